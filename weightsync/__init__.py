"""weightsync: fast, consistent weight synchronisation between a trainer and its workers.

The public surface mirrors TorchRL's ``torchrl.weight_update`` (schemes, transports, weight
strategies) and its legacy weight updaters, so switching is a change of imports. The bytes
are moved by a compiled engine (``weightsync.ops``) with a pure-torch fallback;
:func:`backend_info` says which path is active and why.
"""

from __future__ import annotations

import importlib
from typing import Any

from weightsync import errors, ops
from weightsync.engine import CopyPlan, backend_info
from weightsync.errors import *  # noqa: F403
from weightsync.schemes import (
    NoWeightSyncScheme,
    WeightSyncBackend,
    WeightSyncScheme,
    available_backends,
    backend_names,
    register_backend,
    register_weight_sync_backend,
)
from weightsync.strategy import EXTRA_STATE_KEY, WeightStrategy
from weightsync.transports import InitialSyncTransport, NoOpTransport, TransportBackend
from weightsync.updaters import MultiProcessedWeightUpdater, VanillaWeightUpdater, WeightUpdaterBase

__version__ = "0.1.0"

# Backends with heavier imports load on first access.
_LAZY = {
    "SharedMemWeightSyncScheme": "weightsync.schemes",
    "SharedMemSenderTransport": "weightsync.transports",
    "SharedMemReceiverTransport": "weightsync.transports",
}

__all__ = [
    "CopyPlan",
    "EXTRA_STATE_KEY",
    "InitialSyncTransport",
    "MultiProcessedWeightUpdater",
    "NoOpTransport",
    "NoWeightSyncScheme",
    "SharedMemReceiverTransport",
    "SharedMemSenderTransport",
    "SharedMemWeightSyncScheme",
    "TransportBackend",
    "VanillaWeightUpdater",
    "WeightStrategy",
    "WeightSyncBackend",
    "WeightSyncScheme",
    "WeightUpdaterBase",
    "available_backends",
    "backend_info",
    "backend_names",
    "errors",
    "ops",
    "register_backend",
    "register_weight_sync_backend",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
