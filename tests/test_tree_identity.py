"""The tree-identity check (weightsync.tree_identity): the compiled walk and its Python twin
give the same answers, compare identities only, and never run a compared value's __eq__."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
from conftest import tree_check
from tensordict import TensorDict
from torch import nn

from weightsync import tree_identity
from weightsync.tree_identity import expect


@pytest.fixture(params=["native", "python"])
def same_entries(request):
    return tree_check(request.param)


class _Owner:
    def __init__(self, **dicts) -> None:
        self.__dict__.update(dicts)


class _EqualsEverything:
    """A value whose __eq__ says yes to anything and records that it ran."""

    calls = 0

    def __eq__(self, other: object) -> bool:
        type(self).calls += 1
        return True

    __hash__ = object.__hash__


def test_unchanged_dicts_match(same_entries):
    a, b = torch.ones(3), torch.zeros(2)
    owner = _Owner(d={"a": a, "b": b}, e={})
    expected = (expect(owner.d), expect(owner.e))
    assert same_entries((owner,), ("d", "e"), expected)
    assert same_entries((owner, owner), ("d",), (expected[0], expected[0]))


@pytest.mark.parametrize("with_memo", [False, True], ids=["walk", "memo"])
@pytest.mark.parametrize(
    "change",
    ["replace", "equal_tensor", "add", "remove", "rename", "reorder", "rebind_dict",
     "set_same_value", "clear_and_refill"],
)
def test_every_change_is_seen(same_entries, change, with_memo):
    a, b = torch.ones(1), torch.zeros(1)  # one element: a copy would compare equal
    owner = _Owner(d={"a": a, "b": b})
    expected = expect(owner.d)
    memo = [] if with_memo else None
    if with_memo:  # a first call that finds the tree the same, so the memo vouches for it
        assert same_entries((owner,), ("d",), (expected,), memo)
        assert same_entries((owner,), ("d",), (expected,), memo)
    d = owner.d
    same_after = False
    if change == "replace":
        d["a"] = torch.ones(3)
    elif change == "equal_tensor":
        d["a"] = a.clone()
    elif change == "add":
        d["c"] = a
    elif change == "remove":
        del d["b"]
    elif change == "rename":
        d["c"] = d.pop("b")
    elif change == "reorder":
        d["a"] = d.pop("a")
    elif change == "set_same_value":  # a write that changes nothing: still the same tree
        d["a"] = a
        same_after = True
    elif change == "clear_and_refill":
        d.clear()
        d.update(a=a, b=b)
        same_after = True
    else:
        owner.d = {"a": a, "b": torch.zeros(1)}
    assert same_entries((owner,), ("d",), (expected,), memo) is same_after
    if with_memo:  # answered again from the memo (refilled) or by a walk (emptied)
        assert same_entries((owner,), ("d",), (expected,), memo) is same_after


def test_the_memo_is_filled_only_by_a_walk_that_found_the_tree_the_same():
    same_entries = tree_check("native")
    from weightsync import _entries

    if sys.version_info < (3, 12):  # the version tags behave on 3.11 (checked at import)
        assert _entries.DICT_VERSIONS is True
    if not _entries.DICT_VERSIONS:
        pytest.skip("this interpreter's dict version tags are not used")
    owner = _Owner(d={"a": torch.ones(1)}, e={})
    expected = (expect(owner.d), expect(owner.e))
    memo: list = []
    assert same_entries((owner,), ("d", "e"), expected, memo)
    # Addresses and tags only: the memo holds no reference to the dicts.
    assert memo[0::2] == [id(owner.d), id(owner.e)] and all(type(v) is int for v in memo[1::2])
    owner.e["new"] = 1
    assert not same_entries((owner,), ("d", "e"), expected, memo)
    assert memo == []
    del owner.e["new"]
    assert same_entries((owner,), ("d", "e"), expected, memo) and len(memo) == 4
    with pytest.raises(TypeError, match="memo: list"):
        same_entries((owner,), ("d", "e"), expected, ())


def test_values_are_compared_by_identity_only(same_entries):
    _EqualsEverything.calls = 0
    first = _EqualsEverything()
    owner = _Owner(d={"x": first})
    expected = expect(owner.d)
    assert same_entries((owner,), ("d",), (expected,))
    owner.d["x"] = _EqualsEverything()  # equal by __eq__, but another object
    assert not same_entries((owner,), ("d",), (expected,))
    assert _EqualsEverything.calls == 0


def test_an_equal_key_string_matches(same_entries):
    key = "".join(["we", "ight"])  # a str object other than the literal
    value = torch.ones(2)
    owner = _Owner(d={key: value})
    expected = expect(owner.d)
    owner.d = {"weight": value}
    assert same_entries((owner,), ("d",), (expected,))


def test_a_foreign_key_never_runs_its_eq(same_entries):
    _EqualsEverything.calls = 0
    value = torch.ones(2)
    owner = _Owner(d={"k": value})
    expected = expect(owner.d)
    owner.d = {_EqualsEverything(): value}  # says it equals "k"
    assert not same_entries((owner,), ("d",), (expected,))
    assert _EqualsEverything.calls == 0


def test_skip_key_is_not_compared(same_entries):
    owner = _Owner(d={"a": torch.ones(2), "__extra_state__": 1, "b": torch.ones(2)})
    expected = expect(owner.d, skip_key="__extra_state__")
    owner.d["__extra_state__"] = 2
    assert same_entries((owner,), ("d",), (expected,))
    owner.d["b"] = torch.ones(2)
    assert not same_entries((owner,), ("d",), (expected,))


def test_weak_values_and_owners(same_entries):
    child, other = nn.Linear(2, 2), nn.Linear(2, 2)
    owner = _Owner(d={"child": child, "empty": None})
    expected = expect(owner.d, weak=True)
    assert isinstance(expected[1][0], weakref.ref) and expected[1][1] is None
    ref = weakref.ref(owner)
    memo: list = []
    assert same_entries((ref,), ("d",), (expected,))
    assert same_entries((ref,), ("d",), (expected,), memo)
    owner.d["child"] = other
    assert not same_entries((ref,), ("d",), (expected,))
    assert not same_entries((ref,), ("d",), (expected,), memo)
    owner.d["child"] = child
    assert same_entries((ref,), ("d",), (expected,), memo)
    del owner
    gc.collect()
    assert not same_entries((ref,), ("d",), (expected,))  # the owner died
    assert not same_entries((ref,), ("d",), (expected,), memo)


def test_the_memo_keeps_no_tree_alive(same_entries):
    # A module held weakly (with a submodule pointing back at it) must stay collectable
    # while a memo vouches for its dicts.
    net = nn.Sequential(nn.Linear(2, 2))
    net[0].root = [net]  # a back reference from a submodule to the root
    names = ("_modules", "_parameters", "_buffers")
    mods = tuple(weakref.ref(m) for m in net.modules())
    expected = tuple(expect(getattr(m(), n), weak=n == "_modules") for m in mods for n in names)
    memo: list = []
    assert same_entries(mods, names, expected, memo)
    assert same_entries(mods, names, expected, memo)
    root = weakref.ref(net)
    del net
    gc.collect()
    assert root() is None
    assert not same_entries(mods, names, expected, memo)


def test_a_dead_weak_value_matches_nothing(same_entries):
    child = nn.Linear(2, 2)
    owner = _Owner(d={"child": child})
    expected = expect(owner.d, weak=True)
    owner.d["child"] = None
    del child
    gc.collect()
    assert not same_entries((owner,), ("d",), (expected,))


def test_missing_attribute_and_other_dict_types(same_entries):
    owner = _Owner(d={"a": 1})
    expected = expect(owner.d)
    assert not same_entries((owner,), ("missing",), (expected,))
    owner.d = type("MyDict", (dict,), {})(a=1)
    assert not same_entries((owner,), ("d",), (expected,))


def test_malformed_expectations_raise(same_entries):
    owner = _Owner(d={})
    with pytest.raises(ValueError, match="owners x names"):
        same_entries((owner,), ("d", "e"), (expect(owner.d),))


def test_expect_refuses_what_cannot_be_compared_exactly():
    with pytest.raises(TypeError, match="not a plain dict"):
        expect(type("MyDict", (dict,), {})())
    with pytest.raises(TypeError, match="not a str"):
        expect({1: torch.ones(1)})


def test_tensordict_and_module_trees(same_entries):
    td = TensorDict({"a": torch.ones(2), "sub": {"b": torch.zeros(3)}})
    nodes = (td, td["sub"])
    expected = tuple(expect(n._tensordict) for n in nodes)
    assert same_entries(nodes, ("_tensordict",), expected)
    td["sub", "b"] = torch.zeros(3)
    assert not same_entries(nodes, ("_tensordict",), expected)

    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    names = ("_modules", "_parameters", "_buffers")
    mods = tuple(weakref.ref(m) for m in net.modules())
    expected = tuple(expect(getattr(m(), n), weak=n == "_modules") for m in mods for n in names)
    assert same_entries(mods, names, expected)
    net[0].weight = nn.Parameter(torch.zeros(2, 2))
    assert not same_entries(mods, names, expected)


def test_implementation_reports_the_active_check():
    info = tree_identity.implementation()
    assert info["active"] in ("native", "python")
    assert (info["reason"] is None) == (info["active"] == "native")
