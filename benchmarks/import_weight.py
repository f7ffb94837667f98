"""How much `import gag_export.runtime` (and the other entry points) loads: seconds, package modules,
modules in all, and which heavy libraries come with it. Each import runs in a fresh interpreter,
`--repeat` times; the median is printed. Point `--root` at another checkout to compare layouts:

    python benchmarks/import_weight.py                      # this checkout
    python benchmarks/import_weight.py --root /tmp/old      # e.g. a worktree of an older commit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import importlib, json, sys, time
start = time.perf_counter()
importlib.import_module(sys.argv[1])
seconds = time.perf_counter() - start
mods = list(sys.modules)
heavy = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "polygraphy", "diffusers", "transformers",
         "matplotlib", "tritonclient", "numpy")
print(json.dumps({"seconds": seconds, "package": sum(m == "gag_export" or m.startswith("gag_export.") for m in mods),
                  "all": len(mods), "heavy": [h for h in heavy if h in sys.modules],
                  "build_side": sorted({m.split(".")[1] for m in mods if m.startswith("gag_export.")
                                        and m.split(".")[1] in ("export", "check", "engine", "workflows")}),
                  "file": sys.modules["gag_export"].__file__}))
"""
MODULES = ("gag_export.runtime", "gag_export.serving.client", "gag_export.serving")


def measure(module: str, root: Path, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE, module], env=env, cwd=root, check=True,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(repeat)]
    first = runs[0]
    return {**first, "seconds": statistics.median(r["seconds"] for r in runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for module in MODULES:
        r = measure(module, args.root.resolve(), args.repeat)
        if not r["file"].startswith(str(args.root.resolve())):
            raise SystemExit(f"imported {r['file']}, not the checkout at {args.root}")
        print(f"{module:28s} {r['seconds']:.2f} s  {r['package']:3d} package modules  {r['all']:5d} in all  "
              f"heavy: {', '.join(r['heavy']) or '-'}  build side: {', '.join(r['build_side']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
