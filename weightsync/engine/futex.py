"""Waiting on a 32-bit word in shared memory, across processes.

Native: futex(2) through the library's ``futex_wait`` / ``futex_wake`` ops (the waiter sleeps
in the kernel and wakes as soon as the word changes). Fallback: polling with a backoff that
starts at 20 us and caps at 1 ms, so a wait reacts quickly without spinning a core.
"""

from __future__ import annotations

import time

import torch

from weightsync.engine.backends import native_library_active
from weightsync.errors import InvalidArgumentError

__all__ = ["futex_wait", "futex_wake", "native_futex"]

_MIN_SLEEP = 20e-6
_MAX_SLEEP = 1e-3
_INT32_MAX = 2**31 - 1


def native_futex() -> bool:
    """Whether waits use futex(2) (library loaded, torch backend not forced) or polling."""
    return native_library_active()


def _check(word: torch.Tensor, op: str) -> None:
    if not isinstance(word, torch.Tensor) or word.dtype != torch.int32 or word.numel() != 1 \
            or word.device.type != "cpu":
        raise InvalidArgumentError(f"weightsync[argument]: {op}: word must be a 1-element int32 "
                                   f"CPU tensor, got {word!r:.80}")


def futex_wait(word: torch.Tensor, expected: int, timeout: float, spin: float = 0.0) -> bool:
    """Block while ``word`` holds ``expected``, for at most ``timeout`` seconds.

    ``spin`` (native only): first poll the word for that many seconds, yielding the core,
    before sleeping; an answer that comes within it costs no sleep and wake-up.

    Returns True when the word changed (or a wake arrived), False on timeout.
    """
    _check(word, "futex_wait")
    if native_futex():
        return bool(torch.ops.weightsync.futex_wait(word, int(expected), float(timeout),
                                                    float(spin)))
    deadline = time.monotonic() + timeout
    sleep = _MIN_SLEEP
    while int(word.item()) == expected:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(sleep, left))
        sleep = min(sleep * 2, _MAX_SLEEP)
    return True


def futex_wake(word: torch.Tensor, count: int = _INT32_MAX) -> int:
    """Wake up to ``count`` waiters on ``word``; returns how many woke (0 when polling)."""
    _check(word, "futex_wake")
    if native_futex():
        return int(torch.ops.weightsync.futex_wake(word, int(count)))
    return 0
