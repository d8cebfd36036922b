"""Host copy benchmark of the engine: every batched-copy path against one flat copy of the bytes.

For each weight set (bench/weight_sets.py) the destinations are the parameters of one module
instance and the sources those of another instance of the same set. Measured side by side in
one process, interleaved round by round so that a noisy neighbour slows every method alike,
each sample after a few milliseconds of untimed calls of the same method (:data:`SETTLE_S`):

- ``flat``: one ``dst.copy_(src)`` of two contiguous uint8 buffers of the payload size (the
  floor every other method is held against), with torch's intra-op threads as configured.
- ``flat-1t``: the same copy on one thread (torch's threads set to 1 around each sample): the
  single-core floor, and the reference when the other core is busy.
- ``native``: :func:`weightsync.ops.batched_copy_` with the automatic backend choice.
- ``plan``: :meth:`weightsync.engine.CopyPlan.run` (validated once, outside the timing).
- ``plan-copy``: the same plan's copy alone, without the check each ``run()`` makes that no
  tensor was reallocated (``CopyPlan._copy_repeatedly``: :data:`COPIES_PER_CALL` copies per
  call, only the first checked; times are per copy). Not a way to sync
  (the check is what makes a plan safe to reuse): it shows how much of ``plan``'s time is the
  check, and how close the scattered bytes alone come to one flat copy. Native backend only.
- ``foreach``: ``torch._foreach_copy_``.
- ``loop``: a Python loop of ``dst.copy_(src)``.
- ``torch-backend``: the pure-torch fallback (:class:`TorchBackend`) including its checks.

``ratio_vs_flat`` is flat time / method time (medians over rounds; ``best_ratio_vs_flat``
uses the best sample of each, ``ratio_vs_flat_1t`` the one-thread flat copy): 1.0 means as
fast as one flat copy, and the target for ``native`` and ``plan`` is at least 0.9 on every set.
Sets smaller than the last-level cache are measured cache-hot (each call copies the same
buffers), as a sync of a small model usually is.

The thread experiment (:func:`thread_experiment`, ``--threads-experiment``) runs this script
in child processes with ``WEIGHTSYNC_NUM_THREADS`` = 1 and 2 (the host copier reads its options
once per process), with the other cores idle or kept busy by a neighbour process, to decide
when the copier's threads pay.

Usage::

    python bench/engine_bench.py                         # all four sets, table on stdout
    python bench/engine_bench.py --sets mlp-small many-small --json out.json
    python bench/engine_bench.py --threads-experiment --json threads.json

Everything is importable (:func:`run_benchmarks`, :func:`format_table`,
:func:`thread_experiment`, :func:`format_thread_table`) for a ``weightsync bench`` command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

_BENCH_DIR = Path(__file__).resolve().parent
# Run as a script, neither the package (repo root) nor the sibling weight_sets module is on
# sys.path; as an import (pytest, a CLI) they usually are, and nothing is added twice.
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

from weight_sets import WEIGHT_SETS, make_module, payload_nbytes  # noqa: E402

from weightsync import ops  # noqa: E402
from weightsync.engine import CopyPlan, backend_for, backend_info  # noqa: E402
from weightsync.engine.torch_backend import TorchBackend  # noqa: E402

__all__ = [
    "METHODS", "CopyCase", "MethodResult", "SetResult", "make_case", "method_fn", "method_scope",
    "time_calls", "calls_for", "settle", "SETTLE_S", "measure_case", "run_benchmarks",
    "format_table", "environment", "busy_neighbour", "thread_experiment", "format_thread_table",
    "serve", "main", "THREAD_SETS", "THREAD_SWEEP", "NEIGHBOURS",
]

#: Every method, in table order.
METHODS: tuple[str, ...] = ("flat", "flat-1t", "native", "plan", "plan-copy", "foreach",
                            "loop", "torch-backend")

#: Copies one call makes, for methods that repeat the copy inside one call (their samples are
#: divided by it): ``plan-copy`` amortises its one checked run and its call this way.
COPIES_PER_CALL: dict[str, int] = {"plan-copy": 17}

#: Synthetic sets for the thread sweep: ``uniform-<N>MiB`` is N MiB in 256 KiB float32 tensors.
_UNIFORM = re.compile(r"uniform-(\d+)MiB")
_UNIFORM_TENSOR_BYTES = 256 << 10

#: Sets of the thread experiment: the two big weight sets and a sweep across the copier's
#: default parallel threshold (8 MiB).
THREAD_SETS: tuple[str, ...] = ("conv-mid", "large")
THREAD_SWEEP: tuple[str, ...] = tuple(f"uniform-{n}MiB" for n in (1, 2, 4, 8, 16, 32, 64))
NEIGHBOURS: tuple[str, ...] = ("none", "spin", "memcpy")

# A neighbour that keeps one core busy. "spin" only burns CPU (a descheduled copier thread);
# "memcpy" also takes memory bandwidth, as a collector stepping an environment would.
_NEIGHBOUR_CODE = {
    "spin": "while True:\n    pass\n",
    "memcpy": (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "a = torch.ones(64 << 20, dtype=torch.uint8)\n"
        "b = torch.empty_like(a)\n"
        "while True:\n"
        "    b.copy_(a)\n"
    ),
}


@dataclass
class CopyCase:
    """One weight set ready to copy: ``dst[i] <- src[i]`` plus flat buffers of the same bytes."""

    name: str
    dst: list[torch.Tensor]
    src: list[torch.Tensor]
    flat_dst: torch.Tensor
    flat_src: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat_dst.numel()

    @property
    def count(self) -> int:
        return len(self.dst)


@dataclass
class MethodResult:
    """Per-call times of one method on one set (seconds)."""

    method: str
    median_s: float
    min_s: float
    calls_per_sample: int
    samples_s: list[float]
    ratio_vs_flat: float | None = None
    best_ratio_vs_flat: float | None = None
    ratio_vs_flat_1t: float | None = None
    gb_per_s: float | None = None


@dataclass
class SetResult:
    """All methods on one set, measured in one process."""

    set_name: str
    tensors: int
    nbytes: int
    backends: dict[str, str]
    results: dict[str, MethodResult] = field(default_factory=dict)


def make_case(name: str) -> CopyCase:
    """Build set ``name``: two instances (seeds 0 and 1) and flat buffers of the same size.

    ``name`` is a weight set of bench/weight_sets.py or ``uniform-<N>MiB``. The flat source is
    filled so its pages are really mapped (never-written pages all read the shared zero page,
    which would flatter the flat copy).
    """
    match = _UNIFORM.fullmatch(name)
    if match is not None:
        count = max(1, (int(match.group(1)) << 20) // _UNIFORM_TENSOR_BYTES)
        numel = _UNIFORM_TENSOR_BYTES // 4
        dst = [torch.zeros(numel) for _ in range(count)]
        src = [torch.randn(numel) for _ in range(count)]
        nbytes = count * _UNIFORM_TENSOR_BYTES
    else:
        dst_module = make_module(name, seed=0)
        src_module = make_module(name, seed=1)
        dst, src = list(dst_module.parameters()), list(src_module.parameters())
        nbytes = payload_nbytes(dst_module)
    flat_dst = torch.zeros(nbytes, dtype=torch.uint8)
    flat_src = torch.full((nbytes,), 7, dtype=torch.uint8)
    return CopyCase(name, dst, src, flat_dst, flat_src)


def method_fn(method: str, case: CopyCase) -> Callable[[], None]:
    """A no-argument callable doing one copy of ``case`` by ``method``.

    Setup that a real user does once (building a plan, a backend object) happens here, not
    in the callable. The callables expect to run under ``torch.no_grad()`` (the parameters
    require grad); the engine's own entry points do not need it.
    """
    dst, src = case.dst, case.src
    if method in ("flat", "flat-1t"):
        flat_dst, flat_src = case.flat_dst, case.flat_src
        return lambda: flat_dst.copy_(flat_src)
    if method == "native":
        return lambda: ops.batched_copy_(dst, src)
    if method == "plan":
        return CopyPlan(dst, src).run
    if method == "plan-copy":
        plan, copies = CopyPlan(dst, src), COPIES_PER_CALL[method]
        return lambda: plan._copy_repeatedly(copies)
    if method == "foreach":
        return lambda: torch._foreach_copy_(dst, src)
    if method == "loop":
        def loop() -> None:
            for d, s in zip(dst, src):
                d.copy_(s)
        return loop
    if method == "torch-backend":
        backend = TorchBackend()
        return lambda: backend.batched_copy_(dst, src)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@contextmanager
def method_scope(method: str) -> Iterator[None]:
    """Where ``method``'s calls must run: one torch thread for ``flat-1t``, as is otherwise."""
    if method != "flat-1t":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backends(case: CopyCase) -> dict[str, str]:
    """The engine backend ``native`` and ``plan`` really use (torch without the extension)."""
    return {"native": backend_for(case.dst[:1]).name,
            "plan": CopyPlan(case.dst[:1], case.src[:1]).backend}


