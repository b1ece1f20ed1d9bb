"""The shared fixtures live in plugin modules, :mod:`tests.fixtures` and :mod:`tests.trust` (the
database roles), imported like any module by the tests that need their helpers
(``running_bridge``, ``conninfo_env``, ``setup_room``, ...), rather than from this file."""

pytest_plugins = ["tests.fixtures", "tests.trust"]
