"""pgbridge: a PostgreSQL to WebSocket real-time bridge (``pgbridge run``, ``setup_db.py``).

The names below are its Python API, importable from here (``from daemon import
setup_database, TunnelError``). They are loaded on first use (PEP 562), so that ``import
daemon`` and the command line, which import this package first, load nothing they do not need
(the CLI reaches its error boundary even without the dependencies installed; start-up memory,
docs/topics/fan-out-cost.md).

* :func:`setup_database` (:mod:`daemon.setup_api`): spec 003's ``setupDatabase(isTest)`` with its
  SSH tunnel, as an async context manager yielding a psycopg pool
  (docs/howto/programmatic-setup.md);
* the errors it raises (:mod:`daemon.errors`): :class:`BridgeError`, the root, and
  :class:`ConfigError`, :class:`DatabaseError`, :class:`SchemaError`, :class:`TunnelError`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import BridgeError, ConfigError, DatabaseError, SchemaError, TunnelError
    from .setup_api import setup_database

__all__ = ["BridgeError", "ConfigError", "DatabaseError", "SchemaError", "TunnelError",
           "setup_database"]

_HOME = {"setup_database": "setup_api", "BridgeError": "errors", "ConfigError": "errors",
         "DatabaseError": "errors", "SchemaError": "errors", "TunnelError": "errors"}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
