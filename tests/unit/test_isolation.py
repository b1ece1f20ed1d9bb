"""The unit tests load none of the integration tests' support: their fixtures (a PostgreSQL, the
daemon, an SSH server, a browser) are loaded by tests/integration/conftest.py, which pytest
reads only when it collects tests/integration/.

When this process has none of that support loaded, that is the answer. When it has (it also
collected the integration tests, as CI's full run does, or the unit tests leak), a fresh
interpreter collects tests/unit/ alone, as ``./dev test tests/unit`` does, and is asked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imported by the integration support only: none may be loaded by the unit tests.
INTEGRATION_ONLY = ("asyncssh", "selenium", "tests.support.fixtures", "tests.support.trust",
                    "tests.support.procs", "tests.support.helpers", "tests.support.browser",
                    "tests.support.pgcluster", "tests.support.proxy", "tests.support.sshd",
                    "tests.support.fuzz_strategies", "tests.support.nats",
                    # the daemon imports nats-py only with a broker configured
                    "nats")

COLLECT = """
import json, sys
import pytest
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/unit"])
print("MODULES " + json.dumps(sorted(sys.modules)))
sys.exit(int(code))
"""


def integration_support(modules: Iterable[str]) -> list[str]:
    """The names of :data:`INTEGRATION_ONLY` among ``modules`` (a package for its submodules)."""
    return sorted({m if m in INTEGRATION_ONLY else m.split(".")[0] for m in modules
                   if m in INTEGRATION_ONLY or m.split(".")[0] in INTEGRATION_ONLY})


def test_the_unit_tests_load_no_integration_support() -> None:
    if not integration_support(sys.modules):
        return  # nothing here loaded it, whatever this run collected
    result = subprocess.run([sys.executable, "-c", COLLECT], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("MODULES "))
    loaded = set(json.loads(line.removeprefix("MODULES ")))
    # the probe sees what collection imports (test modules by their base name: no __init__.py)
    assert "test_hub" in loaded, sorted(m for m in loaded if m.startswith(("test", "tests")))
    leaked = integration_support(loaded)
    assert not leaked, f"collecting tests/unit alone imported integration support: {leaked}"
