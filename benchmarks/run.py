"""Run the benchmark suite (the same as `tbptt bench`); arguments are passed through.

    python benchmarks/run.py --full --out benchmarks/results/cpu-full.md
    python benchmarks/run.py --full --device cuda --out benchmarks/results/cuda-full.md
"""

from __future__ import annotations

import sys

from tbptt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
