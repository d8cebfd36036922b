"""GPU benchmark of the engine: batched copies against one flat copy / one pinned DMA.

Needs a CUDA GPU; without one it exits with status 2 and says why. For each weight set
(bench/weight_sets.py) and direction, every method runs on the same tensors in one process,
timed with CUDA events around back-to-back calls (median over rounds); wall-clock time per call
is reported beside it.

- ``d2d`` (device to device, one GPU): ``flat`` (one ``copy_`` of two device uint8 buffers of
  the payload size), ``native`` (:func:`weightsync.ops.batched_copy_`), ``plan``
  (:class:`weightsync.engine.CopyPlan`), ``foreach`` (``torch._foreach_copy_``), ``loop``
  (per-tensor ``copy_``), ``cupy`` (the cupy backend, when cupy is installed) and
  ``torch-backend``. Target: native >= 0.85x flat.
- ``h2d`` (pageable host parameters to device): ``flat`` is one DMA from a pinned buffer
  (``non_blocking=True``); ``flat-pageable`` the same bytes from pageable memory; ``native``
  goes through the engine's pinned staging; ``native-pinned-src`` has page-locked sources
  (DMA'd in place); ``unpack-pinned`` is :func:`weightsync.ops.unpack_` from a pinned flat
  (the shared-memory arena's path). Target: native >= 0.85x flat.
- ``d2h`` (device to pageable host parameters): the mirror image; ``pack-pinned`` is
  :func:`weightsync.ops.pack_` into a pinned flat.

Launch counts: for 10, 1000 and 10000 tensors of 4 KB, torch.profiler counts per call the CUDA
kernels, memcpys/memsets and kernel-launch API calls of native, plan, foreach and cupy (d2d)
and of native h2d/d2h. Target: one kernel per call whatever the tensor count.

Usage::

    python bench/gpu_bench.py --out gpu.json
    python bench/gpu_bench.py --sets mlp-small many-small --directions d2d --out gpu.json

Everything is importable (:func:`run_gpu_benchmarks`, :func:`launch_counts`,
:func:`format_gpu_table`) for a ``weightsync bench`` command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

_BENCH_DIR = Path(__file__).resolve().parent
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

from weight_sets import WEIGHT_SETS, make_module  # noqa: E402

from weightsync import ops  # noqa: E402
from weightsync.engine import CopyPlan, backend_for, backend_info  # noqa: E402
from weightsync.engine.cupy_backend import CupyBackend, cupy_unavailable_reason  # noqa: E402
from weightsync.engine.torch_backend import TorchBackend  # noqa: E402
from weightsync.errors import BackendUnavailableError  # noqa: E402

__all__ = [
    "DIRECTIONS", "METHODS", "GpuCase", "require_gpu", "make_cases", "method_fn",
    "time_cuda", "measure_case", "count_launches", "launch_counts", "run_gpu_benchmarks",
    "format_gpu_table", "main",
]

DIRECTIONS: tuple[str, ...] = ("d2d", "h2d", "d2h")

#: Methods per direction, in table order; the first is the reference of the ratios.
METHODS: dict[str, tuple[str, ...]] = {
    "d2d": ("flat", "native", "plan", "foreach", "loop", "cupy", "torch-backend"),
    "h2d": ("flat", "flat-pageable", "native", "native-pinned-src", "plan", "unpack-pinned",
            "foreach", "loop", "cupy", "torch-backend"),
    "d2h": ("flat", "flat-pageable", "native", "plan", "pack-pinned", "foreach", "loop",
            "torch-backend"),
}

LAUNCH_COUNTS: tuple[int, ...] = (10, 1000, 10000)
_LAUNCH_NUMEL = 1024  # 4 KB float32 tensors
_ARENA_ALIGN = 256  # the arena's offset alignment (DESIGN.md)


def require_gpu() -> torch.device:
    """The current CUDA device, or BackendUnavailableError saying why there is none."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "a CUDA GPU is needed: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return torch.device("cuda", torch.cuda.current_device())


