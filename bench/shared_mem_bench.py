"""End-to-end weight sync with 2 worker processes: weightsync's SharedMemWeightSyncScheme against
TorchRL's and against one flat copy of the payload, side by side in one run.

What is timed: ``sender.send(new_weights)`` in sync mode, i.e. until both workers hold the new
version (both schemes return only then). ``new_weights`` is a TensorDict of another instance
of the same weight set (bench/weight_sets.py). The workers are spawned processes that build
their own model and connect the way a TorchRL collector worker does (``init_on_receiver``,
``connect``, then updates applied by the scheme's background thread).

- ``flat``: one ``dst.copy_(src)`` of the payload's bytes in this process: the floor. It is
  timed alternately with every other implementation, round by round.
- ``ws-copy`` / ``ws-view``: weightsync, workers taking versions by copy or by view.
- ``torchrl``: TorchRL's ``SharedMemWeightSyncScheme`` (when torchrl is installed).

``x_torchrl`` is torchrl time / weightsync time (targets: at least 10 on mlp-small and
many-small); ``x_flat`` is weightsync time / flat time (target: at most 1.2 on large, view
mode). Medians over rounds.

Usage::

    python bench/shared_mem_bench.py --sets mlp-small many-small conv-mid large
    python bench/shared_mem_bench.py --sets mlp-small --rounds 200 --json out.json

Importable: :func:`run`, :func:`format_table`, :class:`Workers` (bench/bench_shared_mem.py uses
them).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

_BENCH_DIR = Path(__file__).resolve().parent
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import torch  # noqa: E402
from weight_sets import WEIGHT_SETS, make_module, payload_nbytes  # noqa: E402

__all__ = ["IMPLS", "Workers", "default_rounds", "flat_copy_fn", "format_table", "run"]

#: What can be measured, in table order.
IMPLS = ("flat", "ws-copy", "ws-view", "torchrl")
_CTX = mp.get_context("spawn")
_READY_TIMEOUT = 300.0


def default_rounds(name: str) -> int:
    """Rounds per implementation: enough for a stable median, bounded for TorchRL's slow sets."""
    return {"mlp-small": 200, "many-small": 30, "conv-mid": 15, "large": 10}.get(name, 10)


def torchrl_available() -> bool:
    try:
        import torchrl.weight_update  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


def _worker(conn: Any, scheme: Any, worker_idx: int, set_name: str) -> None:
    """A collector-like worker: its own model, connect, then the scheme's background thread
    applies updates until the parent says stop."""
    try:
        torch.set_num_threads(1)
        model = make_module(set_name, seed=1)
        scheme.init_on_receiver(model_id="policy", model=model, worker_idx=worker_idx)
        scheme.connect(worker_idx=worker_idx)
        conn.send("ready")
        conn.recv()
        scheme.shutdown()
        conn.send("done")
    except BaseException as exc:
        conn.send(f"error: {type(exc).__name__}: {exc}")


