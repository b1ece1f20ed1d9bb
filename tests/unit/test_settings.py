"""Unit tests of :mod:`daemon.settings`, settings from the environment, no I/O (the environment
is a dict passed in): every parse error is a :class:`~daemon.errors.ConfigError` naming the
variable, and the reprs of the database and SSH settings hide passwords and passphrases. The
``PGBRIDGE_ALLOWED_ORIGINS`` variable is covered with the allowlist in ``test_allowlist.py``."""

from __future__ import annotations

import pytest

from daemon.errors import ConfigError
from daemon.settings import DaemonSettings, DatabaseSettings, SSHSettings


def test_settings_errors_name_the_variable() -> None:
    for env, name in [({"PGBRIDGE_PORT": "http"}, "PGBRIDGE_PORT"),
                      ({"PGBRIDGE_RETENTION": "a week"}, "PGBRIDGE_RETENTION"),
                      ({"PGBRIDGE_SCHEMA": "Robert'); DROP"}, "PGBRIDGE_SCHEMA"),
                      ({"PGBRIDGE_LOG_LEVEL": "loud"}, "PGBRIDGE_LOG_LEVEL"),
                      ({"PGBRIDGE_EVENT_LOOP": "trio"}, "PGBRIDGE_EVENT_LOOP"),
                      ({"PGBRIDGE_HEARTBEAT": "0"}, "PGBRIDGE_HEARTBEAT")]:
        with pytest.raises(ConfigError, match=name):
            DaemonSettings.from_env(env)
    with pytest.raises(ConfigError, match="SSH_STRICT_HOST_KEY_CHECKING"):
        SSHSettings.from_env({"SSH_HOST": "h", "SSH_STRICT_HOST_KEY_CHECKING": "maybe"})
    assert DaemonSettings.from_env({"PGBRIDGE_RETENTION": "12h"}).retention == 43200
    assert DaemonSettings.from_env({"PGBRIDGE_EVENT_LOOP": "UVLoop"}).event_loop == "uvloop"
    assert DatabaseSettings.from_env({}).embedded
    assert not DatabaseSettings.from_env({"POSTGRES_HOST": "db"}).embedded
    assert "secret" not in repr(DatabaseSettings.from_env({"DATABASE_URL": "postgres://u:secret@h/d"}))
    assert "pw" not in repr(SSHSettings.from_env({"SSH_HOST": "h", "SSH_KEY_PASSPHRASE": "pw"}))
