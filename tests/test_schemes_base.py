"""WeightSyncScheme: the registry, the two-sided lifecycle and its phase errors, versions,
transports, model resolution, the background receiver, and pickling into a spawned process."""

from __future__ import annotations

import gc
import pickle
import threading
import time
from collections.abc import Mapping

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import _spawn_helpers
from weightsync.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    KeyMismatchError,
    SchemeStateError,
    WeightSyncError,
)
from weightsync.schemes import (
    NoWeightSyncScheme,
    UnknownBackendError,
    UnknownWorkerError,
    WeightSyncScheme,
    available_backends,
    backend_names,
    register_backend,
)
from weightsync.schemes import registry
from weightsync.schemes.base import resolve_attr
from weightsync.strategy import UnsupportedWeightsError, WeightStrategy
from weightsync.transports import InitialSyncTransport, TransportBackend


class InboxTransport:
    """An in-process transport: the sender appends to a list, the receiver pops from it."""

    def __init__(self, inbox: list | None = None, initial=None) -> None:
        self.inbox = inbox if inbox is not None else []
        self.initial = initial
        self.sent = 0
        self.acks = 0
        self.sender_setups = 0
        self.receiver_setups: list[int | None] = []

    def send_weights(self, weights) -> None:
        self.sent += 1
        self.inbox.append(weights)

    def receive_weights(self, timeout=None, *, weights=None, model=None, strategy=None):
        if not self.inbox:
            return None
        received = self.inbox.pop(0)
        strategy.apply_weights(model, received)
        return received

    def send_ack(self, message: str) -> None:
        self.acks += 1

    def setup_connection_and_weights_on_sender(self) -> None:
        self.sender_setups += 1

    def setup_connection_and_weights_on_receiver(self, *, worker_idx, weights=None, model=None,
                                                 strategy=None):
        self.receiver_setups.append(worker_idx)
        return self.initial


class InboxScheme(WeightSyncScheme):
    """A minimal concrete scheme over InboxTransport; sender and receivers share ``inboxes``."""

    def __init__(self, inboxes: dict[int, list] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inboxes = inboxes if inboxes is not None else {}
        self.shutdowns = 0

    def create_transport(self, **kwargs) -> TransportBackend:
        return InboxTransport(**kwargs)

    def _init_on_sender_impl(self, *, model_id, context=None, model=None, num_workers=2):
        self.model_id = model_id
        self.context = context
        self.model = model
        for i in range(num_workers):
            self._register_worker_sender(worker_idx=i, inbox=self.inboxes.setdefault(i, []))

    def _init_on_receiver_impl(self, *, model_id, context=None, model=None, worker_idx=0,
                               initial=None):
        self.model_id = model_id
        self.context = context
        self.model = model
        self.worker_idx = worker_idx
        self._register_transport_receiver(inbox=self.inboxes.setdefault(worker_idx, []),
                                          initial=initial)

    def _shutdown_impl(self) -> None:
        self.shutdowns += 1


def make_net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8))
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def sender_and_receivers(num_workers: int = 2):
    inboxes: dict[int, list] = {}
    trainer = make_net(0)
    sender = InboxScheme(inboxes)
    sender.init_on_sender(model_id="policy", model=trainer, num_workers=num_workers)
    sender.connect()
    receivers, policies = [], []
    for i in range(num_workers):
        policy = make_net(10 + i)
        receiver = InboxScheme(inboxes)
        receiver.init_on_receiver(model_id="policy", model=policy, worker_idx=i)
        receiver.connect()
        receivers.append(receiver)
        policies.append(policy)
    return trainer, sender, receivers, policies


# -- registry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "direct"])
def test_from_backend_none_and_direct(name):
    scheme = WeightSyncScheme.from_backend(name, strategy="state_dict")
    assert type(scheme) is NoWeightSyncScheme and scheme.strategy.extract_as == "state_dict"


@pytest.mark.parametrize("name", ["shared", "thread"])
def test_from_backend_shared_and_thread(name):
    try:
        from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme
    except ImportError as exc:
        with pytest.raises(BackendUnavailableError, match="shared_mem") as info:
            WeightSyncScheme.from_backend(name)
        assert type(exc).__name__ in str(info.value)
    else:
        scheme = WeightSyncScheme.from_backend(name)
        assert isinstance(scheme, SharedMemWeightSyncScheme)
        scheme.shutdown()


