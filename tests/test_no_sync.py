"""NoWeightSyncScheme: every member of its seed page, with the documented no-op semantics,
and the same signatures as TorchRL's class."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from weightsync.errors import SchemeStateError
from weightsync.schemes import NoWeightSyncScheme, WeightSyncScheme
from weightsync.strategy import WeightStrategy
from weightsync.transports import InitialSyncTransport, NoOpTransport, TransportBackend

SEED_METHODS = ["apply_weights", "connect", "create_transport", "init_on_receiver",
                "init_on_sender", "prepare_weights", "receive", "send", "shutdown"]
SEED_PROPERTIES = ["context", "model", "model_id", "receiver_transport", "sender_transports",
                   "shared_transport", "weights", "worker_idx"]


def make_net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


class Collector:
    def __init__(self) -> None:
        self.policy = make_net(0)


def test_constructor_and_strategy():
    scheme = NoWeightSyncScheme()
    assert isinstance(scheme, WeightSyncScheme)
    assert scheme.strategy.extract_as == "tensordict" and scheme.strategy_str == "tensordict"
    assert NoWeightSyncScheme("state_dict").strategy.extract_as == "state_dict"
    assert NoWeightSyncScheme(strategy="state_dict").strategy_str == "state_dict"


def test_members_exist():
    for name in SEED_METHODS:
        assert callable(getattr(NoWeightSyncScheme, name)), name
    for name in SEED_PROPERTIES:
        assert isinstance(inspect.getattr_static(NoWeightSyncScheme, name), property), name


def test_init_on_sender_records_id_context_and_model():
    collector = Collector()
    scheme = NoWeightSyncScheme()
    scheme.init_on_sender(model_id="policy", context=collector, ctx="ignored", devices=[])
    assert scheme.initialized_on_sender and not scheme.initialized_on_receiver
    assert scheme.model_id == "policy" and scheme.context is collector
    assert scheme.model is collector.policy
    other = NoWeightSyncScheme()
    net = make_net(1)
    other.init_on_sender(model_id="critic", model=net)
    assert other.model is net and other.context is None


def test_init_on_receiver_records_model_and_worker():
    net = make_net(1)
    scheme = NoWeightSyncScheme()
    scheme.init_on_receiver(model_id="policy", model=net, worker_idx=3)
    assert scheme.initialized_on_receiver and scheme.model is net
    assert scheme.model_id == "policy" and scheme.worker_idx == 3 and scheme.context is None
    with_ctx = NoWeightSyncScheme()
    collector = Collector()
    with_ctx.init_on_receiver(model_id="policy", context=collector)
    assert with_ctx.context is collector and with_ctx.model is collector.policy
    with pytest.raises(TypeError):
        NoWeightSyncScheme().init_on_receiver("policy")  # keyword-only, as in TorchRL


def test_connect_is_a_no_op_that_marks_the_side():
    sender = NoWeightSyncScheme()
    sender.connect()  # before any init: nothing at all
    assert not sender.synchronized_on_sender and not sender.synchronized_on_receiver
    sender.init_on_sender(model_id="policy")
    sender.connect()
    sender.connect()
    assert sender.synchronized_on_sender and not sender.synchronized_on_receiver
    receiver = NoWeightSyncScheme()
    receiver.init_on_receiver(model_id="policy")
    receiver.connect(worker_idx=2)
    assert receiver.synchronized_on_receiver and receiver.worker_idx == 2


def test_send_and_receive_do_nothing():
    collector = Collector()
    before = {k: v.clone() for k, v in collector.policy.state_dict().items()}
    scheme = NoWeightSyncScheme()
    scheme.send()  # accepted even before initialisation
    scheme.init_on_sender(model_id="policy", context=collector)
    scheme.connect()
    scheme.send(TensorDict.from_module(make_net(5)), worker_ids=[0, 99])
    assert scheme.version == 0
    receiver = NoWeightSyncScheme()
    receiver.init_on_receiver(model_id="policy", context=collector)
    receiver.connect()
    assert receiver.receive() is None and receiver.receive(timeout=0.5) is None
    assert receiver.version == 0
    assert all(torch.equal(before[k], v) for k, v in collector.policy.state_dict().items())


def test_apply_weights_applies_to_the_model(backend):
    net, source = make_net(1), make_net(2)
    scheme = NoWeightSyncScheme()
    with pytest.raises(SchemeStateError, match="before init_on_receiver"):
        scheme.apply_weights(TensorDict.from_module(source))
    scheme.init_on_receiver(model_id="policy", model=net)
    scheme.apply_weights(TensorDict.from_module(source))
    assert torch.equal(net[0].weight, source[0].weight) and scheme.version == 1
    replacement = TensorDict.from_module(make_net(3)).data
    scheme.apply_weights(replacement, inplace=False)
    assert net[1].bias.data_ptr() == replacement["1", "bias"].data_ptr()
    assert isinstance(net[1].bias, nn.Parameter) and scheme.version == 2
    sender = NoWeightSyncScheme()
    sender.init_on_sender(model_id="policy")
    with pytest.raises(SchemeStateError, match="sender"):
        sender.apply_weights(TensorDict())


@pytest.mark.parametrize("strategy", ["state_dict", "tensordict"])
def test_apply_weights_of_its_own_weights_with_a_non_persistent_buffer(backend, strategy):
    net = make_net(1)
    net[0].register_buffer("tmp", torch.arange(3.0), persistent=False)
    scheme = NoWeightSyncScheme(strategy)
    scheme.init_on_receiver(model_id="policy", model=net)
    before = {k: v.clone() for k, v in TensorDict.from_module(net).items(True, True)}
    scheme.apply_weights(scheme.weights)  # state_dict(): no "0.tmp", and none needed
    assert scheme.version == 1
    assert all(torch.equal(before[k], v) for k, v in TensorDict.from_module(net).items(True, True))


def test_create_transport_is_a_no_op_transport():
    transport = NoWeightSyncScheme().create_transport(anything=1)
    assert isinstance(transport, NoOpTransport)
    assert isinstance(transport, TransportBackend) and isinstance(transport, InitialSyncTransport)
    transport.send_weights(TensorDict())
    assert transport.receive_weights(timeout=1.0) is None
    assert transport.check_connection()
    assert transport.setup_connection_and_weights_on_receiver(worker_idx=0) is None


def test_transport_properties_are_empty():
    scheme = NoWeightSyncScheme()
    scheme.init_on_sender(model_id="policy")
    assert dict(scheme.sender_transports) == {}
    assert scheme.receiver_transport is None and scheme.shared_transport is None


def test_prepare_weights():
    collector = Collector()
    scheme = NoWeightSyncScheme()
    strategy = WeightStrategy()
    weights = scheme.prepare_weights(None, "policy", strategy, context=collector)
    assert weights["0", "weight"] is collector.policy[0].weight
    td = TensorDict.from_module(collector.policy)
    assert scheme.prepare_weights(td, "policy", strategy) is td
    sd = scheme.prepare_weights(collector.policy, "policy", WeightStrategy("state_dict"))
    assert set(sd) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_context_model_and_weights_properties():
    collector = Collector()
    scheme = NoWeightSyncScheme()
    assert scheme.context is None and scheme.model is None and scheme.weights is None
    assert scheme.model_id is None and scheme.worker_idx is None
    scheme.init_on_receiver(model_id="policy", context=collector, worker_idx=1)
    assert scheme.weights["1", "bias"] is collector.policy[1].bias
    scheme.model_id = "renamed"
    assert scheme.model_id == "renamed"
    scheme.worker_idx = 4
    assert scheme.worker_idx == 4
    del collector
    gc.collect()
    assert scheme.context is None and scheme.model is None


def test_shutdown_twice():
    scheme = NoWeightSyncScheme()
    scheme.init_on_sender(model_id="policy")
    scheme.shutdown()
    scheme.shutdown()
    assert scheme.is_shutdown
    with pytest.raises(SchemeStateError, match="after shutdown"):
        scheme.init_on_sender(model_id="policy")


def _shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_signatures_match_torchrl():
    torchrl_wu = pytest.importorskip("torchrl.weight_update")
    theirs = torchrl_wu.NoWeightSyncScheme
    assert _shape(inspect.signature(NoWeightSyncScheme)) == _shape(inspect.signature(theirs))
    for name in SEED_METHODS:
        ours = inspect.signature(getattr(NoWeightSyncScheme, name))
        assert _shape(ours) == _shape(inspect.signature(getattr(theirs, name))), name
    for name in SEED_PROPERTIES:
        assert isinstance(inspect.getattr_static(theirs, name), property), name
    # Registered as a virtual subclass by the first construction once TorchRL is loaded.
    assert isinstance(NoWeightSyncScheme(), torchrl_wu.WeightSyncScheme)
    assert issubclass(NoWeightSyncScheme, torchrl_wu.WeightSyncScheme)
