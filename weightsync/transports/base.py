"""The data-plane protocol every transport implements, and the no-op transport.

A transport moves one model's weights between the sender and one receiver (or all receivers,
for a shared transport). Schemes own transports and drive them; users rarely touch them.

- :class:`TransportBackend`: ``send_weights`` on the sender, ``receive_weights`` on the
  receiver (which also applies what it received, given the model and the strategy).
- :class:`InitialSyncTransport`: the optional first rendez-vous of both ends, run once by
  :meth:`WeightSyncScheme.connect`.

The method names and keyword arguments are TorchRL's (``torchrl.weight_update``), so a
transport written for TorchRL plugs into a weightsync scheme and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from weightsync.strategy import WeightStrategy

__all__ = ["TransportBackend", "InitialSyncTransport", "NoOpTransport"]


@runtime_checkable
class TransportBackend(Protocol):
    """What a scheme needs from a transport to move weights."""

    def send_weights(self, weights: Any) -> None:
        """Make ``weights`` available to the receiver(s) of this transport."""
        ...

    def receive_weights(
        self,
        timeout: float | None = None,
        *,
        weights: Any = None,
        model: Any = None,
        strategy: WeightStrategy | None = None,
    ) -> Any | None:
        """Take the next weights, if any, and apply them to ``model`` with ``strategy``.

        Args:
            timeout: seconds to wait for new weights; ``None`` lets the transport choose its
                default wait. Waits always end: a transport that would block forever raises
                :class:`~weightsync.errors.WeightSyncTimeout` instead.
            weights: a preallocated buffer to receive into, when the transport uses one.
            model: the model the weights are applied to.
            strategy: how to apply them.

        Returns:
            The weights that were applied, or ``None`` when nothing new arrived in time.
        """
        ...


@runtime_checkable
class InitialSyncTransport(Protocol):
    """Transports that need a first rendez-vous of both ends before any send."""

    def setup_connection_and_weights_on_sender(self) -> None:
        """Sender half of the first rendez-vous (e.g. publish a layout, send initial weights)."""
        ...

    def setup_connection_and_weights_on_receiver(
        self,
        *,
        worker_idx: int | None,
        weights: Any = None,
        model: Any = None,
        strategy: WeightStrategy | None = None,
    ) -> Any:
        """Receiver half of the first rendez-vous.

        Returns:
            Initial weights for the scheme to apply to its model, or ``None`` when the
            transport applied them itself (or has none to give).
        """
        ...


class NoOpTransport:
    """A transport that moves nothing; used by :class:`~weightsync.NoWeightSyncScheme`.

    Defined at module level (not inside a method) so schemes holding one still pickle.
    """

    def send_weights(self, weights: Any) -> None:
        """Discard ``weights``."""

    def receive_weights(
        self,
        timeout: float | None = None,
        *,
        weights: Any = None,
        model: Any = None,
        strategy: WeightStrategy | None = None,
    ) -> Any | None:
        """Return ``None`` at once: nothing ever arrives."""
        return None

    def check_connection(self) -> bool:
        """Always connected."""
        return True

    def setup_connection_and_weights_on_sender(self) -> None:
        """Nothing to set up."""

    def setup_connection_and_weights_on_receiver(
        self,
        *,
        worker_idx: int | None,
        weights: Any = None,
        model: Any = None,
        strategy: WeightStrategy | None = None,
    ) -> Any:
        """Nothing to set up; no initial weights."""
        return None

    def __repr__(self) -> str:
        return "NoOpTransport()"
