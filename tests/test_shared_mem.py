"""SharedMemWeightSyncScheme end to end.

In-process tests unpickle the sender's scheme into receivers in the same process (each with its
own segment file descriptor, so slot locks and liveness behave as across processes); the
process tests spawn real workers. GPU tests are marked and skip without CUDA.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from _shm_workers import (  # noqa: F401
    JOIN_TIMEOUT,
    TinyModel,
    fill_version,
    no_leaked_segments,
    scheme_sender,
    scheme_worker,
)
from tensordict import TensorDict
from torch import nn

from weightsync.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    KeyMismatchError,
    PeerDiedError,
    SchemeStateError,
    ShapeMismatchError,
    WeightSyncTimeout,
)
from weightsync.schemes import WeightSyncScheme
from weightsync.engine import StorageWindow
from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme
from weightsync.transports.receive_loop import native_loop_available
from weightsync.transports.shm_segment import SHM_DIR

CTX = mp.get_context("spawn")


# -- helpers ----------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_weights(a: nn.Module | dict, b: nn.Module | dict) -> None:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), f"{k} differs"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                t.copy_(torch.randint(-1000, 1000, t.shape, generator=g, dtype=t.dtype))
    return model


class _Side:
    def __init__(self, scheme, model):
        self.scheme, self.model = scheme, model


@contextmanager
def in_process(n: int = 2, *, mode: str = "copy", workers=None, init=None, **kwargs):
    """A connected sender and ``n`` receivers in this process; everything shut down after."""
    trainer = randomize(TinyModel(), 1)
    kwargs.setdefault("background", False)
    kwargs.setdefault("timeout", 2.0)
    sender = SharedMemWeightSyncScheme(mode=mode, **kwargs)
    with ExitStack() as stack:
        stack.callback(sender.shutdown)
        (init or (lambda s, t: s.init_on_sender(model=t, num_workers=n)))(sender, trainer)
        blob = pickle.dumps(sender)
        sender.connect()
        sides = []
        for w in range(n):
            receiver = pickle.loads(blob)
            stack.callback(receiver.shutdown)
            model = (workers or TinyModel)()
            receiver.init_on_receiver(model_id="policy", model=model, worker_idx=w)
            receiver.connect(worker_idx=w)
            sides.append(_Side(receiver, model))
        yield trainer, sender, sides


# -- lifecycle, initial weights, updates --------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_initial_weights_and_100_updates_bit_exact(mode):
    with in_process(2, mode=mode) as (trainer, sender, sides):
        for side in sides:
            assert_same_weights(side.model, trainer)
            assert side.scheme.weights_version == 0
        for v in range(1, 101):
            new = randomize(TinyModel(), 100 + v)
            sender.sync = False
            sender.send(new)
            for side in sides:
                got = side.scheme.receive()
                assert isinstance(got, TensorDict)
                assert_same_weights(side.model, new)
                assert side.scheme.weights_version == v
        assert sender.version == sender.weights_version == 100
        assert sender.acked_versions() == {0: 100, 1: 100}


def test_receive_returns_none_without_news_and_the_applied_weights_otherwise():
    with in_process(1) as (trainer, sender, sides):
        receiver = sides[0].scheme
        assert receiver.receive() is None
        assert receiver.receive(timeout=0.05) is None
        sender.sync = False
        sender.send(randomize(TinyModel(), 3))
        got = receiver.receive(timeout=0)
        assert got["lin", "weight"] is sides[0].model.lin.weight
        assert receiver.version == 1  # base-class count of applied updates


def test_state_dict_strategy_returns_a_dict():
    with in_process(1, strategy="state_dict") as (trainer, sender, sides):
        sender.sync = False
        sender.send(trainer.state_dict())
        got = sides[0].scheme.receive()
        assert isinstance(got, dict) and set(got) == set(trainer.state_dict())


def _meta_model() -> TinyModel:
    with torch.device("meta"):
        return TinyModel()


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_meta_worker_model_is_materialized_by_the_first_version(mode):
    # TorchRL's collectors send workers a stateless (meta-device) policy and leave the weights
    # to the scheme.
    with in_process(2, mode=mode, workers=_meta_model) as (trainer, sender, sides):
        for side in sides:
            assert all(t.device.type == "cpu" for t in side.model.state_dict().values())
            assert isinstance(side.model.lin.weight, nn.Parameter)
            assert_same_weights(side.model, trainer)
        new = randomize(TinyModel(), 5)
        sender.sync = False
        sender.send(new)
        for side in sides:
            assert side.scheme.receive() is not None
            assert_same_weights(side.model, new)


class _WithExtraState(TinyModel):
    def get_extra_state(self):
        return {"steps": 3}

    def set_extra_state(self, state):
        pass


def test_extra_state_that_shared_memory_cannot_carry_is_announced():
    sender = SharedMemWeightSyncScheme(background=False)
    try:
        with pytest.warns(UserWarning, match=r"extra state \(get_extra_state\) of \[''\] is not sent"):
            sender.init_on_sender(model=_WithExtraState(), num_workers=1)
    finally:
        sender.shutdown()


def test_sync_send_returns_once_workers_applied():
    with in_process(2, background=True) as (trainer, sender, sides):
        for v in range(1, 21):
            new = randomize(TinyModel(), v)
            sender.send(new)  # sync: both background threads applied it
            for side in sides:
                assert_same_weights(side.model, new)
                assert side.scheme.weights_version == v


def test_send_without_weights_snapshots_the_registered_model():
    with in_process(1) as (trainer, sender, sides):
        sender.sync = False
        fill_version(trainer, 7)
        sender.send()
        sides[0].scheme.receive()
        assert_same_weights(sides[0].model, trainer)
        # Replacing a parameter object is seen too.
        trainer.scale = nn.Parameter(torch.full((2,), 3.0, dtype=torch.float64))
        sender.send()
        sides[0].scheme.receive()
        assert torch.equal(sides[0].model.scale, torch.full((2,), 3.0, dtype=torch.float64))


def _mapped_ranges(names) -> list[tuple[int, int]]:
    """Every address range of this process that maps one of the segments ``names`` (the
    sender's mappings, in-process receivers' and any window onto them)."""
    paths = {os.path.join(SHM_DIR, n) for n in names}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] in paths:
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _trainer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_trainer_is_never_shared_and_never_overwritten(mode):
    # TorchRL moves the trainer's parameters into shared memory and sends write into them.
    # Here the trainer's tensors must stay where they were before init_on_sender, outside
    # every mapping of every arena, and keep their bytes while other weights go through every
    # slot of the arena.
    before: dict[str, torch.Tensor] = {}
    ptrs: dict[str, int] = {}
    objects: dict[str, torch.Tensor] = {}

    def init(s, trainer):
        before.update(snapshot(trainer))
        for k, t in _trainer_tensors(trainer).items():
            ptrs[k], objects[k] = t.data_ptr(), t
        s.init_on_sender(model=trainer, num_workers=2)

    with in_process(2, mode=mode, sync=False, init=init) as (trainer, sender, sides):
        names = sender.segment_names()
        assert names
        for name in names:
            seg = os.stat(os.path.join(SHM_DIR, name))
            assert stat.S_IMODE(seg.st_mode) == 0o600
        arena = sender._sender._arenas[0].arena
        written = set()
        for v in range(1, 4 * arena.nslots + 1):
            other = randomize(TinyModel(), 700 + v)
            sender.send(other if v % 2 else TensorDict.from_module(other))
            written |= {s for s in range(arena.nslots) if arena.slot_version(s) == v}
            for side in sides:
                assert side.scheme.receive() is not None
                assert_same_weights(side.model, other)
        assert written == set(range(arena.nslots))  # every slot was written at least once
        sender.send()  # reads the trainer: still only reads it
        for side in sides:
            assert side.scheme.receive() is not None
        ranges = _mapped_ranges(names)
        assert ranges  # the sender's and the receivers' mappings
        tensors = _trainer_tensors(trainer)
        assert all(tensors[k] is objects[k] for k in objects) and set(tensors) == set(objects)
        assert {k: t.data_ptr() for k, t in tensors.items()} == ptrs
        for k, t in tensors.items():
            storage = t.untyped_storage()
            lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            assert not any(lo < end and start < hi for start, end in ranges), f"{k} is in an arena"
        assert_same_weights(trainer, before)
        for side in sides:
            assert_same_weights(side.model, trainer)
        if mode == "view":
            # The workers' tensors, by contrast, live in the arena.
            assert all(any(start <= t.data_ptr() < end for start, end in ranges)
                       for side in sides for t in side.model.parameters())


def test_view_mode_repoints_without_copying():
    with in_process(2, mode="view") as (trainer, sender, sides):
        sender.sync = False
        seen = []
        for v in range(1, 6):
            new = randomize(TinyModel(), v)
            sender.send(new)
            sides[0].scheme.receive()
            assert_same_weights(sides[0].model, new)
            seen.append(sides[0].model.lin.weight.data_ptr())
        assert len(set(seen)) > 1  # the same Parameter object, now in another slot
        assert isinstance(sides[0].model.lin.weight, nn.Parameter)
        # Shutting down gives the worker private copies of what it holds.
        held = snapshot(sides[0].model)
        sides[0].scheme.shutdown()
        sender.send(randomize(TinyModel(), 99))
        sender.send(randomize(TinyModel(), 98))
        assert_same_weights(sides[0].model, held)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_view_mode_tensors_sit_at_their_layout_offsets_in_the_slot_taken(backend, monkeypatch):
    # Natively every tensor views one window that each take points at the new slot (one
    # pointer store for all of them); the fallback re-points each tensor. Either way each
    # tensor's bytes are the slot's, at its layout offset, and a privatized worker re-binds.
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", backend)  # both paths in either CI run
    if backend == "native" and not StorageWindow.available():
        pytest.skip("needs the native library")  # a pure-Python install
    with in_process(1, mode="view", sync=False) as (trainer, sender, sides):
        receiver, model = sides[0].scheme, sides[0].model
        transport = receiver._receiver_transport
        layout = transport.layout
        tensors = transport.tensors

        def check_viewing_current_slot():
            base = transport.arena.slot_bytes(transport._mapped).data_ptr()
            assert [t.data_ptr() - base for t in tensors] == list(layout.offsets)
            owner = transport._window.tensor if backend == "native" else transport.arena.segment.tensor
            assert {t.untyped_storage()._cdata for t in tensors} == {owner.untyped_storage()._cdata}

        check_viewing_current_slot()
        for v in range(1, 8):
            new = randomize(TinyModel(), 500 + v)
            sender.send(new)
            assert receiver.receive() is not None
            check_viewing_current_slot()
            assert_same_weights(model, new)
            if v == 2:
                # Storage of its own behind the scheme's back: the next take must still move
                # it with the others (it would otherwise keep version 2 for ever).
                model.lin.weight.data = torch.zeros(3, 4)
            if v == 4:
                receiver.apply_weights(TensorDict.from_module(randomize(TinyModel(), 600)))
                assert all(not (transport.arena.segment.tensor.data_ptr() <= t.data_ptr()
                                < transport.arena.segment.tensor.data_ptr() + transport.arena.segment.size)
                           for t in tensors)  # private copies, written locally
                assert_same_weights(model, randomize(TinyModel(), 600))


def test_view_mode_needs_enough_slots():
    with pytest.raises(InvalidArgumentError, match="at least workers \\+ 2 = 4 slots"):
        SharedMemWeightSyncScheme(mode="view", slots=3).init_on_sender(model=TinyModel(), num_workers=2)


# -- subsets and per-worker weights ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_subset_updates_leave_the_others_alone(mode):
    with in_process(3, mode=mode, sync=False) as (trainer, sender, sides):
        new = randomize(TinyModel(), 11)
        sender.send(new, worker_ids=[1])
        assert [s.scheme.receive() is not None for s in sides] == [False, True, False]
        assert_same_weights(sides[1].model, new)
        assert_same_weights(sides[0].model, trainer)
        newer = randomize(TinyModel(), 12)
        sender.send(newer, worker_ids=[0, 2])
        for s in sides:
            s.scheme.receive()
        assert_same_weights(sides[0].model, newer)
        assert_same_weights(sides[1].model, new)
        assert_same_weights(sides[2].model, newer)
        assert sender.acked_versions() == {0: 2, 1: 1, 2: 2}


def test_sync_subset_sends_with_the_default_slots():
    # Copy mode with sync uses 3 slots. An offer a worker already took does not hold its
    # slot: alternating subsets must never run out (it used to after three sends).
    with in_process(3, background=True) as (trainer, sender, sides):
        assert sender.slots is None
        for v, ids in enumerate([[0], [1], [0], [2], [1], [0, 2], [2], [1], [0]] * 3, start=1):
            new = randomize(TinyModel(), 300 + v)
            sender.send(new, worker_ids=ids)
            for w in ids:
                assert_same_weights(sides[w].model, new)
                assert sides[w].scheme.weights_version == v


def _lag_behind_subset_sends(sender, sides):
    """Leave each of 3 view-mode workers viewing one slot with an untaken offer of another,
    a different one per worker: 6 slots busy, and the last send needs a seventh."""
    for w in range(3):
        sender.send(randomize(TinyModel(), 400 + w), worker_ids=[w])
        assert sides[w].scheme.receive() is not None
    sender.send(randomize(TinyModel(), 410), worker_ids=[0])  # not taken
    sender.send(randomize(TinyModel(), 411), worker_ids=[1])  # not taken
    last = randomize(TinyModel(), 412)
    sender.send(last, worker_ids=[2])
    return last


def test_lagging_view_workers_behind_subset_sends():
    # Each lagging view-mode worker holds the slot it views plus its own untaken offer. The
    # default for sync=False (2 x workers + 1) lets such async sends go on without waiting
    # for a free slot; an explicit slots= too small for it raises the typed error, naming who
    # holds what, once the timeout is up.
    with in_process(3, mode="view", sync=False, timeout=2.0) as (trainer, sender, sides):
        assert sender.slots is None
        t0 = time.monotonic()
        last = _lag_behind_subset_sends(sender, sides)
        assert time.monotonic() - t0 < 2.0  # no send waited out the timeout
        assert sides[2].scheme.receive() is not None
        assert_same_weights(sides[2].model, last)
        for w, seed in ((0, 410), (1, 411)):
            assert sides[w].scheme.receive() is not None
            assert_same_weights(sides[w].model, randomize(TinyModel(), seed))
    with in_process(3, mode="view", sync=False, slots=5, timeout=0.3) as (trainer, sender, sides):
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"no free slot among 5 .* not yet taken by workers \{0: \d, 1: \d\}, slots viewed by workers \{0: \d, 1: \d, 2: \d\}") as info:
            _lag_behind_subset_sends(sender, sides)
        assert time.monotonic() - t0 < 3.0
        assert sorted(info.value.workers) == [0, 1, 2]
        assert info.value.alive == {0: True, 1: True, 2: True}


@pytest.mark.parametrize(("mode", "sync", "expected"), [
    ("view", False, 2 * 3 + 1),  # a slot viewed and a different untaken offer per worker
    ("view", True, 3 + 2),
    ("copy", False, 3 + 2),
    ("copy", True, 3),
])
def test_default_slot_counts(mode, sync, expected):
    with in_process(3, mode=mode, sync=sync) as (trainer, sender, sides):
        assert [sa.arena.nslots for sa in sender._sender._arenas] == [expected]


def fcntl_lock(arena, slot: int) -> int:
    """A reader's lock on ``slot`` from a file description of our own (close it to drop it)."""
    from weightsync.transports.arena import _lock

    fd = os.open(arena.segment.path, os.O_RDWR | os.O_CLOEXEC)
    assert _lock(fd, slot, fcntl.F_RDLCK)
    return fd


