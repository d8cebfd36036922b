"""futex_wait / futex_wake, native (futex(2)) and fallback (polling), within and across processes."""

from __future__ import annotations

import mmap
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from weightsync.engine import futex_wait, futex_wake, native_futex
from weightsync.errors import InvalidArgumentError

import _futex_workers


def test_wait_times_out_when_nobody_writes(backend):
    word = torch.zeros(1, dtype=torch.int32)
    start = time.monotonic()
    assert futex_wait(word, 0, 0.1) is False
    assert time.monotonic() - start >= 0.09
    assert native_futex() == (backend == "native")


def test_wait_returns_at_once_when_value_differs(backend):
    word = torch.full((1,), 5, dtype=torch.int32)
    start = time.monotonic()
    assert futex_wait(word, 4, 5.0) is True
    assert time.monotonic() - start < 1.0


def test_wake_from_another_thread(backend):
    word = torch.zeros(1, dtype=torch.int32)

    def writer():
        time.sleep(0.05)
        word.fill_(1)
        futex_wake(word)

    thread = threading.Thread(target=writer)
    thread.start()
    start = time.monotonic()
    assert futex_wait(word, 0, 10.0) is True
    assert time.monotonic() - start < 5.0
    thread.join(timeout=10)


def test_wake_across_processes(backend, tmp_path):
    path = tmp_path / "word"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 4096)
    word = torch.frombuffer(buf, dtype=torch.int32, count=1)
    proc = mp.get_context("spawn").Process(target=_futex_workers.bump_after,
                                           args=(str(path), 0.1, backend))
    proc.start()
    try:
        assert futex_wait(word, 0, 30.0) is True
        assert int(word.item()) == 1
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    del word
    buf.close()


def test_word_must_be_one_int32_on_cpu():
    with pytest.raises(InvalidArgumentError, match="1-element int32 CPU tensor"):
        futex_wait(torch.zeros(2, dtype=torch.int32), 0, 0.01)
    with pytest.raises(InvalidArgumentError, match="1-element int32 CPU tensor"):
        futex_wake(torch.zeros(1, dtype=torch.int64))


def test_spin_sees_a_change_without_a_wake_and_never_extends_the_timeout(backend):
    if backend != "native":
        pytest.skip("the spin is part of the native wait")
    word = torch.zeros(1, dtype=torch.int32)
    thread = threading.Thread(target=lambda: (time.sleep(0.02), word.fill_(1)))  # no wake
    thread.start()
    assert futex_wait(word, 0, 10.0, spin=2.0) is True
    thread.join(timeout=10)
    word.fill_(0)
    start = time.monotonic()
    assert futex_wait(word, 0, 0.1, spin=5.0) is False
    assert 0.09 <= time.monotonic() - start < 2.0
