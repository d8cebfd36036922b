"""A host byte buffer that can be pointed at other memory in O(1): the view-mode take.

Tensors that are views into a :class:`StorageWindow` all follow it when it is pointed
elsewhere (one pointer store in the native library), so a worker whose parameters view the
window moves every one of them to another slot at once, however many there are. Needs the
native library (see :meth:`StorageWindow.available`); the fallback re-points each tensor.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

from weightsync import _extension
from weightsync.engine.validate import translate_native_error
from weightsync.errors import BackendUnavailableError

__all__ = ["StorageWindow"]

_ERROR_LEN = 512


@cache
def _c_repoint():
    fn = ctypes.CDLL(_extension.load().path).weightsync_repoint_storage
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


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
        self._repoint = _c_repoint()
        self._error = ctypes.create_string_buffer(_ERROR_LEN)

    @staticmethod
    def available() -> bool:
        """Whether windows can be made (the native library is loaded and not overridden)."""
        return _extension.load().loaded and os.environ.get("WEIGHTSYNC_BACKEND", "") in ("", "native")

    def point_at(self, address: int) -> None:
        """Make the window (and every view of it) read and write ``nbytes`` at ``address``."""
        if self._repoint(self._storage, address, self._error, _ERROR_LEN):
            raise translate_native_error(RuntimeError(self._error.value.decode(errors="replace")))