@pytest.mark.parametrize("name, canonical", [
    ("process", "process"), ("multiprocessing", "process"), ("distributed", "distributed"),
])
def test_roadmap_backends_are_unavailable(name, canonical):
    with pytest.raises(BackendUnavailableError, match="not available in this version") as info:
        WeightSyncScheme.from_backend(name)
    assert repr(name) in str(info.value) and repr(canonical) in str(info.value)
    assert canonical not in available_backends()


def test_unknown_backend_lists_the_choices():
    with pytest.raises(UnknownBackendError) as info:
        WeightSyncScheme.from_backend("carrier-pigeon")
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeightSyncError)
    message = str(info.value)
    assert "'carrier-pigeon'" in message
    for name in ("none", "direct", "shared", "thread", "process", "multiprocessing", "distributed"):
        assert repr(name) in message
    assert backend_names() == sorted(["none", "direct", "shared", "thread", "process",
                                      "multiprocessing", "distributed"])
    with pytest.raises(UnknownBackendError):
        WeightSyncScheme.from_backend(["none"])


@pytest.mark.parametrize("name, runs_on", [("rpc", "torch.distributed.rpc"), ("ray", "Ray")])
def test_torchrl_backends_weightsync_lacks_say_so(name, runs_on):
    with pytest.raises(UnknownBackendError) as info:
        WeightSyncScheme.from_backend(name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeightSyncError)
    message = str(info.value)
    assert f"backend {name!r} (TorchRL's" in message and runs_on in message
    assert "is not provided by weightsync" in message
    assert f"available here: {available_backends()}" in message
    assert str(backend_names()) in message


def test_register_weight_sync_backend_is_torchrls_name_and_decorates(monkeypatch):
    import weightsync

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    assert registry.register_weight_sync_backend is register_backend
    assert weightsync.register_weight_sync_backend is register_backend

    @weightsync.register_weight_sync_backend("rpc")  # TorchRL's usage, a local class
    class LocalScheme(InboxScheme):
        pass

    assert LocalScheme.__name__ == "LocalScheme"  # the decorator returns the class
    assert type(WeightSyncScheme.from_backend("rpc")) is LocalScheme
    with pytest.raises(InvalidArgumentError, match="scheme class.*got a int"):
        register_backend("bad", 3)
    assert "bad" not in backend_names()
    torchrl_schemes = pytest.importorskip("torchrl.weight_update.weight_sync_schemes")
    assert callable(torchrl_schemes.register_weight_sync_backend)  # the name mirrored


