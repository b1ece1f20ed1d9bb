"""The JavaScript client's own tests (clients/js/test/, ``node --test``), run by pytest so that
``./dev test`` and CI run them: resume, de-duplication, backoff, token refresh, refusals and
acks, driven through a scripted WebSocket in Node. Its behaviour against a real daemon in a
real browser is tests/integration/test_browser_client.py.

Node ≥ 20 is ``PGBRIDGE_NODE`` (default: ``node`` on PATH); without it the test skips, and fails
under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.support.fixtures import ROOT


def node() -> str:
    path = os.environ.get("PGBRIDGE_NODE") or shutil.which("node")
    version = ""
    if path:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = done.stdout.strip()
    match = re.fullmatch(r"v(\d+)\..*", version)
    if not path or not match or int(match.group(1)) < 20:
        reason = f"the JavaScript client's tests need Node >= 20 (found {path or 'no node'} " \
                 f"{version})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so they may not be skipped")
        pytest.skip(reason)
    return path


@pytest.mark.slow
def test_the_javascript_client_passes_its_node_tests() -> None:
    done = subprocess.run([node(), "--test", "clients/js/test/"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    summary = [line for line in done.stdout.splitlines() if line.startswith("# ")]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in summary and not any(line == "# pass 0" for line in summary), summary
