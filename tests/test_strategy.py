"""WeightStrategy: extraction in both formats, in-place and out-of-place application, extra
state, validation before any write, and the cached copy plans."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from weightsync.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
    ShapeMismatchError,
    WeightSyncError,
)
from weightsync.strategy import EXTRA_STATE_KEY, UnsupportedWeightsError, WeightStrategy, materialize_meta


def make_net(seed: int, width: int = 8) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.Linear(width, 3))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].num_batches_tracked.fill_(seed + 3)
    return net


def as_bytes(tree) -> dict[str, torch.Tensor]:
    """Every tensor of a module / TensorDict / state_dict as raw bytes, keyed by dotted path."""
    if isinstance(tree, nn.Module):
        tree = tree.state_dict()
    if isinstance(tree, TensorDict):
        tree = {".".join(k) if isinstance(k, tuple) else k: v
                for k, v in tree.items(include_nested=True, leaves_only=True)}
    return {k: v.detach().contiguous().view(-1).view(torch.uint8).clone()
            for k, v in tree.items() if isinstance(v, torch.Tensor)}


def assert_same_bytes(a, b) -> None:
    a, b = as_bytes(a), as_bytes(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Counter(nn.Module):
    """A module with extra state of several kinds (int, str, tensor, nested dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.count = 0
        self.tag = "init"
        self.stats = torch.zeros(3)

    def get_extra_state(self):
        return {"count": self.count, "tag": self.tag, "stats": self.stats,
                "nested": {"twice": self.count * 2}}

    def set_extra_state(self, state) -> None:
        self.count = state["count"]
        self.tag = state["tag"]
        self.stats = state["stats"]
        assert state["nested"]["twice"] == 2 * state["count"]


class WithExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Counter()
        self.head = nn.Linear(2, 1)
        self.steps = 0

    def get_extra_state(self):
        return self.steps

    def set_extra_state(self, state) -> None:
        self.steps = state


# -- construction and extraction ------------------------------------------------------------------


def test_rejects_unknown_format():
    with pytest.raises(InvalidArgumentError, match="'pickle'"):
        WeightStrategy("pickle")
    assert WeightStrategy().extract_as == "tensordict"


def test_extract_tensordict_from_module_holds_live_tensors():
    net = make_net(0)
    td = WeightStrategy("tensordict").extract_weights(net)
    assert isinstance(td, TensorDict)
    assert td["0", "weight"] is net[0].weight
    assert td["1", "running_mean"] is net[1].running_mean
    assert set(as_bytes(td)) == set(net.state_dict())
    # A replaced tensor is seen at the next call.
    strategy = WeightStrategy()
    strategy.extract_weights(net)
    net[0].weight = nn.Parameter(torch.zeros(8, 4))
    assert strategy.extract_weights(net)["0", "weight"] is net[0].weight


@pytest.mark.parametrize("extra", [False, True])
def test_extract_tensordict_from_module_is_a_new_unlocked_tree_each_call(extra):
    net = WithExtra() if extra else make_net(0)
    live = dict(TensorDict.from_module(net).items(True, True))
    strategy = WeightStrategy()
    first, second = strategy.extract_weights(net), strategy.extract_weights(net)
    assert first is not second and not first.is_locked and not second.is_locked
    for td in (first, second):
        assert {k: v for k, v in td.items(True, True) if k not in _extra_keys(td)} == live
        assert all(td.get(k) is v for k, v in live.items())  # the module's own tensors
    # Changing one reaches neither the next call, nor another copy, nor the cached tree the
    # internal paths use.
    key = next(iter(live))
    first.set(key, torch.zeros(1))
    first.set("added", torch.ones(1))
    del first[key[0]]
    first.lock_()
    third = strategy.extract_weights(net)
    for td in (second, third, strategy._extract(net)):
        assert td.get(key) is live[key] and "added" not in td.keys()
    assert not third.is_locked
    if extra:  # extra state read at each call, without changing earlier copies
        net.steps = 5
        assert strategy.extract_weights(net)[EXTRA_STATE_KEY] == 5
        assert second[EXTRA_STATE_KEY] == 0


def test_scheme_weights_are_a_copy_the_caller_may_change():
    from weightsync.schemes import NoWeightSyncScheme

    net = make_net(0)
    scheme = NoWeightSyncScheme()
    scheme.init_on_receiver(model_id="policy", model=net)
    weights = scheme.weights
    weights["0", "weight"] = torch.zeros(8, 4)
    del weights["2"]
    assert scheme.weights["0", "weight"] is net[0].weight and "2" in scheme.weights.keys()
    scheme.apply_weights(scheme.weights)


def _extra_keys(td) -> set:
    return {k for k in td.keys(True, True)
            if EXTRA_STATE_KEY in (k if isinstance(k, tuple) else (k,))}


def test_extract_tensordict_from_tensordict_and_dict():
    net = make_net(0)
    strategy = WeightStrategy("tensordict")
    td = TensorDict.from_module(net)
    assert strategy.extract_weights(td) is td
    from_dict = strategy.extract_weights(net.state_dict())
    assert from_dict["2", "bias"].data_ptr() == net[2].bias.data_ptr()
    assert_same_bytes(from_dict, net)


def test_extract_state_dict_from_each_source():
    net = make_net(0)
    strategy = WeightStrategy("state_dict")
    sd = strategy.extract_weights(net)
    assert list(sd) == list(net.state_dict())
    flat = strategy.extract_weights(TensorDict.from_module(net))
    assert set(flat) == set(sd)
    assert flat["0.weight"] is net[0].weight
    plain = {"a": torch.ones(2)}
    assert strategy.extract_weights(plain) is plain


@pytest.mark.parametrize("extract_as", ["tensordict", "state_dict"])
def test_extract_rejects_other_types(extract_as):
    with pytest.raises(UnsupportedWeightsError, match="list") as info:
        WeightStrategy(extract_as).extract_weights([torch.zeros(1)])
    assert isinstance(info.value, TypeError) and isinstance(info.value, WeightSyncError)


# -- in-place application -------------------------------------------------------------------------


@pytest.mark.parametrize("extract_as", ["tensordict", "state_dict"])
def test_round_trip_into_module_outside_no_grad(backend, extract_as):
    src, dst = make_net(0), make_net(1)
    params_before = [id(p) for p in dst.parameters()]
    strategy = WeightStrategy(extract_as)
    assert torch.is_grad_enabled() and dst[0].weight.requires_grad
    strategy.apply_weights(dst, strategy.extract_weights(src))
    assert_same_bytes(dst, src)
    assert [id(p) for p in dst.parameters()] == params_before
    assert dst[0].weight.requires_grad and dst[0].weight.grad is None


@pytest.mark.parametrize("form", ["td", "locked_td", "flat_dict", "nested_dict", "module"])
def test_apply_accepts_every_weights_form(backend, form):
    src, dst = make_net(0), make_net(1)
    weights = {
        "td": lambda: TensorDict.from_module(src),
        "locked_td": lambda: TensorDict.from_module(src).lock_(),
        "flat_dict": src.state_dict,
        "nested_dict": lambda: TensorDict.from_module(src).to_dict(),
        "module": lambda: src,
    }[form]()
    WeightStrategy().apply_weights(dst, weights)
    assert_same_bytes(dst, src)


@pytest.mark.parametrize("dst_form", ["module", "td", "locked_td", "flat_dict"])
def test_apply_into_every_destination_form(backend, dst_form):
    src, target = make_net(0), make_net(1)
    destination = {
        "module": lambda: target,
        "td": lambda: TensorDict.from_module(target),
        "locked_td": lambda: TensorDict.from_module(target).lock_(),
        "flat_dict": lambda: dict(target.named_parameters()) | dict(target.named_buffers()),
    }[dst_form]()
    WeightStrategy().apply_weights(destination, TensorDict.from_module(src))
    assert_same_bytes(target, src)


def test_none_weights_do_nothing():
    dst = make_net(1)
    before = as_bytes(dst)
    WeightStrategy().apply_weights(dst, None)
    assert_same_bytes(before, dst)


def test_tied_weights_and_self_application(backend):
    def tied(seed):
        net = make_net(seed)
        net.append(nn.Linear(3, 8))
        net[0].weight = nn.Parameter(torch.randn(8, 4) + seed)
        net[3].weight = nn.Parameter(net[0].weight.detach().t().contiguous()[:8, :3].clone())
        net.tie = nn.Linear(4, 8)
        net.tie.weight = net[0].weight  # one tensor under two keys
        return net

    src, dst = tied(0), tied(1)
    strategy = WeightStrategy()
    strategy.apply_weights(dst, src)
    assert_same_bytes(dst, src)
    assert dst.tie.weight is dst[0].weight
    before = as_bytes(dst)
    strategy.apply_weights(dst, dst)  # pushing a tree into itself moves nothing
    strategy.apply_weights(dst, TensorDict.from_module(dst))
    assert_same_bytes(before, dst)


def _tied(dst_form: str, dst_order: tuple[str, str]):
    """A destination holding one tensor under keys "a" and "c", in ``dst_order``; returns it,
    the tensor and each name's key in it."""
    x = torch.zeros(4)
    if dst_form == "module":
        destination = nn.Module()
        for name in dst_order:
            setattr(destination, name, nn.Module())
            getattr(destination, name).register_buffer("w", x)
        return destination, x, {"a": "a.w", "c": "c.w"}
    destination = TensorDict({name: x for name in dst_order})
    if dst_form == "locked_td":
        destination.lock_()
    return destination, x, {"a": "a", "c": "c"}


@pytest.mark.parametrize("dst_form", ["td", "locked_td", "module"])
@pytest.mark.parametrize("dst_order", [("a", "c"), ("c", "a")])
@pytest.mark.parametrize("weights_order", [("a", "c"), ("c", "a")])
def test_tied_destination_fed_different_sources_takes_its_last_key(
        backend, dst_form, dst_order, weights_order):
    values = {"a": torch.full((4,), 1.0), "c": torch.full((4,), 2.0)}
    destination, x, key = _tied(dst_form, dst_order)
    weights = {key[k]: values[k] for k in weights_order}
    strategy = WeightStrategy()
    strategy.apply_weights(destination, weights)
    assert torch.equal(x, values[dst_order[-1]])  # the destination's last key wins
    strategy.apply_weights(destination, weights)  # again, through the cached plan
    assert torch.equal(x, values[dst_order[-1]])
    try:
        from torchrl.weight_update import WeightStrategy as TorchRLStrategy
    except ImportError:
        pass
    else:  # the reference: TorchRL's strategy leaves the same
        theirs, y, _ = _tied(dst_form if dst_form != "locked_td" else "td", dst_order)
        TorchRLStrategy().apply_weights(theirs, weights if dst_form == "module"
                                        else TensorDict(weights))
        assert torch.equal(y, x)
    # The same source under both keys: one copy.
    same = {key["a"]: torch.full((4,), 3.0)}
    same[key["c"]] = same[key["a"]]
    strategy.apply_weights(destination, same)
    assert torch.equal(x, same[key["a"]])
    assert len(strategy._binding(destination, same).keys) == 1


@pytest.mark.gpu
def test_cpu_weights_into_gpu_module(backend):
    src = make_net(0)
    dst = make_net(1).cuda()
    strategy = WeightStrategy()
    strategy.apply_weights(dst, TensorDict.from_module(src))
    torch.cuda.synchronize()
    assert_same_bytes(dst.cpu(), src)


# -- non-persistent buffers -----------------------------------------------------------------------


def with_scratch(seed: int) -> nn.Module:
    """make_net plus a non-persistent buffer, which state_dict() leaves out."""
    net = make_net(seed)
    net[1].register_buffer("tmp", torch.full((3,), float(seed)), persistent=False)
    return net


@pytest.mark.parametrize("inplace", [True, False])
def test_state_dict_strategy_round_trips_a_non_persistent_buffer(backend, inplace):
    src, dst = with_scratch(0), with_scratch(1)
    tmp = dst[1].tmp
    strategy = WeightStrategy("state_dict")
    weights = strategy.extract_weights(src)
    assert "1.tmp" not in weights
    strategy.apply_weights(dst, weights, inplace=inplace)
    assert_same_bytes(dst, src)  # state_dict(): every persistent tensor
    assert dst[1].tmp is tmp and torch.equal(tmp, torch.full((3,), 1.0))  # not written
    # Weights that carry it (from_module's, a module's) leave it alone too.
    for weights in (TensorDict.from_module(with_scratch(2)), with_scratch(3)):
        strategy.apply_weights(dst, weights, inplace=inplace)
        assert dst[1].tmp is tmp and torch.equal(tmp, torch.full((3,), 1.0))
    # Every other key is still required.
    partial = dict(strategy.extract_weights(src))
    del partial["2.bias"]
    before = as_bytes(dst)
    with pytest.raises(KeyMismatchError, match="'2.bias'"):
        strategy.apply_weights(dst, partial, inplace=inplace)
    assert_same_bytes(before, dst)


def test_tensordict_strategy_requires_and_writes_a_non_persistent_buffer(backend):
    src, dst = with_scratch(0), with_scratch(1)
    strategy = WeightStrategy("tensordict")
    weights = strategy.extract_weights(src)
    assert weights["1", "tmp"] is src[1].tmp
    strategy.apply_weights(dst, weights)
    assert torch.equal(dst[1].tmp, src[1].tmp)
    before = as_bytes(dst) | {"tmp": dst[1].tmp.clone()}
    with pytest.raises(KeyMismatchError, match="'1.tmp'.*missing"):
        strategy.apply_weights(dst, with_scratch(2).state_dict())
    assert_same_bytes({k: v for k, v in before.items() if k != "tmp"}, dst)
    assert torch.equal(dst[1].tmp, before["tmp"])


# -- extra state ----------------------------------------------------------------------------------


def test_extra_state_round_trip_tensordict(backend):
    src, dst = WithExtra(), WithExtra()
    src.steps, src.inner.count, src.inner.tag = 7, 5, "five"
    src.inner.stats = torch.arange(3.0)
    strategy = WeightStrategy()
    weights = strategy.extract_weights(src)
    assert (EXTRA_STATE_KEY,) in weights.keys(include_nested=True)
    assert ("inner", EXTRA_STATE_KEY) in weights.keys(include_nested=True)
    strategy.apply_weights(dst, weights)
    assert dst.steps == 7 and type(dst.steps) is int
    assert dst.inner.count == 5 and type(dst.inner.count) is int and dst.inner.tag == "five"
    assert torch.equal(dst.inner.stats, src.inner.stats)
    assert dst.inner.stats.data_ptr() != src.inner.stats.data_ptr()  # cloned, never aliased
    assert_same_bytes(dst, src)
    # Extra state is read again at every extraction and application.
    src.steps, src.inner.count = 8, 6
    strategy.apply_weights(dst, strategy.extract_weights(src))
    assert (dst.steps, dst.inner.count) == (8, 6)


def test_extra_state_round_trip_state_dict(backend):
    src, dst = WithExtra(), WithExtra()
    src.steps, src.inner.count = 3, 4
    strategy = WeightStrategy("state_dict")
    sd = strategy.extract_weights(src)
    assert sd["_extra_state"] == 3 and sd["inner._extra_state"]["count"] == 4
    strategy.apply_weights(dst, sd)
    assert (dst.steps, dst.inner.count) == (3, 4)
    # The TensorDict form converts to torch's state_dict keys and back.
    td = WeightStrategy("tensordict").extract_weights(src)
    as_sd = strategy.extract_weights(td)
    assert as_sd["_extra_state"] == 3 and as_sd["inner._extra_state"]["tag"] == "init"
    back = WeightStrategy("tensordict").extract_weights(as_sd)
    dst2 = WithExtra()
    strategy.apply_weights(dst2, back)
    assert (dst2.steps, dst2.inner.count) == (3, 4)


def test_extra_state_into_tensordict_destination_is_ignored(backend):
    src, dst = WithExtra(), WithExtra()
    src.steps = 9
    weights = WeightStrategy().extract_weights(src)
    WeightStrategy().apply_weights(TensorDict.from_module(dst), weights)
    assert dst.steps == 0
    assert torch.equal(dst.head.weight, src.head.weight)


def test_extra_state_for_a_module_without_it_is_refused(backend):
    dst = make_net(1)
    weights = TensorDict.from_module(make_net(0))
    weights.set(("0", EXTRA_STATE_KEY), torch.zeros(1))
    before = as_bytes(dst)
    with pytest.raises(KeyMismatchError, match="'0'.*set_extra_state"):
        WeightStrategy().apply_weights(dst, weights)
    assert_same_bytes(before, dst)


class Running(nn.Module):
    """Extra state held in a tensor that set_extra_state writes in place (like running
    statistics), and that get_extra_state returns live."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.stats = torch.full((2,), value)
        self.calls = 0

    def get_extra_state(self):
        return {"stats": self.stats, "calls": self.calls}

    def set_extra_state(self, state) -> None:
        self.stats.copy_(state["stats"])
        self.calls = state["calls"]


class Refusing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.refuse = False

    def get_extra_state(self):
        return 0

    def set_extra_state(self, state) -> None:
        if self.refuse:
            raise RuntimeError("refused: incompatible extra state")


class Sets(nn.Module):
    """Two modules with extra state: the first accepts it, the second may refuse it."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.first = Running(float(seed))
            self.second = Refusing()
        self.first.calls = seed


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("source", ["extracted", "module", "state_dict"])
def test_a_refused_extra_state_leaves_the_destination_as_it_was(backend, inplace, source):
    src, dst = Sets(0), Sets(1)
    strategy = WeightStrategy("state_dict" if source == "state_dict" else "tensordict")
    weights = src if source == "module" else strategy.extract_weights(src)
    before, params, stats = as_bytes(dst), [id(p) for p in dst.parameters()], dst.first.stats
    dst.second.refuse = True
    for _ in range(2):  # through a new plan, then through the cached one
        with pytest.raises(RuntimeError, match="refused"):
            strategy.apply_weights(dst, weights, inplace=inplace)
        assert_same_bytes(before, dst)  # every tensor, bit for bit
        assert [id(p) for p in dst.parameters()] == params  # none re-pointed either
        # The first module's extra state was set, then restored (its tensor in place).
        assert dst.first.stats is stats and torch.equal(stats, torch.full((2,), 1.0))
        assert dst.first.calls == 1
    dst.second.refuse = False
    strategy.apply_weights(dst, weights, inplace=inplace)
    assert dst.first.calls == 0 and torch.equal(dst.first.stats, torch.zeros(2))
    assert_same_bytes(dst, src)


def test_a_failed_copy_restores_the_extra_state_it_set(backend):
    src, dst = Sets(0), Sets(1)
    strategy = WeightStrategy()
    weights = strategy.extract_weights(src)
    binding = strategy._binding(dst, weights)

    class FailingPlan:  # what an engine error at run time looks like
        def prepare(self) -> None:
            pass

        def run(self) -> None:
            raise WeightSyncError("index 0: the copy failed")

    binding.plan = FailingPlan()
    with pytest.raises(WeightSyncError, match="the copy failed.*index 0 is key"):
        strategy.apply_weights(dst, weights)
    assert dst.first.calls == 1 and torch.equal(dst.first.stats, torch.full((2,), 1.0))


# -- out-of-place application ---------------------------------------------------------------------


def test_out_of_place_points_module_at_the_weights(backend):
    src, dst = make_net(0), make_net(1)
    dst[2].bias.requires_grad_(False)
    weights = TensorDict.from_module(src).data  # plain tensors, not Parameters
    WeightStrategy().apply_weights(dst, weights, inplace=False)
    assert dst[0].weight.data_ptr() == src[0].weight.data_ptr()
    assert isinstance(dst[0].weight, nn.Parameter) and dst[0].weight.requires_grad
    assert isinstance(dst[2].bias, nn.Parameter) and not dst[2].bias.requires_grad
    assert "running_mean" in dst[1]._buffers and not isinstance(dst[1].running_mean, nn.Parameter)
    assert dst[1].running_mean.data_ptr() == src[1].running_mean.data_ptr()
    assert {n for n, _ in dst.named_parameters()} == {n for n, _ in src.named_parameters()}
    # Parameters given as Parameters are used as they are.
    other = make_net(2)
    WeightStrategy().apply_weights(other, TensorDict.from_module(src), inplace=False)
    assert other[0].weight is src[0].weight


def test_out_of_place_extra_state(backend):
    src, dst = WithExtra(), WithExtra()
    src.inner.count = 11
    WeightStrategy().apply_weights(dst, WeightStrategy().extract_weights(src), inplace=False)
    assert dst.inner.count == 11 and dst.head.weight.data_ptr() == src.head.weight.data_ptr()


def test_out_of_place_into_tensordicts_and_dicts(backend):
    src = TensorDict.from_module(make_net(0))
    td = TensorDict.from_module(make_net(1))
    WeightStrategy().apply_weights(td, src, inplace=False)
    assert td["0", "weight"] is src["0", "weight"]
    with pytest.raises(InvalidArgumentError, match="locked"):
        WeightStrategy().apply_weights(td.lock_(), src, inplace=False)
    with pytest.raises(InvalidArgumentError, match="plain dict"):
        WeightStrategy().apply_weights(make_net(1).state_dict(), src, inplace=False)


# -- validation before the first write ------------------------------------------------------------


def _mismatched(kind: str) -> TensorDict:
    weights = TensorDict.from_module(make_net(0)).data.clone()
    last = ("2", "bias")  # the last key: every other tensor would be written by a naive copy
    if kind == "missing":
        del weights[last]
    elif kind == "unexpected":
        weights["extra_key"] = torch.zeros(2)
    elif kind == "shape":
        weights[last] = torch.zeros(4)
    elif kind == "dtype":
        weights[last] = weights[last].double()
    return weights


@pytest.mark.parametrize("kind, error, pattern", [
    ("missing", KeyMismatchError, r"destination key '2\.bias' \(float32\[3\]\) is missing"),
    ("unexpected", KeyMismatchError, r"weights key 'extra_key' \(float32\[2\]\) is not in the "),
    ("shape", ShapeMismatchError, r"key '2\.bias': destination shape \[3\] != weights shape \[4\]"),
    ("dtype", DTypeMismatchError,
     r"key '2\.bias': destination dtype float32 != weights dtype float64"),
])
@pytest.mark.parametrize("dst_form", ["module", "locked_td"])
def test_mismatch_names_key_and_changes_nothing(backend, kind, error, pattern, dst_form):
    target = make_net(1)
    destination = target if dst_form == "module" else TensorDict.from_module(target).lock_()
    before = as_bytes(target)
    with pytest.raises(error, match=pattern) as info:
        WeightStrategy().apply_weights(destination, _mismatched(kind))
    assert isinstance(info.value, WeightSyncError)
    assert_same_bytes(before, target)


def test_mismatch_after_a_cached_plan_changes_nothing(backend):
    src, dst = TensorDict.from_module(make_net(0)).data.clone(), make_net(1)
    strategy = WeightStrategy()
    strategy.apply_weights(dst, src)
    src["2", "bias"] = torch.zeros(3, dtype=torch.float16)  # same source object, new leaf
    before = as_bytes(dst)
    with pytest.raises(DTypeMismatchError, match="'2.bias'"):
        strategy.apply_weights(dst, src)
    assert_same_bytes(before, dst)


def test_weights_of_an_unsupported_type_are_refused():
    with pytest.raises(UnsupportedWeightsError, match="int"):
        WeightStrategy().apply_weights(make_net(1), 3)
    with pytest.raises(UnsupportedWeightsError, match="'0.weight' holds a str"):
        WeightStrategy().apply_weights(make_net(1), {"0.weight": "nope"})
    with pytest.raises(UnsupportedWeightsError, match="destination must be"):
        WeightStrategy().apply_weights([torch.zeros(1)], {"a": torch.zeros(1)})


# -- cached plans ---------------------------------------------------------------------------------


def _binding(strategy, dst, src):
    return strategy._destinations[id(dst)].bindings[id(src)]


@pytest.mark.parametrize("locked", [False, True])
def test_plan_is_reused_and_rebuilt_when_the_source_changes(backend, locked):
    strategy = WeightStrategy()
    dst = TensorDict.from_module(make_net(1)).lock_()
    src = TensorDict.from_module(make_net(0)).data.clone()
    if locked:
        src.lock_()
    strategy.apply_weights(dst, src)
    plan = _binding(strategy, dst, src).plan
    src["0", "weight"].add_(1)  # new values, same tensors: the cached plan copies them
    strategy.apply_weights(dst, src)
    assert _binding(strategy, dst, src).plan is plan
    assert_same_bytes(dst, src)
    replacement = torch.full((8, 4), 7.0)
    if locked:
        src.unlock_()
    src["0", "weight"] = replacement  # a new leaf object: the plan must not copy the old one
    if locked:
        src.lock_()
    strategy.apply_weights(dst, src)
    assert _binding(strategy, dst, src).plan is not plan
    assert torch.equal(dst["0", "weight"], replacement)


def test_renamed_key_is_noticed(backend):
    strategy = WeightStrategy()
    dst = TensorDict({"a": torch.zeros(2)})
    src = TensorDict({"a": torch.ones(2)})
    strategy.apply_weights(dst, src)
    src.rename_key_("a", "b")
    with pytest.raises(KeyMismatchError, match="'a'"):
        strategy.apply_weights(dst, src)


def test_replaced_and_reallocated_destination_parameters(backend):
    strategy = WeightStrategy()
    src, dst = make_net(0), make_net(1)
    weights = TensorDict.from_module(src).lock_()
    strategy.apply_weights(dst, weights)
    dst[0].weight = nn.Parameter(torch.zeros(8, 4))  # a new Parameter object
    strategy.apply_weights(dst, weights)
    assert torch.equal(dst[0].weight, src[0].weight)
    dst[2].weight.data = torch.zeros(3, 8)  # same Parameter, new storage
    strategy.apply_weights(dst, weights)
    assert torch.equal(dst[2].weight, src[2].weight)
    dst[2].weight.data = torch.zeros(3, 9)  # reallocated into a shape that no longer fits
    with pytest.raises(ShapeMismatchError, match="2.weight"):
        strategy.apply_weights(dst, weights)


def test_cache_holds_destination_and_source_weakly(backend):
    strategy = WeightStrategy()
    dst, src = make_net(1), TensorDict.from_module(make_net(0))
    strategy.apply_weights(dst, src)
    dst_ref, src_ref = weakref.ref(dst), weakref.ref(src)
    del dst, src
    gc.collect()
    assert dst_ref() is None and src_ref() is None
    assert strategy._destinations == {}


def test_strategy_pickles_without_its_caches(backend):
    strategy = WeightStrategy("state_dict")
    dst = make_net(1)
    strategy.apply_weights(dst, make_net(0))
    clone = pickle.loads(pickle.dumps(strategy))
    assert clone.extract_as == "state_dict" and clone._destinations == {}
    assert clone._extracted == {}


def test_cache_never_keeps_tensordict_roots_alive(backend):
    strategy = WeightStrategy()
    dst = TensorDict.from_module(make_net(1))  # unlocked: fingerprinted by a walk
    src = TensorDict.from_module(make_net(0))
    strategy.apply_weights(dst, src)
    strategy.apply_weights(dst, src)
    dst_ref, src_ref = weakref.ref(dst), weakref.ref(src)
    del src
    gc.collect()
    assert src_ref() is None and strategy._destinations[id(dst)].bindings == {}
    del dst
    gc.collect()
    assert dst_ref() is None and strategy._destinations == {}


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)