def test_register_backend_is_one_line(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setattr(registry, "_UNAVAILABLE", dict(registry._UNAVAILABLE))
    register_backend("process", "test_schemes_base:InboxScheme")
    scheme = WeightSyncScheme.from_backend("multiprocessing", inboxes={})
    assert type(scheme).__name__ == "InboxScheme" and "process" in available_backends()
    register_backend("inbox", InboxScheme, aliases=("letterbox",))
    assert isinstance(WeightSyncScheme.from_backend("letterbox"), InboxScheme)
    register_backend("broken", "weightsync.schemes.no_sync:NoSuchScheme")
    with pytest.raises(BackendUnavailableError, match="NoSuchScheme.*AttributeError"):
        WeightSyncScheme.from_backend("broken")
    with pytest.raises(InvalidArgumentError, match="package.module:ClassName"):
        register_backend("bad", "no_colon_here")


# -- lifecycle and phase errors -------------------------------------------------------------------


def test_sender_phase_errors():
    scheme = InboxScheme()
    with pytest.raises(SchemeStateError, match="not initialised as a sender"):
        scheme.send(TensorDict())
    with pytest.raises(SchemeStateError, match="before init_on_sender or init_on_receiver"):
        scheme.connect()
    scheme.init_on_sender(model_id="policy", model=make_net(0))
    assert scheme.initialized_on_sender and not scheme.initialized_on_receiver
    with pytest.raises(SchemeStateError, match="not connected"):
        scheme.send()
    with pytest.raises(SchemeStateError, match="already initialised as a sender"):
        scheme.init_on_sender(model_id="policy")
    with pytest.raises(SchemeStateError, match="initialised as a sender"):
        scheme.init_on_receiver(model_id="policy")
    with pytest.raises(InvalidArgumentError, match="worker_idx"):
        scheme.connect(worker_idx=0)
    with pytest.raises(SchemeStateError, match="initialised as a sender"):
        scheme.worker_idx = 3
    scheme.connect()
    assert scheme.synchronized_on_sender and not scheme.synchronized_on_receiver
    with pytest.raises(SchemeStateError, match="already connected"):
        scheme.connect()
    with pytest.raises(SchemeStateError, match="receiver call"):
        scheme.apply_weights(TensorDict())
    with pytest.raises(SchemeStateError, match="not initialised as a receiver"):
        scheme.receive()


def test_receiver_phase_errors():
    scheme = InboxScheme()
    with pytest.raises(SchemeStateError, match="before init_on_receiver"):
        scheme.apply_weights(TensorDict())
    scheme.init_on_receiver(model_id="policy", model=make_net(0), worker_idx=1)
    with pytest.raises(SchemeStateError, match="not connected"):
        scheme.receive()
    with pytest.raises(SchemeStateError, match="already initialised as a receiver"):
        scheme.init_on_receiver(model_id="policy")
    with pytest.raises(SchemeStateError, match="receiver \\(worker 1\\)"):
        scheme.init_on_sender(model_id="policy")
    with pytest.raises(InvalidArgumentError, match="takes no weights"):
        scheme.connect(weights=TensorDict())
    scheme.connect(worker_idx=1)
    with pytest.raises(SchemeStateError, match="receiver 1 is already connected"):
        scheme.connect()
    with pytest.raises(SchemeStateError, match="not initialised as a sender"):
        scheme.send()


def test_failed_initialisation_leaves_the_scheme_uninitialised():
    scheme = InboxScheme()
    with pytest.raises(TypeError):
        scheme.init_on_sender(model_id="policy", unknown_option=1)
    assert not scheme.initialized_on_sender
    scheme.init_on_sender(model_id="policy")
    assert scheme.initialized_on_sender


def test_shutdown_is_idempotent_and_final():
    trainer, sender, receivers, _ = sender_and_receivers()
    sender.shutdown()
    sender.shutdown()
    assert sender.is_shutdown and sender.shutdowns == 1
    for call in (lambda: sender.send(), lambda: sender.connect(),
                 lambda: sender.init_on_sender(model_id="x")):
        with pytest.raises(SchemeStateError, match="after shutdown"):
            call()
    receivers[0].shutdown()
    with pytest.raises(SchemeStateError, match="receive called after shutdown"):
        receivers[0].receive()
    with pytest.raises(SchemeStateError, match="apply_weights called after shutdown"):
        receivers[0].apply_weights(TensorDict.from_module(trainer))


# -- sending, receiving, versions -----------------------------------------------------------------


def test_send_receive_and_versions(backend):
    trainer, sender, receivers, policies = sender_and_receivers()
    assert sender.version == 0 and all(r.version == 0 for r in receivers)
    sender.send()  # the registered model's weights
    assert sender.version == 1
    for receiver, policy in zip(receivers, policies):
        assert receiver.receive() is not None
        assert receiver.receive() is None  # nothing new
        assert same_weights(policy, trainer) and receiver.version == 1
        assert receiver.receiver_transport.acks == 1
    with torch.no_grad():
        trainer[0].weight.add_(1)
    sender.send(trainer, worker_ids=1)
    sender.send(TensorDict.from_module(trainer), worker_ids=[1])
    assert sender.version == 3
    assert receivers[0].receive() is None and receivers[0].version == 1
    assert receivers[1].receive() is not None and receivers[1].receive() is not None
    assert receivers[1].version == 3 and same_weights(policies[1], trainer)
    assert not same_weights(policies[0], trainer)


def test_send_hands_transports_one_weights_object_per_module():
    trainer, sender, _, _ = sender_and_receivers()

    class Context:
        policy = trainer

    context = Context()  # held weakly by the scheme
    sender.context = context
    sender.send()
    sender.send(trainer)
    sender.send("policy")
    inbox = sender.sender_transports[0].inbox
    # The strategy's cached tree each time (what a transport caches per object holds), while
    # what the public calls return is the caller's to change.
    assert len(inbox) == 3 and inbox[0] is inbox[1] is inbox[2]
    assert inbox[0]["0", "weight"] is trainer[0].weight
    public = sender.prepare_weights(trainer, "policy", sender.strategy)
    assert public is not inbox[0] and sender.weights is not inbox[0]


def test_unknown_worker_sends_nothing():
    trainer, sender, _, _ = sender_and_receivers()
    with pytest.raises(UnknownWorkerError,
                       match="worker 5 has no transport; registered workers: \\[0, 1\\]"):
        sender.send(worker_ids=[0, 5])
    assert [t.sent for t in sender.sender_transports.values()] == [0, 0]
    assert sender.version == 0
    with pytest.raises(InvalidArgumentError, match="worker_ids"):
        sender.send(worker_ids="0")


def test_failed_send_keeps_the_version():
    trainer, sender, _, _ = sender_and_receivers()

    def broken(weights):
        raise RuntimeError("link down")

    sender.sender_transports[0].send_weights = broken
    with pytest.raises(RuntimeError, match="link down"):
        sender.send()
    assert sender.version == 0


def test_send_without_any_weights_is_an_error():
    scheme = InboxScheme()
    scheme.init_on_sender(model_id="policy")
    scheme.connect()
    with pytest.raises(SchemeStateError, match="no weights given and no model"):
        scheme.send()


def test_apply_weights_counts_and_validates(backend):
    policy = make_net(1)
    scheme = InboxScheme()
    scheme.init_on_receiver(model_id="policy", model=policy)
    scheme.apply_weights(TensorDict.from_module(make_net(0)))
    assert same_weights(policy, make_net(0)) and scheme.version == 1
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="'1.bias'"):
        scheme.apply_weights({"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(5),
                              "1.weight": torch.zeros(2, 5)})
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert scheme.version == 1
    nobody = InboxScheme()
    nobody.init_on_receiver(model_id="policy")
    with pytest.raises(SchemeStateError, match="no model registered"):
        nobody.apply_weights(TensorDict())


