"""Unit tests of :mod:`daemon.settings_table`, the one declaration of every setting (issue 26):
the files rendered from it are up to date, the parser and the dataclasses agree with it, and the
defaults are those pgbridge had before the table (so moving them into it changed none)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from dotenv import dotenv_values

from daemon.errors import ConfigError
from daemon.origins import Allowlist
from daemon.settings import DaemonSettings, DatabaseSettings, SSHSettings
from daemon.settings_table import (
    ENV_EXAMPLE,
    REFERENCE_PAGE,
    REGENERATE,
    SETTINGS,
    Setting,
    env_example,
    reference_page,
)

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"database": DatabaseSettings, "ssh": SSHSettings, "daemon": DaemonSettings}
NOT_SETTINGS = {"embedded", "max_frame_bytes"}  # fields no variable fills


@pytest.mark.parametrize(("path", "render"), [(REFERENCE_PAGE, reference_page),
                                              (ENV_EXAMPLE, env_example)])
def test_generated_file_matches_the_settings_table(path: Path,
                                                  render: Callable[[], str]) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    assert text == render(), (f"{path} differs from what daemon/settings_table.py renders; "
                              f"regenerate it with: .venv/bin/{REGENERATE}")


def test_every_field_has_one_variable_and_every_variable_a_field() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for group, cls in CLASSES.items():
        fields = {f.name for f in dataclasses.fields(cls)} - NOT_SETTINGS
        attrs = [s.attr for s in SETTINGS if s.group == group]
        assert sorted(fields) == sorted(a for a in attrs if a), group
    for s in SETTINGS:
        assert s.attr is None if s.group == "tests" else s.attr
        assert s.default is None or s.unset == "", f"{s.name}: a default and an unset text"
        assert s.kind != "choice" or s.default in s.choices, s.name


def test_daemon_fields_are_named_after_their_variables() -> None:
    renamed = {"allowed_origins": "PGBRIDGE_ALLOWED_ORIGINS",
               "public_origins": "PGBRIDGE_PUBLIC_ORIGIN"}
    for s in SETTINGS:
        if s.group == "daemon" and s.attr:
            assert s.name == renamed.get(s.attr, f"PGBRIDGE_{s.attr.upper()}")


def test_dataclass_defaults_are_the_parsed_table_defaults() -> None:
    assert DaemonSettings.from_env({}) == DaemonSettings()
    assert DatabaseSettings.from_env({}) == DatabaseSettings(embedded=True)
    assert SSHSettings.from_env({"SSH_HOST": "h"}) == SSHSettings(host="h")


def test_defaults_are_those_before_the_table() -> None:
    assert dataclasses.asdict(DaemonSettings()) == dataclasses.asdict(DaemonSettings(
        host="127.0.0.1", port=8080, jwt_secret=None, jwt_audience=None, jwt_issuer=None,
        allowed_origins=Allowlist(), public_origins=frozenset(), access_check_interval=30.0,
        schema="public", queue_size=1000, send_timeout=5.0, send_buffer=65536,
        max_subscriptions=100, rate_limit=50.0, rate_burst=100, subscribe_rate=5.0,
        subscribe_burst=100, user_subscribe_rate=10.0, user_subscribe_burst=300,
        max_connections=10000, max_connections_per_user=20, max_frame_bytes=65536,
        heartbeat=20.0, retention=604800.0, prune_interval=300.0, ack_flush_interval=1.0,
        probe_interval=10.0, pool_size=10, log_level="INFO", demo=None, presence_grace=15.0,
        presence_lease=30.0, doorbell="adaptive", doorbell_quiet_above=500.0,
        poll_interval=0.01, event_loop="auto"))
    for name, value in dataclasses.asdict(DaemonSettings()).items():
        if isinstance(value, float):
            assert type(getattr(DaemonSettings.from_env({}), name)) is float, name
    database = DatabaseSettings.from_env({})
    assert (database.host, database.port, database.data_dir) == ("localhost", 5432,
                                                                 Path(".pgbridge"))
    ssh = SSHSettings(host="h")
    assert (ssh.port, ssh.user, ssh.key_path, ssh.strict_host_key_checking, ssh.max_retries,
            ssh.retry_delay) == (22, None, None, True, 3, 1.0)
    assert ssh.known_hosts == Path("~/.ssh/known_hosts").expanduser()


def _outside(value: float, integer: bool) -> str:
    return str(int(value)) if integer else f"{value}s"


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.group != "tests"
                                     and (s.minimum, s.maximum, s.above) != (None,) * 3],
                         ids=lambda s: s.name)
def test_each_bound_is_enforced_with_the_variable_named(setting: Setting) -> None:
    integer = setting.kind in ("integer", "rate")
    step = 1 if integer else 0.0001
    cases = []
    if setting.minimum is not None:
        cases.append(setting.minimum - step)
    if setting.above is not None:
        cases.append(setting.above)
    if setting.maximum is not None:
        cases.append(setting.maximum + step)
    env = {"SSH_HOST": "h"} if setting.group == "ssh" else {}
    cls = CLASSES[setting.group]
    for value in cases:
        if value < 0:  # a negative number is no integer or duration to begin with
            continue
        with pytest.raises(ConfigError, match=f"^{setting.name}=") as caught:
            cls.from_env(env | {setting.name: _outside(value, integer)})  # type: ignore[attr-defined]
        assert "\n" not in str(caught.value)
        assert setting.bounds() in str(caught.value)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.kind == "secret"],
                         ids=lambda s: s.name)
def test_secrets_stay_out_of_the_reprs(setting: Setting) -> None:
    secret = "s3cret-" * 6
    settings = CLASSES[setting.group].from_env(  # type: ignore[attr-defined]
        {"SSH_HOST": "h", setting.name: secret})
    assert getattr(settings, setting.attr or "") == secret
    assert "s3cret" not in repr(settings)


def test_the_env_example_parses() -> None:
    env = {k: v for k, v in dotenv_values(ROOT / ENV_EXAMPLE).items() if v is not None}
    assert env["POSTGRES_HOST"] == "db.internal"
    database = DatabaseSettings.from_env(env)
    assert not database.embedded
    assert DaemonSettings.from_env(env).public_origins == {("https", "chat.example.com", 443)}
    assert SSHSettings.from_env(env) is None  # the tunnel is commented out