def test_materialize_meta_keeps_kinds_ties_and_real_tensors():
    with torch.device("meta"):
        model = _Tied()
    model.extra = nn.Linear(2, 2)  # a real submodule: left alone, values kept
    kept = model.extra.weight.detach().clone()
    assert materialize_meta(model, "cpu") == 6  # a.weight (shared), a.bias, b.bias, frozen, 2 buffers
    assert not any(t.is_meta for t in model.state_dict(keep_vars=True).values())
    assert model.b.weight is model.a.weight and isinstance(model.a.weight, nn.Parameter)
    assert model.a.weight.requires_grad and not model.frozen.requires_grad
    assert set(dict(model.named_buffers())) == {"steps", "scratch"}
    assert "scratch" not in model.state_dict() and model.steps.dtype == torch.int64
    assert torch.equal(model.extra.weight.detach(), kept)
    assert materialize_meta(model) == 0  # nothing left to do
    source = _Tied()
    source.extra = nn.Linear(2, 2)
    WeightStrategy("tensordict").apply_weights(model, source)  # now an ordinary destination
    assert torch.equal(model.b.weight.detach(), source.a.weight.detach())


def test_a_module_with_an_unusual_parameter_dict_is_extracted_without_caching(backend):
    from collections import OrderedDict

    strategy = WeightStrategy()
    src, dst = make_net(0), make_net(1)
    object.__setattr__(src[0], "_parameters", OrderedDict(src[0]._parameters))
    for _ in range(2):
        strategy.apply_weights(dst, src)
        assert torch.equal(dst[0].weight, src[0].weight)
    assert strategy._extracted == {}
    src[0].weight.data.add_(1)
    strategy.apply_weights(dst, src)
    assert torch.equal(dst[0].weight, src[0].weight)