def test_connect_runs_the_initial_rendez_vous(backend):
    trainer = make_net(0)
    sender = InboxScheme()
    sender.init_on_sender(model_id="policy", model=trainer, num_workers=3)
    sender.connect()
    assert [t.sender_setups for t in sender.sender_transports.values()] == [1, 1, 1]
    policy = make_net(1)
    receiver = InboxScheme()
    receiver.init_on_receiver(model_id="policy", model=policy, worker_idx=2,
                              initial=TensorDict.from_module(trainer))
    receiver.connect()
    assert receiver.receiver_transport.receiver_setups == [2]
    assert same_weights(policy, trainer) and receiver.version == 0
    assert isinstance(receiver.receiver_transport, InitialSyncTransport)


def test_receive_tells_the_context(backend):
    class Collector:
        def __init__(self) -> None:
            self.policy = make_net(1)
            self.updates = []

        def update_policy_weights_(self, **kwargs) -> None:
            self.updates.append(kwargs)

    trainer, sender, _, _ = sender_and_receivers(num_workers=1)
    collector = Collector()
    receiver = InboxScheme(sender.inboxes)
    receiver.init_on_receiver(model_id="policy", context=collector, worker_idx=0)
    receiver.connect()
    assert receiver.model is collector.policy
    sender.send()
    weights = receiver.receive()
    assert same_weights(collector.policy, trainer)
    assert collector.updates == [{"model_id": "policy", "policy_or_weights": weights}]


# -- properties, transports, model resolution -----------------------------------------------------


def test_transport_properties():
    _, sender, receivers, _ = sender_and_receivers()
    transports = sender.sender_transports
    assert isinstance(transports, Mapping) and sorted(transports) == [0, 1]
    with pytest.raises(TypeError):
        transports[2] = InboxTransport()  # read-only view
    assert sender.receiver_transport is None and sender.shared_transport is None
    assert receivers[0].receiver_transport is not None and receivers[0].sender_transports == {}
    with pytest.raises(SchemeStateError, match="per-worker"):
        sender.shared_transport = InboxTransport()

    shared = InboxScheme()
    shared.shared_transport = InboxTransport()
    assert shared.sender_transports[7] is shared.shared_transport and 7 in shared.sender_transports
    assert shared.receiver_transport is shared.shared_transport
    with pytest.raises(SchemeStateError, match="shared transport"):
        shared._register_worker_sender(worker_idx=0)


