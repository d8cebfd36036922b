"""The engine's copy right after torch's own parallel work, against the same copy settled.

A trainer pushes its weights right after an optimizer step, so the push starts while torch's
OpenMP workers still spin on the other cores (libgomp spins for some milliseconds after each
parallel region before it sleeps). The host copier's helper threads are other threads of the
same process and need those cores: until the spinners sleep, the copy runs on the calling
thread alone, and a helper preempted in the middle of a chunk makes the caller wait for it.

For each weight set this script repeats: ``--torch-calls`` parallel torch copies of the
payload (the flat reference, timed), then :meth:`weightsync.engine.CopyPlan.run` back to back
for ``--window-ms``. Plan calls that start within ``--early-ms`` of the torch copies count as
"after torch", those after ``--late-ms`` as "settled". Medians are reported, and the worst
call after torch.

Usage::

    python bench/after_torch_bench.py
    python bench/after_torch_bench.py --sets many-small --trials 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

_BENCH_DIR = Path(__file__).resolve().parent
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

from weight_sets import SMALL_SETS, WEIGHT_SETS, make_module  # noqa: E402

from weightsync.engine import CopyPlan, backend_info  # noqa: E402

__all__ = ["measure_set", "main"]


def measure_set(name: str, trials: int = 20, torch_calls: int = 50, early_ms: float = 6.0,
                late_ms: float = 12.0, window_ms: float = 30.0) -> dict[str, Any]:
    """Plan run times after torch's parallel copies and settled, for weight set ``name``."""
    dst = [t.data for t in make_module(name, seed=0).parameters()]
    src = [t.data for t in make_module(name, seed=1).parameters()]
    plan = CopyPlan(dst, src)
    nbytes = sum(t.nbytes for t in dst)
    flat_dst = torch.empty(nbytes, dtype=torch.uint8)
    flat_src = torch.ones(nbytes, dtype=torch.uint8)
    flat: list[int] = []
    early: list[int] = []
    late: list[int] = []
    with torch.no_grad():
        plan.run()
        for _ in range(trials):
            for _ in range(torch_calls):
                t0 = time.perf_counter_ns()
                flat_dst.copy_(flat_src)
                flat.append(time.perf_counter_ns() - t0)
            start = time.perf_counter_ns()
            while True:
                t0 = time.perf_counter_ns()
                plan.run()
                t1 = time.perf_counter_ns()
                since_ms = (t0 - start) / 1e6
                if since_ms < early_ms:
                    early.append(t1 - t0)
                elif since_ms >= late_ms:
                    late.append(t1 - t0)
                if since_ms >= window_ms:
                    break
    if not all(torch.equal(d, s) for d, s in zip(dst, src)):
        raise AssertionError(f"{name}: the plan did not copy every tensor exactly")
    # The first torch copies of each trial follow the plan's calls: take the later half.
    flat_s = median(flat[len(flat) // 2:]) / 1e9
    return {
        "set": name, "tensors": len(dst), "nbytes": nbytes,
        "torch_flat_s": flat_s,
        "plan_after_torch_s": median(early) / 1e9, "plan_after_torch_max_s": max(early) / 1e9,
        "plan_settled_s": median(late) / 1e9,
        "calls_after_torch": len(early), "calls_settled": len(late),
    }


def _format(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'set':<12}{'torch flat':>12}{'plan after torch':>18}{'(worst)':>10}"
             f"{'plan settled':>14}{'after/settled':>15}"]
    for r in rows:
        lines.append(
            f"{r['set']:<12}{r['torch_flat_s'] * 1e6:>9.1f} us"
            f"{r['plan_after_torch_s'] * 1e6:>15.1f} us{r['plan_after_torch_max_s'] * 1e6:>8.0f} us"
            f"{r['plan_settled_s'] * 1e6:>11.1f} us"
            f"{r['plan_after_torch_s'] / r['plan_settled_s']:>14.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SMALL_SETS), choices=list(WEIGHT_SETS))
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--torch-calls", type=int, default=50)
    p.add_argument("--early-ms", type=float, default=6.0)
    p.add_argument("--late-ms", type=float, default=12.0)
    p.add_argument("--window-ms", type=float, default=30.0)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not args.early_ms <= args.late_ms <= args.window_ms:
        p.error("need --early-ms <= --late-ms <= --window-ms")
    rows = [measure_set(name, args.trials, args.torch_calls, args.early_ms, args.late_ms,
                        args.window_ms) for name in args.sets]
    copier = backend_info()["extension"].get("host_copier")
    print(f"# torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"host copier {copier}")
    print(_format(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