def test_a_version_reaches_every_arena_or_none():
    # Two arenas (per-worker weights). When the second has no free slot, the first must not
    # have published: the workers never disagree on what was sent, and nothing is counted.
    with in_process(2, per_worker_weights=True, sync=False, mode="view", timeout=0.3) as (trainer, sender, sides):
        for v in range(1, 4):
            sender.send({0: randomize(TinyModel(), v), 1: randomize(TinyModel(), v)})
            for side in sides:
                side.scheme.receive()
        arenas = sender._sender._arenas
        held = []
        try:
            for slot in range(arenas[1].arena.nslots):  # every slot of worker 1's arena busy
                held.append(fcntl_lock(arenas[1].arena, slot))
            with pytest.raises(WeightSyncTimeout, match="no free slot"):
                sender.send({0: randomize(TinyModel(), 9), 1: randomize(TinyModel(), 9)})
        finally:
            for fd in held:
                os.close(fd)
        assert sender.weights_version == 3
        assert [side.scheme.receive() for side in sides] == [None, None]
        new = randomize(TinyModel(), 10)
        sender.send({0: new, 1: new})
        for side in sides:
            assert side.scheme.receive() is not None
            assert side.scheme.weights_version == 4
            assert_same_weights(side.model, new)


def test_per_worker_weights():
    with in_process(2, per_worker_weights=True, sync=False) as (trainer, sender, sides):
        assert len(sender.segment_names()) == 2
        w0, w1 = randomize(TinyModel(), 21), randomize(TinyModel(), 22)
        sender.send({0: w0, 1: TensorDict.from_module(w1)})
        for s in sides:
            s.scheme.receive()
        assert_same_weights(sides[0].model, w0)
        assert_same_weights(sides[1].model, w1)
        sender.send({1: w0})
        assert sides[0].scheme.receive() is None
        sides[1].scheme.receive()
        assert_same_weights(sides[1].model, w0)