@dataclass
class GpuCase:
    """One weight set in one direction: ``dst[i] <- src[i]`` plus the flat references."""

    name: str
    direction: str
    dst: list[torch.Tensor]
    src: list[torch.Tensor]
    nbytes: int
    flat_dst: torch.Tensor  # device (d2d, h2d) or pinned host (d2h)
    flat_src: torch.Tensor  # device (d2d, d2h) or pinned host (h2d)
    pageable_flat: torch.Tensor | None = None  # h2d: source, d2h: destination
    pinned_src: list[torch.Tensor] = field(default_factory=list)  # h2d only
    offsets: list[int] = field(default_factory=list)  # arena layout of the pinned flat

    @property
    def count(self) -> int:
        return len(self.dst)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


def _arena_offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    offsets, cursor = [], 0
    for t in tensors:
        offsets.append(cursor)
        cursor += -(-t.numel() * t.element_size() // _ARENA_ALIGN) * _ARENA_ALIGN
    return offsets, cursor


def _uniform(count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(_LAUNCH_NUMEL, generator=gen) for _ in range(count)]


def make_cases(name: str, device: torch.device, directions: Sequence[str] = DIRECTIONS
               ) -> dict[str, GpuCase]:
    """Set ``name`` (a weight set, or ``uniform-<count>`` 4 KB tensors) in every direction.

    Two instances (seeds 0 and 1) live on the host and on the device; d2d copies device
    instance 1 into device instance 0, h2d host 1 into device 0, d2h device 1 into host 0.
    """
    if name.startswith("uniform-"):
        count = int(name.split("-", 1)[1])
        host0, host1 = _uniform(count, 0), _uniform(count, 1)
    else:
        host0, host1 = _params(make_module(name, seed=0)), _params(make_module(name, seed=1))
    dev0 = [t.to(device) for t in host0]
    dev1 = [t.to(device) for t in host1]
    nbytes = sum(t.numel() * t.element_size() for t in host0)
    offsets, arena_bytes = _arena_offsets(host0)
    cases: dict[str, GpuCase] = {}
    if "d2d" in directions:
        cases["d2d"] = GpuCase(name, "d2d", dev0, dev1, nbytes,
                               torch.zeros(nbytes, dtype=torch.uint8, device=device),
                               torch.full((nbytes,), 7, dtype=torch.uint8, device=device))
    if "h2d" in directions:
        pinned = torch.zeros(arena_bytes, dtype=torch.uint8, pin_memory=True)
        ops.pack_(host1, pinned, offsets)  # unpack-pinned reads host1's bytes from here
        cases["h2d"] = GpuCase(name, "h2d", dev0, host1, nbytes,
                               torch.zeros(arena_bytes, dtype=torch.uint8, device=device), pinned,
                               pageable_flat=torch.full((arena_bytes,), 7, dtype=torch.uint8),
                               pinned_src=[t.pin_memory() for t in host1], offsets=offsets)
    if "d2h" in directions:
        cases["d2h"] = GpuCase(name, "d2h", host0, dev1, nbytes,
                               torch.zeros(arena_bytes, dtype=torch.uint8, pin_memory=True),
                               torch.full((arena_bytes,), 7, dtype=torch.uint8, device=device),
                               pageable_flat=torch.zeros(arena_bytes, dtype=torch.uint8),
                               offsets=offsets)
    return cases


def method_fn(method: str, case: GpuCase) -> Callable[[], None] | str:
    """A no-argument callable doing one copy of ``case`` by ``method``, or why it cannot run.

    One-time setup (plans, backend objects) happens here, outside the timing.
    """
    dst, src, d = case.dst, case.src, case.direction
    if method == "flat":
        # The reference: one device copy (d2d) or one DMA from/to pinned memory (h2d, d2h),
        # of the payload's bytes only (the flat buffers may hold alignment padding).
        fd, fs = case.flat_dst.narrow(0, 0, case.nbytes), case.flat_src.narrow(0, 0, case.nbytes)
        return lambda: fd.copy_(fs, non_blocking=True)
    if method == "flat-pageable":
        assert case.pageable_flat is not None
        pageable = case.pageable_flat.narrow(0, 0, case.nbytes)
        if d == "h2d":
            fd, fs = case.flat_dst.narrow(0, 0, case.nbytes), pageable
        else:
            fd, fs = pageable, case.flat_src.narrow(0, 0, case.nbytes)
        return lambda: fd.copy_(fs)
    if method == "native":
        return lambda: ops.batched_copy_(dst, src)
    if method == "native-pinned-src":
        pinned = case.pinned_src
        return lambda: ops.batched_copy_(dst, pinned)
    if method == "plan":
        return CopyPlan(dst, src).run
    if method == "unpack-pinned":
        flat, offsets = case.flat_src, case.offsets
        return lambda: ops.unpack_(flat, dst, offsets)
    if method == "pack-pinned":
        flat, offsets = case.flat_dst, case.offsets
        return lambda: ops.pack_(src, flat, offsets)
    if method == "foreach":
        return lambda: torch._foreach_copy_(dst, src)
    if method == "loop":
        def loop() -> None:
            for a, b in zip(dst, src):
                a.copy_(b)
        return loop
    if method == "cupy":
        reason = cupy_unavailable_reason()
        if reason is not None:
            return f"skipped: {reason}"
        backend = CupyBackend()
        return lambda: backend.batched_copy_(dst, src)
    if method == "torch-backend":
        backend = TorchBackend()
        return lambda: backend.batched_copy_(dst, src)
    raise ValueError(f"unknown method {method!r} for {d}; choose from {', '.join(METHODS[d])}")


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).cpu()


