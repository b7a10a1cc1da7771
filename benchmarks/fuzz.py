"""The property-based fuzz of issue 20 run long: the targets of tests/fuzz_targets.py with N examples each.

    python benchmarks/fuzz.py --examples 5000 [--target safetensors ...] [--seed 0]

Prints JSON: per target the examples asked, seconds, and the first failure (the shrunk input and the error) or
null. Exit 1 when any target failed. The default suite (tests/unit/test_fuzz.py) runs the same targets for a
few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzz_targets import TARGETS  # noqa: E402  (tests/ is not a package; pytest puts it on the path the same way)


def run_target(name: str, examples: int, random_seed: int) -> dict[str, Any]:
    """Run one target; return ``{examples, seconds, failure}`` with the failing input (repr) when there is one."""
    strategy, check = TARGETS[name]
    failing: list[str] = []

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(value: Any) -> None:
        try:
            check(value)
        except Exception:
            failing[:] = [repr(value)[:2000]]  # the last call before hypothesis re-raises is the shrunk input
            raise

    start = time.perf_counter()
    failure = None
    try:
        run()
    except Exception as exc:  # report every kind: finding them is the point
        failure = {"input": failing[-1] if failing else None, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"examples": examples, "seconds": round(time.perf_counter() - start, 2), "failure": failure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="examples per target")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {name: run_target(name, args.examples, args.seed) for name in args.target or sorted(TARGETS)}
    print(json.dumps({"examples_per_target": args.examples, "seed": args.seed, "targets": results}, indent=2))
    sys.exit(1 if any(r["failure"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
