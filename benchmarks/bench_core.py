"""Core benchmark figures (issue: Core). Run: python benchmarks/bench_core.py"""

import json

from kvmcore.bench.core import run_all

if __name__ == "__main__":
    print(json.dumps(run_all(), indent=2))
