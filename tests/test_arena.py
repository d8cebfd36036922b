"""The arena: layout and hash, header, slots, slot locks, offers, acks and liveness (one process).

Each worker end is its own Arena object with its own file descriptor, so the OFD locks behave
exactly as they do between processes.
"""

from __future__ import annotations

import fcntl
import threading
import time

import pytest
import torch
from _shm_workers import no_leaked_segments  # noqa: F401

from weightsync.errors import (
    DTypeMismatchError,
    KeyMismatchError,
    LayoutMismatchError,
    PeerDiedError,
    SchemeStateError,
    ShapeMismatchError,
    WeightSyncTimeout,
)
import weightsync.transports.arena as arena_mod
from weightsync.transports.arena import ALIGNMENT, Arena, Layout, _lock
from weightsync.transports.shm_segment import ShmSegment


def _named(**shapes) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}


LAYOUT = Layout.from_tensors(
    [
        ("a.weight", torch.zeros(3, 5)),
        ("a.bias", torch.zeros(3)),
        ("steps", torch.zeros(2, dtype=torch.int64)),
        ("empty", torch.zeros(0, 4)),
        ("half", torch.zeros(7, dtype=torch.float16)),
    ]
)


@pytest.fixture
def arena():
    a = Arena.create(LAYOUT, 3, 2)
    yield a
    a.close()


@pytest.fixture
def workers(arena):
    ends = []
    for w in range(2):
        end = Arena.attach(arena.name)
        end.join(w)
        ends.append(end)
    yield ends
    for end in ends:
        end.close()


def _write(arena: Arena, version: int, workers=(0, 1)) -> int:
    slot = arena.acquire_slot(1.0)
    arena.slot_bytes(slot).fill_(version)
    arena.commit_slot(slot, version)
    arena.publish(slot, version, workers)
    return slot


# -- layout -----------------------------------------------------------------------------------


def test_layout_offsets_are_aligned_and_disjoint():
    ends = [(e.offset, e.offset + e.nbytes) for e in LAYOUT.entries]
    assert all(e.offset % ALIGNMENT == 0 for e in LAYOUT.entries)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    assert [e.nbytes for e in LAYOUT.entries] == [60, 12, 16, 0, 14]
    assert LAYOUT.nbytes == LAYOUT.entries[-1].offset + 14


def test_layout_hash_is_stable_and_sensitive():
    same = Layout.from_tensors([(e.key, torch.empty(e.shape, dtype=e.dtype)) for e in LAYOUT.entries])
    assert same == LAYOUT and same.hash == LAYOUT.hash
    assert Layout.from_json(LAYOUT.to_json()) == LAYOUT
    base = _named(x=(2, 3), y=(4,))
    variants = [
        _named(x=(2, 3), z=(4,)),
        _named(x=(3, 2), y=(4,)),
        {"x": torch.zeros(2, 3, dtype=torch.float64), "y": torch.zeros(4)},
        {"y": torch.zeros(4), "x": torch.zeros(2, 3)},
    ]
    hashes = {Layout.from_tensors(v.items()).hash for v in variants}
    assert Layout.from_tensors(base.items()).hash not in hashes and len(hashes) == 4


def test_layout_match_names_the_key_and_both_values():
    layout = Layout.from_tensors(_named(x=(2, 3), y=(4,)).items())
    with pytest.raises(KeyMismatchError, match=r"worker model has no tensor 'y' \(float32\[4\]\)"):
        layout.match(_named(x=(2, 3)), theirs="worker model")
    with pytest.raises(KeyMismatchError, match=r"has tensor 'z' that the sender does not send"):
        layout.match(_named(x=(2, 3), y=(4,), z=(1,)), theirs="worker model")
    with pytest.raises(ShapeMismatchError, match=r"key 'x': sender shape \[2, 3\], worker model shape \[3, 2\]"):
        layout.match(_named(x=(3, 2), y=(4,)), theirs="worker model")
    with pytest.raises(DTypeMismatchError, match=r"key 'y': sender dtype float32, worker model dtype int32"):
        layout.match({"x": torch.zeros(2, 3), "y": torch.zeros(4, dtype=torch.int32)}, theirs="worker model")
    reordered = {"y": torch.ones(4), "x": torch.zeros(2, 3)}
    assert [t.shape for t in layout.match(reordered)] == [torch.Size([2, 3]), torch.Size([4])]