def test_per_worker_dict_needs_per_worker_weights():
    with in_process(2, sync=False) as (trainer, sender, sides):
        with pytest.raises(InvalidArgumentError, match="per_worker_weights=True"):
            sender.send({0: trainer})


# -- init_on_sender forms -----------------------------------------------------------------------


class _FakeCollector:
    def __init__(self, policy, devices):
        self.policy = policy
        self.policy_device = devices


def _state_of(td: TensorDict) -> dict[str, torch.Tensor]:
    """A TinyModel's TensorDict as its state_dict (same keys, same order)."""
    return {k: td.get(tuple(k.split("."))) for k in TinyModel().state_dict()}


def _register(form: str, scheme, trainer: nn.Module, n: int) -> None:
    """``init_on_sender`` in form ``form``, every form registering ``trainer``'s weights for
    ``n`` CPU workers."""
    cpus = [torch.device("cpu")] * n
    if form == "context":
        scheme.init_on_sender(model_id="policy", context=_FakeCollector(trainer, cpus))
    elif form == "params_map":  # one TensorDict per worker, all over the trainer's tensors
        scheme.init_on_sender(params_map={w: TensorDict.from_module(trainer) for w in range(n)})
    elif form == "weights_devices":
        scheme.init_on_sender(weights=TensorDict.from_module(trainer), devices=cpus)
    elif form == "model_devices":
        scheme.init_on_sender(model=trainer, devices=cpus)
    elif form == "model_num_workers":
        scheme.init_on_sender(model=trainer, num_workers=n)
    elif form == "model_map_fn_clone":  # a copy per worker, as w.to(device) is on another device
        scheme.init_on_sender(model=trainer, device_map_fn=lambda i, w: w.clone(), num_workers=n)
    elif form == "model_map_fn_to":  # a new TensorDict per worker over the same tensors
        scheme.init_on_sender(model=trainer, device_map_fn=lambda i, w: w.to("cpu"), num_workers=n)
    elif form == "weights_map_fn_clone":
        scheme.init_on_sender(weights=TensorDict.from_module(trainer),
                              device_map_fn=lambda i, w: w.clone(), num_workers=n)
    else:
        raise ValueError(form)


_FORMS = ["context", "params_map", "weights_devices", "model_devices", "model_num_workers",
          "model_map_fn_clone", "model_map_fn_to", "weights_map_fn_clone"]


@pytest.mark.parametrize("mode", ["copy", "view"])
@pytest.mark.parametrize("form", _FORMS)
def test_init_on_sender_forms_share_one_arena_and_send_the_trainer_as_it_is_now(form, mode):
    # Every form registers the trainer once: its CPU workers share one arena (one write per
    # send), and send() without weights reads the trainer as it is at that moment; a
    # device_map_fn's copies only say where each worker lives.
    n = 3
    with in_process(n, mode=mode, sync=False, init=lambda s, t: _register(form, s, t, n)) as (
        trainer, sender, sides
    ):
        assert len(sender.segment_names()) == 1
        for side in sides:
            assert_same_weights(side.model, trainer)
        for step in range(1, 4):
            randomize(trainer, 40 + step)  # in place, as an optimiser step
            sender.send()
            for side in sides:
                assert side.scheme.receive() is not None
                assert side.scheme.weights_version == step
                assert_same_weights(side.model, trainer)


def test_device_map_fn_gets_a_tensordict_and_never_the_trainer():
    # As in TorchRL, the function gets a TensorDict of the weights: the usual
    # ``w.to(device)`` on the module itself would move the trainer; writing into what it got
    # is the caller's business, but nothing of the trainer may be replaced.
    trainer = randomize(TinyModel(), 45)
    before = snapshot(trainer)
    def params():
        return [trainer.lin.weight, trainer.lin.bias, trainer.scale]

    before_params = params()
    seen = []

    def fn(i, w):
        seen.append((i, type(w)))
        return w.to("cpu").clone()

    sender = SharedMemWeightSyncScheme(background=False)
    try:
        sender.init_on_sender(model=trainer, device_map_fn=fn, num_workers=2)
        assert seen == [(0, TensorDict), (1, TensorDict)]
        assert all(a is b for a, b in zip(params(), before_params))
        assert_same_weights(trainer, before)
        assert sender._worker_devices == {0: "cpu", 1: "cpu"}
    finally:
        sender.shutdown()


def test_device_map_fn_result_that_does_not_fit_names_the_worker_and_key():
    sender = SharedMemWeightSyncScheme(background=False)
    with pytest.raises(KeyMismatchError,
                       match=r"device_map_fn returned for worker 1 has no tensor 'scale'"):
        sender.init_on_sender(model=TinyModel(), num_workers=2,
                              device_map_fn=lambda i, w: w.exclude("scale") if i == 1 else w)
    with pytest.raises(DTypeMismatchError,
                       match=r"key 'scale'.* device_map_fn returned for worker 0 dtype float32"):
        sender.init_on_sender(model=TinyModel(), num_workers=2,
                              device_map_fn=lambda i, w: w.apply(lambda t: t.float()))
    with pytest.raises(InvalidArgumentError,
                       match=r"device_map_fn returned for worker 0: weights must be"):
        sender.init_on_sender(model=TinyModel(), num_workers=1, device_map_fn=lambda i, w: None)
    assert not sender.initialized_on_sender and sender.segment_names() == []


def test_params_map_copies_are_different_weights_with_an_arena_each():
    # Copies can change on their own: each worker gets its own entry, at connect and at
    # every send() without weights.
    n = 3
    entries = {}

    def init(s, t):
        for w in range(n):
            entries[w] = TensorDict.from_module(randomize(TinyModel(), 50 + w)).data
        s.init_on_sender(params_map=entries)

    with in_process(n, sync=False, init=init) as (trainer, sender, sides):
        assert len(sender.segment_names()) == n
        for w, side in enumerate(sides):
            assert_same_weights(side.model, _state_of(entries[w]))
        entries[1]["lin", "weight"].fill_(7.0)
        sender.send()
        for w, side in enumerate(sides):
            assert side.scheme.receive() is not None
            assert_same_weights(side.model, _state_of(entries[w]))
        assert torch.equal(sides[1].model.lin.weight, torch.full((3, 4), 7.0))


def test_per_worker_weights_keeps_an_arena_per_worker_in_every_form():
    def init(s, t):
        _register("model_map_fn_to", s, t, 3)

    with in_process(3, sync=False, per_worker_weights=True, init=init) as (trainer, sender, sides):
        assert len(sender.segment_names()) == 3
        w1 = randomize(TinyModel(), 61)
        sender.send({1: w1})
        assert [side.scheme.receive() is not None for side in sides] == [False, True, False]
        assert_same_weights(sides[1].model, w1)


