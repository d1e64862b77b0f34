"""Fuzz `perceptcore validate` with 10,000+ structured mutations of the study specs and `--set`
values, or with --data of a synthetic study's data files (the strategies of tests/spec_fuzz.py,
which the suite's fuzz tests run a few hundred of) and print the counts: examples, exit 0, exit 1,
tracebacks, hangs, unlocated messages, overlong messages, leftovers, time.

    python benchmarks/fuzz_spec.py [--examples 10000] [--workers 2] [--seed 0] [--data]

Each worker process draws its share of examples from a fixed seed and runs each in-process in
an empty folder, with a 20-second alarm as the hang detector. The first few problems of each
kind are printed with their example, to reproduce them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import spec_fuzz  # noqa: E402
from synthetic import write_study  # noqa: E402

KINDS = ("traceback", "hang", "exit", "unlocated", "overlong", "leftovers")


def _work(job):
    seed, count, data, files = job
    import random

    from hypothesis import strategies as st

    specs = spec_fuzz.base_specs(Path(data))
    strategy = st.lists(spec_fuzz.data_mutations(), min_size=1, max_size=3) if files else spec_fuzz.examples(specs)
    counts, shown = Counter(), []
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "work"
        for _ in range(count):
            example = _draw(strategy, rng)
            if files:
                outcome = spec_fuzz.run_data_example(example, Path(data), folder)
            else:
                outcome = spec_fuzz.run_example(example, specs, folder)
            counts["examples"] += 1
            counts[f"exit {outcome.code}" if outcome.code in (0, 1) else "exit other"] += 1
            for kind in spec_fuzz.problems(spec_fuzz.DATA_EXAMPLE if files else example, outcome):
                counts[kind] += 1
                if sum(1 for k, _ in shown if k == kind) < 3:
                    shown.append((kind, f"{example!r}\n    -> {outcome.code}: {outcome.err.strip()[-600:]}"))
    return counts, shown


def _draw(strategy, rng):
    """One example from the strategy with a seeded random source (Hypothesis' example() is for
    interactive use and cannot be seeded)."""
    from hypothesis.internal.conjecture.data import ConjectureData

    data = ConjectureData(prefix=b"", random=rng, max_choices=10_000)
    try:
        return data.draw(strategy)
    except Exception:  # noqa: BLE001 - an overrun draw: try again with fresh randomness
        return _draw(strategy, rng)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", action="store_true", help="mutate the study's data files, not its spec")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data:
        study = write_study(Path(data) / "synthetic").parent
        shares = [args.examples // args.workers + (i < args.examples % args.workers) for i in range(args.workers)]
        jobs = [(args.seed * 1000 + i, n, str(study), args.data) for i, n in enumerate(shares)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_work, jobs)
    counts, shown = Counter(), []
    for c, s in results:
        counts.update(c)
        shown += s
    for kind, text in shown:
        print(f"{kind}: {text}")
    print(f"{'data files' if args.data else 'specs'}: examples {counts['examples']}, exit 0 {counts['exit 0']}, exit 1 {counts['exit 1']}, "
          f"other exits {counts['exit other']}, tracebacks {counts['traceback']}, hangs {counts['hang']}, "
          f"unlocated messages {counts['unlocated']}, overlong messages {counts['overlong']}, "
          f"leftovers {counts['leftovers']}, time {time.perf_counter() - started:.0f} s "
          f"({args.workers} worker processes)")
    return 1 if any(counts[kind] for kind in KINDS) else 0


if __name__ == "__main__":
    sys.exit(main())