def _verify(method: str, fn: Callable[[], None], case: GpuCase) -> None:
    """Check bit-exactness of one call of ``method`` before timing it."""
    if method.startswith("flat"):
        return
    if method == "pack-pinned":
        case.flat_dst.zero_()
        fn()
        torch.cuda.synchronize()
        for i, (t, off) in enumerate(zip(case.src, case.offsets)):
            n = t.numel() * t.element_size()
            got = case.flat_dst.narrow(0, off, n)
            if not torch.equal(got, _host_bytes(t)):
                raise AssertionError(f"pack-pinned on {case.name}: segment {i} differs")
        return
    for t in case.dst:
        t.zero_()
    fn()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(case.dst, case.src)):
        if not torch.equal(_host_bytes(a), _host_bytes(b)):
            raise AssertionError(f"{method} ({case.direction}) on {case.name}: tensor {i} differs")


def time_cuda(fn: Callable[[], None], calls: int) -> tuple[float, float]:
    """(CUDA-event seconds per call, wall-clock seconds per call) over ``calls`` calls.

    The events bracket the calls on the current stream; host-side work inside a call (staging
    copies, waits) shows up as the gap it leaves on the stream, so event time is the call's
    full cost as the stream sees it.
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    wall = time.perf_counter() - t0
    return start.elapsed_time(end) / 1e3 / calls, wall / calls


def _calls_for(fn: Callable[[], None], min_sample_s: float, max_calls: int = 1000) -> int:
    calls = 1
    while True:
        _, wall = time_cuda(fn, calls)
        if wall * calls >= min_sample_s or calls >= max_calls:
            return calls
        calls = min(max_calls, max(2 * calls, int(1.2 * min_sample_s / max(wall, 1e-9)) + 1))


def measure_case(case: GpuCase, methods: Sequence[str] | None = None, rounds: int = 10,
                 min_sample_s: float = 0.01, verify: bool = True) -> dict[str, Any]:
    """Time each method on ``case`` round-robin; ratios against the direction's ``flat``."""
    methods = list(dict.fromkeys(("flat", *(methods or METHODS[case.direction]))))
    fns: dict[str, Callable[[], None]] = {}
    skipped: dict[str, str] = {}
    for m in methods:
        fn = method_fn(m, case)
        if isinstance(fn, str):
            skipped[m] = fn
        else:
            fns[m] = fn
    with torch.no_grad():
        calls = {}
        for m, fn in fns.items():
            if verify:
                _verify(m, fn, case)
            fn()
            calls[m] = _calls_for(fn, min_sample_s)
        events: dict[str, list[float]] = {m: [] for m in fns}
        walls: dict[str, list[float]] = {m: [] for m in fns}
        order = list(fns)
        for r in range(rounds):
            shift = r % len(order)
            for m in order[shift:] + order[:shift]:
                ev, wall = time_cuda(fns[m], calls[m])
                events[m].append(ev)
                walls[m].append(wall)
    flat = median(events["flat"])
    results = {}
    for m in fns:
        t = median(events[m])
        results[m] = {"event_s": t, "wall_s": median(walls[m]), "min_event_s": min(events[m]),
                      "calls_per_sample": calls[m], "gb_per_s": case.nbytes / t / 1e9,
                      "ratio_vs_flat": flat / t, "samples_event_s": events[m]}
    return {"set_name": case.name, "direction": case.direction, "tensors": case.count,
            "nbytes": case.nbytes, "backend": backend_for((*case.dst[:1], *case.src[:1])).name,
            "results": results, "skipped": skipped}


