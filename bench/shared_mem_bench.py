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

The default scenario is the issue's: sends back to back, workers idle between updates. A
trainer's sends are a training step apart and collector workers are busy meanwhile, so
``--gap-ms`` sleeps between sends (outside the timing) and ``--workers-busy`` keeps the
workers' main threads working while updates land:

- ``python``: a pure-Python loop (an environment step written in Python): it holds the GIL,
  which the receiving thread of either library needs.
- ``torch``: small matrix products, as a policy's forward pass; weightsync's workers hold
  ``scheme.guard()`` around each, as a collector should (TorchRL has no such guard).

Usage::

    python bench/shared_mem_bench.py --sets mlp-small many-small conv-mid large
    python bench/shared_mem_bench.py --sets mlp-small --rounds 200 --json out.json
    python bench/shared_mem_bench.py --sets mlp-small --gap-ms 2 --workers-busy python torch

Importable: :func:`run`, :func:`format_table`, :class:`Workers` (bench/bench_shared_mem.py uses
them).
"""

from __future__ import annotations

import argparse
import contextlib
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

__all__ = ["BUSY", "IMPLS", "Workers", "default_rounds", "flat_copy_fn", "format_table", "run"]

#: What can be measured, in table order.
IMPLS = ("flat", "ws-copy", "ws-view", "torchrl")
#: What the workers' main threads do while updates arrive (see the module docs).
BUSY = ("idle", "python", "torch")
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


def _python_step() -> int:
    total = 0
    for i in range(2000):
        total += i * i
    return total


def _busy_until_told(conn: Any, scheme: Any, busy: str) -> None:
    """Work as ``busy`` says until the parent writes to ``conn``."""
    if busy == "idle":
        return
    if busy == "python":
        while not conn.poll():
            _python_step()
        return
    guard = getattr(scheme, "guard", None) or contextlib.nullcontext
    a, b = torch.randn(64, 256), torch.randn(256, 256)
    while not conn.poll():
        with guard():
            torch.tanh(a @ b)


def _worker(conn: Any, scheme: Any, worker_idx: int, set_name: str, busy: str = "idle") -> None:
    """A collector-like worker: its own model, connect, then the scheme's background thread
    applies updates while the main thread works as ``busy`` says, until the parent says stop."""
    try:
        torch.set_num_threads(1)
        model = make_module(set_name, seed=1)
        scheme.init_on_receiver(model_id="policy", model=model, worker_idx=worker_idx)
        scheme.connect(worker_idx=worker_idx)
        conn.send("ready")
        _busy_until_told(conn, scheme, busy)
        conn.recv()
        scheme.shutdown()
        conn.send("done")
    except BaseException as exc:
        conn.send(f"error: {type(exc).__name__}: {exc}")


class Workers:
    """Two spawned workers attached to ``scheme`` (already ``init_on_sender``-ed); the sender
    connects while they start, as a collector does. Use as a context manager."""

    def __init__(self, scheme: Any, set_name: str, n: int = 2, busy: str = "idle") -> None:
        self.scheme = scheme
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        for w in range(n):
            parent, child = _CTX.Pipe()
            proc = _CTX.Process(target=_worker, args=(child, scheme, w, set_name, busy), daemon=True)
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


def _paired(
    fn: Callable[[], Any], flat: Callable[[], Any], rounds: int, warmup: int = 3, gap: float = 0.0
) -> tuple[list[float], list[float]]:
    """Time ``fn`` and the flat copy alternately, round by round, so that a noisy neighbour
    (other processes, memory bandwidth taken elsewhere) weighs on both alike. ``gap``
    seconds pass, untimed, before each round."""
    for _ in range(warmup):
        fn()
        flat()
    ours, floor = [], []
    for _ in range(rounds):
        if gap > 0:
            time.sleep(gap)
        t0 = time.perf_counter()
        flat()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        floor.append(t1 - t0)
        ours.append(t2 - t1)
    return ours, floor


def run(
    sets: Sequence[str],
    impls: Sequence[str] = IMPLS,
    rounds: int | None = None,
    *,
    gap_ms: float = 0.0,
    busy: str = "idle",
) -> list[dict[str, Any]]:
    """Measure every implementation on every set; one row per (set, impl).

    ``gap_ms`` and ``busy`` set the scenario (see the module docs); rows record it.

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
            with Workers(scheme, name, busy=busy):
                results[impl] = _paired(
                    lambda: scheme.send(new), flat, rounds or default_rounds(name), gap=gap_ms / 1e3
                )
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
                    "workers": busy,
                    "gap_ms": gap_ms,
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
    head = f"{'set':<11} {'workers':<7} {'gap ms':>6} {'impl':<8} {'MB':>7} {'rounds':>6} {'median ms':>10} {'min ms':>9} {'x flat':>7} {'x torchrl':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        xf = "" if r["x_flat"] is None else f"{r['x_flat']:.2f}"
        xt = "" if r["x_torchrl"] is None else f"{r['x_torchrl']:.1f}"
        lines.append(
            f"{r['set']:<11} {r['workers']:<7} {r['gap_ms']:>6g} {r['impl']:<8} {r['payload_mb']:>7.1f} {r['rounds']:>6} "
            f"{r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {xf:>7} {xt:>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(WEIGHT_SETS), choices=list(WEIGHT_SETS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=None, help="rounds per implementation (default: per set)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="untimed pause before each send (ms)")
    parser.add_argument("--workers-busy", nargs="+", default=["idle"], choices=BUSY,
                        help="what the workers' main threads do meanwhile (one table row group each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    from weightsync.engine import backend_info

    info = backend_info()
    print(
        f"# cpu backend {info['devices']['cpu'].get('active')}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, 2 workers, sync sends",
        flush=True,
    )
    rows = [
        row
        for busy in args.workers_busy
        for row in run(args.sets, args.impls, args.rounds, gap_ms=args.gap_ms, busy=busy)
    ]
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