def test_init_on_sender_rejects_bad_combinations():
    s = SharedMemWeightSyncScheme()
    td = TensorDict.from_module(TinyModel())
    with pytest.raises(InvalidArgumentError, match="model_id is required"):
        s.init_on_sender(context=_FakeCollector(TinyModel(), ["cpu"]))
    with pytest.raises(InvalidArgumentError, match="devices cannot be combined with params_map"):
        s.init_on_sender(params_map={0: td}, devices=["cpu"])
    with pytest.raises(InvalidArgumentError, match="device_map_fn needs num_workers"):
        s.init_on_sender(weights=td, device_map_fn=lambda i, w: w)
    with pytest.raises(InvalidArgumentError, match="not both"):
        s.init_on_sender(weights=td, model=TinyModel(), num_workers=1)
    assert not s.initialized_on_sender and s.segment_names() == []
    s.shutdown()


def test_constructor_checks_and_registry():
    with pytest.raises(InvalidArgumentError, match="mode must be one of"):
        SharedMemWeightSyncScheme(mode="mmap")
    with pytest.raises(InvalidArgumentError, match="slots must be between 2 and 255"):
        SharedMemWeightSyncScheme(slots=1)
    assert type(WeightSyncScheme.from_backend("shared")) is SharedMemWeightSyncScheme
    assert type(WeightSyncScheme.from_backend("thread", mode="view")) is SharedMemWeightSyncScheme


def test_lifecycle_errors():
    s = SharedMemWeightSyncScheme()
    with pytest.raises(SchemeStateError):
        s.send()
    with in_process(1) as (trainer, sender, sides):
        with pytest.raises(SchemeStateError, match="already connected"):
            sender.connect()
        from weightsync.schemes.base import UnknownWorkerError

        with pytest.raises(UnknownWorkerError, match="worker 5 has no arena"):
            sender.send(worker_ids=[5])


# -- mismatches at connect -----------------------------------------------------------------------


class _Renamed(TinyModel):
    def __init__(self):
        super().__init__()
        self.other = self.scale
        del self.scale


def _half_lin() -> TinyModel:
    model = TinyModel()
    model.lin.to(torch.float16)
    return model


def _connect_refused(model: nn.Module, error, message: str) -> None:
    """A worker with ``model`` connects to a TinyModel sender and is refused with ``error``;
    the sender never sees it connected."""
    sender = SharedMemWeightSyncScheme(background=False, timeout=2.0)
    try:
        sender.init_on_sender(model=randomize(TinyModel(), 41), num_workers=1)
        receiver = pickle.loads(pickle.dumps(sender))
        sender.connect()
        receiver.init_on_receiver(model_id="policy", model=model, worker_idx=0)
        with pytest.raises(error, match=message):
            receiver.connect(worker_idx=0)
        assert not receiver.synchronized_on_receiver
        assert sender.workers_alive() == {0: False}
        receiver.shutdown()
    finally:
        sender.shutdown()


@pytest.mark.parametrize(
    "factory, error, message",
    [
        (_Renamed, KeyMismatchError, "worker 0 model has no tensor 'scale' \\(float64\\[2\\]\\) that the sender sends"),
        (lambda: TinyModel(width=5), ShapeMismatchError, "key 'lin.weight': sender shape \\[3, 4\\], worker 0 model shape \\[3, 5\\]"),
        (lambda: _half_lin(), DTypeMismatchError, "key 'lin.weight': sender dtype float32, worker 0 model dtype float16"),
    ],
)
def test_mismatched_worker_model_fails_at_connect_and_nothing_is_applied(factory, error, message):
    model = factory()
    before = snapshot(model)
    _connect_refused(model, error, message)
    assert_same_weights(model, before)


def test_meta_worker_model_with_another_shape_stays_meta():
    # The layout is checked on the meta tensors before they get storage: a mismatch leaves
    # the model exactly as it was.
    with torch.device("meta"):
        model = TinyModel(width=5)
    params = dict(model.named_parameters())
    _connect_refused(model, ShapeMismatchError, "key 'lin.weight'")
    assert all(t.is_meta for t in model.state_dict().values())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_send_validates_before_writing():
    with in_process(1, sync=False) as (trainer, sender, sides):
        bad = TensorDict.from_module(TinyModel(width=5))
        with pytest.raises(ShapeMismatchError, match="key 'lin.weight': arena shape \\[3, 4\\], weights to send shape \\[3, 5\\]"):
            sender.send(bad)
        assert sides[0].scheme.receive() is None


# -- timeouts, dead peers, guard, background -----------------------------------------------------


@pytest.mark.parametrize("locked", [False, True])
def test_resending_one_tensordict_follows_its_changes(locked):
    # The sender keeps the matched layout of a TensorDict it sent before; every way the
    # TensorDict can change between sends must still be seen.
    with in_process(1) as (trainer, sender, sides):
        sender.sync = False
        side = sides[0]
        weights = TensorDict.from_module(randomize(TinyModel(), 7)).clone()
        if locked:
            weights.lock_()

        def send_and_check(version):
            sender.send(weights)
            assert side.scheme.receive() is not None
            assert side.scheme.weights_version == version
            for key, value in weights.items(include_nested=True, leaves_only=True):
                name = key if isinstance(key, str) else ".".join(key)
                assert torch.equal(_bits(side.model.state_dict()[name]), _bits(value))

        send_and_check(1)
        weights["lin", "weight"].add_(1.0)  # in place
        send_and_check(2)
        weights["lin", "weight"].data = torch.full_like(weights["lin", "weight"], 3.0)  # new storage
        send_and_check(3)
        if not locked:
            weights["lin", "bias"] = torch.full_like(weights["lin", "bias"], -2.0)  # new object
            send_and_check(4)
            weights["lin", "bias"] = torch.zeros(weights["lin", "bias"].numel() + 1)
            with pytest.raises(ShapeMismatchError, match="lin.bias"):
                sender.send(weights)
            assert side.scheme.receive() is None and side.scheme.weights_version == 4
        # A resize or re-view in place keeps the object: still caught (by the copy plan the
        # sender keeps for this list), naming the key, before anything is published.
        weight = weights["lin", "weight"].data
        weights["lin", "weight"].data = weight.view(4, 3)  # same storage, rank and size
        with pytest.raises(ShapeMismatchError, match=r"key 'lin.weight': arena shape \[3, 4\], weights to send shape \[4, 3\]"):
            sender.send(weights)
        assert side.scheme.receive() is None
        weights["lin", "weight"].data = torch.zeros(2, 2)
        with pytest.raises(ShapeMismatchError, match="lin.weight"):
            sender.send(weights)
        assert side.scheme.receive() is None
        weights["lin", "weight"].data = weight  # back as it was: sends again
        if not locked:
            weights["lin", "bias"] = torch.zeros(3)
        send_and_check(5 if not locked else 4)


def test_resending_one_module_follows_its_changes():
    # Same for a module: the sender reuses the copy plan of the list it read last time while
    # the module holds the same tensors, and the plan notices reallocated storage.
    with in_process(1) as (trainer, sender, sides):
        sender.sync = False
        side = sides[0]
        source = randomize(TinyModel(), 9)

        def send_and_check(version):
            sender.send(source)
            assert side.scheme.receive() is not None
            assert side.scheme.weights_version == version
            assert_same_weights(side.model, source)

        send_and_check(1)
        with torch.no_grad():
            source.lin.weight.add_(1.0)  # in place
        send_and_check(2)
        source.lin.weight.data = torch.full_like(source.lin.weight, 3.0)  # new storage
        send_and_check(3)
        source.lin.bias = nn.Parameter(torch.full_like(source.lin.bias, -2.0))  # new object
        send_and_check(4)
        source.steps.data = torch.zeros(5, dtype=torch.int64)  # resized in place
        with pytest.raises(ShapeMismatchError, match="steps"):
            sender.send(source)
        assert side.scheme.receive() is None and side.scheme.weights_version == 4
        source.lin.weight.data = source.lin.weight.data.view(4, 3)  # re-viewed, same bytes
        with pytest.raises(ShapeMismatchError, match=r"key 'lin.weight': arena shape \[3, 4\]"):
            sender.send(source)
        source.lin.weight.data = source.lin.weight.data.view(3, 4)
        source.steps.data = torch.zeros(3, dtype=torch.int64)
        send_and_check(5)
        source.lin.bias = None  # removed
        with pytest.raises(KeyMismatchError, match="lin.bias"):
            sender.send(source)
        assert side.scheme.receive() is None and side.scheme.weights_version == 5


