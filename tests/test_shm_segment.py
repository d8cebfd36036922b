"""Shared-memory segments: naming, permissions, attach, and removal in every way a sender ends."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import re
import signal
import stat
import time

import pytest
import torch
from _shm_workers import JOIN_TIMEOUT, no_leaked_segments, segment_owner, segment_reader  # noqa: F401

from weightsync.errors import PeerDiedError, WeightSyncError
from weightsync.transports.shm_segment import SHM_DIR, ShmSegment, list_segments

CTX = mp.get_context("spawn")


def _wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_create_names_modes_and_sizes():
    with ShmSegment.create(5000) as seg:
        assert re.fullmatch(r"weightsync-[0-9a-f]{32}", seg.name)
        st = os.stat(seg.path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert seg.size == st.st_size == 8192  # whole pages
        assert seg.tensor.dtype == torch.uint8 and seg.tensor.numel() == 8192
        assert seg.name in list_segments()
    assert not os.path.exists(seg.path)


def test_names_are_unique():
    segs = [ShmSegment.create(1) for _ in range(8)]
    try:
        assert len({s.name for s in segs}) == 8
    finally:
        for s in segs:
            s.close()


def test_attach_shares_memory_and_never_unlinks():
    owner = ShmSegment.create(4096)
    try:
        reader = ShmSegment.attach(owner.name)
        owner.tensor[:16] = torch.arange(16, dtype=torch.uint8)
        assert torch.equal(reader.tensor[:16], torch.arange(16, dtype=torch.uint8))
        reader.tensor[100] = 7
        assert int(owner.tensor[100]) == 7
        assert not reader.owner
        reader.unlink()
        reader.close()
        assert os.path.exists(owner.path)
    finally:
        owner.close()


def test_attach_errors():
    with pytest.raises(ValueError, match="not a weightsync segment name"):
        ShmSegment.attach("../etc/passwd")
    with pytest.raises(PeerDiedError, match="does not exist"):
        ShmSegment.attach("weightsync-" + "0" * 32)


def test_attach_refuses_a_segment_others_could_read():
    with ShmSegment.create(4096) as seg:
        os.chmod(seg.path, 0o644)
        with pytest.raises(WeightSyncError, match="mode 644, expected uid .* mode 600"):
            ShmSegment.attach(seg.name)


def test_close_with_live_views_keeps_them_valid():
    seg = ShmSegment.create(4096)
    view = seg.tensor[8:16].view(torch.float32)
    view.fill_(2.5)
    seg.close()
    assert seg.closed and not os.path.exists(seg.path)
    assert torch.equal(view, torch.full((2,), 2.5))  # mapping lives as long as the view
    seg.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        seg.tensor


def test_segments_do_not_pickle():
    with ShmSegment.create(1) as seg, pytest.raises(TypeError, match="attach"):
        pickle.dumps(seg)


def test_owner_exit_without_close_removes_the_name():
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=segment_owner, args=(child, 4096, 3, True))
    proc.start()
    assert parent.poll(JOIN_TIMEOUT)
    name = parent.recv()
    proc.join(JOIN_TIMEOUT)
    assert proc.exitcode == 0
    assert _wait_gone(os.path.join(SHM_DIR, name))


def test_owner_killed_removes_the_name_and_readers_keep_their_mapping():
    parent, child = CTX.Pipe()
    owner = CTX.Process(target=segment_owner, args=(child, 4096, 9, False))
    owner.start()
    assert parent.poll(JOIN_TIMEOUT)
    name = parent.recv()
    rparent, rchild = CTX.Pipe()
    reader = CTX.Process(target=segment_reader, args=(rchild, name))
    reader.start()
    try:
        assert rparent.poll(JOIN_TIMEOUT) and rparent.recv() == 9
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(JOIN_TIMEOUT)
        assert owner.exitcode == -signal.SIGKILL
        # The owner's reaper removes the name as soon as the owner is gone...
        assert _wait_gone(os.path.join(SHM_DIR, name))
        # ...and the reader still reads the memory it mapped.
        rparent.send("again")
        assert rparent.poll(JOIN_TIMEOUT) and rparent.recv() == 9
        reader.join(JOIN_TIMEOUT)
        assert reader.exitcode == 0
    finally:
        for p in (owner, reader):
            if p.is_alive():
                p.kill()
                p.join(JOIN_TIMEOUT)
