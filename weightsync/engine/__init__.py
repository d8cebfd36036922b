"""The engine: copy plans, pack/unpack, pinned staging and backend choice.

Public pieces: :class:`CopyPlan`, :class:`StorageWindow`, :func:`futex_wait` /
:func:`futex_wake`, :func:`backend_info`, :func:`backend_for`. The ops themselves are in :mod:`weightsync.ops`.
"""

from weightsync.engine.backends import BACKEND_NAMES, backend_for, backend_info
from weightsync.engine.futex import futex_wait, futex_wake, native_futex
from weightsync.engine.plan import CopyPlan
from weightsync.engine.window import StorageWindow

__all__ = ["BACKEND_NAMES", "CopyPlan", "StorageWindow", "backend_for", "backend_info",
           "futex_wait", "futex_wake", "native_futex"]
