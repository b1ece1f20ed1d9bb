"""The tests: ``tests/unit`` (pure modules, no database, no socket), ``tests/integration``
(against a real PostgreSQL, the daemon, an SSH server, a browser) and their support modules,
``tests/support``. The integration fixtures are loaded by ``tests/integration/conftest.py``,
so ``pytest tests/unit`` imports none of them (tests/unit/test_isolation.py checks it)."""

import pytest

# Plain asserts in the support modules report their values as the tests' own do (pytest
# rewrites the asserts of test modules and conftests only; this adds tests.support.*).
pytest.register_assert_rewrite("tests.support")
