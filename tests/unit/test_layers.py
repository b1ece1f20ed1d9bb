"""The layer contract of daemon/ (docs/contributing.md, "Lint and types"), as pyproject.toml
[tool.importlinter] states it: the composition root (``__main__``, ``cli``, ``app``) over the
I/O modules over the pure ones; no module imports one of a higher layer, no pure module imports
an I/O package, and no module imports another that imports it back, however indirectly
(``TYPE_CHECKING`` imports count: a base class that names its own subclass is a cycle too).

Run here so that ``./dev test`` (so CI) checks it: import-linter's own report is the failure
message. A second check makes the contract cover every module: each module of daemon/ is in
exactly one layer, so a new module cannot slip past it unclassified.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LAYER_NAMES = ("composition root", "I/O", "pure")  # the contract's layers, top down
WHERE = 'pyproject.toml, [[tool.importlinter.contracts]] id = "layers"'


def contract(config: dict[str, Any], contract_id: str) -> dict[str, Any]:
    contracts = config["tool"]["importlinter"]["contracts"]
    found = [c for c in contracts if c.get("id") == contract_id]
    assert len(found) == 1, f"{PYPROJECT}: expected one contract with id = {contract_id!r}"
    return found[0]


def layers(config: dict[str, Any]) -> dict[str, list[str]]:
    """The modules of each layer (names within daemon), by layer name."""
    lines = contract(config, "layers")["layers"]
    assert len(lines) == len(LAYER_NAMES), (
        f"{WHERE}: expected {len(LAYER_NAMES)} layers ({', '.join(LAYER_NAMES)}), "
        f"found {len(lines)}")
    return {name: [m.strip() for m in line.split(":")]
            for name, line in zip(LAYER_NAMES, lines, strict=True)}


def daemon_modules() -> list[str]:
    """Every module of daemon/ by its name within the package (``listener``, ``web``; a
    subpackage by its own name), from the files: what grimp would find."""
    package = ROOT / "daemon"
    names = [p.stem for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [p.parent.name for p in package.glob("*/__init__.py")]
    return sorted(names)


def unclassified(listed: dict[str, list[str]], modules: list[str]) -> list[str]:
    """One line per module of ``modules`` that is in no layer or in more than one."""
    problems = []
    for module in modules:
        homes = [name for name, members in listed.items() if module in members]
        if not homes:
            problems.append(
                f"daemon.{module} (daemon/{module}.py) is in no layer: add {module!r} to the "
                f"I/O layer of {WHERE} if it does I/O (a socket, the database, SSH, a file, the "
                f"environment, stderr), else to the pure layer (and then to source_modules of "
                f'id = "pure-no-io-packages" as "daemon.{module}")')
        elif len(homes) > 1:
            problems.append(f"daemon.{module} is in {len(homes)} layers ({', '.join(homes)}) "
                            f"of {WHERE}: keep it in one")
    return problems


def test_every_module_of_daemon_is_in_exactly_one_layer() -> None:
    config = tomllib.loads(PYPROJECT.read_text())
    problems = unclassified(layers(config), daemon_modules())
    assert not problems, "\n".join(problems)


def test_the_pure_layer_and_the_sources_of_the_package_contract_agree() -> None:
    """The pure modules are named twice in pyproject.toml (a layer, and the sources of the
    contract that forbids them I/O packages: TOML has no references); they must agree."""
    config = tomllib.loads(PYPROJECT.read_text())
    pure = {f"daemon.{m}" for m in layers(config)["pure"]}
    sources = set(contract(config, "pure-no-io-packages")["source_modules"])
    assert sources == pure, (
        f'pyproject.toml: source_modules of id = "pure-no-io-packages" must be the pure layer of '
        f"{WHERE}; only in the layer: {sorted(pure - sources)}, only in source_modules: "
        f"{sorted(sources - pure)}")


def test_unclassified_module_is_named_with_where_to_add_it() -> None:
    """The check above can fail, and says which module and where."""
    problems = unclassified({"composition root": ["app"], "I/O": ["db"], "pure": ["hub", "db"]},
                            ["app", "db", "hub", "fresh"])
    assert problems[0].startswith("daemon.db is in 2 layers (I/O, pure)")
    assert problems[1].startswith("daemon.fresh (daemon/fresh.py) is in no layer: add 'fresh' "
                                  f"to the I/O layer of {WHERE}")
    assert len(problems) == 2


def test_daemon_keeps_its_import_contracts() -> None:
    """lint-imports on pyproject.toml's contracts (no cache: nothing written to the checkout)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", str(PYPROJECT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{report}"
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", report)
    assert kept and kept.group(2) == "0" and int(kept.group(1)) >= 2, report
