"""Loads the compiled engine library once, and remembers why when it cannot.

Never raises at import and never initialises CUDA: loading is lazy (first use of a native
op or of :func:`weightsync.backend_info`), and a failure is recorded with the build metadata
(torch, CUDA and Python the library was built for) beside the running ones, so the message
says what to rebuild.

Environment:
    WEIGHTSYNC_DISABLE_EXTENSION=1   do not load it at all (pure torch path).
    WEIGHTSYNC_EXTENSION_PATH=/x.so  load this file instead of the installed one.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["ExtensionStatus", "load", "status", "has_kernel", "c_functions"]

_PACKAGE_DIR = Path(__file__).resolve().parent
_OPS = ("batched_copy_", "pack_", "unpack_", "host_register", "host_unregister", "futex_wait",
        "futex_wake", "engine_config")


@dataclass(frozen=True)
class ExtensionStatus:
    """Outcome of loading the compiled library."""

    loaded: bool
    path: str | None
    reason: str | None
    build_info: dict[str, Any] = field(default_factory=dict)

    @property
    def with_cuda(self) -> bool:
        """Whether the CUDA kernels are registered with the dispatcher."""
        return self.loaded and has_kernel("batched_copy_", "CUDA")


_lock = threading.Lock()
_status: ExtensionStatus | None = None


def _read_build_info() -> dict[str, Any]:
    try:
        return json.loads((_PACKAGE_DIR / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _library_path() -> str | None:
    override = os.environ.get("WEIGHTSYNC_EXTENSION_PATH")
    if override:
        return override
    spec = importlib.util.find_spec("weightsync._C")
    return spec.origin if spec is not None and spec.origin else None


def _mismatch(info: dict[str, Any]) -> str:
    """Build-versus-runtime differences that usually explain a failed load."""
    running = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "python": platform.python_version()}
    diffs = [f"{key}: built for {info.get(key)!r}, running {value!r}"
             for key, value in running.items()
             if key in info and info.get(key) != value
             and not (key == "python" and str(info.get(key)).rsplit(".", 1)[0] == value.rsplit(".", 1)[0])]
    return "; ".join(diffs)


def _already_registered() -> bool:
    return has_kernel("batched_copy_", "CPU")


def _try_load() -> ExtensionStatus:
    info = _read_build_info()
    if os.environ.get("WEIGHTSYNC_DISABLE_EXTENSION", "") not in ("", "0"):
        return ExtensionStatus(False, None, "disabled by WEIGHTSYNC_DISABLE_EXTENSION", info)
    if info.get("extension") is False:
        reason = info.get("reason", "installed without the extension")
        return ExtensionStatus(False, None, f"not built ({reason})", info)
    path = _library_path()
    if path is None:
        return ExtensionStatus(
            False, None,
            "not built: weightsync/_C is missing (install with `pip install --no-build-isolation "
            "-e .` to compile it)", info)
    if _already_registered():
        return ExtensionStatus(True, path, None, info)
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        hint = _mismatch(info)
        reason = f"failed to load {path}: {exc}"
        if hint:
            reason += f" ({hint}; rebuild the extension)"
        return ExtensionStatus(False, path, reason, info)
    missing = [op for op in _OPS if not hasattr(torch.ops.weightsync, op)]
    if missing:
        return ExtensionStatus(False, path, f"{path} lacks ops {missing}; rebuild it", info)
    _register_fakes()
    return ExtensionStatus(True, path, None, info)


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace the in-place ops.

    They return nothing and mutate nothing: the ops' outputs are their mutated arguments,
    which the schema's alias annotations already describe. The dispatcher also sends real
    meta-device tensors here (a meta argument picks the Meta kernel over the CPU one): those
    hold no bytes, so such a call gets the same device error as the other backends instead of
    silently copying nothing.
    """
    from weightsync.engine.validate import check_copy_lists, check_pack_lists

    def real_meta(tensors: Any) -> bool:
        from torch._subclasses.fake_tensor import is_fake

        return any(isinstance(t, torch.Tensor) and t.is_meta and not is_fake(t) for t in tensors)

    def batched_copy(dst: Any, src: Any, non_blocking: bool = False) -> None:
        if real_meta((*dst, *src)):
            check_copy_lists("batched_copy_", dst, src)

    def pack(src: Any, flat: Any, offsets: Any, non_blocking: bool = False) -> None:
        if real_meta((*src, flat)):
            check_pack_lists("pack_", src, flat, offsets, tensors_are_written=False)

    def unpack(flat: Any, dst: Any, offsets: Any, non_blocking: bool = False) -> None:
        if real_meta((*dst, flat)):
            check_pack_lists("unpack_", dst, flat, offsets, tensors_are_written=True)

    for op, fake in (("batched_copy_", batched_copy), ("pack_", pack), ("unpack_", unpack)):
        torch.library.register_fake(f"weightsync::{op}")(fake)


def load() -> ExtensionStatus:
    """Load the library if not done yet; return the (cached) outcome. Never raises."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _try_load()
    return _status


def status() -> ExtensionStatus:
    """Same as :func:`load`."""
    return load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``weightsync::<op>`` has a kernel for ``dispatch_key`` (asks the dispatcher)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"weightsync::{op}", dispatch_key))
    except RuntimeError:
        return False


def c_functions(prefix: str, signatures: dict[str, tuple[list[Any], Any]], *,
                drop_gil: Collection[str] | None = None) -> SimpleNamespace | None:
    """The library's C entry points ``prefix + name``, typed, as attributes ``name``.

    ``signatures`` maps each ``name`` to ``(argtypes, restype)``. Calls in ``drop_gil`` (all
    when None) release the GIL while they run (``ctypes.CDLL``); the others keep it
    (``ctypes.PyDLL``), which suits calls of a few nanoseconds made often: releasing and
    re-taking the GIL each time would starve the process's other Python threads. Returns
    None when the library is not loaded or lacks one of them.
    """
    loaded = load()
    if not loaded.loaded or loaded.path is None:
        return None
    try:
        dropping, holding = ctypes.CDLL(loaded.path), ctypes.PyDLL(loaded.path)
        functions = {}
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(dropping if drop_gil is None or name in drop_gil else holding, prefix + name)
            fn.argtypes, fn.restype = argtypes, restype
            functions[name] = fn
    except (OSError, AttributeError):
        return None
    return SimpleNamespace(**functions)
