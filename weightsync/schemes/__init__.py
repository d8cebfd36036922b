"""Weight-sync schemes: the lifecycle of one model's synchronisation (see
:mod:`weightsync.schemes.base`), one module per backend, and the backend registry.

Backend schemes other than the no-op one are imported on first access, so a backend that
cannot load here (see :meth:`WeightSyncScheme.from_backend` for why) never breaks the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

from weightsync.schemes.base import UnknownWorkerError, WeightSyncScheme
from weightsync.schemes.no_sync import NoWeightSyncScheme
from weightsync.schemes.registry import (
    UnknownBackendError,
    WeightSyncBackend,
    available_backends,
    backend_names,
    register_backend,
    register_weight_sync_backend,
)

_LAZY = {"SharedMemWeightSyncScheme": "weightsync.schemes.shared_mem"}

__all__ = [
    "NoWeightSyncScheme",
    "SharedMemWeightSyncScheme",
    "UnknownBackendError",
    "UnknownWorkerError",
    "WeightSyncBackend",
    "WeightSyncScheme",
    "available_backends",
    "backend_names",
    "register_backend",
    "register_weight_sync_backend",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
