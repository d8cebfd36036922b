"""The backend registry behind :meth:`WeightSyncScheme.from_backend`.

Backends are named by the deployment they serve (TorchRL's names and aliases) and point at a
scheme class as an import string, so a backend module is imported only when asked for and
a new backend is one line in :data:`_BACKENDS` (or one :func:`register_backend` call from
its own module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal, TypeAlias

from weightsync.errors import UnknownBackendError, BackendUnavailableError, InvalidArgumentError

if TYPE_CHECKING:
    from weightsync.schemes.base import WeightSyncScheme

__all__ = [
    "WeightSyncBackend",
    "UnknownBackendError",
    "available_backends",
    "backend_names",
    "register_backend",
    "resolve_backend",
]

WeightSyncBackend: TypeAlias = Literal[
    "none", "direct", "shared", "thread", "process", "multiprocessing", "distributed"
]


# name -> "module:Class", or None for a backend on the roadmap (see _UNAVAILABLE).
_BACKENDS: dict[str, str | None] = {
    "none": "weightsync.schemes.no_sync:NoWeightSyncScheme",
    "shared": "weightsync.schemes.shared_mem:SharedMemWeightSyncScheme",
    "process": None,
    "distributed": None,
}

_ALIASES: dict[str, str] = {
    "direct": "none",
    "thread": "shared",
    "multiprocessing": "process",
}

_UNAVAILABLE: dict[str, str] = {
    "process": "the queue-based multiprocessing scheme is not available in this version of "
               "weightsync; use 'shared' for workers on the same machine",
    "distributed": "the torch.distributed scheme is not available in this version of "
                   "weightsync; use 'shared' for workers on the same machine",
}


def backend_names() -> list[str]:
    """Every accepted name: backends and aliases, sorted."""
    return sorted({*_BACKENDS, *_ALIASES})


def available_backends() -> list[str]:
    """Backends (not aliases) with an implementation in this version, sorted."""
    return sorted(name for name, target in _BACKENDS.items() if target is not None)


def register_backend(name: str, target: str | type[WeightSyncScheme],
                     aliases: tuple[str, ...] = ()) -> None:
    """Register (or replace) the scheme behind ``name``.

    Args:
        name: the backend name given to :meth:`WeightSyncScheme.from_backend`.
        target: the scheme class, or ``"package.module:ClassName"`` to import on first use.
        aliases: other names for the same backend.
    """
    if isinstance(target, str):
        if target.count(":") != 1:
            raise InvalidArgumentError(
                f"backend {name!r}: target must look like 'package.module:ClassName', "
                f"got {target!r}"
            )
        _BACKENDS[name] = target
    else:
        _BACKENDS[name] = f"{target.__module__}:{target.__qualname__}"
    _UNAVAILABLE.pop(name, None)
    for alias in aliases:
        _ALIASES[alias] = name


def resolve_backend(name: str) -> type[WeightSyncScheme]:
    """The scheme class behind backend ``name`` (or one of its aliases).

    Raises:
        UnknownBackendError: ``name`` is not a backend or an alias; the message lists them.
        BackendUnavailableError: the backend is known but cannot be used here; says why.
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in _BACKENDS:
        raise UnknownBackendError(
            f"unknown weight-sync backend {name!r}; expected one of {backend_names()}"
        )
    target = _BACKENDS[canonical]
    label = repr(name) if canonical == name else f"{name!r} (alias of {canonical!r})"
    if target is None:
        raise BackendUnavailableError(f"backend {label}: {_UNAVAILABLE[canonical]}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(
            f"backend {label} needs {module_name}.{class_name}, which could not be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
