"""Transports: how one model's weights travel between a sender and its receivers.

:mod:`weightsync.transports.base` holds the protocol every transport implements; each backend
lives in its own module and is re-exported here, imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from weightsync.transports.base import InitialSyncTransport, NoOpTransport, TransportBackend

_LAZY = {
    "SharedMemSenderTransport": "weightsync.transports.shared_mem",
    "SharedMemReceiverTransport": "weightsync.transports.shared_mem",
}

__all__ = [
    "InitialSyncTransport",
    "NoOpTransport",
    "SharedMemReceiverTransport",
    "SharedMemSenderTransport",
    "TransportBackend",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
