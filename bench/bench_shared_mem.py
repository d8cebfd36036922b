"""pytest-benchmark form of bench/shared_mem_bench.py: ``send(new_weights)`` with 2 spawned
workers, sync mode, until both hold the version.

One group per weight set: ``flat`` (one contiguous copy of the payload in this process, the
floor), ``torchrl`` (TorchRL's SharedMemWeightSyncScheme, when installed), ``ws-copy`` and
``ws-view`` (weightsync, workers taking versions by copy or by view). For the weightsync rows
``extra_info`` holds ``x_torchrl`` (TorchRL median / ours: target at least 10 on mlp-small and
many-small) and, for every scheme, ``x_flat`` (its median / the median of a flat copy run before
each of its rounds: target at most 1.2 on large in view mode); a summary is printed at the end
of each set.

Run::

    python -m pytest bench/bench_shared_mem.py --benchmark-only
    WEIGHTSYNC_BENCH_SETS=small python -m pytest bench/bench_shared_mem.py --benchmark-only
    WEIGHTSYNC_BENCH_ROUNDS=50 python -m pytest bench/bench_shared_mem.py --benchmark-only -k mlp

Rounds default to ``shared_mem_bench.default_rounds`` per set; WEIGHTSYNC_BENCH_ROUNDS overrides.
"""

from __future__ import annotations

import gc
import time
from statistics import median

import pytest
from shared_mem_bench import Workers, default_rounds, flat_copy_fn, make_scheme, torchrl_available
from weight_sets import make_module, payload_nbytes

# TorchRL before ours, so that our rows can carry the ratio against it.
IMPLS = ("flat", "torchrl", "ws-copy", "ws-view")


@pytest.fixture(scope="module")
def medians(weight_set: str, request: pytest.FixtureRequest):
    """Medians (seconds) of this set's rows, filled as they run; summarised at teardown."""
    found: dict[str, float] = {}
    yield found
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not found:
        return
    parts = [f"{impl} {found[impl] * 1e3:.3f} ms" for impl in IMPLS if impl in found]
    for impl in ("ws-copy", "ws-view"):
        if impl in found and "torchrl" in found:
            parts.append(f"{impl} x torchrl {found['torchrl'] / found[impl]:.1f}")
        if f"x_flat {impl}" in found:
            parts.append(f"{impl} x flat {found[f'x_flat {impl}']:.2f}")
    reporter.write_line(f"\nshared-mem {weight_set}: " + ", ".join(parts))


@pytest.mark.parametrize("impl", IMPLS)
def test_send(benchmark, weight_set: str, impl: str, medians: dict, bench_rounds) -> None:
    benchmark.group = f"shared-mem send, 2 workers, sync: {weight_set}"
    rounds = bench_rounds(default_rounds(weight_set))
    flat = flat_copy_fn(payload_nbytes(make_module(weight_set)))
    if impl == "flat":
        benchmark.pedantic(flat, rounds=max(rounds, 20), warmup_rounds=3)
        medians["flat"] = median(benchmark.stats.stats.data)
        return
    if impl == "torchrl" and not torchrl_available():
        pytest.skip("torchrl is not installed")
    from tensordict import TensorDict

    # The flat copy runs (timed here, untimed by pytest-benchmark) before every round, so
    # that x_flat compares samples taken side by side.
    floor: list[float] = []

    def flat_before_round() -> None:
        t0 = time.perf_counter()
        flat()
        floor.append(time.perf_counter() - t0)

    new = TensorDict.from_module(make_module(weight_set, seed=2))
    scheme = make_scheme(impl, make_module(weight_set, seed=0))
    with Workers(scheme, weight_set):
        benchmark.pedantic(scheme.send, args=(new,), setup=flat_before_round, rounds=rounds,
                           warmup_rounds=3)
    del new, scheme
    gc.collect()
    ours = median(benchmark.stats.stats.data)
    medians[impl] = ours
    benchmark.extra_info["x_flat"] = medians[f"x_flat {impl}"] = ours / median(floor)
    if impl.startswith("ws-") and "torchrl" in medians:
        benchmark.extra_info["x_torchrl"] = medians["torchrl"] / ours