def _verify(method: str, fn: Callable[[], None], case: CopyCase) -> None:
    """Check that ``method`` really copies every byte before timing it."""
    flat = method in ("flat", "flat-1t")
    targets = [case.flat_dst] if flat else case.dst
    sources = [case.flat_src] if flat else case.src
    with torch.no_grad():
        for t in targets:
            t.zero_()
        fn()
        for i, (d, s) in enumerate(zip(targets, sources)):
            if not torch.equal(d.reshape(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8)):
                raise AssertionError(f"{method} on {case.name}: tensor {i} differs from its source")


@contextmanager
def _quiet_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(fn: Callable[[], None], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calls_for(fn: Callable[[], None], min_sample_s: float, max_calls: int = 10_000) -> int:
    """How many calls make one sample last at least ``min_sample_s`` (timer resolution, noise)."""
    calls = 1
    while True:
        per_call = time_calls(fn, calls)
        if per_call * calls >= min_sample_s or calls >= max_calls:
            return calls
        wanted = int(1.2 * min_sample_s / max(per_call, 1e-9)) + 1
        calls = min(max_calls, max(2 * calls, wanted))


#: Untimed calls of a method before each of its samples, in seconds. Torch's OpenMP workers
#: keep spinning for several milliseconds after each parallel region (libgomp's default spin
#: count; measured 8 ms on a 2-core EPYC VM), and while they spin they hold the core the host
#: copier's helper needs: the plan's first calls after a sample of ``flat`` ran at one-thread
#: speed (85-91 us against 45 us on many-small's bytes as one span). Settling first measures
#: each method in its own steady state instead of in the previous method's wake.
SETTLE_S = 0.015


def settle(fn: Callable[[], None], seconds: float = SETTLE_S) -> None:
    """Call ``fn`` back to back, untimed, for ``seconds`` (at least once)."""
    end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < end:
        fn()


def round_robin(fns: dict[str, Callable[[], None]], rounds: int = 7, min_sample_s: float = 0.02,
                settle_s: float = SETTLE_S) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of every function, sampled round-robin: ``(samples, calls)``.

    Each round takes one sample of every function (in an order rotated per round), a sample
    being ``calls[name]`` back-to-back calls, enough to last ``min_sample_s``, after
    ``settle_s`` of untimed calls of the same function (see :data:`SETTLE_S`). Interleaving
    keeps drifts of the machine (the host's load, its memory bandwidth) out of the ratios.
    A function named ``flat-1t`` runs with one torch thread (:func:`method_scope`).
    """
    with _quiet_gc():
        calls: dict[str, int] = {}
        for name, fn in fns.items():
            with method_scope(name):
                fn()  # warm: first touch of pages, lazy inits
                calls[name] = calls_for(fn, min_sample_s)
        names = list(fns)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                with method_scope(name):
                    settle(fns[name], settle_s)
                    samples[name].append(time_calls(fns[name], calls[name]))
    return samples, calls


def measure_case(case: CopyCase, methods: Sequence[str] = METHODS, rounds: int = 7,
                 min_sample_s: float = 0.02, verify: bool = True,
                 settle_s: float = SETTLE_S) -> SetResult:
    """Time every method on ``case``, round-robin, and compute ratios against ``flat``.

    Each round takes one sample of every method (in an order rotated per round), a sample
    being enough back-to-back calls to last ``min_sample_s``, after ``settle_s`` of untimed
    calls of the same method (see :data:`SETTLE_S`). The per-call median over rounds is the
    reported time; ``flat`` is always measured, since the ratios need it.
    """
    methods = list(dict.fromkeys(("flat", *methods)))
    backends = _backends(case)
    if backends["plan"] != "native":  # only native plans can skip their check
        methods = [m for m in methods if m != "plan-copy"]
    fns = {m: method_fn(m, case) for m in methods}
    result = SetResult(case.name, case.count, case.nbytes, backends)
    if verify:
        with torch.no_grad():
            for m in methods:
                with method_scope(m):
                    _verify(m, fns[m], case)
    with torch.no_grad():
        samples, calls = round_robin(fns, rounds, min_sample_s, settle_s)
    for m, copies in COPIES_PER_CALL.items():
        if m in samples:
            samples[m] = [t / copies for t in samples[m]]
    flat, flat_best = median(samples["flat"]), min(samples["flat"])
    flat_1t = median(samples["flat-1t"]) if "flat-1t" in samples else None
    for m in methods:
        mid, best = median(samples[m]), min(samples[m])
        result.results[m] = MethodResult(
            method=m, median_s=mid, min_s=best, calls_per_sample=calls[m], samples_s=samples[m],
            ratio_vs_flat=flat / mid, best_ratio_vs_flat=flat_best / best,
            ratio_vs_flat_1t=None if flat_1t is None else flat_1t / mid,
            gb_per_s=case.nbytes / mid / 1e9)
    return result


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, thread settings, host copier options, load."""
    info = backend_info()
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "cpu_backend": info["devices"]["cpu"].get("active"),
        "extension_loaded": info["extension"]["loaded"],
        "extension_reason": info["extension"]["reason"],
        "host_copier": info["extension"].get("host_copier"),
        "env": {k: v for k, v in os.environ.items() if k.startswith("WEIGHTSYNC_")},
    }


def run_benchmarks(sets: Sequence[str] = tuple(WEIGHT_SETS), methods: Sequence[str] = METHODS,
                   rounds: int = 7, min_sample_s: float = 0.02, verify: bool = True,
                   progress: Callable[[str], None] | None = None,
                   settle_s: float = SETTLE_S) -> dict[str, Any]:
    """Measure ``methods`` on each set in ``sets`` (one set in memory at a time).

    Returns ``{"environment": ..., "sets": [SetResult as dict, ...]}`` (JSON-ready).
    """
    out: dict[str, Any] = {"environment": {**environment(), "settle_s": settle_s}, "sets": []}
    for name in sets:
        if progress is not None:
            progress(f"building {name}")
        case = make_case(name)
        if progress is not None:
            progress(f"measuring {name} ({case.count} tensors, {case.nbytes / 1e6:.1f} MB)")
        out["sets"].append(asdict(measure_case(case, methods, rounds, min_sample_s, verify, settle_s)))
        del case
        gc.collect()
    out["environment"]["loadavg_end"] = list(os.getloadavg())
    return out


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table, one row per method and set.

    Columns: median time per call, GB/s at the median, flat median / method median, flat-1t
    median / method median, and flat / method from the best sample of each (less sensitive
    to a busy machine).
    """
    env = report["environment"]
    lines = [
        f"torch {env['torch']}, {env['cpus']} CPUs, torch threads {env['torch_threads']}, "
        f"cpu backend {env['cpu_backend']}, host copier {env['host_copier']}, "
        f"load {env['loadavg'][0]:.2f} -> {env.get('loadavg_end', env['loadavg'])[0]:.2f}",
        f"{'set':<14}{'tensors':>8}{'MB':>9}  {'method':<14}{'median':>11}{'GB/s':>8}"
        f"{'vs flat':>9}{'vs 1t':>8}{'best vs flat':>14}",
    ]
    for s in report["sets"]:
        first = True
        for m, r in s["results"].items():
            head = (f"{s['set_name']:<14}{s['tensors']:>8}{s['nbytes'] / 1e6:>9.1f}" if first
                    else " " * 31)
            note = ""
            if m in s["backends"] and s["backends"][m] != "native":
                note = f"  (ran on the {s['backends'][m]} backend)"
            vs_1t = r.get("ratio_vs_flat_1t")
            lines.append(f"{head}  {m:<14}{_fmt_time(r['median_s']):>11}{r['gb_per_s']:>8.2f}"
                         f"{r['ratio_vs_flat']:>8.2f}x"
                         + (f"{vs_1t:>7.2f}x" if vs_1t is not None else f"{'-':>8}")
                         + f"{r['best_ratio_vs_flat']:>13.2f}x{note}")
            first = False
    return "\n".join(lines)


@contextmanager
def busy_neighbour(kind: str) -> Iterator[subprocess.Popen | None]:
    """Keep one core busy with a separate process for the duration (``none``: do nothing).

    The process is started here and killed here, by its own handle.
    """
    if kind == "none":
        yield None
        return
    if kind not in _NEIGHBOUR_CODE:
        raise ValueError(f"unknown neighbour {kind!r}; choose from {', '.join(NEIGHBOURS)}")
    proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR_CODE[kind]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # past the interpreter (and torch) start-up, into the busy loop
        if proc.poll() is not None:
            raise RuntimeError(f"busy neighbour {kind!r} exited early with code {proc.returncode}")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


class _Server:
    """This script in ``--serve`` mode in a child process with its own copier options.

    The host copier reads its options once per process, so each thread count needs its own
    process; keeping the processes alive and asking them for one round at a time lets the
    parent interleave the thread counts, so a load that comes and goes (other jobs on the
    machine) hits all of them alike.
    """

    def __init__(self, threads: int, sets: Sequence[str], methods: Sequence[str],
                 parallel_min_bytes: int | None, timeout_s: float) -> None:
        env = dict(os.environ)
        env["WEIGHTSYNC_NUM_THREADS"] = str(threads)
        env.pop("WEIGHTSYNC_BACKEND", None)
        if parallel_min_bytes is not None:
            env["WEIGHTSYNC_PARALLEL_MIN_BYTES"] = str(parallel_min_bytes)
        self.threads = threads
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--sets", *sets,
               "--methods", *methods, "--torch-threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.hello = self._answer("start up")

    def _answer(self, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if self.proc.poll() is None:
                self.close()
                raise RuntimeError(f"benchmark child with {self.threads} thread(s) did not "
                                   f"{what} within {self.timeout_s:.0f} s")
            self._stderr.seek(0)
            raise RuntimeError(f"benchmark child with {self.threads} thread(s) exited with code "
                               f"{self.proc.returncode} during {what}:\n{self._stderr.read()[-2000:]}")
        return json.loads(line)

    def round(self) -> dict[str, dict[str, float]]:
        """One sample of every method on every set: {set: {method: seconds per call}}."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._answer("finish a round")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()


def serve(sets: Sequence[str], methods: Sequence[str], min_sample_s: float = 0.02) -> int:
    """Child side of :class:`_Server`: build the sets, then time one round per ``round`` line.

    Writes one JSON line when ready (set sizes) and one per round; ``quit`` or EOF ends it.
    """
    cases = {name: make_case(name) for name in sets}
    fns = {name: {m: method_fn(m, case) for m in methods} for name, case in cases.items()}
    calls: dict[str, dict[str, int]] = {name: {} for name in sets}
    with torch.no_grad(), _quiet_gc():
        for name, case in cases.items():
            for m, fn in fns[name].items():
                with method_scope(m):
                    _verify(m, fn, case)
                    fn()
                    calls[name][m] = calls_for(fn, min_sample_s)
        sizes = {name: {"tensors": c.count, "nbytes": c.nbytes, "calls": calls[name]}
                 for name, c in cases.items()}
        print(json.dumps({"environment": environment(), "sets": sizes}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command != "round":
                print(f"unknown command {command!r}; expected 'round' or 'quit'", file=sys.stderr)
                return 2
            out: dict[str, dict[str, float]] = {}
            for name in sets:
                out[name] = {}
                for m, fn in fns[name].items():
                    with method_scope(m):
                        settle(fn)
                        out[name][m] = time_calls(fn, calls[name][m])
            print(json.dumps(out), flush=True)
    return 0


def thread_experiment(sets: Sequence[str] = THREAD_SETS + THREAD_SWEEP,
                      threads: Sequence[int] = (1, 2), neighbours: Sequence[str] = NEIGHBOURS,
                      methods: Sequence[str] = ("flat", "plan", "native"), rounds: int = 7,
                      parallel_min_bytes: int | None = 0, timeout_s: float = 600.0,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Host copier threads: one child process per thread count, idle and beside a busy core.

    Per neighbour kind, the children are started (each builds every set once), then asked for
    ``rounds`` rounds in alternation, so both thread counts see the same background load.
    ``parallel_min_bytes=0`` (the default here) makes the copier use its threads at every
    size, so the sweep shows where they start to pay; ``None`` keeps the process default.
    The flat copy in each child runs with torch's intra-op threads set to the same count.
    Returns ``{"environment", "parallel_min_bytes", "runs": [{"threads", "neighbour",
    "report"}, ...]}``, each report shaped like :func:`run_benchmarks`'s.
    """
    runs = []
    for kind in neighbours:
        with busy_neighbour(kind):
            if progress is not None:
                progress(f"neighbour={kind}: starting children")
            servers: list[_Server] = []
            try:
                for n in threads:
                    servers.append(_Server(n, sets, methods, parallel_min_bytes, timeout_s))
                samples: dict[int, list[dict[str, dict[str, float]]]] = {n: [] for n in threads}
                loads = []
                for r in range(rounds):
                    if progress is not None:
                        progress(f"neighbour={kind}: round {r + 1}/{rounds}")
                    loads.append(os.getloadavg()[0])
                    shift = r % len(servers)
                    for server in servers[shift:] + servers[:shift]:
                        samples[server.threads].append(server.round())
                for server in servers:
                    runs.append({"threads": server.threads, "neighbour": kind,
                                 "report": _summarize(server.hello, samples[server.threads],
                                                      loads)})
            finally:
                for server in servers:
                    server.close()
    return {"environment": environment(), "parallel_min_bytes": parallel_min_bytes, "runs": runs}


def _summarize(hello: dict[str, Any], rounds: list[dict[str, dict[str, float]]],
               loads: list[float]) -> dict[str, Any]:
    """Per-round samples of one child turned into a :func:`run_benchmarks`-shaped report."""
    report: dict[str, Any] = {"environment": {**hello["environment"], "loadavg_rounds": loads},
                              "sets": []}
    for name, size in hello["sets"].items():
        results = {}
        flat = median(r[name]["flat"] for r in rounds) if "flat" in rounds[0][name] else None
        for m in rounds[0][name]:
            per_call = [r[name][m] for r in rounds]
            mid = median(per_call)
            results[m] = asdict(MethodResult(
                method=m, median_s=mid, min_s=min(per_call), calls_per_sample=size["calls"][m],
                samples_s=per_call, ratio_vs_flat=None if flat is None else flat / mid,
                gb_per_s=size["nbytes"] / mid / 1e9))
        report["sets"].append({"set_name": name, "tensors": size["tensors"],
                               "nbytes": size["nbytes"], "results": results})
    return report


def format_thread_table(experiment: dict[str, Any]) -> str:
    """One row per (set, method, neighbour): time per call for each thread count and the speedup."""
    runs = experiment["runs"]
    counts = sorted({r["threads"] for r in runs})
    neighbours = list(dict.fromkeys(r["neighbour"] for r in runs))
    by_key: dict[tuple[str, int], dict[str, Any]] = {
        (r["neighbour"], r["threads"]): {s["set_name"]: s for s in r["report"]["sets"]}
        for r in runs}
    by_load = {r["neighbour"]: r["report"]["environment"].get("loadavg_rounds") for r in runs}
    first = by_key[(neighbours[0], counts[0])]
    methods = list(next(iter(first.values()))["results"])
    header = (f"{'set':<14}{'method':<8}{'neighbour':<10}"
              + "".join(f"{f'{n} thr':>11}" for n in counts)
              + "".join(f"{f'{n}/{counts[0]}':>8}" for n in counts[1:])
              + f"{'GB/s@' + str(counts[-1]):>9}")
    lines = [f"parallel_min_bytes={experiment['parallel_min_bytes']} "
             f"(torch threads = copier threads in each child)"]
    for kind in neighbours:
        loads = by_load.get(kind)
        if loads:
            lines.append(f"neighbour={kind}: 1-min load average {min(loads):.1f}-{max(loads):.1f} "
                         f"during the rounds")
    lines.append(header)
    for set_name in first:
        for m in methods:
            for kind in neighbours:
                times = [by_key[(kind, n)][set_name]["results"][m]["median_s"] for n in counts]
                gbps = by_key[(kind, counts[-1])][set_name]["results"][m]["gb_per_s"]
                lines.append(f"{set_name:<14}{m:<8}{kind:<10}"
                             + "".join(f"{_fmt_time(t):>11}" for t in times)
                             + "".join(f"{times[0] / t:>7.2f}x" for t in times[1:])
                             + f"{gbps:>9.2f}")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=None,
                   help=f"weight sets (default: {' '.join(WEIGHT_SETS)}); also uniform-<N>MiB")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: all (flat plan native for --threads-experiment)")
    p.add_argument("--rounds", type=int, default=7, help="samples per method (median reported)")
    p.add_argument("--min-sample", type=float, default=0.02,
                   help="seconds one sample lasts at least (calls are repeated)")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help="seconds of untimed calls of a method before each of its samples")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for this process (flat/foreach/loop use them)")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exact check")
    p.add_argument("--json", default=None, help="write the full report (all samples) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines or table")
    p.add_argument("--threads-experiment", action="store_true",
                   help="1 vs 2 copier threads, idle and with a busy neighbour (child processes)")
    p.add_argument("--neighbours", nargs="+", default=list(NEIGHBOURS), choices=NEIGHBOURS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # experiment child
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    progress = None if args.quiet else (lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    for name in args.sets or ():
        if name not in WEIGHT_SETS and _UNIFORM.fullmatch(name) is None:
            print(f"unknown set {name!r}; choose from {', '.join(WEIGHT_SETS)} or uniform-<N>MiB",
                  file=sys.stderr)
            return 2
    if args.serve:
        return serve(args.sets or THREAD_SETS, args.methods or METHODS, args.min_sample)
    if args.threads_experiment:
        sets = args.sets or (THREAD_SETS + THREAD_SWEEP)
        report = thread_experiment(sets, methods=args.methods or ("flat", "plan", "native"),
                                   neighbours=args.neighbours, rounds=args.rounds,
                                   progress=progress)
        table = format_thread_table(report)
    else:
        report = run_benchmarks(args.sets or tuple(WEIGHT_SETS), args.methods or METHODS,
                                args.rounds, args.min_sample, not args.no_verify, progress,
                                settle_s=args.settle)
        table = format_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.quiet:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
