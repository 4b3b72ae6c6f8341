"""Time ``pathfactor demo`` end to end (a fresh process, as a user runs it) and read its G2M AUROC.
Prints one JSON line.

    python experiments/mesc_demo.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="pathfactor-demo-")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pathfactor", "demo", "--quiet", "--out", out],
                         capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    auroc = float(re.search(r"G2M vs other cells: ([0-9.]+)", run.stdout).group(1))
    print(json.dumps({"command": "pathfactor demo", "seconds_wall": round(seconds, 1), "auroc_g2m": auroc,
                      "out": out, "stdout": run.stdout.splitlines()}, indent=1))


if __name__ == "__main__":
    main()
