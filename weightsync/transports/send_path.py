"""The sender's common send as one native call (``csrc/send_path.cpp``).

A send to a host arena takes a free slot, writes it, commits it, publishes it and, in sync
mode, waits for the acks. On a small model those steps cost more in Python than the write
itself (a fcntl call per slot tried, a futex call through the dispatcher, loops over the
workers' words): about 45 us beside a 60 us write for a 0.9 MB model on a 2-core VM. With the
native library the whole send is one ctypes call that drops the GIL, following the protocol of
:class:`~weightsync.transports.arena.Arena` word for word.

Everything that needs waiting or a message stays in Python: the call reports, by its return
code, that no slot was free at the first look (nothing changed), that the slot it took has no
copy plan for these sources (Python writes it and calls :meth:`NativeSendPath.finish`), that
the plan raised (the slot was given back), or that acks did not come in time (published;
Python's ``wait_acks`` names the workers).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache
from typing import Any

from weightsync import _extension
from weightsync.engine.backends import native_library_active
from weightsync.transports.arena import _ACK_SPIN, _LIVENESS_PERIOD, _LOCK_WORKER, Arena

__all__ = ["NativeSendPath", "SENT", "NO_SLOT", "NEED_WRITE", "WRITE_FAILED", "ACK_TIMEOUT"]

#: Return codes of :meth:`NativeSendPath.send` and :meth:`NativeSendPath.finish`.
SENT, NO_SLOT, NEED_WRITE, WRITE_FAILED, ACK_TIMEOUT = 0, 1, 2, 3, 4

_I64 = ctypes.c_int64
_I64P = ctypes.POINTER(ctypes.c_int64)
_ERROR_LEN = 4096


@cache
def _entry_points() -> Any | None:
    # Every call drops the GIL: send and finish may wait for acks.
    return _extension.c_functions("weightsync_sender_", {
        "new": ([_I64P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _I64], _I64),
        "free": ([_I64], None),
        "send": ([_I64, _I64P, _I64P, ctypes.c_int, _I64, ctypes.c_int, ctypes.c_double,
                  ctypes.c_double, ctypes.c_double, _I64P, ctypes.c_char_p, ctypes.c_size_t],
                 ctypes.c_int),
        "finish": ([_I64, _I64, _I64P, ctypes.c_int, _I64, ctypes.c_int, ctypes.c_double,
                    ctypes.c_double, ctypes.c_double], ctypes.c_int),
        "abort": ([_I64, _I64], None),
    })


def native_send_available() -> bool:
    """Whether senders can send through the native path (the native library is active).

    Asked whenever one is built, so a backend forced through the environment later
    (``WEIGHTSYNC_BACKEND=torch``) applies to the senders built from then on.
    """
    return native_library_active() and _entry_points() is not None


class NativeSendPath:
    """The C++ state of one sender arena's sends (its words, lock file, slot cursor).

    The arena must outlive this object; :meth:`free` releases it.
    """

    def __init__(self, arena: Arena) -> None:
        self._handle = 0  # set first: __del__ runs even when this raises
        lib = _entry_points() if native_library_active() else None
        if lib is None:
            raise RuntimeError("the native send path is not available")
        self._lib = lib
        words = arena.native_sender_words()
        self._handle = lib.new((_I64 * len(words))(*words), arena.segment.fd, arena.nslots,
                               arena.nworkers, _LOCK_WORKER)
        if not self._handle:
            raise RuntimeError(f"weightsync_sender_new refused arena {arena.name}")
        self._plans = (_I64 * arena.nslots)()
        self._slot = _I64(-1)
        self._error = ctypes.create_string_buffer(_ERROR_LEN)
        self._targets: tuple[Sequence[int], ctypes.Array] | None = None

    def _target_array(self, targets: Sequence[int]) -> ctypes.Array:
        cached = self._targets
        if cached is not None and cached[0] == targets:
            return cached[1]
        array = (_I64 * len(targets))(*targets)
        self._targets = (list(targets), array)
        return array

    def send(self, plans: Sequence[int], targets: Sequence[int], version: int, *, sync: bool,
             timeout: float) -> tuple[int, int]:
        """Send ``version`` to the arena's workers ``targets`` (indices).

        ``plans[s]`` is the address of the native copy plan that writes the sources into slot
        ``s``, or 0. Returns ``(code, slot)``. After ``WRITE_FAILED`` the caller redoes the
        send on the Python path, which raises the typed error naming the tensor.
        """
        for s, address in enumerate(plans):
            self._plans[s] = address
        array = self._target_array(targets)
        code = self._lib.send(self._handle, self._plans, array, len(targets), version, int(sync),
                              timeout, _ACK_SPIN, _LIVENESS_PERIOD, ctypes.byref(self._slot),
                              self._error, _ERROR_LEN)
        return code, self._slot.value

    def finish(self, slot: int, targets: Sequence[int], version: int, *, sync: bool,
               timeout: float) -> int:
        """Commit, publish and (``sync``) wait, for a slot Python wrote after ``NEED_WRITE``."""
        array = self._target_array(targets)
        return self._lib.finish(self._handle, slot, array, len(targets), version, int(sync),
                                timeout, _ACK_SPIN, _LIVENESS_PERIOD)

    def abort(self, slot: int) -> None:
        """Give back a slot taken by :meth:`send` (``NEED_WRITE``) whose write failed."""
        self._lib.abort(self._handle, slot)

    def free(self) -> None:
        handle, self._handle = self._handle, 0
        if handle:
            self._lib.free(handle)

    def __del__(self) -> None:
        self.free()
