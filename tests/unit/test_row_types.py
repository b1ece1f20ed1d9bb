"""The row types of the JavaScript client (clients/js/pgbridge.d.ts's generated block and
clients/js/rows.d.ts) are those clients/js/scripts/row_types.py generates from sql/ now: a
change of a published table without regenerating them fails here, naming the command."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from daemon.schema_check import PUBLISHED

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "clients" / "js" / "scripts" / "row_types.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("row_types", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["row_types"] = module
    spec.loader.exec_module(module)
    return module


def test_the_row_types_match_sql_schema() -> None:
    row_types = load()
    dts, rows = row_types.render()
    assert (ROOT / "clients/js/pgbridge.d.ts").read_text() == dts and (
        ROOT / "clients/js/rows.d.ts").read_text() == rows, (
        f"clients/js/pgbridge.d.ts or rows.d.ts is stale: run {row_types.COMMAND}")


def test_the_typed_tables_are_the_published_ones() -> None:
    row_types = load()
    assert set(row_types.published_tables(ROOT / "sql" / "triggers")) == set(PUBLISHED)


def test_a_row_is_typed_as_to_jsonb_sends_it() -> None:
    block = load().generated_block()
    messages = block[block.index("export interface MessagesRow"):]
    messages = messages[:messages.index("}")]
    for line in ("id: string;", "content: string;", "created_at: string;",
                 "deleted_at: string | null;", "metadata: Json | null;"):
        assert f"  {line}" in messages, (line, messages)
    assert "  size: number;" in block  # files.size BIGINT NOT NULL
    assert '  role: "owner" | "admin" | "member" | "guest";' in block
    assert "  messages: MessagesRow;" in block and "export type TableName = keyof Rows;" in block
    assert "UsersRow" not in block  # users is not published


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "sql", tmp_path / "sql")
    return tmp_path / "sql"


def test_a_column_added_to_the_schema_or_by_a_migration_shows(
        sql_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row_types = load()
    monkeypatch.setattr(row_types, "SQL", sql_copy)
    schema = sql_copy / "schema.sql"
    schema.write_text(schema.read_text().replace(
        "    metadata JSONB\n);",
        "    metadata JSONB,\n    pinned BOOLEAN NOT NULL DEFAULT false\n);"))
    (sql_copy / "migrations" / "9999_weight.sql").write_text(
        "ALTER TABLE reactions ADD COLUMN IF NOT EXISTS weight BIGINT;\n")
    block = row_types.generated_block()
    assert "  pinned: boolean;" in block and "  weight: number | null;" in block


def test_a_migration_that_changes_a_published_row_stops_the_generator(
        sql_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row_types = load()
    monkeypatch.setattr(row_types, "SQL", sql_copy)
    monkeypatch.setattr(row_types, "ROOT", sql_copy.parent)
    (sql_copy / "migrations" / "9999_type.sql").write_text(
        "ALTER TABLE messages ALTER COLUMN content TYPE jsonb USING to_jsonb(content);\n")
    with pytest.raises(row_types.RowTypesError, match="changes the rows of messages"):
        row_types.generated_block()


@pytest.mark.parametrize("statement", [
    "ALTER TABLE reactions ADD weight BIGINT;",  # COLUMN is optional in PostgreSQL
    "ALTER TABLE public.reactions ADD COLUMN weight BIGINT;",
    'ALTER TABLE "reactions" ADD COLUMN IF NOT EXISTS weight BIGINT;',
])
def test_a_column_added_in_any_spelling_of_alter_table_shows(
        sql_copy: Path, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    row_types = load()
    monkeypatch.setattr(row_types, "SQL", sql_copy)
    (sql_copy / "migrations" / "9999_weight.sql").write_text(statement + "\n")
    assert "  weight: number | null;" in row_types.generated_block()


@pytest.mark.parametrize("statement", [
    "ALTER TABLE messages DROP metadata;",  # COLUMN is optional here too
    "ALTER TABLE public.messages DROP COLUMN metadata;",
])
def test_a_column_dropped_in_any_spelling_stops_the_generator(
        sql_copy: Path, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    row_types = load()
    monkeypatch.setattr(row_types, "SQL", sql_copy)
    monkeypatch.setattr(row_types, "ROOT", sql_copy.parent)
    (sql_copy / "migrations" / "9999_drop.sql").write_text(statement + "\n")
    with pytest.raises(row_types.RowTypesError, match="changes the rows of messages"):
        row_types.generated_block()
