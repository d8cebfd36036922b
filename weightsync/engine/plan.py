"""Copy plans: a (dst, src) list pair validated once and run many times.

Native plans are ``torch.classes.weightsync.CopyPlan`` objects: ``run()`` is one call with no
arguments and no per-tensor Python work; it checks each tensor's data pointer and size (a few
ns each) and rebuilds itself when one changed, raising the usual typed error when the new
tensors no longer fit. Python plans (torch and cupy backends) precompute their device groups
and do the same pointer check in Python.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache, partial
from typing import Any

import torch

from weightsync import _extension
from weightsync.engine.backends import backend_for
from weightsync.engine.torch_backend import group_pairs, run_groups
from weightsync.engine.validate import check_copy_lists, nbytes_of, translate_native_error
from weightsync.errors import BackendUnavailableError

__all__ = ["CopyPlan"]


class _PythonPlan:
    def __init__(self, backend, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self._backend = backend
        self._dst = dst
        self._src = src
        self.rebuilds = 0
        self._build()
        self.rebuilds = 0

    def _fingerprint(self) -> list[tuple[int, int, torch.dtype, torch.Size, bool, bool]]:
        # Storage, size, dtype and shape: what a reallocation or a re-view changes. The grouped
        # foreach copies values with torch's semantics, so a changed dtype or shape must send
        # the plan back through validation rather than into a partial copy. The conjugate and
        # negative bits too, as the native plan notices them (torch applies them at each run).
        return [(t.data_ptr(), nbytes_of(t), t.dtype, t.shape, t.is_conj(), t.is_neg())
                for t in (*self._dst, *self._src)]

    def _build(self) -> None:
        check_copy_lists("CopyPlan", self._dst, self._src)
        self._prints = self._fingerprint()
        # The torch backend's device groups are computed once; cupy re-plans its launches.
        self._groups = group_pairs(self._dst, self._src) if self._backend.name == "torch" else None
        self.rebuilds += 1

    def is_valid(self) -> bool:
        return self._fingerprint() == self._prints

    def prepare(self) -> None:
        pass  # no helper threads to wake on these backends

    def run(self, non_blocking: bool) -> None:
        if not self.is_valid():
            self._build()
        if self._groups is not None:
            run_groups(self._groups, non_blocking)  # validated when (re)built
        else:
            self._backend.batched_copy_(self._dst, self._src, non_blocking)


@cache
def _c_plan() -> Any:
    """The plan's C entry points (see copy_plan.h); they release the GIL while they run."""
    calls = _extension.c_functions("weightsync_plan_", {
        "run": ([ctypes.c_int64, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
        "prepare": ([ctypes.c_int64], None),
    })
    if calls is None:
        raise RuntimeError("the loaded weightsync library lacks the copy plan's C entry points")
    return calls


_ERROR_LEN = 4096


@cache
def _fast_calls() -> tuple[Any, int, int] | None:
    """``(weightsync._entries, run address, prepare address)``: the plan's C entry points
    called through a METH_FASTCALL trampoline, a tenth of ctypes' per-call cost (see
    csrc/python/entries.cpp); None when that module is not built (ctypes then)."""
    try:
        from weightsync import _entries
    except ImportError:
        return None
    if not hasattr(_entries, "plan_run"):  # a module built before the trampolines
        return None
    calls = _c_plan()
    return (_entries, ctypes.cast(calls.run, ctypes.c_void_p).value,
            ctypes.cast(calls.prepare, ctypes.c_void_p).value)


class _NativePlan:
    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor],
                 parallel_min_bytes: int) -> None:
        try:
            self._plan = torch.classes.weightsync.CopyPlan(dst, src, parallel_min_bytes)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(
                exc, lambda: check_copy_lists("CopyPlan", dst, src)) from None
        self._address = self._plan.address()
        fast = _fast_calls()
        if fast is not None:
            entries, run, prepare = fast
            self._fast_run = partial(entries.plan_run, run, self._address)
            self.prepare = partial(entries.plan_prepare, prepare, self._address)
        else:
            self._fast_run = None
            self._run = _c_plan().run
            self.prepare = partial(_c_plan().prepare, self._address)
            self._error = ctypes.create_string_buffer(_ERROR_LEN)

    @property
    def rebuilds(self) -> int:
        return self._plan.rebuilds()

    def is_valid(self) -> bool:
        return self._plan.is_valid()

    def run(self, non_blocking: bool) -> None:
        # The plan turns grad mode off itself, in C++; both calls release the GIL meanwhile.
        if self._fast_run is not None:
            try:
                self._fast_run(non_blocking)
            except RuntimeError as exc:
                raise translate_native_error(exc) from None
        elif self._run(self._address, non_blocking, self._error, _ERROR_LEN):
            raise translate_native_error(RuntimeError(self._error.value.decode(errors="replace")))


