"""Generate the TypeScript types of the rows that pgbridge publishes, from ``sql/``.

    .venv/bin/python clients/js/scripts/row_types.py --write   # rewrite the generated parts
    .venv/bin/python clients/js/scripts/row_types.py --check   # exit 1 if they are stale

What it writes: the block between the ``BEGIN GENERATED ROWS`` and ``END GENERATED ROWS`` lines
of ``clients/js/pgbridge.d.ts`` (one interface per published table, ``Rows`` and ``TableName``)
and the whole of ``clients/js/rows.d.ts`` (the package's ``./rows`` entry, which re-exports
them). The block lives in pgbridge.d.ts, not in a file of its own, because the daemon serves
pgbridge.d.ts alone at ``/client.d.ts``: a page that downloads it gets types that resolve.

The published tables are those with a capture trigger (``pgbridge_capture``) in
``sql/triggers/``; tests/unit/test_row_types.py checks them against
``daemon.schema_check.PUBLISHED``. Each row is typed as the bridge sends it in an event's
``data``: ``to_jsonb`` of the row (sql/triggers/10_change_capture.sql), so ``bigint`` becomes a
JSON number (a JavaScript ``number``: exact up to 2^53), ``timestamptz`` an ISO 8601 string,
``uuid`` and ``varchar`` strings, ``jsonb`` any JSON value, a nullable column ``T | null``, and a
``CHECK (col IN ('a', 'b'))`` a union of its literals.

Design: the types are read from the SQL text, not from a database's catalog. The check then
needs no PostgreSQL (a unit test, run everywhere in a second), and the text is what a change
edits. The text is not all of the truth, though: ``sql/schema.sql`` creates tables with
``CREATE TABLE IF NOT EXISTS``, so a change to an existing table goes to ``sql/migrations/``.
The migrations' ``ALTER TABLE … ADD COLUMN`` are therefore applied on top, and any other
``ALTER TABLE`` of a published table that would change a row's shape (a type, a nullability, a
dropped or renamed column) stops the generator with an error rather than going unseen;
tests/integration/test_row_types_catalog.py compares the result with the catalog of a database
the schema was applied to. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SQL = ROOT / "sql"
DTS = ROOT / "clients" / "js" / "pgbridge.d.ts"
ROWS = ROOT / "clients" / "js" / "rows.d.ts"
BEGIN = "// BEGIN GENERATED ROWS"
END = "// END GENERATED ROWS"
COMMAND = ".venv/bin/python clients/js/scripts/row_types.py --write"

# SQL type (lower case, without length or precision) -> the TypeScript type of its to_jsonb
JSON_TYPES = {
    "varchar": "string", "character varying": "string", "text": "string", "char": "string",
    "character": "string", "citext": "string", "uuid": "string", "bytea": "string",
    "timestamptz": "string", "timestamp with time zone": "string", "timestamp": "string",
    "timestamp without time zone": "string", "date": "string", "time": "string",
    "interval": "string", "inet": "string",
    "smallint": "number", "integer": "number", "int": "number", "int2": "number",
    "int4": "number", "int8": "number", "bigint": "number", "numeric": "number",
    "decimal": "number", "real": "number", "double precision": "number",
    "boolean": "boolean", "bool": "boolean",
    "jsonb": "Json", "json": "Json",
}
# words that end a column's type in a column definition
CONSTRAINT_WORDS = {"not", "null", "default", "primary", "references", "constraint", "check",
                    "unique", "generated", "collate"}
TABLE_CONSTRAINTS = ("primary key", "unique", "constraint", "check", "foreign key", "exclude")


class RowTypesError(Exception):
    """The SQL holds something the generator cannot type (the message says what and where)."""


@dataclass
class Column:
    name: str
    ts_type: str
    nullable: bool
    note: str  # the SQL type, as written


def strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def split_top(body: str) -> list[str]:
    """``body`` split on the commas outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(body):
        if ch == "'":
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return [" ".join(p.split()) for p in parts if p.strip()]