def count_launches(fn: Callable[[], None], calls: int = 5) -> dict[str, Any]:
    """Per call of ``fn``: CUDA kernels, memcpys, memsets and kernel-launch API calls.

    Counted from a torch.profiler trace of ``calls`` calls after one warm-up call (which may
    allocate staging buffers or compile kernels).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: Counter[str] = Counter()
    memcpy = memset = launch_api = 0
    for evt in prof.events():
        name = evt.name
        if evt.device_type == DeviceType.CUDA:
            # Kineto tags device activities (kernel, gpu_memcpy, gpu_memset); older traces
            # only name them ("Memcpy HtoD (Pinned -> Device)", "Memset (Device)").
            kind = str(getattr(evt, "activity_type", "") or "").lower()
            if "memcpy" in kind or name.startswith("Memcpy"):
                memcpy += 1
            elif "memset" in kind or name.startswith("Memset"):
                memset += 1
            else:
                kernels[name] += 1
        elif "LaunchKernel" in name:  # cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernel
            launch_api += 1
    return {"kernels_per_call": sum(kernels.values()) / calls, "memcpy_per_call": memcpy / calls,
            "memset_per_call": memset / calls, "launch_api_per_call": launch_api / calls,
            "kernel_names": sorted(kernels)}


def launch_counts(device: torch.device, counts: Sequence[int] = LAUNCH_COUNTS
                  ) -> list[dict[str, Any]]:
    """Kernel launches per call for ``counts`` tensors of 4 KB, per method and direction."""
    rows = []
    cupy_reason = cupy_unavailable_reason()
    # A trace without device activity (CUPTI missing or busy) would read as "0 kernels": check
    # that one plain device copy shows up before trusting any count.
    probe = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    seen = count_launches(lambda: probe.copy_(probe.flip(0)))
    if seen["kernels_per_call"] + seen["memcpy_per_call"] == 0:
        raise RuntimeError("torch.profiler recorded no CUDA activity for a plain device copy; "
                           "kernel counts would be meaningless (is CUPTI available?)")
    for count in counts:
        cases = make_cases(f"uniform-{count}", device)
        per_direction = {"d2d": ("native", "plan", "foreach", "cupy"),
                         "h2d": ("native", "plan", "cupy"), "d2h": ("native", "plan")}
        with torch.no_grad():
            for direction, methods in per_direction.items():
                for m in methods:
                    if m == "cupy" and cupy_reason is not None:
                        continue
                    fn = method_fn(m, cases[direction])
                    assert not isinstance(fn, str)
                    rows.append({"tensors": count, "direction": direction, "method": m,
                                 **count_launches(fn)})
        del cases
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: GPU, versions, backend choice, host copier options."""
    props = torch.cuda.get_device_properties(device)
    info = backend_info()
    return {
        "gpu": props.name, "gpu_memory_gb": props.total_memory / 2**30,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
        "cuda_backend": info["devices"]["cuda"].get("active"),
        "cuda_unavailable": info["devices"]["cuda"].get("unavailable"),
        "extension": {k: info["extension"][k] for k in ("loaded", "reason", "cuda_kernels")},
        "host_copier": info["extension"].get("host_copier"),
        "cupy": cupy_unavailable_reason() or "available",
        "env": {k: v for k, v in os.environ.items() if k.startswith("WEIGHTSYNC_")},
    }


