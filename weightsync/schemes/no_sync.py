"""The no-op scheme: weight synchronisation switched off.

Useful where an API requires a scheme but the workers must keep their own weights (a frozen
policy, a test). Every call is accepted and moves nothing; ``apply_weights`` on a receiver
still applies weights given to it explicitly.
"""

from __future__ import annotations

from typing import Any, Literal

from weightsync.schemes.base import WeightSyncScheme
from weightsync.strategy import WeightStrategy
from weightsync.transports.base import NoOpTransport, TransportBackend

__all__ = ["NoWeightSyncScheme"]


class NoWeightSyncScheme(WeightSyncScheme):
    """A scheme that keeps every worker's weights as they are.

    ``send``, ``receive`` and ``connect`` move nothing (``version`` does not change on their
    account); explicit ``apply_weights`` calls on a receiver still apply.

    Args:
        strategy: the weight format used by ``apply_weights`` and ``weights``
            (``"tensordict"`` or ``"state_dict"``).
    """

    def __init__(
        self, strategy: Literal["state_dict", "tensordict"] | WeightStrategy = "tensordict"
    ) -> None:
        super().__init__(strategy)

    def _init_on_sender_impl(self, model_id: str | None = None, context: Any = None,
                             **kwargs: Any) -> None:
        """Record the model id, the context and a ``model=`` if given; nothing else is needed."""
        self._model_id = model_id
        self.context = context
        if kwargs.get("model") is not None:
            self.model = kwargs["model"]

    def _init_on_receiver_impl(self, *, model_id: str, context: Any = None, **kwargs: Any) -> None:
        """Record the model id, the context, and ``model=`` / ``worker_idx=`` if given."""
        self._model_id = model_id
        self.context = context
        if kwargs.get("model") is not None:
            self.model = kwargs["model"]
        if kwargs.get("worker_idx") is not None:
            self._worker_idx = kwargs["worker_idx"]

    def create_transport(self, **kwargs: Any) -> TransportBackend:
        """A :class:`~weightsync.transports.NoOpTransport`; options are ignored."""
        return NoOpTransport()

    def connect(self, *, worker_idx: int | None = None) -> None:
        """Move nothing; mark the initialised side as connected (recording ``worker_idx`` on
        a receiver) so code that checks ``synchronized_on_*`` sees a connected scheme."""
        if self._initialized_on_sender:
            self._synchronized_on_sender = True
        elif self._initialized_on_receiver:
            if worker_idx is not None:
                self._worker_idx = worker_idx
            self._synchronized_on_receiver = True

    def send(self, weights: Any = None, worker_ids: int | list[int] | None = None) -> None:
        """Accept and drop the weights, in any phase."""

    def receive(self, timeout: float | None = None) -> None:
        """Return ``None`` at once: nothing is ever received."""
        return None
