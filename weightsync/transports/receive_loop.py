"""The worker's guard lock and its native receive loop (``csrc/receive_loop.cpp``).

A worker's background receiver used to be a Python thread: every update it applied needed the
GIL, so while the worker's main thread ran Python (an environment step) each update queued for
up to the interpreter's switch interval (5 ms), and even an idle worker paid tens of
microseconds of Python per take. With the native library, the background thread instead calls
:meth:`NativeReceiveLoop.run`, which waits, takes, acks and releases in C++ without the GIL,
and returns to Python only to stop, when the sender is gone, or for a case the Python path
handles (it reports errors with their usual types and messages).

Both paths apply under one lock, :class:`ReceiverLock`: the scheme's ``guard()`` and every
Python apply hold it, and while a native loop is attached it also holds the loop's mutex, so
an update never lands inside a guarded block whichever path applies it.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache
from typing import Any

from weightsync import _extension
from weightsync.engine.backends import native_library_active
from weightsync.transports.arena import spin_seconds

__all__ = ["ReceiverLock", "NativeReceiveLoop", "STOPPED", "SENDER_GONE", "HAND_BACK"]

#: After a take, the loop looks for the next offer this long (yielding the core) before it
#: sleeps, while offers come back to back (the last came within this long of the take before):
#: a sync sender then publishes the next version as soon as every worker acked, and waking a
#: sleeping worker costs tens of microseconds (more on a VM). Spaced updates never spin.
#: (WEIGHTSYNC_RECEIVE_SPIN_US; 0 turns it off.)
_RECEIVE_SPIN = spin_seconds("WEIGHTSYNC_RECEIVE_SPIN_US", 300)

#: What :meth:`NativeReceiveLoop.run` returns.
STOPPED, SENDER_GONE, HAND_BACK = 0, 1, 2
MODE_COPY, MODE_WINDOW = 0, 1

_I64 = ctypes.c_int64
_I64P = ctypes.POINTER(ctypes.c_int64)


@cache
def _entry_points() -> Any | None:
    # Only the two calls that block (``run``, and ``lock`` when the mutex is taken) drop the
    # GIL; every other call takes a few nanoseconds and keeps it (see c_functions).
    return _extension.c_functions("weightsync_receiver_", {
        "new": ([_I64P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _I64P, _I64, _I64, _I64,
                 ctypes.c_double], _I64),
        "free": ([_I64], None),
        "lock": ([_I64], None),
        "try_lock": ([_I64], ctypes.c_int),
        "unlock": ([_I64], None),
        "version": ([_I64], _I64),
        "set_version": ([_I64, _I64], None),
        "mapped": ([_I64], _I64),
        "set_mapped": ([_I64, _I64], None),
        "applied": ([_I64], _I64),
        "bind": ([_I64, _I64P, _I64P, _I64], None),
        "stop": ([_I64], None),
        "run": ([_I64, ctypes.c_double], ctypes.c_int),
    }, drop_gil=("run", "lock"))


def native_loop_available() -> bool:
    """Whether workers can receive in C++ (the native library is active and has the loop).

    Asked whenever one is built, so a backend forced through the environment later
    (``WEIGHTSYNC_BACKEND=torch``) applies to the loops started from then on.
    """
    return native_library_active() and _entry_points() is not None


class NativeReceiveLoop:
    """The C++ state of one worker's loop: the words it watches, what it applies, its mutex.

    Build it with the transport's words and plans (see ``SharedMemReceiverTransport``); keep
    what ``targets`` point at (copy plans, the mapping) alive until :meth:`free`.
    """

    def __init__(self, words: list[int], fd: int, mode: int, targets: list[int], *,
                 window: int = 0, version: int = 0, mapped: int = -1,
                 spin: float | None = None) -> None:
        lib = _entry_points() if native_library_active() else None
        if lib is None:
            raise RuntimeError("the native receive loop is not available")
        self._lib = lib
        n = len(targets)
        self._handle = lib.new(
            (_I64 * len(words))(*words), fd, n, mode, (_I64 * n)(*targets), window, version,
            mapped, _RECEIVE_SPIN if spin is None else spin,
        )
        if not self._handle:
            raise RuntimeError(f"weightsync_receiver_new refused mode {mode}")

    def lock(self, blocking: bool = True) -> bool:
        """Take the loop's mutex; False when ``blocking`` is False and a take is in progress."""
        # Keep the GIL when the mutex is free (nearly always); drop it only to wait for a take
        # in progress (see weightsync_receiver_try_lock).
        if self._lib.try_lock(self._handle):
            return True
        if not blocking:
            return False
        self._lib.lock(self._handle)
        return True

    def unlock(self) -> None:
        self._lib.unlock(self._handle)

    @property
    def version(self) -> int:
        return self._lib.version(self._handle)

    @version.setter
    def version(self, value: int) -> None:
        self._lib.set_version(self._handle, value)

    @property
    def mapped(self) -> int:
        return self._lib.mapped(self._handle)

    @mapped.setter
    def mapped(self, slot: int) -> None:
        self._lib.set_mapped(self._handle, slot)

    @property
    def applied(self) -> int:
        """How many versions the loop itself applied."""
        return self._lib.applied(self._handle)

    def bind(self, impls: Any | None, offsets: Any | None, count: int) -> None:
        """View mode: the tensors that must view the window (``count=-1``: none are bound)."""
        if count < 0:
            self._lib.bind(self._handle, None, None, -1)
        else:
            self._lib.bind(self._handle, impls, offsets, count)

    def run(self, liveness_s: float) -> int:
        """Receive until stopped (:data:`STOPPED`), the sender is gone (:data:`SENDER_GONE`)
        or Python must look (:data:`HAND_BACK`). Releases the GIL throughout."""
        return self._lib.run(self._handle, liveness_s)

    def stop(self) -> None:
        """Make :meth:`run` return :data:`STOPPED` (from another thread)."""
        self._lib.stop(self._handle)

    def free(self) -> None:
        """Release the C++ state; :meth:`run` must have returned."""
        if self._handle:
            self._lib.free(self._handle)
            self._handle = 0


class ReceiverLock:
    """A re-entrant lock that also holds a native loop's mutex while one is attached.

    Used like ``threading.RLock`` (``with lock:``, :meth:`acquire`, :meth:`release`). The
    outermost acquire by a thread takes the attached loop's mutex (waiting, without the GIL,
    for a take in progress); the matching release gives it back.
    """

    def __init__(self) -> None:
        self._rlock = threading.RLock()
        self._depth = 0
        self._loop: NativeReceiveLoop | None = None
        self._held: NativeReceiveLoop | None = None  # the loop whose mutex the owner holds

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._rlock.acquire(blocking, timeout):
            return False
        if self._depth == 0 and self._loop is not None:
            # A timed acquire waits for a take in progress anyway: takes are short.
            if not self._loop.lock(blocking):
                self._rlock.release()
                return False
            self._held = self._loop
        self._depth += 1
        return True

    def release(self) -> None:
        if self._depth == 1 and self._held is not None:
            self._held.unlock()
            self._held = None
        self._depth -= 1
        self._rlock.release()

    @property
    def outermost(self) -> bool:
        """True when the calling thread holds the lock exactly once (read it while holding
        the lock: only the owner's depth is meaningful)."""
        return self._depth == 1

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def attach(self, loop: NativeReceiveLoop | None) -> None:
        """Attach ``loop`` (None: detach). Takes the lock, so no block is in progress."""
        with self:
            self._loop = loop
