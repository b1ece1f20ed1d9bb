"""The integration tests' fixtures, defined in :mod:`tests.support.fixtures` (a PostgreSQL,
databases, bridges, an SSH server), :mod:`tests.support.trust` (the database roles), where the
tests also import their helpers from (``running_bridge``, ``conninfo_env``, ...), and
:mod:`tests.support.nats` (a NATS server of the test's own). Imported here, the fixtures exist
for the tests under tests/integration only, and pytest reads this file only when it collects
them: ``pytest tests/unit`` loads none of it."""

from tests.support.fixtures import (
    bridge,
    conn,
    create_database,
    db_url,
    fresh_db,
    pg_server_conninfo,
    proxied_bridge,
    sshd,
)
from tests.support.nats import nats_server
from tests.support.trust import attacker, make_role, roles, trust_db

__all__ = ["attacker", "bridge", "conn", "create_database", "db_url", "fresh_db",
           "make_role", "nats_server", "pg_server_conninfo", "proxied_bridge", "roles", "sshd",
           "trust_db"]