def test_prepare_weights_variants():
    class Ctx:
        def __init__(self) -> None:
            self.policy = make_net(0)
            self.nets = {"critic": [make_net(1)]}

    ctx = Ctx()
    scheme = NoWeightSyncScheme()
    strategy = WeightStrategy()
    from_ctx = scheme.prepare_weights(None, "policy", strategy, ctx)
    assert from_ctx["0", "weight"] is ctx.policy[0].weight
    assert scheme.prepare_weights(None, "missing", strategy, ctx) is None
    assert scheme.prepare_weights(None, "policy", strategy, None) is None
    critic = scheme.prepare_weights("nets['critic'][0]", "policy", strategy, ctx)
    assert critic["1", "bias"] is ctx.nets["critic"][0][1].bias
    td = TensorDict.from_module(ctx.policy)
    assert scheme.prepare_weights(td, "policy", strategy) is td
    as_state_dict = scheme.prepare_weights(ctx.policy, "policy", WeightStrategy("state_dict"))
    assert as_state_dict["0.bias"] is not None
    with pytest.raises(InvalidArgumentError, match="no context"):
        scheme.prepare_weights("policy", "policy", strategy)
    with pytest.raises(UnsupportedWeightsError, match="float"):
        scheme.prepare_weights(1.5, "policy", strategy)


def test_resolve_attr_paths():
    class Obj:
        pass

    root = Obj()
    root.env = Obj()
    root.env.transform = [Obj(), Obj()]
    root.env.transform[1].net = "found"
    root.schemes = {"policy": "scheme"}
    assert resolve_attr(root, "env.transform[1].net") == "found"
    assert resolve_attr(root, "env.transform[-1].net") == "found"
    assert resolve_attr(root, "schemes['policy']") == "scheme"
    assert resolve_attr(root, 'schemes["policy"]') == "scheme"
    with pytest.raises(AttributeError):
        resolve_attr(root, "env.missing")
    with pytest.raises(InvalidArgumentError, match="cannot parse"):
        resolve_attr(root, "env..transform")


def test_context_and_model_are_held_weakly():
    class Ctx:
        def __init__(self) -> None:
            self.policy = make_net(0)

    ctx = Ctx()
    scheme = NoWeightSyncScheme()
    scheme.init_on_sender(model_id="policy", context=ctx)
    assert scheme.context is ctx and scheme.model is ctx.policy
    assert scheme.weights["0", "weight"] is ctx.policy[0].weight
    del ctx
    gc.collect()
    assert scheme.context is None and scheme.model is None and scheme.weights is None
    scheme.weights = TensorDict(a=torch.zeros(1))
    assert scheme.weights["a"].shape == (1,)


def test_strategy_property():
    scheme = NoWeightSyncScheme()
    scheme.strategy = WeightStrategy("state_dict")
    assert scheme.strategy_str == "state_dict"
    with pytest.raises(InvalidArgumentError, match="WeightStrategy"):
        scheme.strategy = "tensordict"
    assert NoWeightSyncScheme(WeightStrategy("state_dict")).strategy.extract_as == "state_dict"


# -- background receiver --------------------------------------------------------------------------


def test_background_receiver_applies_updates_and_stops(backend):
    trainer, sender, receivers, policies = sender_and_receivers(num_workers=1)
    receiver = receivers[0]
    receiver._start_background_receiver(poll_interval=0.01)
    with pytest.raises(SchemeStateError, match="already running"):
        receiver._start_background_receiver()
    thread = receiver._background_thread
    sender.send()
    deadline = time.monotonic() + 30
    while receiver.version < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.version == 1 and same_weights(policies[0], trainer)
    receiver.shutdown()
    assert not thread.is_alive() and receiver.background_error is None


def test_background_receiver_reports_errors():
    _, sender, receivers, _ = sender_and_receivers(num_workers=1)
    receiver = receivers[0]
    sender.send(TensorDict(wrong=torch.zeros(1)))
    with pytest.warns(RuntimeWarning, match="background receiver of worker 0 stopped"):
        receiver._start_background_receiver(poll_interval=0.01)
        receiver._background_thread.join(30)
    assert isinstance(receiver.background_error, KeyMismatchError)
    receiver.shutdown()


# -- pickling -------------------------------------------------------------------------------------


def test_pickle_drops_runtime_state():
    trainer, _, receivers, policies = sender_and_receivers(num_workers=1)
    receiver = receivers[0]
    receiver.context = policies[0]
    receiver.lock = threading.Lock()
    receiver._start_background_receiver(poll_interval=0.01)
    clone = pickle.loads(pickle.dumps(receiver))
    assert not clone.initialized_on_receiver and not clone.synchronized_on_receiver
    assert clone.context is None and clone.model is None and clone.lock is None
    assert clone._background_thread is None and clone._stop_event is None
    assert clone.version == 0 and clone.model_id == "policy"
    assert isinstance(clone.receiver_transport, InboxTransport)
    receiver.shutdown()