class CopyPlan:
    """Copies ``src[i]`` into ``dst[i]`` for all ``i``, validated once, run many times.

    Args:
        dst: destination tensors (written in place).
        src: source tensors, same dtypes and shapes as ``dst``.
        parallel_min_bytes: native host copies only: copy on the calling thread alone unless
            the payload is at least this big (and the process-wide threshold,
            ``WEIGHTSYNC_PARALLEL_MIN_BYTES``). For callers whose other cores are likely busy.

    Raises:
        The typed errors of :func:`weightsync.ops.batched_copy_`, at construction and at a
        ``run()`` that finds the tensors reallocated into a shape that no longer fits.

    The plan holds references to the tensors. It keeps working when a tensor is reallocated
    (``param.data = ...``): the next ``run()`` notices and rebuilds (see ``rebuilds``).
    """

    def __init__(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], *,
                 parallel_min_bytes: int = 0) -> None:
        dst, src = list(dst), list(src)
        backend = backend_for((*dst, *src))
        self.backend: str = backend.name
        self._len = len(dst)
        if backend.name == "native":
            self._impl: _NativePlan | _PythonPlan = _NativePlan(dst, src, parallel_min_bytes)
        else:
            self._impl = _PythonPlan(backend, dst, src)
        self.nbytes: int = sum(nbytes_of(t) for t in dst)  # validated tensors by now

    def run(self, non_blocking: bool = False) -> None:
        """Run the copy. ``non_blocking`` as in :func:`weightsync.ops.batched_copy_`."""
        self._impl.run(non_blocking)

    def prepare(self) -> None:
        """A heads-up that :meth:`run` follows shortly (after the caller's own checks, say).

        On the native backend, when the copy will use the copier's helper threads, this
        keeps those still spinning after their last job spinning a while longer and wakes
        parked ones now: waking a parked thread takes tens of microseconds on a VM, as long as
        copying a small model, and this way it overlaps the caller's work. Nothing is copied
        or checked; it costs a clock read and an atomic store when no helper is parked.
        """
        self._impl.prepare()

    def is_valid(self) -> bool:
        """True while no tensor of the plan was reallocated since it was (re)built."""
        return self._impl.is_valid()

    def _copy_repeatedly(self, times: int) -> None:
        """For benchmarks: :meth:`run` once, then the copy ``times - 1`` more times without
        the per-run reallocation check, to measure what the bytes alone cost. Nothing may
        change the tensors meanwhile. Native plans only (BackendUnavailableError otherwise).
        """
        impl = self._impl
        if not isinstance(impl, _NativePlan):
            raise BackendUnavailableError(
                f"weightsync[backend]: CopyPlan._copy_repeatedly: only native plans copy without "
                f"their check; this plan runs on the {self.backend} backend")
        impl._plan.copy_repeatedly(times)

    @property
    def native_address(self) -> int | None:
        """The C++ plan's address on the native backend (for C callers; the plan object keeps
        it alive), else None."""
        impl = self._impl
        return impl._address if isinstance(impl, _NativePlan) else None

    @property
    def rebuilds(self) -> int:
        """How many times the plan noticed reallocated tensors and rebuilt itself."""
        return self._impl.rebuilds

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"CopyPlan(tensors={self._len}, nbytes={self.nbytes}, backend={self.backend!r})"
