"""Legacy weight updaters: every member of VanillaWeightUpdater's seed page, the base's push
lifecycle (hooks, versions, errors), MultiProcessedWeightUpdater, pickling into a spawned
process, and TorchRL interop."""

from __future__ import annotations

import gc
import inspect
import pickle

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import _spawn_helpers
from weightsync.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
    SchemeStateError,
    ShapeMismatchError,
)
from weightsync.schemes import UnknownWorkerError
from weightsync.strategy import UnsupportedWeightsError
from weightsync.updaters import MultiProcessedWeightUpdater, VanillaWeightUpdater, WeightUpdaterBase

SEED_METHODS = ["all_worker_ids", "from_policy", "increment_version", "init", "push_weights",
                "register_collector", "register_post_hook"]
SEED_PROPERTIES = ["collector", "post_hooks"]


def make_net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    net.register_buffer("steps", torch.tensor([seed]))
    return net


def raw(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().view(-1).view(torch.uint8).clone() for k, v in net.state_dict().items()}


def same(a, b) -> bool:
    a = a if isinstance(a, dict) else raw(a)
    b = b if isinstance(b, dict) else raw(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Collector:
    def __init__(self) -> None:
        self.bumps = 0

    def increment_version(self) -> None:
        self.bumps += 1


# -- VanillaWeightUpdater: the seed page ----------------------------------------------------------


def test_constructor_is_keyword_only_and_checked():
    weights = TensorDict.from_module(make_net(0))
    with pytest.raises(TypeError):
        VanillaWeightUpdater(None, weights)
    with pytest.raises(TypeError):
        VanillaWeightUpdater(weight_getter=None)  # policy_weights is required
    with pytest.raises(UnsupportedWeightsError, match="policy_weights.*list"):
        VanillaWeightUpdater(policy_weights=[1])
    with pytest.raises(InvalidArgumentError, match="weight_getter"):
        VanillaWeightUpdater(weight_getter=3, policy_weights=weights)
    updater = VanillaWeightUpdater(policy_weights=weights)
    assert updater.policy_weights is weights and updater.weight_getter is None
    assert isinstance(updater, WeightUpdaterBase)


def test_members_exist():
    for name in SEED_METHODS:
        assert callable(getattr(VanillaWeightUpdater, name)), name
    for name in SEED_PROPERTIES:
        assert isinstance(inspect.getattr_static(VanillaWeightUpdater, name), property), name


def test_all_worker_ids_is_none():
    assert VanillaWeightUpdater.from_policy(make_net(0)).all_worker_ids() is None


def test_from_policy_writes_into_the_policy(backend):
    policy, trainer = make_net(1), make_net(0)
    updater = VanillaWeightUpdater.from_policy(policy)
    assert isinstance(updater, VanillaWeightUpdater) and updater.policy_weights.is_locked
    assert updater.policy_weights["0", "weight"] is policy[0].weight
    updater.push_weights(trainer)
    assert same(policy, trainer)
    with pytest.raises(UnsupportedWeightsError, match="nn.Module"):
        VanillaWeightUpdater.from_policy(TensorDict())
    assert WeightUpdaterBase.from_policy(policy) is None


@pytest.mark.parametrize("form", ["module", "td", "locked_td", "flat_dict", "nested_dict"])
def test_push_weights_every_form_outside_no_grad(backend, form):
    policy, trainer = make_net(1), make_net(0)
    updater = VanillaWeightUpdater.from_policy(policy)
    weights = {
        "module": lambda: trainer,
        "td": lambda: TensorDict.from_module(trainer),
        "locked_td": lambda: TensorDict.from_module(trainer).lock_(),
        "flat_dict": trainer.state_dict,
        "nested_dict": lambda: TensorDict.from_module(trainer).to_dict(),
    }[form]()
    assert torch.is_grad_enabled() and policy[0].weight.requires_grad
    updater.push_weights(weights)
    assert same(policy, trainer) and updater.version == 1
    assert policy[0].weight.requires_grad and policy[0].weight.grad is None
    with torch.no_grad():
        trainer[2].bias.add_(1)
    updater.push_weights(weights)  # the same source again: the cached plan sees new values
    assert same(policy, trainer) and updater.version == 2


def test_pushing_a_module_reuses_one_copy_plan(backend):
    policy, trainer = make_net(1), make_net(0)
    updater = VanillaWeightUpdater.from_policy(policy)
    updater.push_weights(trainer)
    bindings = updater._strategy._destinations[id(updater.policy_weights)].bindings
    (first,) = bindings.values()
    with torch.no_grad():
        trainer[0].weight.add_(1)
    updater.push_weights(trainer)  # the strategy's cached tree, not a new copy per push
    assert list(bindings.values()) == [first] and same(policy, trainer)


def test_push_weights_none_asks_the_getter(backend):
    policy, trainer = make_net(1), make_net(0)
    calls = []

    def getter():
        calls.append(1)
        return TensorDict.from_module(trainer)

    updater = VanillaWeightUpdater(weight_getter=getter,
                                   policy_weights=TensorDict.from_module(policy).lock_())
    updater.push_weights()
    assert calls == [1] and same(policy, trainer)
    updater()  # __call__ is push_weights
    assert calls == [1, 1] and updater.version == 2


def test_push_weights_none_without_getter_is_an_error():
    policy = make_net(1)
    updater = VanillaWeightUpdater.from_policy(policy)
    before = raw(policy)
    with pytest.raises(SchemeStateError, match="no weights were given and there is no weight"):
        updater.push_weights()
    assert same(before, policy) and updater.version == 0
    empty_getter = VanillaWeightUpdater(weight_getter=lambda: None,
                                        policy_weights=TensorDict.from_module(policy))
    with pytest.raises(SchemeStateError, match="returned None"):
        empty_getter.push_weights(None)


@pytest.mark.parametrize("worker_ids", [0, [0], (0,), [0, 0]])
def test_push_weights_to_its_only_worker(backend, worker_ids):
    policy, trainer = make_net(1), make_net(0)
    updater = VanillaWeightUpdater.from_policy(policy)
    updater.push_weights(trainer, worker_ids=worker_ids)  # TorchRL's updater accepts these
    assert same(policy, trainer) and updater.version == 1
    updater.push_weights(make_net(2), worker_ids=[])  # names no worker: writes nothing
    assert same(policy, trainer)


def test_push_weights_to_the_workers_all_worker_ids_names(backend):
    class OnDevice(VanillaWeightUpdater):
        def all_worker_ids(self):
            return [torch.device("cpu")]

    policy, trainer = make_net(1), make_net(0)
    updater = OnDevice.from_policy(policy)
    updater.push_weights(trainer, worker_ids=torch.device("cpu"))
    assert same(policy, trainer)
    with pytest.raises(UnknownWorkerError, match=r"names worker 1; .*\[0, device\(type='cpu'\)\]"):
        updater.push_weights(make_net(2), worker_ids=1)


@pytest.mark.parametrize("worker_ids, named", [
    (1, "1"), ([0, 2], "2"), (True, "True"), (torch.device("cpu"), "device\\(type='cpu'\\)"),
    ("policy", "'policy'"),
])
def test_push_weights_rejects_other_workers_and_changes_nothing(worker_ids, named):
    policy = make_net(1)
    updater = VanillaWeightUpdater.from_policy(policy)
    before = raw(policy)
    with pytest.raises(UnknownWorkerError, match=f"worker_ids=.* names worker {named}; "
                                                 "expected None or worker ids among \\[0\\]"):
        updater.push_weights(make_net(0), worker_ids=worker_ids)
    assert same(before, policy) and updater.version == 0


def test_push_weights_rejects_bad_types():
    updater = VanillaWeightUpdater.from_policy(make_net(1))
    with pytest.raises(UnsupportedWeightsError, match="str"):
        updater.push_weights("policy")
    assert updater.version == 0


@pytest.mark.parametrize("kind, error, pattern", [
    ("missing", KeyMismatchError, r"'2\.bias' \(float32\[2\]\) is missing"),
    ("shape", ShapeMismatchError, r"'2\.bias'.*\[2\] != weights shape \[3\]"),
    ("dtype", DTypeMismatchError, r"'2\.bias'.*float32 != weights dtype bfloat16"),
])
def test_mismatch_changes_nothing_and_runs_no_hook(backend, kind, error, pattern):
    policy = make_net(1)
    updater = VanillaWeightUpdater.from_policy(policy)
    fired = []
    updater.register_post_hook(lambda: fired.append(1))
    weights = TensorDict.from_module(make_net(0)).data.clone()
    if kind == "missing":
        del weights["2", "bias"]
    elif kind == "shape":
        weights["2", "bias"] = torch.zeros(3)
    else:
        weights["2", "bias"] = weights["2", "bias"].bfloat16()
    before = raw(policy)
    with pytest.raises(error, match=pattern):
        updater.push_weights(weights)
    assert same(before, policy) and updater.version == 0 and fired == []


def test_post_hooks_run_in_order_after_every_push(backend):
    policy, trainer = make_net(1), make_net(0)
    updater = VanillaWeightUpdater.from_policy(policy)
    assert updater.post_hooks == []
    seen = []
    updater.register_post_hook(lambda: seen.append(("a", updater.version, same(policy, trainer))))
    updater.register_post_hook(lambda: seen.append(("b", updater.version)))
    updater.post_hooks.append(lambda: seen.append(("c", updater.version)))
    assert len(updater.post_hooks) == 3
    updater.push_weights(trainer)
    updater.push_weights(trainer)
    assert seen == [("a", 1, True), ("b", 1), ("c", 1), ("a", 2, True), ("b", 2), ("c", 2)]
    with pytest.raises(InvalidArgumentError, match="callable"):
        updater.register_post_hook("not a hook")


def test_register_collector_once():
    updater = VanillaWeightUpdater.from_policy(make_net(0))
    assert updater.collector is None and updater.collectors is None
    first, second = Collector(), Collector()
    updater.register_collector(first)
    updater.register_collector(first)  # the same collector again is fine
    assert updater.collector is first and updater.collectors == [first]
    with pytest.raises(SchemeStateError, match="already registered with a Collector"):
        updater.register_collector(second)
    assert updater.collector is first
    del first
    gc.collect()
    assert updater.collector is None  # held weakly
    updater.register_collector(second)
    assert updater.collector is second


def test_increment_version_bumps_updater_and_collector(backend):
    updater = VanillaWeightUpdater.from_policy(make_net(1))
    updater.increment_version()
    assert updater.version == 1
    collector = Collector()
    updater.register_collector(collector)
    updater.push_weights(make_net(0))
    updater.increment_version()
    assert updater.version == 3 and collector.bumps == 1


def test_init_is_a_no_op():
    updater = VanillaWeightUpdater.from_policy(make_net(0))
    assert updater.init() is None and updater.init(1, key="value") is None
    assert updater.version == 0


def test_updater_pickles_without_its_collector(backend):
    updater = VanillaWeightUpdater.from_policy(make_net(1))
    updater.register_collector(Collector.__new__(Collector))
    clone = pickle.loads(pickle.dumps(updater))
    assert clone.collector is None and clone.version == 0
    clone.push_weights(make_net(0))
    assert clone.version == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vanilla", "multi_processed"])
def test_updater_crosses_into_a_spawned_process(backend, kind):
    policy = _spawn_helpers.make_policy(seed=1)
    weights = TensorDict.from_module(policy).lock_()
    if kind == "vanilla":
        updater = VanillaWeightUpdater(weight_getter=_spawn_helpers.trainer_weights,
                                       policy_weights=weights)
    else:
        updater = MultiProcessedWeightUpdater(get_server_weights=_spawn_helpers.trainer_weights,
                                              policy_weights={0: weights})
    updater.register_post_hook(_spawn_helpers.count_push)
    collector = Collector()
    updater.register_collector(collector)
    updater.push_weights(_spawn_helpers.make_policy(seed=3))  # a cached plan, version 1
    out = _spawn_helpers.run_spawned(_spawn_helpers.updater_pushes, updater)
    assert out["arrived"] == {
        "type": type(updater).__name__, "version": 1, "collector": None, "post_hooks": True,
        "plans_cached": 0,  # the strategy crosses without its caches
    }
    assert out["version"] == 3 and out["hook_calls"] == 2

    def as_bytes(net):
        return {".".join(k): _spawn_helpers.tensor_bytes(v)
                for k, v in TensorDict.from_module(net).items(True, True)}

    assert out["from_getter"] == as_bytes(_spawn_helpers.make_policy(seed=0))
    assert out["pushed"] == as_bytes(_spawn_helpers.make_policy(seed=2))
    # The parent's updater is untouched by the pickling.
    assert updater.collector is collector and updater.version == 1


# -- WeightUpdaterBase ----------------------------------------------------------------------------


def test_subclass_without_super_init_works(backend):
    class Recording(WeightUpdaterBase):
        def __init__(self, targets: dict) -> None:  # no super().__init__(), as TorchRL's own
            self.targets = targets
            self.synced = []

        def all_worker_ids(self):
            return list(self.targets)

        def _skip_update(self, worker_id):
            return worker_id == "skip"

        def _sync_weights_with_worker(self, *, worker_id=None, server_weights):
            self.synced.append(worker_id)
            self._strategy.apply_weights(self.targets[worker_id], server_weights)

    nets = {"a": make_net(1), "skip": make_net(2), "b": make_net(3)}
    updater = Recording(nets)
    hooks = []
    updater.register_post_hook(lambda: hooks.append(updater.version))
    trainer = make_net(0)
    updater.push_weights(trainer)
    assert updater.synced == ["a", "b"] and hooks == [1]
    assert same(nets["a"], trainer) and same(nets["b"], trainer) and not same(nets["skip"], trainer)
    updater.push_weights(trainer, worker_ids=["b"])
    assert updater.synced == ["a", "b", "b"]
    with pytest.raises(UnknownWorkerError, match="'zz' is not one of its workers"):
        updater.push_weights(trainer, worker_ids="zz")
    with pytest.raises(TypeError):
        WeightUpdaterBase()  # abstract


# -- MultiProcessedWeightUpdater ------------------------------------------------------------------


def test_multi_processed_updates_each_device(backend):
    policies = {torch.device("cpu"): make_net(1), 1: make_net(2)}
    weights = {k: TensorDict.from_module(v).lock_() for k, v in policies.items()}
    trainer = make_net(0)
    updater = MultiProcessedWeightUpdater(
        get_server_weights=lambda: TensorDict.from_module(trainer), policy_weights=weights)
    assert updater.all_worker_ids() == [torch.device("cpu"), 1]
    updater.push_weights()
    assert all(same(p, trainer) for p in policies.values()) and updater.version == 1
    other = make_net(5)
    updater.push_weights(other, worker_ids=1)
    assert same(policies[1], other) and same(policies[torch.device("cpu")], trainer)
    with pytest.raises(UnknownWorkerError, match="worker 7 is not one of its workers"):
        updater.push_weights(other, worker_ids=[torch.device("cpu"), 7])
    assert same(policies[torch.device("cpu")], trainer)


def test_multi_processed_checks_every_worker_first(backend):
    good, odd = make_net(1), nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 4))
    odd.register_buffer("steps", torch.tensor([0]))
    updater = MultiProcessedWeightUpdater(
        get_server_weights=None,
        policy_weights={0: TensorDict.from_module(good), 1: TensorDict.from_module(odd)})
    before_good, before_odd = raw(good), raw(odd)
    with pytest.raises(ShapeMismatchError, match="'2.weight'"):
        updater.push_weights(make_net(0))
    assert same(before_good, good) and same(before_odd, odd) and updater.version == 0
    with pytest.raises(SchemeStateError, match="no weight getter"):
        updater.push_weights()
    with pytest.raises(InvalidArgumentError, match="get_server_weights"):
        MultiProcessedWeightUpdater(get_server_weights=1, policy_weights={})
    with pytest.raises(InvalidArgumentError, match="policy_weights must map"):
        MultiProcessedWeightUpdater(get_server_weights=None, policy_weights=[])


