"""Virtual-subclass registration with TorchRL's base classes, without importing TorchRL.

TorchRL's collectors check ``isinstance(x, <its base>)``; registering our bases as virtual
subclasses makes ours pass. TorchRL is optional and takes seconds to import, so it is never
imported from here: a base whose module is already loaded is registered at once, and any
other is registered by a small import hook (:class:`_PostImportHook`, on ``sys.meta_path``)
as soon as TorchRL's module finishes loading, whatever the order of the imports. The hook
removes itself once nothing is left to register.
"""

from __future__ import annotations

import abc
import importlib.abc
import sys
import threading
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["register_with_torchrl"]

# TorchRL module name -> (name of its base class, our class to register under it), waiting for
# that module to be imported.
_PENDING: dict[str, list[tuple[str, type]]] = {}
_LOCK = threading.Lock()


def register_with_torchrl(module_name: str, base_name: str, cls: type) -> None:
    """Register ``cls`` under TorchRL's ``module_name.base_name``: now when that module is
    loaded, else right after TorchRL imports it. A missing or non-ABC base is skipped (a
    TorchRL version that moved or dropped it has nothing to register with)."""
    with _LOCK:
        module = sys.modules.get(module_name)
        if module is None or _initialising(module):
            # A module still executing (we are imported from inside it) has no finished class
            # to register with, and the hook will not see it load: it stays pending, which
            # only matters if TorchRL itself imported us (it does not).
            _PENDING.setdefault(module_name, []).append((base_name, cls))
            _install_hook()
            return
    _register(module, [(base_name, cls)])


def _initialising(module: ModuleType) -> bool:
    # importlib flags a module's spec while its code runs (a "partially initialized module").
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register(module: ModuleType, entries: list[tuple[str, type]]) -> None:
    for base_name, cls in entries:
        torchrl_base = getattr(module, base_name, None)
        if isinstance(torchrl_base, abc.ABCMeta):
            torchrl_base.register(cls)


def _module_loaded(module: ModuleType) -> None:
    """Called by the hook once ``module`` executed: register what waited for it."""
    with _LOCK:
        entries = _PENDING.pop(module.__name__, [])
        if not _PENDING:
            _remove_hook()
    try:
        _register(module, entries)
    except Exception as exc:  # never break the user's import of TorchRL over an isinstance aid
        warnings.warn(
            f"weightsync: could not register with {module.__name__}: {type(exc).__name__}: {exc}",
            RuntimeWarning, stacklevel=2,
        )


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a pending TorchRL module it asks the other finders for the
    spec and wraps its loader, so that :func:`_module_loaded` runs after the module's code."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        if fullname not in _PENDING:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _NotifyingLoader(spec.loader)
        return spec


class _NotifyingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then notifies. It puts the real loader back on the spec
    and the module before the module's code runs, so nothing in the module ever sees it."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)  # an import that fails leaves the entry pending
        _module_loaded(module)


_HOOK = _PostImportHook()


def _install_hook() -> None:
    # First, so the hook sees TorchRL's modules before the path finder loads them.
    if not any(f is _HOOK for f in sys.meta_path):  # by identity: other finders' __eq__ vary
        sys.meta_path.insert(0, _HOOK)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if f is not _HOOK]
