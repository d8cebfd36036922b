"""A host byte buffer that can be pointed at other memory in O(1): the view-mode take.

Tensors that are views into a :class:`StorageWindow` all follow it when it is pointed
elsewhere (one pointer store in the native library), so a worker whose parameters view the
window moves every one of them to another slot at once, however many there are. Needs the
native library (see :meth:`StorageWindow.available`); the fallback re-points each tensor.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import torch

from weightsync import _extension
from weightsync.engine.backends import native_library_active
from weightsync.engine.validate import translate_native_error
from weightsync.errors import BackendUnavailableError

__all__ = ["StorageWindow"]

_ERROR_LEN = 512


@cache
def _c_calls() -> tuple[Any, Any]:
    calls = _extension.c_functions("weightsync_", {
        "repoint_storage": ([ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t],
                            ctypes.c_int),
        "window_viewed": ([ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
                          ctypes.c_int),
    })
    if calls is None:
        raise RuntimeError("the loaded weightsync library lacks the storage window's C entry points")
    return calls.repoint_storage, calls.window_viewed


class StorageWindow:
    """``nbytes`` of host memory, readable as :attr:`tensor`, re-pointable with :meth:`point_at`.

    The memory pointed at is not owned: keep it mapped while the window (or any view of it)
    points there, and point the views elsewhere (or give them copies) before unmapping it.
    """

    def __init__(self, nbytes: int) -> None:
        if not self.available():
            raise BackendUnavailableError(
                "StorageWindow needs the native library (not loaded, or WEIGHTSYNC_BACKEND=torch)"
            )
        #: A uint8 tensor over the whole window; take typed views of it.
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self._storage = self.tensor.untyped_storage()._cdata
        self._repoint, self._viewed = _c_calls()
        self._error = ctypes.create_string_buffer(_ERROR_LEN)
        self._bound: list[torch.Tensor] = []
        self._impls = self._offsets = None

    @property
    def storage(self) -> int:
        """The address of the window's ``StorageImpl`` (what the native receive loop re-points)."""
        return self._storage

    @property
    def impls(self) -> ctypes.Array | None:
        """The bound tensors' ``TensorImpl`` addresses (None before :meth:`bind`)."""
        return self._impls

    @property
    def offsets(self) -> ctypes.Array | None:
        """The bound tensors' element offsets into the window (None before :meth:`bind`)."""
        return self._offsets

    @staticmethod
    def available() -> bool:
        """Whether windows can be made (the native library is loaded and not overridden)."""
        return native_library_active()

    def point_at(self, address: int) -> None:
        """Make the window (and every view of it) read and write ``nbytes`` at ``address``."""
        if self._repoint(self._storage, address, self._error, _ERROR_LEN):
            raise translate_native_error(RuntimeError(self._error.value.decode(errors="replace")))

    def bind(self, tensors: list[torch.Tensor], views: list[torch.Tensor]) -> None:
        """Make each of ``tensors`` (parameters stay parameters) a view of the window, as
        ``views[i]`` is, and remember them for :meth:`bound`."""
        for t, v in zip(tensors, views):
            t.data = v
        self._bound = list(tensors)
        n = len(tensors)
        self._impls = (ctypes.c_int64 * n)(*(t._cdata for t in tensors))
        self._offsets = (ctypes.c_int64 * n)(*(v.storage_offset() for v in views))

    def bound(self) -> bool:
        """Whether every tensor of the last :meth:`bind` still views the window where it was
        put (one that was given other storage since would not follow :meth:`point_at`).
        A few nanoseconds per tensor, in C."""
        if self._impls is None:
            return False
        return bool(self._viewed(self._storage, self._impls, self._offsets, len(self._bound)))

    def unbind(self) -> None:
        """Forget the bound tensors (after they were given storage of their own)."""
        self._bound, self._impls, self._offsets = [], None, None