def test_sync_send_times_out_naming_a_worker_that_does_not_take_it():
    with in_process(2, timeout=0.3) as (trainer, sender, sides):
        sides[0].scheme.start_background()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"workers \[1\] did not acknowledge .* worker 1 \(pid \d+, alive") as info:
            sender.send(randomize(TinyModel(), 1))
        assert 0.3 <= time.monotonic() - t0 < 5
        assert info.value.workers == [1] and info.value.alive == {1: True}
        assert sender.weights_version == 1 and sender.version == 0  # published, not completed
        assert sides[0].scheme.weights_version == 1


def test_sync_false_never_waits_for_a_slow_worker():
    with in_process(2, sync=False, mode="copy") as (trainer, sender, sides):
        t0 = time.monotonic()
        for v in range(50):
            sender.send(randomize(TinyModel(), v))
        assert time.monotonic() - t0 < 2.0
        sides[0].scheme.receive()
        assert sides[0].scheme.weights_version == 50


def test_receiver_sees_sender_shutdown():
    with in_process(1) as (trainer, sender, sides):
        sender.shutdown()
        with pytest.raises(PeerDiedError, match="shut down"):
            sides[0].scheme.receive(timeout=0.1)


def _wait_for_native_loop(receiver) -> None:
    """The background thread builds the native loop as it starts: wait for it (when the
    library has one) so that the test exercises it."""
    deadline = time.monotonic() + 5
    while native_loop_available() and receiver._native_loop is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert (receiver._native_loop is not None) == native_loop_available()


def test_guard_holds_off_a_background_update():
    with in_process(1, background=True, sync=False) as (trainer, sender, sides):
        receiver, model = sides[0].scheme, sides[0].model
        _wait_for_native_loop(receiver)
        new = randomize(TinyModel(), 51)
        with receiver.guard():
            before = snapshot(model)
            sender.send(new)
            time.sleep(0.3)  # the background thread has long seen the offer
            assert_same_weights(model, before)
            assert receiver.weights_version == 0
        deadline = time.monotonic() + 5
        while receiver.weights_version != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert receiver.weights_version == 1
        assert_same_weights(model, new)


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_entering_the_guard_applies_a_version_already_on_offer(mode):
    # No background thread and no receive(): entering the guard alone takes the offer, so a
    # forward pass started after a publish runs on it.
    with in_process(1, sync=False, mode=mode) as (trainer, sender, sides):
        receiver, model = sides[0].scheme, sides[0].model
        applied = []
        receiver._after_receive = applied.append  # what a TorchRL context would be told
        with receiver.guard():
            assert receiver.weights_version == 0 and applied == []
            assert_same_weights(model, trainer)
        new = randomize(TinyModel(), 61)
        sender.send(new)
        with receiver.guard():
            assert receiver.weights_version == 1
            assert_same_weights(model, new)
            with receiver.guard():  # re-entrant; nothing newer on offer
                assert receiver.weights_version == 1
            newer = randomize(TinyModel(), 62)
            sender.send(newer)
            with receiver.guard():  # an inner block leaves the outer one on its version
                assert receiver.weights_version == 1
                assert_same_weights(model, new)
            assert receiver.weights_version == 1
            assert_same_weights(model, new)
        assert len(applied) == 1
        with receiver.guard():
            assert receiver.weights_version == 2
            assert_same_weights(model, newer)
        assert len(applied) == 2 and receiver.receive() is None
        sender.send(randomize(TinyModel(), 63))
        sender.shutdown()
        # The sender is gone: the guard still takes what was published and never raises.
        with receiver.guard():
            assert receiver.weights_version == 3
        with receiver.guard():
            assert receiver.weights_version == 3
        with pytest.raises(PeerDiedError):
            receiver.receive(timeout=0.05)


@pytest.mark.parametrize("take", ["receive", "guard"])
def test_a_version_is_counted_before_it_is_acknowledged(take):
    # A sync sender returns at the ack, and a guarded block sees the new weights as soon as
    # the apply releases the guard: either may read `version` right away. CI once caught a
    # worker that saw its last version under the guard while `version` was one short (the
    # Python path counted after the ack, outside the guard).
    with in_process(1, sync=False) as (trainer, sender, sides):
        receiver = sides[0].scheme
        arena = receiver._receiver_transport.arena
        seen = []
        ack = arena.ack

        def recording_ack(version):
            seen.append((version - 1, receiver.version))  # (weights version, count) at the ack
            ack(version)

        arena.ack = recording_ack
        for v in (1, 2):
            sender.send(randomize(TinyModel(), 80 + v))
            if take == "receive":
                assert receiver.receive() is not None
            else:
                with receiver.guard():
                    pass
        assert seen == [(1, 1), (2, 2)]
        assert receiver.version == receiver.weights_version == 2


def test_sync_sends_reach_a_worker_that_holds_the_guard_nearly_always():
    # The worker's main thread re-enters the guard as soon as it leaves it: its background
    # thread queues for the lock behind it, and mostly loses the race for it; guard() entry
    # takes the update instead. The send timeout is the liveness bound: no wall-clock
    # assertion, since every GIL hand-off to the spinning thread costs up to a switch
    # interval on a loaded machine.
    updates = [randomize(TinyModel(), 200 + v) for v in range(1, 31)]
    with in_process(1, background=True, sync=True, timeout=5.0) as (trainer, sender, sides):
        receiver, model = sides[0].scheme, sides[0].model
        stop = threading.Event()
        seen = []
        taken_on_entry = []
        take_offered = receiver._take_offered

        def counted_take():  # runs under the guard: only entry can change the version here
            before = receiver.weights_version
            take_offered()
            taken_on_entry.extend(range(before + 1, receiver.weights_version + 1))

        receiver._take_offered = counted_take

        def busy_worker():
            while not stop.is_set():
                with receiver.guard():
                    seen.append(receiver.weights_version)
                    deadline = time.perf_counter() + 0.002  # a "forward pass", GIL held
                    while time.perf_counter() < deadline:
                        pass

        thread = threading.Thread(target=busy_worker)
        thread.start()
        try:
            for v, update in enumerate(updates, start=1):
                sender.send(update)
                assert receiver.weights_version == v
        finally:
            stop.set()
            thread.join(JOIN_TIMEOUT)
        assert_same_weights(model, updates[-1])
        assert seen == sorted(seen) and seen[-1] == 30
        assert taken_on_entry, "guard() entry took none of the 30 versions"


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_guard_keeps_a_forward_pass_on_one_version(mode):
    with in_process(1, background=True, sync=False, mode=mode) as (trainer, sender, sides):
        receiver, model = sides[0].scheme, sides[0].model
        _wait_for_native_loop(receiver)
        stop = threading.Event()

        def pump():
            v = 0
            while not stop.is_set():
                v += 1
                m = TinyModel()
                fill_version(m, v)
                sender.send(m)

        thread = threading.Thread(target=pump)
        thread.start()
        try:
            mixed = checked = 0
            for _ in range(300):
                with receiver.guard():
                    version = receiver.weights_version
                    first = float(model.lin.weight.detach()[0, 0])
                    time.sleep(0.0005)  # a "forward pass"
                    values = {float(t.detach().max()) for t in (*model.parameters(), *model.buffers())}
                    values |= {float(t.detach().min()) for t in (*model.parameters(), *model.buffers())}
                    if version > 0:  # version 0 is the trainer's random initial weights
                        checked += 1
                        mixed += values != {first, float(version)} - {None}
        finally:
            stop.set()
            thread.join(JOIN_TIMEOUT)
        assert mixed == 0
        assert checked > 0 and receiver.weights_version > 0


_EXIT_WITH_RUNNING_RECEIVER = """
import pickle
from torch import nn
from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme
sender = SharedMemWeightSyncScheme(background=True, timeout=5.0)
sender.init_on_sender(model=nn.Linear(4, 3), num_workers=1)
blob = pickle.dumps(sender)
sender.connect()
receiver = pickle.loads(blob)
receiver.init_on_receiver(model_id="policy", model=nn.Linear(4, 3), worker_idx=0)
receiver.connect(worker_idx=0)
sender.send(nn.Linear(4, 3))
print("sent", flush=True)
"""


