"""The backend registry behind :meth:`WeightSyncScheme.from_backend`.

Backends are named by the deployment they serve (TorchRL's names and aliases) and point at a
scheme class as an import string, so a backend module is imported only when asked for and
a new backend is one line in :data:`_BACKENDS` (or one :func:`register_backend` call from
its own module, or the ``@register_weight_sync_backend(name)`` decorator, as in TorchRL).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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
    "register_weight_sync_backend",
    "resolve_backend",
]

WeightSyncBackend: TypeAlias = Literal[
    "none", "direct", "shared", "thread", "process", "multiprocessing", "distributed"
]


# name -> "module:Class" (or the class, when registered as one), or None for a backend on the
# roadmap (see _UNAVAILABLE).
_BACKENDS: dict[str, str | type | None] = {
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


# TorchRL backends weightsync does not provide, and what they run on (for the error).
_NOT_PROVIDED: dict[str, str] = {
    "rpc": "TorchRL's RPCWeightSyncScheme, over torch.distributed.rpc",
    "ray": "TorchRL's RayWeightSyncScheme, over Ray",
}


def backend_names() -> list[str]:
    """Every accepted name: backends and aliases, sorted."""
    return sorted({*_BACKENDS, *_ALIASES})


def available_backends() -> list[str]:
    """Backends (not aliases) with an implementation in this version, sorted."""
    return sorted(name for name, target in _BACKENDS.items() if target is not None)


def register_backend(
    name: str, target: str | type[WeightSyncScheme] | None = None, aliases: tuple[str, ...] = ()
) -> Callable[[type[WeightSyncScheme]], type[WeightSyncScheme]] | None:
    """Register (or replace) the scheme behind ``name``.

    Args:
        name: the backend name given to :meth:`WeightSyncScheme.from_backend`.
        target: the scheme class, or ``"package.module:ClassName"`` to import on first use.
            Omitted, the call returns a class decorator that registers the class it decorates
            (TorchRL's ``@register_weight_sync_backend(name)``).
        aliases: other names for the same backend.

    Raises:
        InvalidArgumentError: ``target`` is a string not of the form ``"module:Class"``, or
            neither a string nor a class.
    """
    if target is None:
        def register(cls: type[WeightSyncScheme]) -> type[WeightSyncScheme]:
            register_backend(name, cls, aliases)
            return cls

        return register
    if isinstance(target, str):
        if target.count(":") != 1:
            raise InvalidArgumentError(
                f"backend {name!r}: target must look like 'package.module:ClassName', "
                f"got {target!r}"
            )
    elif not isinstance(target, type):
        raise InvalidArgumentError(
            f"backend {name!r}: target must be a scheme class or 'package.module:ClassName', "
            f"got a {type(target).__name__}"
        )
    # A class is kept as is: a local or nested one could not be found again by its name.
    _BACKENDS[name] = target
    _UNAVAILABLE.pop(name, None)
    for alias in aliases:
        _ALIASES[alias] = name
    return None


#: TorchRL's name for :func:`register_backend` (``torchrl.weight_update.weight_sync_schemes``);
#: ``@register_weight_sync_backend("name")`` works the same with either.
register_weight_sync_backend = register_backend


def resolve_backend(name: str) -> type[WeightSyncScheme]:
    """The scheme class behind backend ``name`` (or one of its aliases).

    Raises:
        UnknownBackendError: ``name`` is not a backend or an alias, or is one of TorchRL's
            that weightsync does not provide (``"rpc"``, ``"ray"``); the message lists the
            choices.
        BackendUnavailableError: the backend is known but cannot be used here; says why.
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in _BACKENDS:
        if canonical in _NOT_PROVIDED:
            # A ValueError, as TorchRL's from_backend raises for a backend it lacks.
            raise UnknownBackendError(
                f"weight-sync backend {name!r} ({_NOT_PROVIDED[canonical]}) is not provided "
                f"by weightsync; available here: {available_backends()} (every accepted "
                f"name: {backend_names()}); register_backend({name!r}, SchemeClass) adds one"
            )
        raise UnknownBackendError(
            f"unknown weight-sync backend {name!r}; expected one of {backend_names()}"
        )
    target = _BACKENDS[canonical]
    label = repr(name) if canonical == name else f"{name!r} (alias of {canonical!r})"
    if target is None:
        raise BackendUnavailableError(f"backend {label}: {_UNAVAILABLE[canonical]}")
    if isinstance(target, type):
        return target
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(
            f"backend {label} needs {module_name}.{class_name}, which could not be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
