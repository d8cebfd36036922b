"""``VanillaWeightUpdater.push_weights`` against one flat copy of the same bytes, and TorchRL.

For each weight set of bench/weight_sets.py the worker policy is one instance of the set and
the new weights come from another (the trainer). Measured in one run, one group per set:

- ``flat``: one ``dst.copy_(src)`` of two contiguous uint8 buffers of the payload size: the
  floor the updater is held against, with torch's intra-op threads as configured.
- ``flat-1t``: the same copy with torch limited to one thread (the single-core floor, and the
  fairer reference when the other cores are busy: a parallel copy then waits for a thread
  that is not scheduled).
- ``engine-plan``: :class:`weightsync.engine.CopyPlan` ``run()`` over the same tensors (the
  policy's and the trainer's parameters; built once): the engine's share of a push, so the
  updater's own overhead is the difference.
- ``weightsync``: ``VanillaWeightUpdater.from_policy(policy).push_weights(weights)`` with
  ``weights = TensorDict.from_module(trainer)`` built once (unlocked, as ``from_module``
  returns it), outside ``torch.no_grad()``.
- ``weightsync-locked``: the same with the weights TensorDict locked (the cheapest check that
  the source is unchanged).
- ``torchrl``: TorchRL's ``VanillaWeightUpdater`` doing the same push (under
  ``torch.no_grad()``, which it needs), when torchrl is installed.

Every push is warmed up once first (the first push builds the copy plan). ``ratio_vs_flat``
(in each result's ``extra_info`` and in the summary printed at the end) is the flat copy's
median time over the method's median time (``ratio_vs_flat_1t``: the one-thread flat copy's):
1.0 is as fast as one flat copy; the target for ``weightsync`` is at least 0.8 on every set.

Usage::

    python -m pytest bench/bench_updaters.py --benchmark-only
    python -m pytest bench/bench_updaters.py --benchmark-only -k "mlp-small or many-small"
    python bench/bench_updaters.py --sets mlp-small many-small   # interleaved, see below

pytest-benchmark runs each method's rounds back to back, so a drift of the machine between
two methods (the host's load, its memory bandwidth) lands in their ratio. Run as a script,
the same methods are sampled round-robin (``engine_bench.round_robin``: one sample of each
method per round, each after untimed settling calls), which keeps such drifts out.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path
from statistics import median

_BENCH_DIR = Path(__file__).resolve().parent
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):  # run as a script: the repository and bench/
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import pytest  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from conftest import selected_sets  # noqa: E402
from weight_sets import WEIGHT_SETS, make_module, payload_nbytes  # noqa: E402

from weightsync.engine import CopyPlan  # noqa: E402
from weightsync.updaters import VanillaWeightUpdater  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HAVE_TORCHRL = importlib.util.find_spec("torchrl") is not None
METHODS = ("flat", "flat-1t", "engine-plan", "weightsync", "weightsync-locked", "torchrl")
# (set, method) -> median seconds, filled as the benchmarks run; flat runs first in each set.
_MEDIANS: dict[tuple[str, str], float] = {}


class _Case:
    """The modules and buffers of one weight set, built once and shared by its methods."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.trainer = make_module(name, seed=0)
        self.nbytes = payload_nbytes(self.trainer)
        self.count = len(self.trainer.state_dict())

    def method(self, method: str):
        if method in ("flat", "flat-1t"):
            src = torch.randint(0, 255, (self.nbytes,), dtype=torch.uint8)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)
        policy = make_module(self.name, seed=1)
        weights = TensorDict.from_module(self.trainer)
        if method == "engine-plan":
            # The very tensors a push writes and reads (the parameters, not `.data` aliases,
            # whose freshly allocated metadata the plan's check would read faster).
            dst = TensorDict.from_module(policy).values(True, True)
            plan = CopyPlan(list(dst), list(weights.values(True, True)))
            return plan.run
        if method == "weightsync":
            updater = VanillaWeightUpdater.from_policy(policy)
            return lambda: updater.push_weights(weights)
        if method == "weightsync-locked":
            updater = VanillaWeightUpdater.from_policy(policy)
            weights.lock_()
            return lambda: updater.push_weights(weights)
        from torchrl.collectors import VanillaWeightUpdater as TorchRLVanilla

        theirs = TorchRLVanilla.from_policy(policy)

        def push() -> None:
            with torch.no_grad():  # TorchRL's update_ fails on leaf parameters otherwise
                theirs.push_weights(weights)

        return push


