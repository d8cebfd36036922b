"""Backend choice: which implementation runs an op, per device type, and why.

Order: ``native`` (the compiled library), ``cupy`` (CUDA tensors only, when the library has
no CUDA part), ``torch`` (always). ``WEIGHTSYNC_BACKEND=native|cupy|torch`` forces one; a
forced backend that cannot run raises :class:`BackendUnavailableError` saying why, rather
than quietly running another.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache
from typing import Any, Protocol

import torch

from weightsync import _extension, tree_identity
from weightsync.engine.cupy_backend import CupyBackend, cupy_unavailable_reason
from weightsync.engine.native_backend import NativeBackend
from weightsync.engine.torch_backend import TorchBackend
from weightsync.errors import BackendUnavailableError

__all__ = ["Backend", "BACKEND_NAMES", "forced_backend", "backend_for", "backend_info",
           "native_reason"]

BACKEND_NAMES = ("native", "cupy", "torch")


class Backend(Protocol):
    name: str

    def batched_copy_(self, dst, src, non_blocking: bool = False) -> None: ...
    def pack_(self, src, flat, offsets, non_blocking: bool = False) -> None: ...
    def unpack_(self, flat, dst, offsets, non_blocking: bool = False) -> None: ...


@cache
def _instance(name: str) -> Backend:
    return {"native": NativeBackend, "cupy": CupyBackend, "torch": TorchBackend}[name]()


def forced_backend() -> str | None:
    """The backend named by WEIGHTSYNC_BACKEND, or None (automatic)."""
    value = os.environ.get("WEIGHTSYNC_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKEND_NAMES:
        raise BackendUnavailableError(
            f"WEIGHTSYNC_BACKEND={value!r} is not a backend; choose one of {', '.join(BACKEND_NAMES)}")
    return value


# native_library_active() per WEIGHTSYNC_BACKEND value: asked on per-update paths. A plain
# dict rather than functools.cache, which torch.compile would trace through.
_NATIVE_ACTIVE: dict[str, bool] = {}


def native_library_active() -> bool:
    """Whether the library's host-side entry points are to be used: it is loaded and the torch
    backend is not forced (futex waits, storage windows, compiled calls of the ops)."""
    forced = os.environ.get("WEIGHTSYNC_BACKEND", "")
    active = _NATIVE_ACTIVE.get(forced)
    if active is None:
        active = _NATIVE_ACTIVE[forced] = _extension.load().loaded and forced_backend() != "torch"
    return active


def native_reason(device_type: str) -> str | None:
    """Why the native backend cannot run ops on ``device_type`` tensors, or None."""
    status = _extension.load()
    if not status.loaded:
        return f"extension {status.reason}"
    key = "CUDA" if device_type == "cuda" else "CPU"
    if not _extension.has_kernel("batched_copy_", key):
        built = status.build_info.get("cuda_skipped_because")
        return "extension built without its CUDA part" + (f" ({built})" if built else "")
    return None


def _reason(name: str, device_type: str) -> str | None:
    if name == "native":
        return native_reason(device_type)
    if name == "cupy":
        if device_type != "cuda":
            return "cupy only handles CUDA tensors"
        return cupy_unavailable_reason()
    return None


def _choose(device_type: str) -> str:
    forced = forced_backend()
    if forced is not None:
        if forced == "cupy" and device_type == "cpu":
            return "torch"  # cupy has nothing to offer for host-only work
        reason = _reason(forced, device_type)
        if reason is not None:
            raise BackendUnavailableError(
                f"WEIGHTSYNC_BACKEND={forced} cannot run {device_type} ops: {reason}")
        return forced
    for name in BACKEND_NAMES:
        if _reason(name, device_type) is None:
            return name
    return "torch"


@cache
def _choices(forced: str | None) -> tuple[str | Exception, str | Exception]:
    """(cpu choice, cuda choice) for one WEIGHTSYNC_BACKEND value; errors kept, not raised."""
    out: list[str | Exception] = []
    for device_type in ("cpu", "cuda"):
        try:
            out.append(_choose(device_type))
        except BackendUnavailableError as exc:
            out.append(exc)
    return out[0], out[1]


def backend_for(tensors: Iterable[torch.Tensor]) -> Backend:
    """The backend for a call touching ``tensors`` (CUDA if any of them is on a GPU).

    The choice is cached per WEIGHTSYNC_BACKEND value; when both device types get the same
    backend (the native one, typically) the tensors are not even looked at.
    """
    cpu, cuda = _choices(os.environ.get("WEIGHTSYNC_BACKEND", "").strip().lower() or None)
    choice = cpu
    # No CUDA tensor can exist before CUDA is initialised: skip the scan in CPU-only runs.
    # (A non-tensor is left to the chosen backend's checks, which name its index.)
    if cpu != cuda and torch.cuda.is_initialized() and any(
            isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        choice = cuda
    if isinstance(choice, Exception):
        raise type(choice)(str(choice))
    return _instance(choice)


def backend_info() -> dict[str, Any]:
    """Which backend runs each device type's ops, why the others do not, and build metadata.

    Never initialises CUDA and never raises: a bad WEIGHTSYNC_BACKEND shows up as an error entry.
    """
    status = _extension.load()
    info: dict[str, Any] = {
        "forced": os.environ.get("WEIGHTSYNC_BACKEND") or None,
        "extension": {
            "loaded": status.loaded,
            "path": status.path,
            "reason": status.reason,
            "cuda_kernels": status.with_cuda,
            "build": status.build_info,
        },
        "runtime": {"torch": torch.__version__, "torch_cuda": torch.version.cuda},
        # The walk that tells whether a cached plan's weight tree still holds its tensors.
        "tree_check": tree_identity.implementation(),
        "devices": {},
    }
    if status.loaded:
        threads, min_bytes, chunk = torch.ops.weightsync.engine_config()
        info["extension"]["host_copier"] = {
            # max_threads: capped by torch.get_num_threads() at the time of the call.
            "max_threads": threads, "parallel_min_bytes": min_bytes, "chunk_bytes": chunk}
        if hasattr(torch.ops.weightsync, "span_loop"):  # libraries built before it lack it
            # How small spans are copied: a vector loop for this CPU, or memcpy
            # (WEIGHTSYNC_SPAN_LOOP=memcpy|avx|avx512 picks one the CPU has).
            info["extension"]["host_copier"]["span_loop"] = torch.ops.weightsync.span_loop()
        if hasattr(torch.ops.weightsync, "helpers"):
            # Whose threads help the caller: the copier's own pool, torch's intra-op threads,
            # or "auto", which switches between them (WEIGHTSYNC_HELPERS=auto|own|torch).
            info["extension"]["host_copier"]["helpers"] = torch.ops.weightsync.helpers()
    for device_type in ("cpu", "cuda"):
        entry: dict[str, Any] = {"unavailable": {}}
        try:
            entry["active"] = _choose(device_type)
        except BackendUnavailableError as exc:
            entry["active"] = None
            entry["error"] = str(exc)
        for name in BACKEND_NAMES:
            reason = _reason(name, device_type)
            if reason is not None:
                entry["unavailable"][name] = reason
        info["devices"][device_type] = entry
    return info