def test_scheme_crosses_into_a_spawned_process(backend):
    trainer = _spawn_helpers.make_policy(seed=0)

    class Ctx:
        policy = trainer

    ctx = Ctx()
    scheme = NoWeightSyncScheme(strategy="tensordict")
    scheme.init_on_sender(model_id="policy", context=ctx)
    scheme.connect()
    weights = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    out = _spawn_helpers.run_spawned(_spawn_helpers.receiver_applies, scheme, weights)
    assert out["arrived"] == {
        "type": "NoWeightSyncScheme", "initialized_on_sender": False,
        "initialized_on_receiver": False, "synchronized_on_sender": False, "context": None,
        "model": None, "version": 0, "model_id": "policy", "strategy": "tensordict",
    }
    assert out["worker_idx"] == 1 and out["version"] == 1
    for key, value in trainer.state_dict().items():
        assert out["weights"][key] == _spawn_helpers.tensor_bytes(value), key
    # The sender's own copy is untouched by the pickling.
    assert scheme.initialized_on_sender and scheme.context is ctx


# -- TorchRL interoperability ---------------------------------------------------------------------


def test_schemes_pass_torchrl_isinstance_checks():
    torchrl_schemes = pytest.importorskip("torchrl.weight_update.weight_sync_schemes")
    scheme = NoWeightSyncScheme()  # registered when TorchRL loaded, in any import order
    assert isinstance(scheme, torchrl_schemes.WeightSyncScheme)
    assert isinstance(InboxScheme(), torchrl_schemes.WeightSyncScheme)


def test_only_create_transport_is_abstract():
    assert WeightSyncScheme.__abstractmethods__ == frozenset({"create_transport"})
    torchrl_schemes = pytest.importorskip("torchrl.weight_update.weight_sync_schemes")
    assert WeightSyncScheme.__abstractmethods__ == \
        torchrl_schemes.WeightSyncScheme.__abstractmethods__


def test_scheme_overriding_init_on_sender_and_receiver_directly():
    class DirectInit(WeightSyncScheme):  # the TorchRL way: no _init_on_*_impl
        def create_transport(self, **kwargs):
            return InboxTransport(**kwargs)

        def init_on_sender(self, *, model_id, model=None, **kwargs):
            self.model_id, self.model = model_id, model
            self._register_worker_sender(worker_idx=0)
            self._initialized_on_sender = True

        def init_on_receiver(self, *, model_id, context=None, model=None, **kwargs):
            self.model_id, self.model = model_id, model
            self._initialized_on_receiver = True

    trainer, policy = make_net(0), make_net(1)
    sender, receiver = DirectInit(), DirectInit()
    sender.init_on_sender(model_id="policy", model=trainer)
    sender.connect()
    sender.send()
    assert sender.initialized_on_sender and sender.version == 1
    receiver.init_on_receiver(model_id="policy", model=policy)
    receiver.apply_weights(sender.sender_transports[0].inbox.pop())
    assert same_weights(policy, trainer) and receiver.version == 1


def test_init_without_an_implementation_raises_and_leaves_the_scheme_uninitialised():
    class TransportOnly(WeightSyncScheme):
        def create_transport(self, **kwargs):
            return InboxTransport(**kwargs)

    scheme = TransportOnly()
    with pytest.raises(NotImplementedError, match="TransportOnly cannot be a sender"):
        scheme.init_on_sender(model_id="policy")
    assert not scheme.initialized_on_sender
    with pytest.raises(NotImplementedError, match="receiver \\(model_id='policy'\\)"):
        scheme.init_on_receiver(model_id="policy")
    assert not scheme.initialized_on_receiver


def test_backend_modules_are_exported_lazily():
    import weightsync.schemes as schemes
    import weightsync.transports as transports

    shared = schemes.SharedMemWeightSyncScheme
    assert shared is registry.resolve_backend("shared")
    assert issubclass(shared, WeightSyncScheme)
    assert transports.SharedMemSenderTransport.__module__ == "weightsync.transports.shared_mem"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        schemes.Nope
