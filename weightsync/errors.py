"""The typed errors of weightsync.

Everything we raise on purpose derives from :class:`WeightSyncError`, so callers can catch
one type. Each subclass also derives from the builtin exception a generic caller would expect
(``ValueError`` for bad input, ``TimeoutError`` for timeouts, ...), so code written against
TorchRL's plain exceptions keeps working.

Messages name the offending key, index, worker or device and both the expected and the actual
value. Every check runs before the first byte is written: when one of these is raised by an
update, every destination is exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "WeightSyncError",
    "LayoutMismatchError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "DeviceMismatchError",
    "AliasingError",
    "InvalidArgumentError",
    "UnsupportedWeightsError",
    "UnknownBackendError",
    "UnknownWorkerError",
    "BackendUnavailableError",
    "WeightSyncTimeout",
    "PeerDiedError",
    "SchemeStateError",
]


class WeightSyncError(Exception):
    """Base class of every error weightsync raises on purpose."""


class LayoutMismatchError(WeightSyncError, ValueError):
    """Two weight layouts (sender and receiver, or dst and src lists) do not match."""


class KeyMismatchError(LayoutMismatchError, KeyError):
    """A key is missing on one side or present only on the other."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LayoutMismatchError):
    """The same key or index has different shapes on the two sides."""


class DTypeMismatchError(LayoutMismatchError, TypeError):
    """The same key or index has different dtypes on the two sides."""


class DeviceMismatchError(LayoutMismatchError):
    """A tensor is on a device the operation does not accept."""


class AliasingError(WeightSyncError, ValueError):
    """A destination overlaps another destination or a source."""


class InvalidArgumentError(WeightSyncError, ValueError):
    """An argument is malformed (wrong kind of tensor, negative offset, out of bounds, ...)."""


class UnsupportedWeightsError(InvalidArgumentError, TypeError):
    """Weights, a source or a destination of a type the strategy does not handle."""


class UnknownBackendError(InvalidArgumentError):
    """A scheme backend name that is neither registered nor an alias."""


class UnknownWorkerError(InvalidArgumentError):
    """A worker id that has no transport (scheme) or no weights (updater)."""


class BackendUnavailableError(WeightSyncError, RuntimeError):
    """A requested backend cannot be used here; the message says why."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A wait ran out of time. ``workers`` names who did not answer.

    Args:
        message: what was waited for.
        workers: the worker ids that did not answer, in order.
        alive: for each such worker, whether its process is still alive (``None`` if unknown).
    """

    def __init__(
        self,
        message: str,
        workers: Iterable[int] = (),
        alive: Mapping[int, bool | None] | None = None,
    ) -> None:
        self.workers = list(workers)
        self.alive = dict(alive or {})
        super().__init__(message)


class PeerDiedError(WeightSyncError, RuntimeError):
    """The process on the other end (sender or worker) is gone."""


class SchemeStateError(WeightSyncError, RuntimeError):
    """A scheme method was called in the wrong phase of its lifecycle."""