class Workers:
    """Two spawned workers attached to ``scheme`` (already ``init_on_sender``-ed); the sender
    connects while they start, as a collector does. Use as a context manager."""

    def __init__(self, scheme: Any, set_name: str, n: int = 2) -> None:
        self.scheme = scheme
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        for w in range(n):
            parent, child = _CTX.Pipe()
            proc = _CTX.Process(target=_worker, args=(child, scheme, w, set_name), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        try:
            scheme.connect()
            for w, conn in enumerate(self._conns):
                if not conn.poll(_READY_TIMEOUT):
                    raise TimeoutError(f"worker {w} did not connect within {_READY_TIMEOUT} s")
                msg = conn.recv()
                if msg != "ready":
                    raise RuntimeError(f"worker {w}: {msg}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send("stop")
            except OSError:
                pass
        for conn in self._conns:
            if conn.poll(30.0):
                conn.recv()
        self.scheme.shutdown()
        for proc in self._procs:
            proc.join(30.0)
            if proc.is_alive():
                proc.kill()
                proc.join(30.0)
        self._procs, self._conns = [], []


def make_scheme(impl: str, sender_model: torch.nn.Module) -> Any:
    """A sender scheme for ``impl``, initialised for 2 CPU workers."""
    if impl == "torchrl":
        from torchrl.weight_update import SharedMemWeightSyncScheme as TorchRLScheme

        scheme = TorchRLScheme(strategy="tensordict", sync=True)
        scheme.init_on_sender(model_id="policy", model=sender_model, devices=["cpu", "cpu"], ctx=_CTX)
        return scheme
    from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme

    scheme = SharedMemWeightSyncScheme(sync=True, mode=impl.removeprefix("ws-"), timeout=60.0)
    scheme.init_on_sender(model_id="policy", model=sender_model, devices=["cpu", "cpu"])
    return scheme


def flat_copy_fn(nbytes: int) -> Callable[[], None]:
    """One contiguous copy of ``nbytes`` (buffers allocated and touched once, up front).

    Payloads under 64 MB are copied on one thread: torch would split them over two, and a
    two-thread copy stalls whenever one of its threads is descheduled, which on a 2-core
    machine shared with two workers happens all the time. Bigger ones use torch's threads,
    as the engine's copier does."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    if nbytes >= 64 << 20:
        return lambda: dst.copy_(src)
    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            dst.copy_(src)
        finally:
            torch.set_num_threads(threads)

    return one_thread


def _time(fn: Callable[[], Any], rounds: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _paired(fn: Callable[[], Any], flat: Callable[[], Any], rounds: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Time ``fn`` and the flat copy alternately, round by round, so that a noisy neighbour
    (other processes, memory bandwidth taken elsewhere) weighs on both alike."""
    for _ in range(warmup):
        fn()
        flat()
    ours, floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        flat()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        floor.append(t1 - t0)
        ours.append(t2 - t1)
    return ours, floor


def run(sets: Sequence[str], impls: Sequence[str] = IMPLS, rounds: int | None = None) -> list[dict[str, Any]]:
    """Measure every implementation on every set; one row per (set, impl).

    ``x_flat`` of a row compares it with the flat copy timed alternately with it; the
    ``flat`` row pools every flat sample of the set.
    """
    from tensordict import TensorDict

    rows = []
    for name in sets:
        nbytes = payload_nbytes(make_module(name))
        flat = flat_copy_fn(nbytes)
        results: dict[str, tuple[list[float], list[float]]] = {}
        for impl in impls:
            if impl == "flat" or (impl == "torchrl" and not torchrl_available()):
                continue
            trainer = make_module(name, seed=0)
            new = TensorDict.from_module(make_module(name, seed=2))
            scheme = make_scheme(impl, trainer)
            with Workers(scheme, name):
                results[impl] = _paired(lambda: scheme.send(new), flat, rounds or default_rounds(name))
            del trainer, new, scheme
            gc.collect()
        del flat
        gc.collect()
        if "flat" in impls and results:
            pooled = [t for _, floor in results.values() for t in floor]
            results = {"flat": (pooled, pooled), **results}
        trl = median(results["torchrl"][0]) if "torchrl" in results else None
        for impl, (samples, floor) in results.items():
            med = median(samples)
            rows.append(
                {
                    "set": name,
                    "impl": impl,
                    "payload_mb": nbytes / 1e6,
                    "rounds": len(samples),
                    "median_ms": med * 1e3,
                    "min_ms": min(samples) * 1e3,
                    "x_flat": med / median(floor),
                    "x_torchrl": None if trl is None or impl == "torchrl" else trl / med,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'set':<11} {'impl':<8} {'MB':>7} {'rounds':>6} {'median ms':>10} {'min ms':>9} {'x flat':>7} {'x torchrl':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        xf = "" if r["x_flat"] is None else f"{r['x_flat']:.2f}"
        xt = "" if r["x_torchrl"] is None else f"{r['x_torchrl']:.1f}"
        lines.append(
            f"{r['set']:<11} {r['impl']:<8} {r['payload_mb']:>7.1f} {r['rounds']:>6} "
            f"{r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {xf:>7} {xt:>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(WEIGHT_SETS), choices=list(WEIGHT_SETS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=None, help="rounds per implementation (default: per set)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    from weightsync.engine import backend_info

    info = backend_info()
    print(
        f"# cpu backend {info['devices']['cpu'].get('active')}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, 2 workers, sync sends",
        flush=True,
    )
    rows = run(args.sets, args.impls, args.rounds)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
