"""clients/js/package.json (the npm package ``@pgbridge/client``) is versioned with the project
and ships only the client's files; the wheel holds only the files the daemon serves."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from daemon.web import ROUTES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = json.loads((ROOT / "clients/js/package.json").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_npm_package_has_the_version_of_the_project() -> None:
    assert PACKAGE["version"] == PYPROJECT["project"]["version"], (
        "clients/js/package.json's version differs from pyproject.toml's [project] version")


def test_the_npm_package_is_an_esm_package_without_runtime_dependencies() -> None:
    assert PACKAGE["name"] == "@pgbridge/client" and PACKAGE["type"] == "module"
    assert "dependencies" not in PACKAGE
    assert PACKAGE["peerDependencies"] == {"react": ">=18"}
    assert PACKAGE["peerDependenciesMeta"]["react"]["optional"] is True
    exports = PACKAGE["exports"]
    assert exports["."] == {"types": "./pgbridge.d.ts", "default": "./pgbridge.js"}
    assert exports["./react"] == {"types": "./react.d.ts", "default": "./react.js"}
    assert all(next(iter(e)) == "types" for e in (exports["."], exports["./react"])), (
        "`types` must come first in each entry to be seen")
    shipped = {re.sub(r"^\./", "", p) for entry in exports.values()
               for p in (entry.values() if isinstance(entry, dict) else [entry])}
    assert shipped - {"package.json"} <= set(PACKAGE["files"])


def test_the_wheel_holds_exactly_the_files_the_daemon_serves() -> None:
    included = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    web = {src.removeprefix("clients/js/"): dest for src, dest in included.items()
           if src.startswith("clients/js")}
    served = {name for name, _type, _demo in ROUTES.values()}
    assert set(web) == served, "pyproject.toml's force-include and daemon/web.py's ROUTES differ"
    assert all(dest == f"daemon/web/{name}" for name, dest in web.items())
