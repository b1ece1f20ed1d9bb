"""The SQL files of the pgbridge schema (``sql/``), read with :mod:`importlib.resources` from
the installed package (``daemon/sql`` in a wheel) or from the checkout's top-level ``sql/``:
``schema.sql`` (:func:`schema_sql`), ``migrations/NNNN_name.sql`` (:func:`load_migrations`) and
``triggers/*.sql`` (:func:`trigger_files`).

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

__all__ = ["Migration", "load_migrations", "schema_sql", "sql_dir_path", "trigger_files"]


def _sql_dir() -> Traversable:
    packaged = resources.files("daemon") / "sql"
    if packaged.is_dir():
        return packaged
    return resources.files("daemon").joinpath("..", "sql")  # a source checkout


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _read_dir(directory: Traversable) -> list[tuple[str, str]]:
    files = sorted((f.name, f) for f in directory.iterdir() if f.name.endswith(".sql"))
    return [(name, f.read_text(encoding="utf-8")) for name, f in files]


def load_migrations() -> list[Migration]:
    """The files of ``sql/migrations/`` in version order. Raises :class:`SchemaError` for a
    file not named ``NNNN_name.sql`` or a repeated version."""
    result: list[Migration] = []
    for name, text in _read_dir(_sql_dir() / "migrations"):
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", name)
        if not match:
            raise SchemaError(f"sql/migrations/{name}: migration files must be named NNNN_name.sql")
        result.append(Migration(int(match.group(1)), match.group(2), text))
    versions = [m.version for m in result]
    if len(set(versions)) != len(versions):
        raise SchemaError("sql/migrations/: two migration files share a version number")
    return result


def schema_sql() -> str:
    return (_sql_dir() / "schema.sql").read_text(encoding="utf-8")


def trigger_files() -> list[tuple[str, str]]:
    return _read_dir(_sql_dir() / "triggers")


def sql_dir_path() -> Path:
    """Filesystem path of the SQL directory (for messages and tests)."""
    return Path(str(_sql_dir()))
