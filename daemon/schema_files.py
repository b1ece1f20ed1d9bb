"""The SQL files of the pgbridge schema (``sql/``), read with :mod:`importlib.resources` from
the installed package (``daemon/sql`` in a wheel) or from the checkout's top-level ``sql/``:
``schema.sql`` (:func:`schema_sql`), ``migrations/NNNN_name.sql`` each with its down script
``migrations/NNNN_name.down.sql`` (:func:`load_migrations`) and ``triggers/*.sql``
(:func:`trigger_files`).

Why a module of its own: both :mod:`daemon.schema` (which applies the files) and
:mod:`daemon.schema_check` (which checks the migrations' ledger against them) read the files;
reading them needs no database.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import SchemaError

__all__ = ["Created", "Migration", "created_names", "load_migrations", "schema_sql",
           "sql_dir_path", "trigger_files"]


def _sql_dir() -> Traversable:
    packaged = resources.files("daemon") / "sql"
    if packaged.is_dir():
        return packaged
    return resources.files("daemon").joinpath("..", "sql")  # a source checkout


@dataclass(frozen=True)
class Migration:
    """One file of ``sql/migrations/``: ``text`` is applied once (its SHA-256, ``checksum``, is
    recorded in ``schema_migrations``), ``down`` undoes it (``setup_db.py --rollback``,
    :mod:`daemon.rollback`); the down script is not part of the checksum."""

    version: int
    name: str
    text: str
    down: str = ""

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _read_dir(directory: Traversable) -> list[tuple[str, str]]:
    files = sorted((f.name, f) for f in directory.iterdir() if f.name.endswith(".sql"))
    return [(name, f.read_text(encoding="utf-8")) for name, f in files]


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    """The files of ``sql/migrations/`` (or ``directory``) in version order, each paired with
    its down script. Raises :class:`SchemaError` for a file named neither ``NNNN_name.sql`` nor
    ``NNNN_name.down.sql``, a repeated version, a migration without its down script or a down
    script without its migration (spec 003, "Rollback Plan": every migration can be undone)."""
    where = "sql/migrations"
    ups: dict[str, tuple[int, str, str]] = {}
    downs: dict[str, str] = {}
    for name, text in _read_dir(directory or _sql_dir() / "migrations"):
        match = re.fullmatch(r"(\d{4})_(\w+)(\.down)?\.sql", name)
        if not match:
            raise SchemaError(f"{where}/{name}: migration files must be named NNNN_name.sql "
                              "(and its down script NNNN_name.down.sql)")
        stem = f"{match.group(1)}_{match.group(2)}"
        if match.group(3):
            downs[stem] = text
        else:
            ups[stem] = (int(match.group(1)), match.group(2), text)
    for stem in sorted(ups.keys() - downs.keys()):
        raise SchemaError(f"{where}/{stem}.sql has no down script: add {where}/{stem}.down.sql "
                          "(setup_db.py --rollback runs it; a deliberate no-op says why)")
    for stem in sorted(downs.keys() - ups.keys()):
        raise SchemaError(f"{where}/{stem}.down.sql has no migration {where}/{stem}.sql")
    result = [Migration(version, name, text, downs[stem])
              for stem, (version, name, text) in sorted(ups.items())]
    versions = [m.version for m in result]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"{where}/: two migration files share a version number")
    return result


def schema_sql() -> str:
    return (_sql_dir() / "schema.sql").read_text(encoding="utf-8")


def trigger_files() -> list[tuple[str, str]]:
    return _read_dir(_sql_dir() / "triggers")


# "CREATE [OR REPLACE] [UNIQUE] <kind> [IF NOT EXISTS] <name>", comments left out beforehand
_CREATE = re.compile(
    r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:UNIQUE\s+)?(TABLE|SEQUENCE|INDEX|VIEW|MATERIALIZED\s+VIEW"
    r"|FUNCTION|PROCEDURE|AGGREGATE|TYPE|DOMAIN)\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)",
    re.IGNORECASE)


@dataclass(frozen=True)
class Created:
    """Names of the objects the files create in the target schema, by catalog:
    ``relations`` (``pg_class``: tables, sequences, indexes, views), ``functions``
    (``pg_proc``: functions, procedures, aggregates) and ``types`` (``pg_type``: types,
    domains)."""

    relations: frozenset[str]
    functions: frozenset[str]
    types: frozenset[str]


def created_names() -> Created:
    """What ``schema.sql``, the migrations (up scripts) and the trigger files create, read from
    their ``CREATE`` statements: the names the apply would adopt if another role made them
    first (:func:`daemon.schema_check.adoption_problems`). Names are lower case."""
    texts = [schema_sql(), *(m.text for m in load_migrations()),
             *(text for _, text in trigger_files())]
    found: dict[str, set[str]] = {"relations": set(), "functions": set(), "types": set()}
    for text in texts:
        for kind, name in _CREATE.findall(re.sub(r"--[^\n]*", "", text)):
            kind = kind.upper()
            catalog = ("functions" if kind in ("FUNCTION", "PROCEDURE", "AGGREGATE") else
                       "types" if kind in ("TYPE", "DOMAIN") else "relations")
            found[catalog].add(name.lower())
    return Created(**{k: frozenset(v) for k, v in found.items()})


def sql_dir_path() -> Path:
    """Filesystem path of the SQL directory (for messages and tests)."""
    return Path(str(_sql_dir()))
