#!/usr/bin/env python3
"""What the JavaScript client costs a page: minified and minified + gzip bytes of the core
entry (clients/js/pgbridge.js) and, when present, of the React entry (clients/js/react.js),
next to two other real-time clients (docs/benchmarks/bundle-size.md).

    python -m bench.bundle_size [--esbuild-version 0.25] [--dir clients/js]

esbuild (``npm install esbuild@VERSION`` into a temporary directory, removed after) bundles and
minifies each entry as an ES module for browsers (``--bundle --minify --format=esm``):

* core: pgbridge.js alone (it imports nothing);
* react: react.js with ``react`` and ``./pgbridge.js`` left out (``--external``): what the React
  entry adds to a page that has the core;
* core + react: a module that re-exports both entries, ``react`` left out: a page that uses
  both.

gzip is zlib's at level 9 (``gzip -9``). The figures of centrifuge-js and
@supabase/realtime-js are the ones issue 28 gives (minified + gzip), not measured here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
GIVEN = (("centrifuge-js", 23.6), ("@supabase/realtime-js", 16.9))  # KB, min + gzip (given)


def esbuild(tool: Path, entry: Path, *external: str) -> bytes:
    args = [str(tool), str(entry), "--bundle", "--minify", "--format=esm",
            "--platform=browser", "--log-level=warning",
            *(f"--external:{name}" for name in external)]
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bundle_size: esbuild failed on {entry.name}: {done.stderr.decode()}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--esbuild-version", default="0.25", help="esbuild to install (0.25)")
    parser.add_argument("--dir", type=Path, default=JS,
                        help="the directory of pgbridge.js and react.js (clients/js)")
    args = parser.parse_args()
    js = args.dir.resolve()
    npm = shutil.which("npm")
    if not npm:
        raise SystemExit("bundle_size: needs npm (Node >= 20)")
    with tempfile.TemporaryDirectory(prefix="pgbridge-esbuild-") as tmp:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent",
                               f"esbuild@{args.esbuild_version}"], cwd=tmp, capture_output=True,
                              check=False)
        if done.returncode != 0:
            raise SystemExit(f"bundle_size: npm install esbuild failed: {done.stderr.decode()}")
        tool = Path(tmp) / "node_modules" / ".bin" / "esbuild"
        version = subprocess.run([str(tool), "--version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        rows = [("core (pgbridge.js)", esbuild(tool, js / "pgbridge.js"))]
        if (js / "react.js").exists():
            rows.append(("react (react.js, without core)",
                         esbuild(tool, js / "react.js", "react", "./pgbridge.js")))
            both = Path(tmp) / "both.js"  # a page that uses both entries
            both.write_text(f"export * from {json.dumps(str(js / 'pgbridge.js'))};\n"
                            f"export * from {json.dumps(str(js / 'react.js'))};\n")
            rows.append(("core + react", esbuild(tool, both, "react")))
    print(f"esbuild {version}, --bundle --minify --format=esm; gzip -9")
    print(f"{'entry':34} {'source':>9} {'minified':>9} {'min+gzip':>9}")
    source = {"core (pgbridge.js)": js / "pgbridge.js",
              "react (react.js, without core)": js / "react.js"}
    for name, body in rows:
        src = source.get(name)
        size = f"{src.stat().st_size:,}" if src else "-"
        gz = len(gzip.compress(body, compresslevel=9, mtime=0))
        print(f"{name:34} {size:>9} {len(body):>9,} {gz:>9,}  ({gz / 1000:.1f} KB)")
    if not (js / "react.js").exists():
        print(f"react: no react.js in {js}")
    for name, kb in GIVEN:
        print(f"{name:34} {'':>9} {'':>9} {kb * 1000:>9,.0f}  ({kb} KB, given in issue 28, "
              "not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