def test_layout_views_cover_the_slot():
    flat = torch.zeros(LAYOUT.nbytes, dtype=torch.uint8)
    views = LAYOUT.views(flat)
    assert [tuple(v.shape) for v in views] == [e.shape for e in LAYOUT.entries]
    views[2].fill_(-1)
    assert flat[LAYOUT.entries[2].offset : LAYOUT.entries[2].offset + 16].eq(255).all()


# -- header and attach ------------------------------------------------------------------------


def test_attach_reads_the_header(arena):
    end = Arena.attach(arena.name)
    try:
        assert end.layout == LAYOUT and end.nslots == 3 and end.nworkers == 2
        assert end.slot_stride % 4096 == 0 and end.slots_offset % 4096 == 0
        assert end.sender_pid == arena.sender_pid and end.sender_alive()
        assert end.offer(0) == (0, 0)
    finally:
        end.close()


def test_attach_refuses_a_segment_that_is_no_arena():
    with ShmSegment.create(4096) as seg, pytest.raises(LayoutMismatchError, match="not a weightsync arena"):
        Arena.attach(seg.name)


def test_arena_arguments_are_checked():
    with pytest.raises(ValueError, match="slots must be between 2 and 255"):
        Arena.create(LAYOUT, 1, 1)
    with pytest.raises(ValueError, match="at least one worker"):
        Arena.create(LAYOUT, 3, 0)


def test_join_is_exclusive_and_bounded(arena, workers):
    other = Arena.attach(arena.name)
    try:
        with pytest.raises(SchemeStateError, match="worker 1 of arena .* is already connected"):
            other.join(1)
        with pytest.raises(SchemeStateError, match=r"worker 2 \(index 2\) is not a worker of arena .* \(indices 0..1\)"):
            other.join(2)
        with pytest.raises(SchemeStateError, match="worker 7 of arena .* is already connected"):
            other.join(1, worker_id=7)  # messages use the scheme's id
        workers[1].close()
        other.join(1)  # the id is free again once its holder is gone
    finally:
        other.close()


# -- slots, offers, acks ------------------------------------------------------------------------


def test_publish_take_and_ack(arena, workers):
    slot = _write(arena, 1)
    for end in workers:
        assert end.open_offer(0) == (1, slot)
        assert torch.equal(end.slot_bytes(slot), torch.full((LAYOUT.nbytes,), 1, dtype=torch.uint8))
        end.release_slot(slot)
        end.ack(1)
        assert end.open_offer(1) is None
    arena.wait_acks([0, 1], 1, 1.0)
    assert [arena.acked(w) for w in (0, 1)] == [1, 1]


def test_subset_offers_leave_the_others_alone(arena, workers):
    s1 = _write(arena, 1)
    s2 = _write(arena, 2, workers=[1])
    assert workers[0].offer(0) == (1, s1)
    assert workers[1].offer(1) == (2, s2)
    # Slot s1 is still on offer to worker 0: the next write must not touch it.
    s3 = _write(arena, 3, workers=[1])
    assert s3 not in (s1, s2)
    assert torch.equal(arena.slot_bytes(s1), torch.full((LAYOUT.nbytes,), 1, dtype=torch.uint8))


def test_writer_skips_slots_being_read(arena, workers):
    s1 = _write(arena, 1)
    assert workers[0].open_offer(0) == (1, s1)  # worker 0 keeps a read lock on s1
    s2 = _write(arena, 2)
    s3 = _write(arena, 3)
    assert len({s1, s2, s3}) == 3
    # s1 is locked, s3 on offer: only s2 is free.
    assert _write(arena, 4) == s2
    workers[0].release_slot(s1)


