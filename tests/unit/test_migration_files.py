"""The migrations' files (daemon/schema_files.py): each ``NNNN_name.sql`` is paired with its down
script ``NNNN_name.down.sql`` (setup_db.py --rollback runs it; spec 003, "Rollback Plan"), so a
migration cannot land without one. Read from a directory of files, no database."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import SchemaError
from daemon.schema_files import load_migrations


def write(directory: Path, **files: str) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_each_migration_is_paired_with_its_down_script_in_version_order(tmp_path: Path) -> None:
    write(tmp_path, **{"0002_b.sql": "up b", "0002_b.down.sql": "down b",
                       "0001_a.sql": "up a", "0001_a.down.sql": "down a"})
    migrations = load_migrations(tmp_path)
    assert [(m.version, m.name, m.text, m.down) for m in migrations] == [
        (1, "a", "up a", "down a"), (2, "b", "up b", "down b")]


def test_the_checksum_is_of_the_migration_alone(tmp_path: Path) -> None:
    """A down script added to an installed migration does not change its recorded checksum."""
    write(tmp_path, **{"0001_a.sql": "up a", "0001_a.down.sql": "down a"})
    first = load_migrations(tmp_path)[0].checksum
    (tmp_path / "0001_a.down.sql").write_text("another down", encoding="utf-8")
    assert load_migrations(tmp_path)[0].checksum == first


def test_a_migration_without_its_down_script_is_refused(tmp_path: Path) -> None:
    write(tmp_path, **{"0001_a.sql": "up a", "0001_a.down.sql": "down a", "0002_b.sql": "up"})
    with pytest.raises(SchemaError, match=r"0002_b\.sql has no down script: add "
                       r"sql/migrations/0002_b\.down\.sql"):
        load_migrations(tmp_path)


def test_a_down_script_without_its_migration_is_refused(tmp_path: Path) -> None:
    write(tmp_path, **{"0001_a.sql": "up a", "0001_a.down.sql": "down a",
                       "0003_c.down.sql": "down c"})
    with pytest.raises(SchemaError, match=r"0003_c\.down\.sql has no migration"):
        load_migrations(tmp_path)


@pytest.mark.parametrize("name", ["1_a.sql", "0001-a.sql", "0001_a.up.sql", "0001_a.down.txt.sql"])
def test_a_file_named_otherwise_is_refused(tmp_path: Path, name: str) -> None:
    write(tmp_path, **{"0001_a.sql": "up", "0001_a.down.sql": "down", name: "x"})
    with pytest.raises(SchemaError, match=r"must be named NNNN_name\.sql"):
        load_migrations(tmp_path)


def test_the_shipped_migrations_all_have_down_scripts() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations and all(m.down.strip() for m in migrations)