def table_bodies(text: str) -> dict[str, str]:
    """``CREATE TABLE`` name -> the text between its parentheses."""
    found = {}
    for m in re.finditer(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)\s*\(", text, re.IGNORECASE):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        found[m.group(1).lower()] = text[m.end():i - 1]
    return found


def parse_column(table: str, definition: str) -> Column:
    words = definition.split()
    name = words[0].strip('"')
    type_words = []
    for word in words[1:]:
        if word.lower() in CONSTRAINT_WORDS:
            break
        type_words.append(word)
    sql_type = " ".join(type_words)
    array = sql_type.endswith("[]")
    base = re.sub(r"\s*\(.*?\)", "", sql_type.removesuffix("[]")).lower()
    if base not in JSON_TYPES:
        raise RowTypesError(f"{table}.{name}: no JSON type known for SQL type {sql_type!r} "
                            "(add it to JSON_TYPES in clients/js/scripts/row_types.py)")
    ts_type = JSON_TYPES[base]
    rest = definition[len(" ".join(words[:1 + len(type_words)])):]
    check = re.search(r"CHECK\s*\(\s*" + re.escape(name) + r"\s+IN\s*\(([^)]*)\)\s*\)", rest,
                      re.IGNORECASE)
    if check and ts_type == "string" and not array:
        ts_type = " | ".join('"' + v.strip().strip("'") + '"' for v in check.group(1).split(","))
    if array:
        ts_type = f"Array<{ts_type}>"
    upper = rest.upper()
    nullable = "NOT NULL" not in upper and "PRIMARY KEY" not in upper
    return Column(name, ts_type, nullable, sql_type)


def parse_table(table: str, body: str) -> dict[str, Column]:
    columns: dict[str, Column] = {}
    for part in split_top(body):
        lower = part.lower()
        if lower.startswith(TABLE_CONSTRAINTS):
            key = re.match(r"primary key\s*\(([^)]*)\)", lower)
            for col in key.group(1).split(",") if key else ():
                columns[col.strip()].nullable = False
            continue
        column = parse_column(table, part)
        columns[column.name] = column
    return columns


def published_tables(triggers: Path) -> list[str]:
    """Tables with a capture trigger, in the order the triggers are created."""
    tables: list[str] = []
    for path in sorted(triggers.glob("*.sql")):
        text = strip_comments(path.read_text())
        for m in re.finditer(r"CREATE (?:OR REPLACE )?TRIGGER \w+\s+AFTER [\w\s]+? ON (\w+)\s+"
                             r"FOR EACH ROW EXECUTE FUNCTION pgbridge_capture\(", text,
                             re.IGNORECASE):
            if m.group(1) not in tables:
                tables.append(m.group(1))
    return tables


def apply_migrations(tables: dict[str, dict[str, Column]], published: list[str],
                     migrations: Path) -> None:
    """Apply the migrations' ``ADD COLUMN``s; refuse any other shape change of a published
    table (RowTypesError)."""
    for path in sorted(migrations.glob("*.sql")):
        if path.name.endswith(".down.sql"):
            continue
        text = strip_comments(path.read_text())
        # the table as PostgreSQL takes it: x, "x", public.x; COLUMN is optional after ADD
        # and DROP
        for m in re.finditer(r'ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?:"?public"?\.)?"?(\w+)"?'
                             r"\s+([^;]*);", text, re.IGNORECASE):
            table, action = m.group(1).lower(), " ".join(m.group(2).split())
            if table not in tables:
                continue
            for clause in split_top(action):
                add = re.match(r"ADD (?!(?:CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN|EXCLUDE)\b)"
                               r"(?:COLUMN )?(?:IF NOT EXISTS )?(.*)", clause, re.IGNORECASE)
                if add:
                    column = parse_column(table, add.group(1))
                    tables[table].setdefault(column.name, column)
                elif table in published and re.match(
                        r"(DROP (?!CONSTRAINT\b)|RENAME|ALTER (COLUMN )?\w+ (TYPE|SET DATA TYPE"
                        r"|SET NOT NULL|DROP NOT NULL))", clause, re.IGNORECASE):
                    raise RowTypesError(f"{path.relative_to(ROOT)}: {clause!r} changes the rows "
                                        f"of {table}: teach clients/js/scripts/row_types.py it")


def type_name(table: str) -> str:
    return "".join(part.capitalize() for part in table.split("_")) + "Row"


def published_rows() -> dict[str, dict[str, Column]]:
    """Published table -> its columns (name -> Column) in order, after the migrations; in the
    order of the capture triggers. RowTypesError for what cannot be typed."""
    text = strip_comments((SQL / "schema.sql").read_text())
    tables = {name: parse_table(name, body) for name, body in table_bodies(text).items()}
    published = published_tables(SQL / "triggers")
    missing = [t for t in published if t not in tables]
    if missing:
        raise RowTypesError(f"published but not created by sql/schema.sql: {missing}")
    apply_migrations(tables, published, SQL / "migrations")
    return {table: tables[table] for table in published}


def generated_block() -> str:
    """The text between the markers of pgbridge.d.ts, markers included."""
    rows = published_rows()
    out = [BEGIN, f"// by clients/js/scripts/row_types.py from sql/: run `{COMMAND}`",
           "// after changing the tables; tests/unit/test_row_types.py fails while stale.", "",
           "/** A JSON value (a `jsonb` column). */",
           "export type Json = string | number | boolean | null | Json[] "
           "| { [key: string]: Json };", ""]
    for table, columns in rows.items():
        out.append(f"/** A row of `{table}` as an event's `data` carries it (`to_jsonb`). */")
        out.append(f"export interface {type_name(table)} {{")
        for col in columns.values():
            null = " | null" if col.nullable else ""
            out.append(f"  /** {col.note}{'' if col.nullable else ' NOT NULL'} */")
            out.append(f"  {col.name}: {col.ts_type}{null};")
        out.append("}")
        out.append("")
    out.append("/** The published tables (those with a capture trigger) and their rows. */")
    out.append("export interface Rows {")
    out += [f"  {table}: {type_name(table)};" for table in rows]
    out.append("}")
    out.append("")
    out.append("/** The name of a published table: an event's `table`. */")
    out.append("export type TableName = keyof Rows;")
    out.append(END)
    return "\n".join(out)


def rows_file() -> str:
    names = ["Json", "Rows", "TableName", *map(type_name, published_tables(SQL / "triggers"))]
    listed = ",\n  ".join(names)
    return ("// @pgbridge/client/rows: the row types of the published tables. Generated by\n"
            f"// clients/js/scripts/row_types.py (`{COMMAND}`); do not edit.\n"
            f"export type {{\n  {listed},\n}} from \"./pgbridge.js\";\n")


def render() -> tuple[str, str]:
    """The new texts of pgbridge.d.ts and rows.d.ts."""
    dts = DTS.read_text()
    start, end = dts.find(BEGIN), dts.find(END)
    if start < 0 or end < start:
        raise RowTypesError(f"{DTS.relative_to(ROOT)} lacks the lines {BEGIN!r} and {END!r}")
    return dts[:start] + generated_block() + dts[end + len(END):], rows_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated parts")
    mode.add_argument("--check", action="store_true", help="exit 1 if they are stale")
    args = parser.parse_args(argv)
    try:
        dts, rows = render()
    except RowTypesError as exc:
        print(f"row_types: {exc}", file=sys.stderr)
        return 2
    stale = [p for p, text in ((DTS, dts), (ROWS, rows))
             if not p.exists() or p.read_text() != text]
    if args.write:
        for path, text in ((DTS, dts), (ROWS, rows)):
            path.write_text(text)
        return 0
    for path in stale:
        print(f"row_types: {path.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
