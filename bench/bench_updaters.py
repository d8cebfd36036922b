"""``VanillaWeightUpdater.push_weights`` against one flat copy of the same bytes, and TorchRL.

For each weight set of bench/weight_sets.py the worker policy is one instance of the set and
the new weights come from another (the trainer). Measured in one run, one group per set:

- ``flat``: one ``dst.copy_(src)`` of two contiguous uint8 buffers of the payload size: the
  floor the updater is held against, with torch's intra-op threads as configured.
- ``flat-1t``: the same copy with torch limited to one thread (the single-core floor, and the
  fairer reference when the other cores are busy: a parallel copy then waits for a thread
  that is not scheduled).
- ``engine-plan``: :class:`weightsync.engine.CopyPlan` ``run()`` over the same tensors (built
  once): the engine's share of a push, so the updater's own overhead is the difference.
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
"""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch
from tensordict import TensorDict
from conftest import selected_sets
from weight_sets import WEIGHT_SETS, make_module, payload_nbytes

from weightsync.engine import CopyPlan
from weightsync.updaters import VanillaWeightUpdater

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
            dst = TensorDict.from_module(policy).data.values(True, True)
            plan = CopyPlan(list(dst), list(weights.data.values(True, True)))
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
