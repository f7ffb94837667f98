"""What checking an export before use costs: every graph hashed (no record yet, or the files
changed) against the record's stat comparison, side by side in one run.

    python benchmarks/bench_verify.py graphs/dmd2 [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gag_export.artifacts.integrity import verify_graphs  # noqa: E402
from gag_export.artifacts.manifest import Manifest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    manifest = Manifest.load(args.graphs_dir)
    size = sum(c["size_bytes"] for c in manifest.components.values())
    cold, warm = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["GAG_EXPORT_CACHE"] = cache  # an empty record: every graph is hashed
            start = time.perf_counter()
            verify_graphs(manifest)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            verify_graphs(manifest)  # the record matches: stat only
            warm.append(time.perf_counter() - start)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{manifest.model}: {len(manifest.components)} graphs, {size / 2**30:.2f} GiB")
    print(f"hashed (no record):   {c:.2f} s  ({size / 2**20 / c:.0f} MiB/s)")
    print(f"recorded (stat only): {w * 1e3:.2f} ms")
    print(f"ratio: {c / w:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