_CASES: dict[str, _Case] = {}


def _case(name: str) -> _Case:
    if name not in _CASES:
        _CASES.clear()  # one set in memory at a time (large is 400 MB per copy)
        gc.collect()
        _CASES[name] = _Case(name)
    return _CASES[name]


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Print the ratios of the whole run once it is over."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _MEDIANS:
        return
    lines = ["", "push_weights vs one flat copy (median ms; ratio = flat / method, "
                 "ratio_1t = flat-1t / method)"]
    for name in WEIGHT_SETS:
        flat, flat_1t = _MEDIANS.get((name, "flat")), _MEDIANS.get((name, "flat-1t"))
        if flat is None:
            continue
        nbytes, count = _SIZES[name]
        lines.append(f"{name} ({count} tensors, {nbytes / 1e6:.1f} MB)")
        for method in METHODS:
            t = _MEDIANS.get((name, method))
            if t is not None:
                ratio_1t = f"{flat_1t / t:6.2f}x" if flat_1t is not None else "     -"
                lines.append(f"  {method:<18} {t * 1e3:10.3f} ms   ratio {flat / t:6.2f}x   "
                             f"ratio_1t {ratio_1t}")
    # Teardown output is captured; write past the capture so the table reaches the terminal.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


_SIZES: dict[str, tuple[int, int]] = {}


@pytest.mark.parametrize("name, method", [(n, m) for n in selected_sets() for m in METHODS],
                         ids=[f"{n}-{m}" for n in selected_sets() for m in METHODS])
def test_push_weights(benchmark, name: str, method: str) -> None:
    if method == "torchrl" and not HAVE_TORCHRL:
        pytest.skip("torchrl is not installed")
    case = _case(name)
    _SIZES[name] = (case.nbytes, case.count)
    fn = case.method(method)
    fn()  # warm-up: the first push validates and builds the copy plan
    benchmark.group = name
    benchmark.extra_info.update(nbytes=case.nbytes, tensors=case.count, method=method)
    threads = torch.get_num_threads()
    if method == "flat-1t":
        torch.set_num_threads(1)
    try:
        benchmark(fn)
    finally:
        torch.set_num_threads(threads)
    median = benchmark.stats.stats.median
    _MEDIANS[(name, method)] = median
    for reference in ("flat", "flat-1t"):
        ref = _MEDIANS.get((name, reference))
        if ref is not None:
            key = "ratio_vs_flat" if reference == "flat" else "ratio_vs_flat_1t"
            benchmark.extra_info[key] = ref / median


def interleaved(sets: list[str], rounds: int = 7) -> list[dict]:
    """Every method on every set, sampled round-robin; medians and ratios per method."""
    from engine_bench import round_robin

    rows = []
    for name in sets:
        case = _case(name)
        methods = [m for m in METHODS if m != "torchrl" or HAVE_TORCHRL]
        fns = {m: case.method(m) for m in methods}
        samples, calls = round_robin(fns, rounds=rounds)
        mids = {m: median(v) for m, v in samples.items()}
        for m in methods:
            rows.append({"set": name, "tensors": case.count, "nbytes": case.nbytes, "method": m,
                         "median_s": mids[m], "min_s": min(samples[m]), "calls": calls[m],
                         "samples_s": samples[m], "ratio_vs_flat": mids["flat"] / mids[m],
                         "ratio_vs_flat_1t": mids["flat-1t"] / mids[m]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="push_weights against a flat copy and TorchRL, "
                                            "methods sampled round-robin")
    p.add_argument("--sets", nargs="+", choices=list(WEIGHT_SETS), default=list(WEIGHT_SETS))
    p.add_argument("--rounds", type=int, default=7, help="samples per method (median reported)")
    p.add_argument("--json", type=Path, help="also write the rows (all samples) here")
    args = p.parse_args(argv)
    rows = interleaved(args.sets, args.rounds)
    print(f"{'set':<12}{'method':<20}{'median':>12}{'vs flat':>9}{'vs 1t':>8}")
    for r in rows:
        t = r["median_s"]
        shown = f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"
        print(f"{r['set']:<12}{r['method']:<20}{shown:>12}{r['ratio_vs_flat']:>8.2f}x"
              f"{r['ratio_vs_flat_1t']:>7.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
