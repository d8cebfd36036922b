"""Weight strategies: from a module, TensorDict or state_dict to weights, and back.

:class:`WeightStrategy` is the format layer between schemes and the engine. It extracts the
weights of a source (``"tensordict"``: a nested :class:`~tensordict.TensorDict` like
``TensorDict.from_module``; ``"state_dict"``: a flat ``{"a.b": tensor}`` dict) and applies
weights of either format to a destination (a module, a TensorDict or a state_dict).

Applying in place is the hot path of every weight update, so it is built around a cached
:class:`~weightsync.engine.CopyPlan`:

- The first update of a (destination, source) pair checks the two trees key by key (missing or
  unexpected keys, shapes, dtypes) and raises a typed error naming the key and both values
  before any byte moves. It then builds one copy plan for all tensors.
- Later updates of the same pair only confirm that neither tree changed (a locked TensorDict:
  one identity test; otherwise one pass over the tree's containers comparing object
  identities, with no per-tensor Python work) and run the plan: one engine call.
  ``TensorDict.update_`` is avoided: it does per-key work that grows quadratically with the
  number of tensors.
- Destinations and sources are held weakly; a reallocated or restructured destination
  rebuilds its plan.

Extra state (``Module.get_extra_state``) travels under the key ``"__extra_state__"`` of the
module it belongs to (``("__extra_state__",)`` for the root, as in TorchRL) and is applied with
``set_extra_state``, before any tensor is written: a ``set_extra_state`` that raises leaves the
tensors untouched and the extra state already set restored. In a state_dict it keeps torch's
own ``"<module>._extra_state"`` key.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase, is_non_tensor
from torch import nn

from weightsync.engine import CopyPlan
from weightsync.errors import (
    UnsupportedWeightsError,
    DTypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
    ShapeMismatchError,
    WeightSyncError,
)
from weightsync.tree_identity import expect, same_entries

__all__ = ["WeightStrategy", "UnsupportedWeightsError", "EXTRA_STATE_KEY"]

#: Key of a module's extra state inside a weights TensorDict.
EXTRA_STATE_KEY = "__extra_state__"
# torch's suffix for extra state in Module.state_dict().
_STATE_DICT_EXTRA_KEY = "_extra_state"
_EXTRA_KEYS = (EXTRA_STATE_KEY, _STATE_DICT_EXTRA_KEY)
# Plans kept per destination, one per source object; a destination fed from more sources
# than this rebuilds the least recently added plan.
_MAX_SOURCES_PER_DESTINATION = 4

Key = tuple[str, ...]


def _key_str(key: Key) -> str:
    return ".".join(key) if key else "<root>"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]"


def _as_key(key: str | tuple[str, ...]) -> Key:
    return key if isinstance(key, tuple) else (key,)


def _defines(module: nn.Module, method: str) -> bool:
    """True when ``module`` overrides ``nn.Module.<method>`` (get/set_extra_state)."""
    return getattr(type(module), method) is not getattr(nn.Module, method)


def _extra_state_modules(module: nn.Module, method: str) -> dict[Key, nn.Module]:
    return {
        tuple(name.split(".")) if name else (): sub
        for name, sub in module.named_modules()
        if _defines(sub, method)
    }


def modules_with_extra_state(module: nn.Module) -> list[str]:
    """Dotted names of the submodules of ``module`` that define ``get_extra_state`` ("" for
    the module itself). Internal to the package."""
    return [".".join(path) for path in _extra_state_modules(module, "get_extra_state")]


def _set_extra(td: TensorDictBase, path: Key, value: Any) -> None:
    """Store ``value`` (anything get_extra_state returns) under ``path + (EXTRA_STATE_KEY,)``."""
    _set_value(td, (*path, EXTRA_STATE_KEY), value)


def _set_value(td: TensorDictBase, key: Any, value: Any) -> None:
    # Tensors as tensors, string-keyed mappings as sub-TensorDicts, anything else as
    # non-tensor data (not converted to a tensor as TensorDict(dict) would), so an int stays
    # an int through extract -> apply.
    if isinstance(value, torch.Tensor):
        td.set(key, value)
    elif isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        td.set(key, _dict_to_td(value))
    else:
        td.set_non_tensor(key, value)


def _dict_to_td(value: Mapping[str, Any]) -> TensorDict:
    td = TensorDict()
    for k, v in value.items():
        _set_value(td, k, v)
    return td


def _extra_from_tree(value: Any) -> Any:
    """The Python value to hand to ``set_extra_state``; tensors are cloned so the module never
    aliases the weights it was given (they may be a transport's buffer)."""
    if is_non_tensor(value):
        return value.data
    if isinstance(value, TensorDictBase):
        return {k: _extra_from_tree(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _extra_from_tree(v) for k, v in value.items()}
    return value


def _set_extra_states(targets: list[tuple[nn.Module, Any]]) -> list[tuple[nn.Module, Any]]:
    """``module.set_extra_state(value)`` for each pair, in order, all or nothing.

    Runs before any tensor byte moves. When one raises, the modules already set get back the
    extra state they had (a deep copy of ``get_extra_state()`` taken just before, since a
    ``set_extra_state`` may write into the very tensors ``get_extra_state`` returned), and
    the error propagates. The module that raised is left to its own ``set_extra_state``.
    Returns what :func:`_restore_extra_states` needs to undo them all.
    """
    done: list[tuple[nn.Module, Any]] = []
    for module, value in targets:
        try:
            before = _extra_snapshot(module)
            module.set_extra_state(value)
        except BaseException as exc:
            _restore_extra_states(done, exc)
            raise
        done.append((module, before))
    return done


_NO_SNAPSHOT = object()


def _extra_snapshot(module: nn.Module) -> Any:
    if not _defines(module, "get_extra_state"):
        return _NO_SNAPSHOT  # set_extra_state without get_extra_state: nothing to restore from
    state = module.get_extra_state()
    try:
        return copy.deepcopy(state)
    except Exception:  # not deep-copyable (a lock, a handle): the object is the best we have
        return state


def _restore_extra_states(done: list[tuple[nn.Module, Any]], exc: BaseException) -> None:
    for module, before in reversed(done):
        if before is _NO_SNAPSHOT:
            _note(exc, f"weightsync: the extra state of a {type(module).__name__} was set and "
                       "cannot be restored (it defines no get_extra_state)")
            continue
        try:
            module.set_extra_state(before)
        except Exception as restore_exc:  # the first error is the one to report
            _note(exc, f"weightsync: restoring the extra state of a {type(module).__name__} "
                       f"failed too: {type(restore_exc).__name__}: {restore_exc}")


def _note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


class _At:
    """A reference to the entry of a weights tree at ``key`` (read when it is applied)."""

    __slots__ = ("key",)

    def __init__(self, key: Key) -> None:
        self.key = key


def _resolve(tree: Any, value: Any) -> Any:
    return tree.get(value.key) if isinstance(value, _At) else value


class _Flat:
    """One weight tree as ordered (key, tensor) pairs plus its extra-state entries."""

    __slots__ = ("keys", "tensors", "extra")

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.tensors: list[torch.Tensor] = []
        # module path -> its extra state: an _At into the tree, or the value itself;
        # for a module destination: the submodule that takes it
        self.extra: dict[Key, Any] = {}

    def add(self, key: Key, value: Any, where: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise UnsupportedWeightsError(
                f"{where}: key {_key_str(key)!r} holds a {type(value).__name__}, expected a tensor"
            )
        self.keys.append(key)
        self.tensors.append(value)


def _flatten_td(td: TensorDictBase, where: str) -> _Flat:
    flat = _Flat()
    extra_keys = []
    for key in td.keys(include_nested=True):
        key = _as_key(key)
        if key[-1] == EXTRA_STATE_KEY and EXTRA_STATE_KEY not in key[:-1]:
            extra_keys.append(key)
            flat.extra[key[:-1]] = _At(key)
    leaves = td.exclude(*extra_keys) if extra_keys else td
    for key, value in leaves.items(include_nested=True, leaves_only=True):
        flat.add(_as_key(key), value, where)
    return flat


def _flatten_mapping(mapping: Mapping[Any, Any], where: str, prefix: Key = (),
                     flat: _Flat | None = None) -> _Flat:
    flat = _Flat() if flat is None else flat
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise UnsupportedWeightsError(
                f"{where}: key {name!r} under {_key_str(prefix)!r} is a {type(name).__name__}, "
                "expected a str"
            )
        key = (*prefix, *name.split("."))
        if key[-1] in _EXTRA_KEYS:
            flat.extra[key[:-1]] = value
        elif isinstance(value, TensorDictBase):
            sub = _flatten_td(value, where)
            flat.keys.extend((*key, *k) for k in sub.keys)
            flat.tensors.extend(sub.tensors)
            flat.extra.update({(*key, *p): _resolve(value, v) for p, v in sub.extra.items()})
        elif isinstance(value, Mapping):
            _flatten_mapping(value, where, key, flat)
        else:
            flat.add(key, value, where)
    return flat


def _flatten(tree: Any, where: str) -> _Flat:
    if isinstance(tree, nn.Module):
        flat = _flatten_td(TensorDict.from_module(tree), where)
        flat.extra = _extra_state_modules(tree, "set_extra_state")
        return flat
    if isinstance(tree, TensorDictBase):
        return _flatten_td(tree, where)
    if isinstance(tree, Mapping):
        return _flatten_mapping(tree, where)
    raise UnsupportedWeightsError(
        f"{where} must be an nn.Module, a TensorDict or a dict of tensors, got "
        f"{type(tree).__name__}"
    )


def _non_persistent_keys(module: nn.Module) -> set[Key]:
    """The keys of ``module``'s non-persistent buffers (``register_buffer(...,
    persistent=False)``), which its ``state_dict`` leaves out; under every path a shared
    submodule is reachable by."""
    keys: set[Key] = set()
    for name, sub in module.named_modules(remove_duplicate=False):
        prefix = tuple(name.split(".")) if name else ()
        keys.update((*prefix, buffer) for buffer in sub._non_persistent_buffers_set)
    return keys


def _flatten_pair(destination: Any, weights: Any, state_dict_keys: bool) -> tuple[_Flat, _Flat]:
    """The destination and weights trees, flattened and checked against each other.

    With ``state_dict_keys`` a module destination has the keys of its ``state_dict``: its
    non-persistent buffers are neither required from the weights nor written when the
    weights carry them (a TensorDict taken with ``TensorDict.from_module`` does).
    """
    dst = _flatten(destination, "destination")
    src = _flatten(weights, "weights")
    if state_dict_keys and isinstance(destination, nn.Module):
        skipped = _non_persistent_keys(destination)
        if skipped:
            for flat in (dst, src):
                kept = [(k, t) for k, t in zip(flat.keys, flat.tensors) if k not in skipped]
                flat.keys = [k for k, _ in kept]
                flat.tensors = [t for _, t in kept]
    _check_layouts(dst, src, isinstance(destination, nn.Module))
    return dst, src


def _check_layouts(dst: _Flat, src: _Flat, dst_is_module: bool) -> None:
    """Raise the typed error for the first difference between the two trees."""
    src_index = {k: i for i, k in enumerate(src.keys)}
    dst_index = {k: i for i, k in enumerate(dst.keys)}
    missing = [k for k in dst.keys if k not in src_index]
    unexpected = [k for k in src.keys if k not in dst_index]
    if missing or unexpected:
        parts = []
        if missing:
            k = missing[0]
            parts.append(
                f"destination key {_key_str(k)!r} ({_describe(dst.tensors[dst_index[k]])}) is "
                f"missing from the weights ({len(missing)} missing in all)"
            )
        if unexpected:
            k = unexpected[0]
            parts.append(
                f"weights key {_key_str(k)!r} ({_describe(src.tensors[src_index[k]])}) is not "
                f"in the destination ({len(unexpected)} unexpected in all)"
            )
        raise KeyMismatchError("; ".join(parts))
    for key, d in zip(dst.keys, dst.tensors):
        s = src.tensors[src_index[key]]
        if d.shape != s.shape:
            raise ShapeMismatchError(
                f"key {_key_str(key)!r}: destination shape [{', '.join(map(str, d.shape))}] != "
                f"weights shape [{', '.join(map(str, s.shape))}]"
            )
        if d.dtype != s.dtype:
            raise DTypeMismatchError(
                f"key {_key_str(key)!r}: destination dtype {str(d.dtype).removeprefix('torch.')} "
                f"!= weights dtype {str(s.dtype).removeprefix('torch.')}"
            )
    if dst_is_module:
        for path in src.extra:
            if path not in dst.extra:
                raise KeyMismatchError(
                    f"weights carry extra state for module {_key_str(path)!r}, but the "
                    "destination has no module there that defines set_extra_state"
                )


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


_INDEX = re.compile(r"\bindex (\d+)|\b(?:dst|src)\[(\d+)\]")


def _name_plan_indices(exc: WeightSyncError, keys: list[Key]) -> WeightSyncError:
    """The engine names list indices; add the weight keys they stand for."""
    found = []
    for match in _INDEX.finditer(str(exc)):
        i = int(match.group(1) or match.group(2))
        if i < len(keys) and i not in found:
            found.append(i)
    if not found:
        return exc
    names = ", ".join(f"index {i} is key {_key_str(keys[i])!r}" for i in found)
    return type(exc)(f"{exc} ({names})")


# ---------------------------------------------------------------------------------------------
# Snapshots: cheap tests that a tree is still the one a plan was built for.
# ---------------------------------------------------------------------------------------------


_TD_DICTS = ("_tensordict",)
_MODULE_DICTS = ("_modules", "_parameters", "_buffers")


class _LockedSnapshot:
    """A locked TensorDict: tensordict builds a fresh schema object at every ``lock_()`` and
    drops it at ``unlock_()``, and a locked tree (sub-trees included) can neither gain, lose
    nor replace an entry. The schema's identity is therefore a token for the tree's shape."""

    __slots__ = ("schema",)

    def __init__(self, schema: object) -> None:
        self.schema = schema

    def unchanged(self, td: Any) -> bool:
        return td.__dict__.get("_locked_schema") is self.schema


class _WalkSnapshot:
    """An unlocked TensorDict: every node's keys and values (see :mod:`weightsync.tree_identity`).

    It holds the sub-trees and values but not the root (the cache holds roots weakly). Values
    under ``__extra_state__`` are not compared: they are re-read at every update anyway.
    """

    __slots__ = ("nodes", "expected", "memo")

    def __init__(self, td: TensorDict) -> None:
        self.memo: list = []  # see tree_identity.same_entries
        self.nodes: list[TensorDict] = []  # the sub-trees; the root is passed to unchanged()
        expected = []
        stack = [td]
        while stack:
            node = stack.pop()
            d = node._tensordict
            if node is not td:
                self.nodes.append(node)
            try:
                expected.append(expect(d, skip_key=EXTRA_STATE_KEY))
            except TypeError:
                raise UncacheableTree from None
            for k, v in d.items():
                if k == EXTRA_STATE_KEY:
                    continue
                if type(v) is TensorDict:
                    stack.append(v)
                elif isinstance(v, TensorDictBase):
                    raise UncacheableTree
        self.expected = tuple(expected)

    def unchanged(self, td: Any) -> bool:
        return same_entries((td, *self.nodes), _TD_DICTS, self.expected, self.memo)


class _ModuleSnapshot:
    """A module: per submodule, its children, parameters and buffers.

    Submodules are held weakly (one may point back at the root, which must stay
    collectable); parameters and buffers strongly. Checking every module's children from the
    root down also proves that ``module.modules()`` still yields the same modules.
    """

    __slots__ = ("modules", "expected", "memo")

    def __init__(self, module: nn.Module) -> None:
        self.memo: list = []  # see tree_identity.same_entries
        modules = list(module.modules())
        self.modules = tuple(weakref.ref(m) for m in modules)
        try:
            self.expected = tuple(
                expect(getattr(m, name), weak=name == "_modules")
                for m in modules
                for name in _MODULE_DICTS
            )
        except TypeError:
            raise UncacheableTree from None

    def unchanged(self, module: Any) -> bool:
        return self.modules[0]() is module and same_entries(self.modules, _MODULE_DICTS,
                                                            self.expected, self.memo)


class UncacheableTree(Exception):
    """The tree cannot be fingerprinted cheaply (e.g. a plain dict); nothing derived from it
    is cached. Internal to the package."""


def tree_snapshot(tree: Any) -> _LockedSnapshot | _WalkSnapshot | _ModuleSnapshot:
    """A cheap test of whether ``tree`` (a module or a TensorDict) still holds the very tensor
    objects it holds now: ``tree_snapshot(t).unchanged(t)``. Used to cache what is derived from
    a tree (copy plans here, matched arena layouts in the shared-memory scheme). Internal to
    the package.

    Raises:
        UncacheableTree: for other trees (plain dicts, TensorDict subclasses).
    """
    if isinstance(tree, nn.Module):
        return _ModuleSnapshot(tree)
    if type(tree) is TensorDict:
        if tree.is_locked:
            schema = tree.__dict__.get("_locked_schema")
            if schema is not None:
                return _LockedSnapshot(schema)
        return _WalkSnapshot(tree)
    raise UncacheableTree


# ---------------------------------------------------------------------------------------------
# Bindings: a validated (destination, source) pair with its copy plan.
# ---------------------------------------------------------------------------------------------


class _Binding:
    __slots__ = ("plan", "keys", "extra", "dst_snapshot", "src_snapshot", "src_ref")

    def __init__(self, plan: CopyPlan | None, keys: list[Key],
                 extra: list[tuple[Key, Callable[[], nn.Module | None], Any]]) -> None:
        self.plan = plan
        self.keys = keys
        self.extra = extra
        self.dst_snapshot: Any = None
        self.src_snapshot: Any = None
        self.src_ref: weakref.ReferenceType | None = None

    def run(self, src: Any) -> None:
        # Extra state first: a set_extra_state that refuses its state is the one failure the
        # checks made when the plan was built cannot foresee, and it must find the tensors
        # still untouched (the extra state already set is restored). Most trees have none.
        done = _set_extra_states(self._extra_states(src)) if self.extra else []
        if self.plan is None:
            return
        try:
            # The engine copies under torch.no_grad() (parameters that require grad are
            # leaves autograd would refuse to write in place); no second guard here.
            self.plan.run()
        except BaseException as exc:
            if done:
                _restore_extra_states(done, exc)  # no new extra state next to failed tensors
            if isinstance(exc, WeightSyncError):
                raise _name_plan_indices(exc, self.keys) from None
            raise

    def _extra_states(self, src: Any) -> list[tuple[nn.Module, Any]]:
        """(destination module, its new extra state from ``src``) for each extra-state key."""
        extra = []
        for path, module_ref, src_key in self.extra:
            module = module_ref()
            if module is None:
                raise KeyMismatchError(
                    f"destination module {_key_str(path)!r} that takes the extra state is gone"
                )
            extra.append((module, _extra_from_tree(_resolve(src, src_key))))
        return extra


def _bind(destination: Any, weights: Any, state_dict_keys: bool) -> _Binding:
    dst, src = _flatten_pair(destination, weights, state_dict_keys)
    dst_is_module = isinstance(destination, nn.Module)
    src_index = {k: i for i, k in enumerate(src.keys)}
    dst_list: list[torch.Tensor] = []
    src_list: list[torch.Tensor] = []
    keys: list[Key] = []
    # Each destination tensor is written once. One tensor under several keys (tied weights)
    # takes the source of the last of those keys in the destination's order: what TorchRL's
    # strategy leaves when the sources differ (its update_ writes in the destination's key
    # order, whatever the weights' order). The same source under each key is one copy.
    chosen: dict[tuple, tuple[int, Key, torch.Tensor]] = {}
    for key, d in zip(dst.keys, dst.tensors):
        if d.numel() == 0:
            continue
        ident = (d.device, d.data_ptr(), d.dtype, d.shape, d.stride())
        chosen[ident] = (src_index[key], key, d)
    for position, key, d in chosen.values():
        s = src.tensors[position]
        if d is s or _same_memory(d, s):
            continue  # nothing to move: pushing a tree into itself
        dst_list.append(d)
        src_list.append(s)
        keys.append(key)
    plan = None
    if dst_list:
        try:
            plan = CopyPlan(dst_list, src_list)
        except WeightSyncError as exc:
            raise _name_plan_indices(exc, keys) from None
    extra = []
    if dst_is_module:
        for path, src_key in src.extra.items():
            extra.append((path, weakref.ref(dst.extra[path]), src_key))
    return _Binding(plan, keys, extra)


class _DestinationEntry:
    __slots__ = ("ref", "bindings")

    def __init__(self, ref: weakref.ReferenceType) -> None:
        self.ref = ref
        self.bindings: dict[int, _Binding] = {}


class _ExtractEntry:
    __slots__ = ("ref", "snapshot", "td", "extra_modules")

    def __init__(self, ref: weakref.ReferenceType, snapshot: _ModuleSnapshot, td: TensorDict,
                 extra_modules: dict[Key, nn.Module]) -> None:
        self.ref = ref
        self.snapshot = snapshot
        self.td = td
        self.extra_modules = {p: weakref.ref(m) for p, m in extra_modules.items()}


class WeightStrategy:
    """Extracts weights from a source and applies weights to a destination.

    Args:
        extract_as: the format :meth:`extract_weights` returns: ``"tensordict"`` (default) for
            a nested :class:`~tensordict.TensorDict` keyed like ``TensorDict.from_module``, or
            ``"state_dict"`` for a flat ``{"a.b": tensor}`` dict. :meth:`apply_weights` accepts
            both formats whatever this is.

    Raises:
        InvalidArgumentError: ``extract_as`` is neither of the two.

    A strategy caches one copy plan per (destination, source) pair it has applied, holding
    both weakly; see the module docs. It pickles without its caches.
    """

    def __init__(self, extract_as: Literal["tensordict", "state_dict"] = "tensordict") -> None:
        if extract_as not in ("tensordict", "state_dict"):
            raise InvalidArgumentError(
                f"extract_as must be 'tensordict' or 'state_dict', got {extract_as!r}"
            )
        self.extract_as: Literal["tensordict", "state_dict"] = extract_as
        self._destinations: dict[int, _DestinationEntry] = {}
        self._extracted: dict[int, _ExtractEntry] = {}

    def __repr__(self) -> str:
        return f"WeightStrategy(extract_as={self.extract_as!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"extract_as": self.extract_as}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["extract_as"])

    # -- extraction ----------------------------------------------------------------------------

    def extract_weights(self, source: Any) -> TensorDictBase | dict[str, Any]:
        """The weights of ``source`` in the format chosen by ``extract_as``.

        Args:
            source: an ``nn.Module``, a TensorDict or a state_dict-like dict.

        Returns:
            ``"tensordict"``: a TensorDict of the module's parameters and buffers (the live
            tensors, not copies), with each module's extra state under ``"__extra_state__"``;
            a TensorDict source is returned as is, and a dict is nested at its dots.
            ``"state_dict"``: ``module.state_dict()``, the dict itself, or the TensorDict
            flattened to dotted keys.

            For a module, every call returns a new, unlocked TensorDict (as TorchRL's
            ``from_module`` does): the caller may add, remove or replace its entries without
            that reaching later calls or a scheme's ``weights``. Its tensors are the module's
            own, so writing into them writes into the module.

        Raises:
            UnsupportedWeightsError: ``source`` is of another type.
        """
        if self.extract_as == "tensordict" and isinstance(source, nn.Module):
            # The cached tree is shared by every internal path; a fresh shell around its
            # tensors costs about what from_module does, far less than td.copy().
            return _fresh_copy(self._module_tree(source))
        return self._extract(source)

    def _extract(self, source: Any) -> TensorDictBase | dict[str, Any]:
        """:meth:`extract_weights`, except that a module's weights are the strategy's cached
        TensorDict (locked unless the module has extra state, which is refreshed at every
        call), reused while the module keeps the same parameter and buffer objects, so a
        cached copy plan keyed on it holds. For the package's hot paths, which only read it.
        Internal to the package."""
        if self.extract_as == "tensordict":
            if isinstance(source, nn.Module):
                return self._module_tree(source)
            if isinstance(source, TensorDictBase):
                return source
            if isinstance(source, Mapping):
                return _mapping_to_td(source)
        else:
            if isinstance(source, nn.Module):
                return source.state_dict()
            if isinstance(source, TensorDictBase):
                return _td_to_state_dict(source)
            if isinstance(source, Mapping):
                return source  # type: ignore[return-value]
        raise UnsupportedWeightsError(
            f"cannot extract weights from a {type(source).__name__}; expected an nn.Module, "
            "a TensorDict or a dict of tensors"
        )

    def _module_tree(self, module: nn.Module) -> TensorDict:
        entry = self._extracted.get(id(module))
        if entry is not None and entry.ref() is module and entry.snapshot.unchanged(module):
            for path, ref in entry.extra_modules.items():
                sub = ref()
                if sub is None:
                    break
                _set_extra(entry.td, path, sub.get_extra_state())
            else:
                return entry.td
        td = TensorDict.from_module(module)
        extra_modules = _extra_state_modules(module, "get_extra_state")
        for path, sub in extra_modules.items():
            _set_extra(td, path, sub.get_extra_state())
        if not extra_modules:
            td.lock_()
        try:
            snapshot = _ModuleSnapshot(module)
        except UncacheableTree:  # a module keeping its tensors in other than plain dicts
            self._extracted.pop(id(module), None)
            return td
        ref = weakref.ref(module, _dropper(self._extracted, id(module), "ref"))
        self._extracted[id(module)] = _ExtractEntry(ref, snapshot, td, extra_modules)
        return td

    # -- application ---------------------------------------------------------------------------

    def apply_weights(self, destination: Any, weights: Any, inplace: bool = True) -> None:
        """Write ``weights`` into ``destination``.

        Args:
            destination: an ``nn.Module``, a TensorDict or a dict of tensors.
            weights: a TensorDict, a dict (flat dotted keys or nested), or an ``nn.Module``
                whose weights are taken; ``None`` does nothing.
            inplace: ``True`` copies the values into the destination's existing tensors
                (through the engine, under ``torch.no_grad()``); ``False`` makes the
                destination point at the given tensors: a module's parameters stay
                ``nn.Parameter`` (same ``requires_grad``) and its buffers stay buffers; a
                TensorDict's entries are replaced.

        Both trees must have the same keys and, per key, the same shape and dtype; devices may
        differ. A module destination's keys are those of ``TensorDict.from_module`` with the
        ``"tensordict"`` strategy, and those of its ``state_dict`` with ``"state_dict"``: its
        non-persistent buffers are then neither required nor written (weights that carry
        them, e.g. taken with ``from_module``, have them ignored). Extra state in ``weights``
        is applied with ``set_extra_state`` when the destination is a module and ignored
        otherwise.

        A destination tensor found under several keys (tied weights) is written once, in
        place: when the weights hold different tensors under those keys, the weight of the
        last of those keys in the destination's order wins (a module's: registration order),
        whatever the weights' order, as with TorchRL's strategy. Out of place, each key is
        pointed at its own weight: tied keys stay tied only if the weights tie them.

        Raises:
            KeyMismatchError / ShapeMismatchError / DTypeMismatchError: naming the first key
                that differs and both values; nothing was written.
            UnsupportedWeightsError: a type the strategy does not handle.
            InvalidArgumentError: ``inplace=False`` into a plain dict or a locked TensorDict.
        """
        if weights is None:
            return
        weights = self._weights_tree(weights)
        if not inplace:
            _apply_out_of_place(destination, weights, self.extract_as == "state_dict")
            return
        self._binding(destination, weights).run(weights)

    def validate(self, destination: Any, weights: Any) -> None:
        """Check that ``weights`` fit ``destination`` for an in-place apply; copy nothing.

        Raises the errors :meth:`apply_weights` would raise. The copy plan it builds is cached,
        so a following ``apply_weights(destination, weights)`` only runs it. Used to check
        every destination before writing any of them.
        """
        if weights is None:
            return
        self._binding(destination, self._weights_tree(weights))

    def _weights_tree(self, weights: Any) -> Any:
        """``weights`` as a tree :meth:`_binding` takes (a module becomes its TensorDict)."""
        if type(weights) is TensorDict:  # the common case, without two ABC checks
            return weights
        if isinstance(weights, nn.Module):
            return self._module_tree(weights)
        if not isinstance(weights, (TensorDictBase, Mapping)):
            raise UnsupportedWeightsError(
                f"weights must be a TensorDict, a dict of tensors or an nn.Module, got "
                f"{type(weights).__name__}"
            )
        return weights

    def _binding(self, destination: Any, weights: Any) -> _Binding:
        entry = self._destinations.get(id(destination))
        if entry is not None and entry.ref() is destination:
            binding = entry.bindings.get(id(weights))
            if binding is not None and binding.plan is not None:
                binding.plan.prepare()  # its helper threads wake while the trees are checked
            if (
                binding is not None
                and binding.src_ref is not None
                and binding.src_ref() is weights
                and binding.dst_snapshot.unchanged(destination)
                and binding.src_snapshot.unchanged(weights)
            ):
                return binding
        binding = _bind(destination, weights, self.extract_as == "state_dict")
        try:
            binding.dst_snapshot = tree_snapshot(destination)
            binding.src_snapshot = tree_snapshot(weights)
            if entry is None or entry.ref() is not destination:
                entry = _DestinationEntry(
                    weakref.ref(destination, _dropper(self._destinations, id(destination), "ref"))
                )
                self._destinations[id(destination)] = entry
            binding.src_ref = weakref.ref(weights, _dropper(entry.bindings, id(weights), "src_ref"))
        except (UncacheableTree, TypeError):  # TypeError: not weakly referenceable
            return binding
        entry.bindings.pop(id(weights), None)
        if len(entry.bindings) >= _MAX_SOURCES_PER_DESTINATION:
            entry.bindings.pop(next(iter(entry.bindings)))
        entry.bindings[id(weights)] = binding
        return binding


def _dropper(cache: dict[int, Any], key: int, attr: str) -> Callable[[weakref.ReferenceType], None]:
    """A weakref callback that removes ``cache[key]`` when its referent dies, unless the slot
    was meanwhile reused for a new object with the same id."""

    def drop(ref: weakref.ReferenceType) -> None:
        entry = cache.get(key)
        if entry is not None and getattr(entry, attr) is ref:
            del cache[key]

    return drop


def _apply_out_of_place(destination: Any, weights: Any, state_dict_keys: bool) -> None:
    if isinstance(destination, Mapping) and not isinstance(destination, TensorDictBase):
        raise InvalidArgumentError(
            "cannot apply weights out of place (inplace=False) to a plain dict; use inplace=True"
        )
    if isinstance(destination, TensorDictBase) and destination.is_locked:
        raise InvalidArgumentError(
            "cannot replace the entries of a locked TensorDict (inplace=False); unlock it or "
            "use inplace=True"
        )
    dst, src = _flatten_pair(destination, weights, state_dict_keys)
    src_by_key = dict(zip(src.keys, src.tensors))
    if isinstance(destination, TensorDictBase):
        for key in dst.keys:
            destination.set(key, src_by_key[key])
        return
    # Extra state first, as in place: a set_extra_state that raises leaves every tensor as
    # it was (and the extra state already set restored).
    _set_extra_states([(dst.extra[path], _extra_from_tree(_resolve(weights, src_key)))
                       for path, src_key in src.extra.items()])
    for key, current in zip(dst.keys, dst.tensors):
        new = src_by_key[key]
        owner = destination.get_submodule(".".join(key[:-1]))
        if isinstance(current, nn.Parameter):
            if not (isinstance(new, nn.Parameter) and new.requires_grad == current.requires_grad):
                new = nn.Parameter(new, requires_grad=current.requires_grad)
        elif isinstance(new, nn.Parameter):
            new = new.detach()
        setattr(owner, key[-1], new)


def materialize_meta(module: nn.Module, device: torch.device | str | None = None) -> int:
    """Give every meta-device parameter and buffer of ``module`` real, uninitialised storage on
    ``device`` (CPU when None), keeping parameters as parameters (same ``requires_grad``) and
    buffers as buffers; tensors on other devices are left alone. A tensor shared by several
    submodules (tied weights) stays shared. Returns how many tensors were replaced.

    TorchRL's multi-process collectors send workers a stateless (meta-device) copy of the
    policy and leave it to the weight sync scheme to bring the weights; a receiver calls this
    before taking its first version. Internal to the package.
    """
    target = torch.device("cpu" if device is None else device)
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, new): keeps ids unique
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, old in table.items():
                if old is None or not old.is_meta:
                    continue
                hit = replaced.get(id(old))
                if hit is None:
                    new = torch.empty(old.shape, dtype=old.dtype, device=target)
                    if isinstance(old, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=old.requires_grad)
                    hit = replaced[id(old)] = (old, new)
                # Direct table writes, as nn.Module._apply does: the name stays registered as
                # a parameter or a buffer (and a non-persistent buffer stays non-persistent).
                table[name] = hit[1]
    return len(replaced)


# tensordict's unchecked constructor (present in the versions we support; td.copy() otherwise).
_NEW_UNSAFE = getattr(TensorDict, "_new_unsafe", None)


def _fresh_copy(td: TensorDict) -> TensorDict:
    """A new, unlocked TensorDict holding the same entries as ``td`` (the same tensor objects),
    its nested TensorDicts copied the same way, so no change made to it reaches ``td``.

    Built with tensordict's unchecked constructor: the entries come from a valid TensorDict,
    and the checked path (``td.copy()``) costs about 1 us per entry, several times the push
    of a 1000-tensor model. Non-tensor entries are shared: tensordict replaces them on
    ``set``, never changes them in place.
    """
    if _NEW_UNSAFE is None:
        return td.copy()
    entries = {
        key: _fresh_copy(value) if type(value) is TensorDict else value
        for key, value in td._tensordict.items()
    }
    return _NEW_UNSAFE(source=entries, batch_size=td.batch_size, device=td.device)


def _mapping_to_td(mapping: Mapping[Any, Any]) -> TensorDict:
    flat = _flatten_mapping(mapping, "source")
    td = TensorDict()
    for key, value in zip(flat.keys, flat.tensors):
        td.set(key, value)
    for path, value in flat.extra.items():
        _set_extra(td, path, _extra_from_tree(value) if is_non_tensor(value) else value)
    return td


def _td_to_state_dict(td: TensorDictBase) -> dict[str, Any]:
    flat = _flatten_td(td, "source")
    out: dict[str, Any] = {".".join(k): v for k, v in zip(flat.keys, flat.tensors)}
    for path, src_key in flat.extra.items():
        out[".".join((*path, _STATE_DICT_EXTRA_KEY))] = _extra_from_tree(_resolve(td, src_key))
    return out
