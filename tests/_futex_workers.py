"""Entry points of processes spawned by test_futex.py (must be importable by the child)."""

from __future__ import annotations

import mmap
import os
import time

import torch


def bump_after(path: str, delay: float, backend: str) -> None:
    os.environ["WEIGHTSYNC_BACKEND"] = backend
    from weightsync.engine import futex_wake

    with open(path, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 4096)
    word = torch.frombuffer(buf, dtype=torch.int32, count=1)
    time.sleep(delay)
    word.fill_(1)
    futex_wake(word)
    del word
    buf.close()
