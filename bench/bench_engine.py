"""pytest-benchmark form of bench/engine_bench.py: batched-copy paths against one flat copy.

One benchmark group per weight set; within it every method of ``engine_bench.METHODS`` but
``plan-copy`` (a diagnostic of the script: several copies per call, see engine_bench.py).
``extra_info["ratio_vs_flat"]`` is (flat copy median) / (this method's median): 1.0 means as
fast as one contiguous copy of the same bytes (target for ``native`` and ``plan``: at least
0.9). The flat copy is sampled after every round of the method (pytest-benchmark's teardown
hook, outside the timing), so both see the same background load even on a busy machine.
``ratio_vs_flat_1t`` uses the same copy on one torch thread, the steadier reference when the
other core is busy (a two-thread torch copy stalls whenever one of its threads is descheduled).

Run::

    python -m pytest bench/bench_engine.py --benchmark-only
    WEIGHTSYNC_BENCH_SETS=small python -m pytest bench/bench_engine.py --benchmark-only
    python -m pytest bench/bench_engine.py --benchmark-only -k "not large"
    python -m pytest bench/bench_engine.py --benchmark-only --benchmark-json=out.json

Rounds default to what fits in about a second per benchmark (at least 3, at most 10);
WEIGHTSYNC_BENCH_ROUNDS overrides.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from statistics import median

import pytest
import torch
from engine_bench import (COPIES_PER_CALL, METHODS, CopyCase, calls_for, make_case, method_fn,
                          method_scope, time_calls)

_MIN_SAMPLE_S = 0.01  # one round lasts at least this long (repeated calls for small sets)
_BUDGET_S = 1.0  # per benchmark, flat samples included, for the default number of rounds
_REFERENCES = ("flat", "flat-1t")


@pytest.fixture(scope="module")
def case(weight_set: str):
    """Both instances of the set and its flat buffers; freed before the next set is built."""
    built = make_case(weight_set)
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def references(case: CopyCase) -> dict[str, tuple[Callable[[], None], int, int]]:
    """Per flat reference: (callable, calls per sample, torch threads), calibrated once per set."""
    default_threads = torch.get_num_threads()
    out = {}
    for method in _REFERENCES:
        fn = method_fn(method, case)
        with method_scope(method):
            fn()
            out[method] = (fn, calls_for(fn, _MIN_SAMPLE_S), torch.get_num_threads())
    assert torch.get_num_threads() == default_threads
    return out


def _sampler(references: dict[str, tuple[Callable[[], None], int, int]],
             samples: dict[str, list[float]]) -> Callable[[], None]:
    """A teardown that takes one sample of each flat reference, at its own thread count."""
    def sample() -> None:
        inner = torch.get_num_threads()
        try:
            for name, (fn, calls, threads) in references.items():
                torch.set_num_threads(threads)
                samples[name].append(time_calls(fn, calls))
        finally:
            torch.set_num_threads(inner)
    return sample


@pytest.mark.parametrize("method", [m for m in METHODS if m not in COPIES_PER_CALL])
def test_copy(benchmark, bench_rounds, weight_set: str, case: CopyCase,
              references: dict[str, tuple[Callable[[], None], int, int]], method: str) -> None:
    benchmark.group = weight_set
    benchmark.extra_info.update(tensors=case.count, nbytes=case.nbytes)
    fn = method_fn(method, case)
    is_flat = method in _REFERENCES
    samples: dict[str, list[float]] = {name: [] for name in references}
    with torch.no_grad(), method_scope(method):
        if not is_flat:
            for d in case.dst:
                d.zero_()
        fn()
        if not is_flat:
            for i, (d, s) in enumerate(zip(case.dst, case.src)):
                if not torch.equal(d, s):
                    pytest.fail(f"{method} on {weight_set}: tensor {i} differs from its source")
        calls = calls_for(fn, _MIN_SAMPLE_S)
        per_round = time_calls(fn, calls) * calls + sum(
            time_calls(f, c) * c for f, c, _ in references.values())
        rounds = bench_rounds(max(3, min(10, int(_BUDGET_S / per_round))))
        benchmark.pedantic(fn, rounds=rounds, iterations=calls, warmup_rounds=1,
                           teardown=_sampler(references, samples))
    if benchmark.disabled:  # --benchmark-disable: one plain call, nothing timed
        return
    own = benchmark.stats.stats.median
    for name, key in (("flat", "ratio_vs_flat"), ("flat-1t", "ratio_vs_flat_1t")):
        benchmark.extra_info[key] = round(median(samples[name]) / own, 3)
    benchmark.extra_info["flat_median_s"] = median(samples["flat"])