# -- TorchRL interoperability ---------------------------------------------------------------------


def _shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_signatures_match_torchrl():
    collectors = pytest.importorskip("torchrl.collectors")
    for ours, theirs, methods in (
        (VanillaWeightUpdater, collectors.VanillaWeightUpdater, SEED_METHODS),
        (MultiProcessedWeightUpdater, collectors.MultiProcessedWeightUpdater, ["all_worker_ids"]),
    ):
        assert _shape(inspect.signature(ours)) == _shape(inspect.signature(theirs)), ours
        for name in methods:
            assert _shape(inspect.signature(getattr(ours, name))) == \
                _shape(inspect.signature(getattr(theirs, name))), name
    for name in SEED_PROPERTIES:
        assert isinstance(inspect.getattr_static(collectors.VanillaWeightUpdater, name), property)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_torchrl_collector_accepts_our_updater(backend):
    collectors = pytest.importorskip("torchrl.collectors")
    mocking = pytest.importorskip("torchrl.testing.mocking_classes")
    from tensordict.nn import TensorDictModule

    env = mocking.ContinuousActionVecMockEnv()
    obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    policy = TensorDictModule(nn.Linear(obs, act), in_keys=["observation"], out_keys=["action"])
    trainer = TensorDictModule(nn.Linear(obs, act), in_keys=["observation"], out_keys=["action"])
    updater = VanillaWeightUpdater.from_policy(policy)
    collector = collectors.Collector(env, policy, frames_per_batch=4, total_frames=8,
                                     weight_updater=updater)
    try:
        assert updater.collector is collector
        collector.update_policy_weights_(TensorDict.from_module(trainer))
        assert torch.equal(policy.module.weight, trainer.module.weight) and updater.version == 1
    finally:
        collector.shutdown()
