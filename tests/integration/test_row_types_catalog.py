"""clients/js/scripts/row_types.py reads the row types from the SQL text (sql/schema.sql, then
the migrations' ADD COLUMNs); this holds it to the catalog of a database the schema was applied
to: every published table has the same columns, in the same order, with the same nullability
and a JSON type that matches the column's type."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.unit.test_row_types import load

# information_schema's data_type -> the TypeScript type of its to_jsonb (the literal unions of
# CHECK constraints are strings)
CATALOG_TYPES = {"character varying": "string", "text": "string", "character": "string",
                 "timestamp with time zone": "string", "uuid": "string", "bigint": "number",
                 "integer": "number", "smallint": "number", "numeric": "number",
                 "boolean": "boolean", "jsonb": "Json", "json": "Json"}


async def test_the_generated_rows_match_the_catalog(db_url: str) -> None:
    rows = load().published_rows()
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT table_name, column_name, is_nullable = 'YES', data_type "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name = ANY(%s) ORDER BY table_name, ordinal_position", [list(rows)])
        catalog: dict[str, list[Any]] = {}
        for table, column, nullable, data_type in await cur.fetchall():
            catalog.setdefault(table, []).append((column, nullable, CATALOG_TYPES[data_type]))
    generated = {table: [(c.name, c.nullable, "string" if c.ts_type.startswith('"')
                          else c.ts_type) for c in columns.values()]
                 for table, columns in rows.items()}
    assert generated == catalog