def test_process_exits_cleanly_with_a_running_background_receiver():
    # TorchRL's workers exit without shutting their schemes down. A daemon receiver thread
    # that returned from its futex wait during interpreter teardown used to abort the
    # process ("terminate called without an active exception", exit status 134).
    done = subprocess.run([sys.executable, "-c", _EXIT_WITH_RUNNING_RECEIVER],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sent" and "terminate" not in done.stderr


def test_pickled_scheme_carries_no_live_state():
    with in_process(1) as (trainer, sender, sides):
        state = sender.__getstate__()
        assert state["_sender"] is None and state["_sources"] == {}
        assert set(state["_tickets"]) == {0}


# -- processes ------------------------------------------------------------------------------------


def _recv(conn, what: str):
    assert conn.poll(JOIN_TIMEOUT), f"no reply from a worker while waiting for {what}"
    msg = conn.recv()
    if msg[0] in ("error", "connect-error") and what != msg[0]:
        raise AssertionError(f"worker failed: {msg[1]}: {msg[2]}\n{msg[-1] if msg[0] == 'error' else ''}")
    return msg


@contextmanager
def spawned(scheme, n: int, plan: str, opts: dict | None = None, model: str = "tiny"):
    """Start ``n`` workers running ``plan`` on (pickled) ``scheme``; kill leftovers after."""
    procs, conns = [], []
    for w in range(n):
        parent, child = CTX.Pipe()
        p = CTX.Process(target=scheme_worker, args=(child, scheme, w, model, plan, opts or {}), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
    try:
        yield procs, conns
    finally:
        for c in conns:
            try:
                c.send("stop")
            except OSError:
                pass
        for p in procs:
            p.join(JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(JOIN_TIMEOUT)


def test_processes_follow_updates_subsets_and_survive_a_killed_worker():
    trainer = randomize(TinyModel(), 61)
    sender = SharedMemWeightSyncScheme(timeout=5.0)  # background receivers, sync sends: TorchRL's setup
    sender.init_on_sender(model=trainer, num_workers=2)
    try:
        with spawned(sender, 2, "follow") as (procs, conns):
            sender.connect()
            for w, c in enumerate(conns):
                msg = _recv(c, "connected")
                assert msg[0] == "connected" and msg[2] == 0
                assert_same_weights(msg[3], trainer)  # the initial weights, bit-exact
            for v in range(1, 101):
                new = randomize(TinyModel(), 1000 + v)
                sender.send(new)
                if v % 25 == 0:
                    for c in conns:
                        c.send("report")
                        _, version, state = _recv(c, "state")
                        assert version == v
                        assert_same_weights(state, new)
            only1 = randomize(TinyModel(), 2000)
            sender.send(only1, worker_ids=[1])
            states = []
            for c in conns:
                c.send("report")
                states.append(_recv(c, "state"))
            assert states[0][1] == 100 and states[1][1] == 101
            assert_same_weights(states[1][2], only1)
            assert_same_weights(states[0][2], new)
            # A worker killed with SIGKILL is named by the next sync send, well within the timeout.
            os.kill(procs[1].pid, signal.SIGKILL)
            procs[1].join(JOIN_TIMEOUT)
            t0 = time.monotonic()
            with pytest.raises(WeightSyncTimeout, match=r"workers \[1\] did not acknowledge .* worker 1 \(pid \d+, dead") as info:
                sender.send(randomize(TinyModel(), 3000))
            assert time.monotonic() - t0 < 5.0
            assert info.value.workers == [1] and info.value.alive == {1: False}
            # The other worker got that version and keeps receiving.
            last = randomize(TinyModel(), 3001)
            sender.send(last, worker_ids=[0])
            conns[0].send("report")
            _, version, state = _recv(conns[0], "state")
            assert version == 103
            assert_same_weights(state, last)
    finally:
        sender.shutdown()


def _hammer_round(scheme, conns, model: nn.Module, n_updates: int, label) -> None:
    """Connect ``scheme``, send versions 1..n_updates (every tensor filled with the version)
    and check the workers' reports: every take whole, the last version reached, and with
    sync sends every version taken."""
    scheme.connect()
    for c in conns:
        _recv(c, "connected")
    for v in range(1, n_updates + 1):
        fill_version(model, v)
        scheme.send(model)
    for c in conns:
        _, takes, mixed, last = _recv(c, "hammered")
        assert last == n_updates and mixed == 0 and takes > 0, (label, takes, mixed)
        if scheme.sync:
            assert takes == n_updates, (label, takes)
        c.send("next")


def test_processes_hammer_never_see_a_mixed_version():
    """10,000 updates, every tensor of version v filled with v; the workers check every take."""
    n_updates = 10_000
    configs = [("copy", True), ("copy", False), ("view", True), ("view", False)]
    schemes = []
    for mode, sync in configs:
        s = SharedMemWeightSyncScheme(mode=mode, sync=sync, background=False, timeout=10.0)
        s.init_on_sender(model=TinyModel(), num_workers=2)
        schemes.append(s)
    model = TinyModel()
    try:
        with spawned(schemes, 2, "hammer", {"last": n_updates}) as (procs, conns):
            for (mode, sync), s in zip(configs, schemes):
                _hammer_round(s, conns, model, n_updates, label=(mode, sync))
                s.shutdown()
    finally:
        for s in schemes:
            s.shutdown()


@pytest.mark.parametrize("mode", ["copy", "view"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_processes_background_receivers_never_show_a_guarded_block_a_mixed_version(mode, sync):
    """Background receivers (the native loop when the library has it), workers looking at
    their model under the guard as a forward pass would: every look sees one whole version."""
    n_updates = 2_000
    scheme = SharedMemWeightSyncScheme(mode=mode, sync=sync, background=True, timeout=10.0)
    scheme.init_on_sender(model=TinyModel(), num_workers=2)
    model = TinyModel()
    try:
        with spawned(scheme, 2, "guarded-hammer", {"last": n_updates}) as (procs, conns):
            scheme.connect()
            for c in conns:
                _recv(c, "connected")
            for v in range(1, n_updates + 1):
                fill_version(model, v)
                scheme.send(model)
            for c in conns:
                _, looks, mixed, last, native, applied = _recv(c, "hammered")
                assert last == n_updates and mixed == 0 and looks > 0, (looks, mixed, last)
                assert native == native_loop_available()
                # Each version applied once, by the loop or by a guard entry, and counted.
                assert applied == n_updates if sync else 0 < applied <= n_updates, applied
                c.send("next")
    finally:
        scheme.shutdown()


@pytest.mark.skipif(not native_loop_available(), reason="needs the native library's receive loop")
@pytest.mark.parametrize("mode", ["copy", "view"])
def test_processes_take_updates_while_their_main_thread_holds_the_gil(mode):
    """A worker whose main thread runs pure Python and never gives up the GIL (an environment
    step; here the switch interval is 1000 s) still takes every sync update: the native loop
    needs no GIL. A Python receiver thread could not run, and the first send would time out."""
    scheme = SharedMemWeightSyncScheme(mode=mode, sync=True, background=True, timeout=2.0)
    scheme.init_on_sender(model=TinyModel(), num_workers=1)
    try:
        with spawned(scheme, 1, "gil-held", {"seconds": 4.0}) as (procs, conns):
            scheme.connect()
            _recv(conns[0], "connected")
            conns[0].send("go")
            assert _recv(conns[0], "busy") == ("busy", True)
            for v in range(1, 21):
                last = randomize(TinyModel(), 500 + v)
                scheme.send(last)  # sync: returns once the worker applied it
            _, version, state = _recv(conns[0], "state")
            assert version == 20
            assert_same_weights(state, last)
    finally:
        scheme.shutdown()


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_processes_hammer_a_megabyte_model_with_async_sends(mode):
    """The same check on a 0.9 MB model (the bench's mlp-small), sends not waiting for the
    workers: copies long enough for a write racing a read to show up as a mixed version."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from weight_sets import make_module

    n_updates = 2_000
    model = make_module("mlp-small", seed=0)
    scheme = SharedMemWeightSyncScheme(mode=mode, sync=False, background=False, timeout=10.0)
    scheme.init_on_sender(model=model, num_workers=2)
    try:
        with spawned(scheme, 2, "hammer", {"last": n_updates}, model="set:mlp-small") as (procs, conns):
            _hammer_round(scheme, conns, model, n_updates, label=mode)
    finally:
        scheme.shutdown()


@pytest.mark.parametrize("mode", ["copy", "view"])
@pytest.mark.parametrize("background", [False, True], ids=["receive", "background"])
def test_killed_sender_is_reported_and_leaves_no_segment(mode, background):
    # A sender killed with SIGKILL: receive() raises the typed error within its timeout.
    # With a background receiver (the native loop where the library has one), the thread
    # stops on that error, records it in background_error and warns; guard() keeps working
    # and the worker keeps the last weights it took. The dead sender's reaper removes the name.
    died = r"^worker 0: the sender of arena weightsync-[0-9a-f]+ \(pid \d+\) died$"
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=scheme_sender, args=(child, mode), daemon=True)
    proc.start()
    try:
        blob = _recv(parent, "scheme")[1]
        receiver = pickle.loads(blob)
        model = TinyModel()
        receiver.init_on_receiver(model_id="policy", model=model, worker_idx=0)
        receiver.timeout = 10.0
        receiver.background = background
        receiver.connect(worker_idx=0)
        if background:
            _wait_for_native_loop(receiver)
        held = snapshot(model)
        path = os.path.join(SHM_DIR, receiver._receiver_transport.arena.name)
        assert os.path.exists(path)
        warned = (pytest.warns(RuntimeWarning, match=r"receiver of worker 0 stopped: PeerDiedError")
                  if background else contextlib.nullcontext())
        with warned:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(JOIN_TIMEOUT)
            t0 = time.monotonic()
            if background:
                thread = receiver._background_thread
                thread.join(receiver.timeout)
                assert not thread.is_alive()
                assert time.monotonic() - t0 < receiver.timeout
        if background:
            assert isinstance(receiver.background_error, PeerDiedError)
            assert re.search(died, str(receiver.background_error))
        t1 = time.monotonic()
        with pytest.raises(PeerDiedError, match=died):
            while True:
                receiver.receive(timeout=2.0)
        assert time.monotonic() - t1 < 2.5
        with receiver.guard():
            assert_same_weights(model, held)
        # The dead sender's reaper removed the name; the worker's weights stay valid.
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(path)
        receiver.shutdown()
        assert_same_weights(model, held)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT)


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["copy", "view"])
def test_gpu_sender_to_cpu_workers(mode):
    trainer = randomize(TinyModel(), 71).cuda()
    init = lambda s, _: s.init_on_sender(model=trainer, devices=["cpu", "cpu"])  # noqa: E731
    with in_process(2, mode=mode, sync=False, init=init) as (_, sender, sides):
        for side in sides:
            assert_same_weights(side.model, trainer)
        new = randomize(TinyModel(), 72).cuda()
        sender.send(new)
        for side in sides:
            side.scheme.receive()
            assert_same_weights(side.model, new)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["copy", "view"])
def test_gpu_trainer_device_map_fn_to_cpu_workers_follows_the_trainer(mode):
    # The usual TorchRL call for a CUDA trainer with CPU workers: w.to("cpu") is a copy per
    # worker. The workers share one (host) arena and send() carries the trainer as it is now.
    trainer = randomize(TinyModel(), 73).cuda()
    init = lambda s, _: s.init_on_sender(  # noqa: E731
        model=trainer, device_map_fn=lambda i, w: w.to("cpu"), num_workers=3)
    with in_process(3, mode=mode, sync=False, init=init) as (_, sender, sides):
        assert len(sender.segment_names()) == 1
        assert {t.slot_device for t in sender._tickets.values()} == {"cpu"}
        for step in range(1, 3):
            randomize(trainer, 73 + step)  # in place, on the GPU
            sender.send()
            for side in sides:
                assert side.scheme.receive() is not None
                assert_same_weights(side.model, trainer)


@pytest.mark.gpu
def test_gpu_trainer_workers_share_one_arena_per_device_group():
    # Workers on the trainer's GPU share a device arena, the others one host arena, whatever
    # the form; only per_worker_weights gives each its own.
    trainer = randomize(TinyModel(), 77).cuda()
    where = ["cuda:0", "cpu", "cpu", "cuda:0"]
    forms = {
        "devices": dict(model=trainer, devices=where),
        "device_map_fn": dict(model=trainer, device_map_fn=lambda i, w: w.to(where[i]),
                              num_workers=len(where)),
        "params_map": dict(params_map={i: TensorDict.from_module(trainer).to(where[i])
                                       for i in range(len(where))}),
    }
    for form, kwargs in forms.items():
        sender = SharedMemWeightSyncScheme(background=False)
        try:
            sender.init_on_sender(**kwargs)
            expected = 3 if form == "params_map" else 2  # the CPU copies are weights of their own
            assert len(sender.segment_names()) == expected, form
            assert [sender._tickets[w].slot_device for w in range(4)] == \
                ["cuda:0", "cpu", "cpu", "cuda:0"], form
        finally:
            sender.shutdown()


@pytest.mark.gpu
def test_cpu_sender_to_gpu_worker():
    trainer = randomize(TinyModel(), 81)
    sender = SharedMemWeightSyncScheme(background=False, sync=False)
    sender.init_on_sender(model=trainer, devices=["cuda:0"])
    try:
        receiver = pickle.loads(pickle.dumps(sender))
        sender.connect()
        m = TinyModel().cuda()
        receiver.init_on_receiver(model_id="policy", model=m, worker_idx=0)
        receiver.connect(worker_idx=0)
        assert_same_weights(m, trainer)
        new = randomize(TinyModel(), 82)
        sender.send(new)
        receiver.receive()
        assert_same_weights(m, new)
        receiver.shutdown()
    finally:
        sender.shutdown()


@pytest.mark.gpu
def test_same_gpu_workers_use_a_device_arena():
    trainer = randomize(TinyModel(), 91).cuda()
    sender = SharedMemWeightSyncScheme(timeout=30.0)
    sender.init_on_sender(model=trainer, devices=["cuda:0"])
    try:
        assert sender._tickets[0].slot_device == "cuda:0"
        with spawned(sender, 1, "follow", model="tiny-cuda") as (procs, conns):
            sender.connect()
            assert_same_weights(_recv(conns[0], "connected")[3], trainer)
            new = randomize(TinyModel(), 92).cuda()
            sender.send(new)
            conns[0].send("report")
            _, version, state = _recv(conns[0], "state")
            assert version == 1
            assert_same_weights(state, new)
    finally:
        sender.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_sender_to_a_worker_on_another_gpu():
    trainer = randomize(TinyModel(), 95).to("cuda:0")
    sender = SharedMemWeightSyncScheme(background=False, sync=False)
    sender.init_on_sender(model=trainer, devices=["cuda:1"])
    try:
        assert sender._tickets[0].slot_device == "cpu"
        receiver = pickle.loads(pickle.dumps(sender))
        sender.connect()
        m = TinyModel().to("cuda:1")
        receiver.init_on_receiver(model_id="policy", model=m, worker_idx=0)
        receiver.connect(worker_idx=0)
        new = randomize(TinyModel(), 96).to("cuda:0")
        sender.send(new)
        receiver.receive()
        assert_same_weights(m, new)
        receiver.shutdown()
    finally:
        sender.shutdown()


def test_transports_follow_the_transport_protocol():
    from weightsync.transports.base import TransportBackend
    from weightsync.transports.shared_mem import SharedMemReceiverTransport, SharedMemSenderTransport, named_tensors

    source = randomize(TinyModel(), 101)
    sender = SharedMemSenderTransport([(named_tensors(source), [0], torch.device("cpu"))], sync=False)
    try:
        receiver = SharedMemReceiverTransport(sender.tickets()[0], 0)
        assert isinstance(sender, TransportBackend) and isinstance(receiver, TransportBackend)
        sender.send_weights(source)
        model = TinyModel()
        receiver.connect(named_tensors(model), timeout=2.0)
        assert_same_weights(model, source)
        assert receiver.receive_weights(timeout=0) is None
        new = randomize(TinyModel(), 102)
        sender.send_weights(TensorDict.from_module(new))
        got = receiver.receive_weights(timeout=1.0)
        assert got["lin.weight"] is model.lin.weight
        assert_same_weights(model, new)
        with pytest.raises(SchemeStateError, match="sender call"):
            receiver.send_weights(new)
        receiver.close()
    finally:
        sender.close()


def test_apply_weights_in_view_mode_never_writes_shared_memory():
    with in_process(2, mode="view", sync=False) as (trainer, sender, sides):
        local = randomize(TinyModel(), 111)
        sides[0].scheme.apply_weights(TensorDict.from_module(local))
        assert_same_weights(sides[0].model, local)
        assert_same_weights(sides[1].model, trainer)  # same slot, untouched
        new = randomize(TinyModel(), 112)
        sender.send(new)
        sides[0].scheme.receive()
        assert_same_weights(sides[0].model, new)


@pytest.mark.skipif(not native_loop_available(), reason="needs the native library's receive loop")
def test_receiver_lock_holds_the_native_loop_mutex():
    from weightsync.transports.receive_loop import NativeReceiveLoop, ReceiverLock

    with in_process(1, background=True, sync=False) as (trainer, sender, sides):
        receiver = sides[0].scheme
        _wait_for_native_loop(receiver)
        loop: NativeReceiveLoop = receiver._native_loop
        lock: ReceiverLock = receiver.lock
        with lock:
            with lock:  # re-entrant
                pass
            # Still held by this thread: another thread can take neither the lock nor the mutex.
            seen = []
            t = threading.Thread(target=lambda: seen.append((lock.acquire(blocking=False),
                                                             loop.lock(blocking=False))))
            t.start()
            t.join(JOIN_TIMEOUT)
            assert seen == [(False, False)]
        assert loop.lock(blocking=False)  # released on the way out
        loop.unlock()
        assert lock.acquire(blocking=False)
        lock.release()


def test_a_sender_without_a_core_to_spare_writes_small_payloads_on_one_thread(monkeypatch):
    from weightsync.transports import shared_mem as transport

    monkeypatch.setattr(transport.os, "sched_getaffinity", lambda pid: {0, 1})
    assert transport._sender_parallel_min_bytes(workers=1) == 2 << 20
    assert transport._sender_parallel_min_bytes(workers=4) == 2 << 20
    monkeypatch.setattr(transport.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert transport._sender_parallel_min_bytes(workers=2) == 0
    # The sender hands it to the copy plans of its host arenas.
    for cores, expected in ((2, 2 << 20), (16, 0)):
        monkeypatch.setattr(transport.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        sender = transport.SharedMemSenderTransport(
            [({"w": torch.ones(4)}, [0, 1], torch.device("cpu"))])
        try:
            assert [sa.parallel_min_bytes for sa in sender._arenas] == [expected]
        finally:
            sender.close()


# -- the native send path ------------------------------------------------------------------------


def _count_python_protocol(monkeypatch) -> dict[str, int]:
    """Counts the calls of the Python protocol steps the native send path replaces."""
    from weightsync.transports.arena import Arena

    calls = {"acquire_slot": 0, "commit_slot": 0, "publish": 0, "wait_acks": 0}
    for name in calls:
        original = getattr(Arena, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Arena, name, counted)
    return calls


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_sends_take_the_native_path_when_the_library_is_active(backend, mode, monkeypatch):
    # Same results on both paths (bit-exact weights, versions, acks); with the native
    # library, the protocol steps run in C++ and never in Python, first send included (the
    # slot's plan is built in Python, then the C++ call commits and publishes).
    calls = _count_python_protocol(monkeypatch)
    with in_process(2, mode=mode, background=True) as (trainer, sender, sides):
        assert sender.sync
        for v in range(1, 21):
            weights = randomize(TinyModel(), 100 + v)
            sender.send(weights)
            for side in sides:
                # A sync send returns once both background receivers applied it.
                assert side.scheme.weights_version == v
                assert_same_weights(side.model, weights)
        transport = sender._sender
        assert transport.version == 21  # the initial weights were transport version 1
        assert [transport.acked(w) for w in (0, 1)] == [21, 21]
    if backend == "native":
        assert calls == {"acquire_slot": 0, "commit_slot": 0, "publish": 0, "wait_acks": 0}
    else:
        # The initial weights are published at connect without waiting for acks.
        assert calls["acquire_slot"] == calls["publish"] == 21 and calls["wait_acks"] == 20


def test_native_send_without_a_free_slot_hands_over_to_python(native, monkeypatch):
    # The lagging-workers case above with too few slots (the default has enough), counting
    # who does what: the native call finds no free slot, changes nothing, and Python's
    # acquire_slot waits, then names who holds the slots.
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")
    calls = _count_python_protocol(monkeypatch)
    with in_process(3, mode="view", sync=False, slots=5, timeout=0.3) as (trainer, sender, sides):
        for w in range(3):
            sender.send(randomize(TinyModel(), 400 + w), worker_ids=[w])
            assert sides[w].scheme.receive() is not None
        sender.send(randomize(TinyModel(), 410), worker_ids=[0])  # not taken
        sender.send(randomize(TinyModel(), 411), worker_ids=[1])  # not taken
        assert calls["acquire_slot"] == 0
        version = sender._sender.version
        with pytest.raises(WeightSyncTimeout, match=r"no free slot among 5") as info:
            sender.send(randomize(TinyModel(), 412), worker_ids=[2])
        assert calls == {"acquire_slot": 1, "commit_slot": 0, "publish": 0, "wait_acks": 0}
        assert sorted(info.value.workers) == [0, 1, 2]
        assert sender._sender.version == version and sides[2].scheme.receive() is None
        # Once worker 0 takes its offer, its old slot is free and the native path sends again.
        assert sides[0].scheme.receive() is not None
        last = randomize(TinyModel(), 413)
        sender.send(last, worker_ids=[2])
        assert sides[2].scheme.receive() is not None
        assert_same_weights(sides[2].model, last)
        assert calls["acquire_slot"] == 1


def test_native_send_that_fails_to_write_publishes_nothing(native, monkeypatch):
    # A source re-viewed in place since the last send: the native call's plan refuses it, gives
    # the slot back and reports; Python's path then raises the typed error naming the key.
    # Nothing is published, and the next good send goes through natively.
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")
    calls = _count_python_protocol(monkeypatch)
    with in_process(1, mode="copy") as (trainer, sender, sides):
        sides[0].scheme.start_background()
        weights = TensorDict.from_module(randomize(TinyModel(), 20)).clone()
        for _ in range(3):  # every slot gets its plan for this TensorDict
            sender.send(weights)
        assert calls["acquire_slot"] == 0
        weight = weights["lin", "weight"].data
        arena = sender._sender._arenas[0].arena
        offer = arena.offer(0)
        version = sides[0].scheme.weights_version
        weights["lin", "weight"].data = weight.view(4, 3)
        with pytest.raises(ShapeMismatchError, match=r"key 'lin.weight': arena shape \[3, 4\], weights to send shape \[4, 3\]"):
            sender.send(weights)
        # The C++ plan refused it first; Python's path redid the send to raise the error.
        assert calls["acquire_slot"] == 1
        assert calls["publish"] == 0 and sides[0].scheme.weights_version == version
        # The offer is unchanged (already taken, so its slot could be reused for the write)
        # and no slot is left mid-write (odd sequence).
        assert arena.offer(0) == offer and arena.acked(0) == offer[0]
        assert all(arena.slot_seq(s) % 2 == 0 for s in range(arena.nslots))
        weights["lin", "weight"].data = weight
        before = dict(calls)
        sender.send(weights)
        assert calls == before and sides[0].scheme.weights_version == version + 1  # natively
        assert_same_weights(sides[0].model, {k: v for k, v in weights.flatten_keys(".").items()})


def test_a_backend_forced_later_applies_to_arenas_and_loops_built_after(native, monkeypatch):
    from weightsync.transports import shared_mem as transport
    from weightsync.transports.send_path import native_send_available

    def sender_paths() -> list[bool]:
        sender = transport.SharedMemSenderTransport([({"w": torch.ones(4)}, [0], torch.device("cpu"))])
        try:
            return [sa._native is not None for sa in sender._arenas]
        finally:
            sender.close()

    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")
    assert native_send_available() and native_loop_available() and sender_paths() == [True]
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "torch")
    assert not native_send_available() and not native_loop_available()
    assert sender_paths() == [False]
