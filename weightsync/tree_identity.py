"""Has a tree of dicts kept the very objects it held? The check behind every cached plan.

weightsync caches what it derives from a weight tree (copy plans, matched arena layouts) and
must notice, at every sync, an entry that was added, removed, renamed or given another object.
A tree is described as *owners* (objects, or weak references to them), attribute *names*
whose values are the dicts to check (``("_tensordict",)`` for TensorDict nodes, a module's
``_modules``, ``_parameters`` and ``_buffers``), and one :func:`expect` per (owner, name).

:func:`same_entries` is the compiled walk (``weightsync._entries``, a few ns per entry) when
it is built and the extension is not disabled, else :func:`same_entries_python`, its pure
Python twin (about 37 ns per entry). With a ``memo`` the compiled walk skips the entries of
trees whose dicts have not changed since it last found them the same (their version tags). Both compare identities only: no ``__eq__`` of a compared
value ever runs, so no foreign object can pass for another.

Internal to the package; :func:`implementation` tells which one is active and why.
"""

from __future__ import annotations

import operator
import os
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Expected", "expect", "same_entries", "same_entries_python", "implementation"]

#: One dict's expected entries: (keys, values, weak, skip). See :func:`expect`.
Expected = tuple[tuple[str, ...], tuple[Any, ...], bool, int]

_DEAD = object()  # what a dead weak reference resolves to: equal to no value


def expect(d: dict, *, weak: bool = False, skip_key: str | None = None) -> Expected:
    """The entries ``d`` holds now, to compare against later.

    Args:
        weak: keep weak references to the values (a module's submodules, which may point
            back at the root the caches hold weakly); ``None`` values stay ``None``.
        skip_key: a key whose value is not compared (re-read at every update anyway).

    Raises:
        TypeError: ``d`` is not an exact ``dict`` with ``str`` keys (such trees are not cached).
    """
    if type(d) is not dict:
        raise TypeError(f"not a plain dict: {type(d).__name__}")
    keys = tuple(d)
    if not all(type(k) is str for k in keys):
        raise TypeError("a key is not a str")
    values = tuple(d.values())
    if weak:
        values = tuple(None if v is None else weakref.ref(v) for v in values)
    skip = keys.index(skip_key) if skip_key is not None and skip_key in d else -1
    return keys, values, weak, skip


def _resolve(obj: Any) -> Any:
    if type(obj) is weakref.ref:
        target = obj()
        return _DEAD if target is None else target
    return obj


def same_entries_python(owners: tuple, names: tuple[str, ...], expected: tuple[Expected, ...],
                        memo: list | None = None) -> bool:
    """Pure-Python :func:`same_entries` (same contract, same answers). Python cannot read a
    dict's version tag, so ``memo`` is only emptied: every call walks the entries."""
    if memo is not None:
        memo.clear()
    if len(expected) != len(owners) * len(names):
        raise ValueError(
            f"expected holds {len(expected)} entries, owners x names is {len(owners) * len(names)}"
        )
    k = 0
    for owner in owners:
        owner = _resolve(owner)
        if owner is _DEAD:
            return False
        for name in names:
            keys, values, weak, skip = expected[k]
            k += 1
            try:
                d = getattr(owner, name)
            except AttributeError:
                return False
            if type(d) is not dict or len(d) != len(keys):
                return False
            # Keys match by identity or, like the compiled walk, as equal exact strs (a
            # re-inserted key string); a key of another type never gets to run its __eq__.
            if not all(map(operator.is_, d, keys)) and not (
                all(type(k) is str for k in d) and tuple(d) == keys
            ):
                return False
            current = tuple(d.values())
            if weak:
                values = tuple(v if v is None else _resolve(v) for v in values)
            if skip >= 0:
                current = current[:skip] + current[skip + 1 :]
                values = values[:skip] + values[skip + 1 :]
            if not all(map(operator.is_, current, values)):
                return False
    return True


def _choose() -> tuple[Callable[..., bool], str, str | None]:
    if os.environ.get("WEIGHTSYNC_DISABLE_EXTENSION", "") not in ("", "0"):
        return same_entries_python, "python", "disabled by WEIGHTSYNC_DISABLE_EXTENSION"
    try:
        from weightsync._entries import same_entries as compiled
    except ImportError as exc:
        return same_entries_python, "python", f"weightsync._entries is not built ({exc})"
    return compiled, "native", None


#: ``same_entries(owners, names, expected, memo=None) -> bool``: for every owner (an object,
#: or a weak reference to one; a dead one fails) and name, in order, ``getattr(owner, name)``
#: is an exact dict holding, in order, ``expected[k]``'s keys (same objects or equal strs) and
#: values (the same objects; through their weak references when ``weak``; the one at ``skip``
#: not compared). ``memo``, a list kept beside ``expected`` (start empty), lets the compiled
#: walk answer from the dicts' addresses and version tags, which CPython changes at every
#: change of a dict: a few ns per dict instead of per entry while nothing changed. It holds no
#: reference to the dicts, and is unused where ``weightsync._entries.DICT_VERSIONS`` is False.
same_entries, _NAME, _WHY_NOT_NATIVE = _choose()


def implementation() -> dict[str, str | None]:
    """Which tree check is active (``native`` or ``python``) and, for ``python``, why."""
    return {"active": _NAME, "reason": _WHY_NOT_NATIVE}