def run_gpu_benchmarks(sets: Sequence[str] = tuple(WEIGHT_SETS),
                       directions: Sequence[str] = DIRECTIONS, rounds: int = 10,
                       with_launch_counts: bool = True, verify: bool = True,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every set and direction, then the launch counts. JSON-ready dict."""
    device = require_gpu()
    report: dict[str, Any] = {"environment": environment(device), "cases": [], "launches": []}
    for name in sets:
        if progress is not None:
            progress(f"building {name}")
        cases = make_cases(name, device, directions)
        for direction in directions:
            if progress is not None:
                progress(f"measuring {name} {direction}")
            report["cases"].append(measure_case(cases[direction], rounds=rounds, verify=verify))
        del cases
        gc.collect()
        torch.cuda.empty_cache()
    if with_launch_counts:
        if progress is not None:
            progress("counting launches")
        try:
            report["launches"] = launch_counts(device)
        except RuntimeError as exc:
            report["launches_error"] = str(exc)
    return report


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def format_gpu_table(report: dict[str, Any]) -> str:
    """Times, GB/s and ratios per case and method, then the launch counts."""
    env = report["environment"]
    lines = [f"{env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), cuda backend "
             f"{env['cuda_backend']}, extension CUDA kernels {env['extension']['cuda_kernels']}, "
             f"cupy {env['cupy']}",
             f"{'dir':<5}{'set':<12}{'tensors':>8}{'MB':>8}  {'method':<19}{'event':>11}"
             f"{'wall':>11}{'GB/s':>9}{'vs flat':>9}"]
    for case in report["cases"]:
        head = (f"{case['direction']:<5}{case['set_name']:<12}{case['tensors']:>8}"
                f"{case['nbytes'] / 1e6:>8.1f}")
        for m, r in case["results"].items():
            lines.append(f"{head}  {m:<19}{_fmt(r['event_s']):>11}{_fmt(r['wall_s']):>11}"
                         f"{r['gb_per_s']:>9.1f}{r['ratio_vs_flat']:>8.2f}x")
            head = " " * len(head)
        for m, why in case["skipped"].items():
            lines.append(f"{head}  {m:<19}{why}")
    if report.get("launches_error"):
        lines.append(f"launch counts unavailable: {report['launches_error']}")
    if report["launches"]:
        lines.append("")
        lines.append(f"{'tensors':>8}  {'dir':<5}{'method':<9}{'kernels':>9}{'memcpy':>8}"
                     f"{'memset':>8}{'launch API':>12}  kernels")
        for r in report["launches"]:
            lines.append(f"{r['tensors']:>8}  {r['direction']:<5}{r['method']:<9}"
                         f"{r['kernels_per_call']:>9.1f}{r['memcpy_per_call']:>8.1f}"
                         f"{r['memset_per_call']:>8.1f}{r['launch_api_per_call']:>12.1f}  "
                         f"{', '.join(n[:40] for n in r['kernel_names'][:3])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 when there is no GPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(WEIGHT_SETS), choices=list(WEIGHT_SETS))
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--no-launch-counts", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exact check")
    p.add_argument("--out", default=None, help="write the full report (JSON) here")
    args = p.parse_args(argv)
    try:
        report = run_gpu_benchmarks(
            args.sets, args.directions, args.rounds, not args.no_launch_counts,
            not args.no_verify, lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    except BackendUnavailableError as exc:
        print(f"gpu_bench: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_gpu_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