def test_no_free_slot_times_out_naming_the_viewers(arena, workers):
    for w, end in enumerate(workers):
        s = _write(arena, w + 1)
        assert end.open_offer(0)[1] == s
        end.set_mapped(s)
    _write(arena, 3, workers=[0])  # on offer to worker 0, not taken: the last slot is busy too
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"no free slot among 3 .* viewed by workers \{0: \d, 1: \d\}") as info:
        arena.acquire_slot(0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert info.value.workers == [0, 1] and info.value.alive == {0: True, 1: True}


def test_reader_never_takes_a_rewritten_slot(arena, workers):
    s1 = _write(arena, 1, workers=[0])
    # Worker 0 saw offer (1, s1) ... the sender moves on and reuses s1 for a newer version.
    seen = workers[0].offer(0)
    _write(arena, 2, workers=[0])
    _write(arena, 3, workers=[1])
    _write(arena, 4, workers=[1])
    assert seen == (1, s1) and arena.slot_version(s1) != 1
    got = workers[0].open_offer(0)
    assert got is not None and got[0] == 2  # the current offer, never stale slot contents
    workers[0].release_slot(got[1])


def test_a_slot_being_written_cannot_be_locked(arena, workers):
    slot = arena.acquire_slot(1.0)
    assert arena.slot_seq(slot) % 2 == 1
    fd = workers[0].segment.fd
    assert not _lock(fd, slot, fcntl.F_RDLCK)
    arena.commit_slot(slot, 5)
    assert arena.slot_seq(slot) % 2 == 0 and arena.slot_version(slot) == 5
    assert _lock(fd, slot, fcntl.F_RDLCK)
    workers[0].release_slot(slot)


def test_wait_acks_times_out_naming_the_laggard(arena, workers):
    _write(arena, 1)
    workers[0].ack(1)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"workers \[1\] did not acknowledge version 1 within 0.2 s: worker 1 \(pid \d+, alive") as info:
        arena.wait_acks([0, 1], 1, 0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert info.value.workers == [1] and info.value.alive == {1: True}


def test_wait_acks_gives_up_early_on_a_dead_worker(arena, workers):
    _write(arena, 1)
    workers[1].close()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="dead or disconnected") as info:
        arena.wait_acks([1], 1, 30.0)
    assert time.monotonic() - t0 < 5
    assert info.value.alive == {1: False}
    assert not arena.worker_alive(1) and arena.worker_alive(0)


def test_wait_acks_uses_scheme_ids(arena, workers):
    arena.worker_ids = [7, 9]
    _write(arena, 1)
    with pytest.raises(WeightSyncTimeout, match=r"workers \[7, 9\] .* worker 7 \(pid") as info:
        arena.wait_acks([0, 1], 1, 0.05)
    assert info.value.workers == [7, 9]


def test_ack_wakes_a_sleeping_sender_and_only_then(arena, workers, monkeypatch):
    # A lost wake would leave the sender asleep until the liveness period: make that period
    # long, so the test fails by timing out instead of passing slowly.
    monkeypatch.setattr(arena_mod, "_LIVENESS_PERIOD", 30.0)
    end = workers[0]
    wakes = []
    real_wake = end._wake
    monkeypatch.setattr(end, "_wake", lambda word: wakes.append(word) or real_wake(word))
    _write(arena, 1, workers=(0,))
    end.ack(1)  # nobody waits yet: no wake syscall
    assert wakes == []
    arena.wait_acks([0], 1, 1.0)

    _write(arena, 2, workers=(0,))
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (arena.wait_acks([0], 2, 20.0), done.set()))
    waiter.start()
    deadline = time.monotonic() + 5.0
    while not arena._q[arena_mod._H_ACK_SLEEPING // 8] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert arena._q[arena_mod._H_ACK_SLEEPING // 8] == 1, "the sender never went to sleep"
    end.ack(2)
    assert done.wait(5.0), "the ack did not wake the sleeping sender"
    waiter.join()
    assert len(wakes) == 1 and arena._q[arena_mod._H_ACK_SLEEPING // 8] == 0


def test_wait_offer_wakes_on_publish(arena, workers):
    assert workers[0].wait_offer(0, 0.05) is False
    _write(arena, 1)
    assert workers[0].wait_offer(0, 0.05) is True


def test_sender_shutdown_and_death_are_seen(arena, workers):
    _write(arena, 1)
    arena.close()
    # An offer made before the sender left can still be taken...
    assert workers[0].wait_offer(0, 0.1) is True
    # ...but waiting for anything newer says the sender is gone.
    with pytest.raises(PeerDiedError, match=r"the sender of arena .* \(pid \d+\) shut down"):
        workers[0].wait_offer(1, 5.0)
    assert not workers[1].sender_alive()
