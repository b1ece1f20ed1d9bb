"""The shared fixtures live in a plugin module, :mod:`tests.fixtures`, imported like any module
by the tests that need its helpers (``running_bridge``, ``conninfo_env``, ...), rather than from
this file."""

pytest_plugins = ["tests.fixtures"]
