"""The abstract weight-sync scheme: how ONE model travels from a sender to its receivers.

A scheme object serves one side. The trainer (sender) and each worker (receiver) hold their
own copy; pickling a scheme into a worker gives it a fresh, uninitialised copy.

Lifecycle::

    sender:    init_on_sender(...) -> connect() -> send(weights) ... -> shutdown()
    receiver:  init_on_receiver(model_id=..., context=... | model=...)
               -> connect(worker_idx=i) -> receive() at each safe point ... -> shutdown()

Public calls check the phase first and raise :class:`~weightsync.errors.SchemeStateError`
when called out of order (``send`` before ``connect``, anything after ``shutdown``, ...).

Versions: ``scheme.version`` counts, on the sender, the ``send`` calls that completed; on a
receiver, the weight versions it applied (``receive`` calls that returned weights plus
``apply_weights`` calls). Version 0 is what was in place after ``connect``.

Writing a scheme
----------------
Subclasses override small hooks; the public methods keep the phase checks, argument
normalisation and version counting. Hooks (``*`` = must be implemented):

- ``create_transport(**kwargs)`` *: a new transport (see :mod:`weightsync.transports`).
- ``_init_on_sender_impl(*args, **kwargs)`` (*): record what ``send`` needs; register
  transports with :meth:`_register_worker_sender` or set :attr:`shared_transport`.
- ``_init_on_receiver_impl(*, model_id, context=None, **kwargs)`` (*): record the model
  (``self.model = ...`` or through ``context``) and the receiver transport
  (:meth:`_register_transport_receiver`).

(*): needed for that side unless the scheme overrides ``init_on_sender`` /
``init_on_receiver`` themselves, as schemes written for TorchRL may; only
``create_transport`` is abstract, as in TorchRL. Called without an implementation they raise
``NotImplementedError`` and leave the scheme uninitialised.
- ``_setup_connection_and_weights_on_sender_impl(*, weights=None)``: first rendez-vous on the
  sender; by default runs each transport's ``setup_connection_and_weights_on_sender``.
- ``_setup_connection_and_weights_on_receiver_impl(*, worker_idx=None)``: the receiver half;
  by default runs the transport's and applies the initial weights it returns.
- ``_send_impl(weights, worker_ids, version)``: deliver prepared weights as ``version``; by
  default ``send_weights`` on each selected transport. Raise to leave ``version`` unchanged.
- ``_receive_impl(timeout)``: take and apply the next weights (with ``self.strategy``, never
  through ``self.apply_weights``, which would count the version twice); return them, or
  ``None`` when nothing new arrived. By default the transport's ``receive_weights``.
- ``_after_receive(weights)``: runs after a receive that applied weights; by default tells
  the context (``context.update_policy_weights_``), as TorchRL does.
- ``_wait_for_update(timeout, stop)``: how the optional background receiver waits.
- ``_shutdown_impl()``: release resources; runs once.
- ``__getstate__``: extend (call ``super()``) to drop more state that cannot cross processes.
  The base already drops weak references, threads, events and locks it finds in the
  instance's ``__dict__``, and resets the phase flags and the version.
"""

from __future__ import annotations

import abc
import atexit
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

from tensordict import TensorDictBase
from torch import nn

from weightsync._torchrl_compat import register_with_torchrl
from weightsync.errors import (
    UnknownWorkerError,
    InvalidArgumentError,
    SchemeStateError,
    WeightSyncTimeout,
)
from weightsync.schemes.registry import WeightSyncBackend, resolve_backend
from weightsync.strategy import UnsupportedWeightsError, WeightStrategy
from weightsync.transports.base import InitialSyncTransport, TransportBackend

__all__ = ["WeightSyncScheme", "UnknownWorkerError", "resolve_attr"]

# How long shutdown() waits for the background receiver thread to notice the stop event.
_BACKGROUND_JOIN_TIMEOUT_S = 5.0

# Schemes whose background receiver runs. At interpreter exit a daemon thread that comes back
# from native code (a futex wait) is ended by a forced unwind through C++ frames that may not
# unwind, which aborts the process ("terminate called without an active exception"). TorchRL's
# collector workers exit without shutting their schemes down, so the receivers are stopped
# here, before the interpreter starts tearing down threads.
_RUNNING_RECEIVERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_receivers_at_exit() -> None:
    for scheme in list(_RUNNING_RECEIVERS):
        try:
            scheme._stop_background_receiver()
        except Exception as exc:  # exiting anyway: say so, do not mask the exit status
            warnings.warn(f"weightsync: at exit: {exc}", RuntimeWarning, stacklevel=1)


_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_UNPICKLABLE_RUNTIME = (weakref.ReferenceType, threading.Thread, threading.Event,
                        threading.Condition, *_LOCK_TYPES)


class _StrongRef:
    """Stands in for a weak reference to an object that cannot be weakly referenced."""

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __call__(self) -> Any:
        return self._obj


def _ref(obj: Any) -> weakref.ReferenceType | _StrongRef | None:
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return _StrongRef(obj)


_PATH_TOKEN = re.compile(r"""\.?([A-Za-z_]\w*)|\[(-?\d+)\]|\[(['"])(.*?)\3\]""")


def resolve_attr(context: Any, path: str) -> Any:
    """The object at ``path`` from ``context``: ``"policy"``, ``"env.transform[0]"``,
    ``"_receiver_schemes['policy']"``.

    Raises:
        AttributeError / KeyError / IndexError: a step of the path does not exist.
        InvalidArgumentError: ``path`` is not such an expression.
    """
    obj = context
    pos = 0
    while pos < len(path):
        match = _PATH_TOKEN.match(path, pos)
        if match is None or (pos == 0 and path.startswith(".")):
            raise InvalidArgumentError(
                f"cannot parse model path {path!r} at character {pos} ({path[pos:]!r})"
            )
        name, index, _, key = match.groups()
        if name is not None:
            obj = getattr(obj, name)
        elif index is not None:
            obj = obj[int(index)]
        else:
            obj = obj[key]
        pos = match.end()
    return obj


class _SharedTransportView(Mapping):
    """``sender_transports`` of a scheme with one transport shared by every worker."""

    def __init__(self, transport: TransportBackend) -> None:
        self._transport = transport

    def __getitem__(self, worker_idx: int) -> TransportBackend:
        if not isinstance(worker_idx, int):
            raise KeyError(worker_idx)
        return self._transport

    def __contains__(self, worker_idx: object) -> bool:
        return isinstance(worker_idx, int)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _worker_list(worker_ids: int | list[int] | tuple[int, ...] | None) -> list[int] | None:
    if worker_ids is None:
        return None
    if isinstance(worker_ids, bool) or not isinstance(worker_ids, (int, list, tuple)):
        raise InvalidArgumentError(
            f"worker_ids must be an int, a list of ints or None, got {worker_ids!r}"
        )
    ids = [worker_ids] if isinstance(worker_ids, int) else list(worker_ids)
    for w in ids:
        if isinstance(w, bool) or not isinstance(w, int):
            raise InvalidArgumentError(f"worker_ids: {w!r} is not an int (in {worker_ids!r})")
    return ids


def _prepare(weights: Any, model_id: str | None, extract: Callable[[Any], Any],
             context: Any) -> Any:
    """:meth:`WeightSyncScheme.prepare_weights`, extracting a module's weights with
    ``extract``."""
    if weights is None:
        if context is None or model_id is None:
            return None
        try:
            model = resolve_attr(context, model_id)
        except (AttributeError, KeyError, IndexError, TypeError):
            return None
        return None if model is None else extract(model)
    if isinstance(weights, nn.Module):
        return extract(weights)
    if isinstance(weights, str):
        if context is None:
            raise InvalidArgumentError(
                f"cannot resolve the model path {weights!r}: the scheme has no context"
            )
        return extract(resolve_attr(context, weights))
    if isinstance(weights, (TensorDictBase, Mapping)):
        return weights
    raise UnsupportedWeightsError(
        f"cannot send weights of type {type(weights).__name__}; expected an nn.Module, a "
        "TensorDict, a dict of tensors, a model path or None"
    )


class WeightSyncScheme(abc.ABC):
    """How one model's weights are synchronised from a sender to its receivers.

    Args:
        strategy: the weight format, ``"tensordict"`` (default) or ``"state_dict"``, or a
            :class:`~weightsync.WeightStrategy`.

    See the module documentation for the lifecycle, the versions and the subclass hooks.
    """

    def __init__(
        self, strategy: Literal["state_dict", "tensordict"] | WeightStrategy = "tensordict"
    ) -> None:
        if isinstance(strategy, WeightStrategy):
            self._strategy = strategy
        else:
            self._strategy = WeightStrategy(strategy)
        self.strategy_str: str = self._strategy.extract_as
        self._model_id: str | None = None
        self._worker_idx: int | None = None
        self._context_ref: weakref.ReferenceType | _StrongRef | None = None
        self._model_ref: weakref.ReferenceType | _StrongRef | None = None
        self._weights: Any = None
        self._sender_transports: dict[int, TransportBackend] | None = None
        self._receiver_transport: TransportBackend | None = None
        self._shared_transport: TransportBackend | None = None
        self._initialized_on_sender = False
        self._initialized_on_receiver = False
        self._synchronized_on_sender = False
        self._synchronized_on_receiver = False
        self._version = 0
        self._is_shutdown = False
        self._background_thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self._background_error: BaseException | None = None

    def __repr__(self) -> str:
        side = ("sender" if self._initialized_on_sender
                else "receiver" if self._initialized_on_receiver else "uninitialised")
        return (f"{type(self).__name__}(model_id={self._model_id!r}, side={side}, "
                f"version={self._version}, strategy={self.strategy_str!r})")

    # -- registry ------------------------------------------------------------------------------

    @classmethod
    def from_backend(cls, backend: WeightSyncBackend | str, **kwargs: Any) -> WeightSyncScheme:
        """The scheme for a deployment backend.

        Args:
            backend: ``"none"`` (alias ``"direct"``), ``"shared"`` (``"thread"``), ``"process"``
                (``"multiprocessing"``) or ``"distributed"``.
            **kwargs: passed to the scheme's constructor.

        Raises:
            UnknownBackendError: an unknown name, or TorchRL's ``"rpc"`` / ``"ray"``, which
                weightsync does not provide (a ``ValueError``); the message lists the choices.
            BackendUnavailableError: the backend cannot be used here; the message says why.
        """
        return resolve_backend(backend)(**kwargs)

    # -- state ---------------------------------------------------------------------------------

    @property
    def strategy(self) -> WeightStrategy:
        """How weights are extracted and applied."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: WeightStrategy) -> None:
        if not isinstance(value, WeightStrategy):
            raise InvalidArgumentError(
                f"strategy must be a WeightStrategy, got {type(value).__name__}"
            )
        self._strategy = value
        self.strategy_str = value.extract_as

    @property
    def initialized_on_sender(self) -> bool:
        """Whether :meth:`init_on_sender` completed."""
        return self._initialized_on_sender

    @property
    def initialized_on_receiver(self) -> bool:
        """Whether :meth:`init_on_receiver` completed."""
        return self._initialized_on_receiver

    @property
    def synchronized_on_sender(self) -> bool:
        """Whether :meth:`connect` completed on the sender."""
        return self._synchronized_on_sender

    @synchronized_on_sender.setter
    def synchronized_on_sender(self, value: bool) -> None:
        self._synchronized_on_sender = bool(value)

    @property
    def synchronized_on_receiver(self) -> bool:
        """Whether :meth:`connect` completed on the receiver."""
        return self._synchronized_on_receiver

    @synchronized_on_receiver.setter
    def synchronized_on_receiver(self, value: bool) -> None:
        self._synchronized_on_receiver = bool(value)

    @property
    def is_shutdown(self) -> bool:
        """Whether :meth:`shutdown` ran."""
        return self._is_shutdown

    @property
    def version(self) -> int:
        """Sender: completed ``send`` calls. Receiver: weight versions applied since connect."""
        return self._version

    @property
    def context(self) -> Any | None:
        """The context object (e.g. the collector), if one is set and still alive."""
        return self._context_ref() if self._context_ref is not None else None

    @context.setter
    def context(self, context: Any) -> None:
        self._context_ref = _ref(context)

    @property
    def model_id(self) -> str | None:
        """The model's name (also its attribute path in the context), if set."""
        return self._model_id

    @model_id.setter
    def model_id(self, model_id: str | None) -> None:
        self._model_id = model_id

    @property
    def worker_idx(self) -> int | None:
        """This receiver's worker index, if set (always ``None`` on the sender)."""
        return self._worker_idx

    @worker_idx.setter
    def worker_idx(self, worker_idx: int | None) -> None:
        if self._initialized_on_sender and worker_idx is not None:
            raise SchemeStateError(
                f"cannot set worker_idx={worker_idx} on a scheme initialised as a sender"
            )
        self._worker_idx = worker_idx

    @property
    def model(self) -> Any | None:
        """The model weights are applied to, if available.

        Set directly (held weakly) or found in the context at the path ``model_id``.
        """
        if self._model_ref is not None:
            return self._model_ref()
        context = self.context
        if context is None or self._model_id is None:
            return None
        try:
            model = resolve_attr(context, self._model_id)
        except (AttributeError, KeyError, IndexError, TypeError, InvalidArgumentError):
            return None
        if model is not None:
            self._model_ref = _ref(model)
        return model

    @model.setter
    def model(self, model: Any) -> None:
        self._model_ref = _ref(model)

    @property
    def weights(self) -> Any | None:
        """The weights set on the scheme, else those extracted from :attr:`model`, else None."""
        if self._weights is not None:
            return self._weights
        model = self.model
        if model is not None:
            return self._strategy.extract_weights(model)
        return None

    @weights.setter
    def weights(self, value: Any) -> None:
        self._weights = value

    # -- transports ----------------------------------------------------------------------------

    @abc.abstractmethod
    def create_transport(self, **kwargs: Any) -> TransportBackend:
        """A new transport for this scheme (what the ``init_on_*`` hooks register)."""

    @property
    def sender_transports(self) -> Mapping[int, TransportBackend]:
        """Read-only map of worker index to transport on the sender (every index maps to the
        shared transport when there is one)."""
        if self._shared_transport is not None:
            return _SharedTransportView(self._shared_transport)
        return MappingProxyType(self._sender_transports or {})

    @property
    def receiver_transport(self) -> TransportBackend | None:
        """The transport of this receiver (the shared one when there is one)."""
        if self._shared_transport is not None:
            return self._shared_transport
        return self._receiver_transport

    @property
    def shared_transport(self) -> TransportBackend | None:
        """The one transport every worker uses, when the scheme has one."""
        return self._shared_transport

    @shared_transport.setter
    def shared_transport(self, transport: TransportBackend | None) -> None:
        if transport is not None and (self._sender_transports or self._receiver_transport):
            raise SchemeStateError(
                "cannot set a shared transport on a scheme that already has per-worker or "
                "receiver transports"
            )
        self._shared_transport = transport

    def _register_worker_sender(self, *, worker_idx: int,
                                transport: TransportBackend | None = None,
                                **transport_kwargs: Any) -> None:
        """Give worker ``worker_idx`` its own transport (created unless one is passed)."""
        if self._shared_transport is not None:
            raise SchemeStateError(
                f"cannot register a transport for worker {worker_idx}: the scheme uses a "
                "shared transport"
            )
        if self._sender_transports is None:
            self._sender_transports = {}
        if worker_idx not in self._sender_transports:
            self._sender_transports[worker_idx] = (
                transport if transport is not None else self.create_transport(**transport_kwargs)
            )

    def _register_transport_receiver(self, transport: TransportBackend | None = None,
                                     **transport_kwargs: Any) -> None:
        """Set this receiver's transport (created unless one is passed)."""
        self._receiver_transport = (
            transport if transport is not None else self.create_transport(**transport_kwargs)
        )

    def _iterate_transports(self, worker_ids: list[int] | None = None) -> list[TransportBackend]:
        """The transports for ``worker_ids`` (all when ``None``), every id checked first."""
        if self._shared_transport is not None:
            return [self._shared_transport]
        registered = self._sender_transports or {}
        if worker_ids is None:
            if registered:
                return [registered[k] for k in sorted(registered)]
            return [self._receiver_transport] if self._receiver_transport is not None else []
        unknown = [w for w in worker_ids if w not in registered]
        if unknown:
            raise UnknownWorkerError(
                f"worker {unknown[0]} has no transport; registered workers: {sorted(registered)}"
            )
        return [registered[w] for w in worker_ids]

    # -- initialisation ------------------------------------------------------------------------

    def init_on_sender(self, *args: Any, **kwargs: Any) -> None:
        """Set this scheme up as the sender, once, in the trainer process.

        Arguments are the concrete scheme's (typically ``model_id=``, ``context=`` or
        ``model=`` / ``weights=``, and the workers). A collector calls it once its workers
        exist; a failure leaves the scheme uninitialised.
        """
        self._check_alive("init_on_sender")
        if self._initialized_on_receiver:
            raise SchemeStateError(
                f"init_on_sender: this scheme is initialised as a receiver (worker "
                f"{self._worker_idx}); a scheme object serves one side"
            )
        if self._initialized_on_sender:
            raise SchemeStateError("init_on_sender: already initialised as a sender")
        self._initialized_on_sender = True
        try:
            self._init_on_sender_impl(*args, **kwargs)
        except BaseException:
            self._initialized_on_sender = False
            raise

    def init_on_receiver(self, *, model_id: str, context: Any = None, **kwargs: Any) -> None:
        """Set this scheme up as a receiver, once, in a worker.

        Args:
            model_id: the model's name, and its attribute path in ``context``.
            context: the object the model is found in (e.g. the worker's collector); held
                weakly.
            **kwargs: the concrete scheme's, typically ``model=`` (instead of a context) and
                ``worker_idx=``.
        """
        self._check_alive("init_on_receiver")
        if self._initialized_on_sender:
            raise SchemeStateError(
                f"init_on_receiver(model_id={model_id!r}): this scheme is initialised as a "
                "sender; a worker needs its own copy (pickle the scheme into the worker)"
            )
        if self._initialized_on_receiver:
            raise SchemeStateError(
                f"init_on_receiver(model_id={model_id!r}): already initialised as a receiver"
            )
        self._initialized_on_receiver = True
        try:
            self._init_on_receiver_impl(model_id=model_id, context=context, **kwargs)
        except BaseException:
            self._initialized_on_receiver = False
            raise

    # Not abstract, as in TorchRL (whose only abstract method is create_transport): a scheme
    # written for TorchRL may override init_on_sender / init_on_receiver themselves instead.
    def _init_on_sender_impl(self, *args: Any, **kwargs: Any) -> None:
        """Sender-side initialisation of the concrete scheme."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be a sender: it implements neither "
            "_init_on_sender_impl nor init_on_sender"
        )

    def _init_on_receiver_impl(self, *, model_id: str, context: Any = None, **kwargs: Any) -> None:
        """Receiver-side initialisation of the concrete scheme."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be a receiver (model_id={model_id!r}): it implements "
            "neither _init_on_receiver_impl nor init_on_receiver"
        )

    # -- connection ----------------------------------------------------------------------------

    def connect(self, *, worker_idx: int | None = None, weights: Any | None = None) -> None:
        """First rendez-vous of both ends, once, after the workers started.

        On the sender it takes no ``worker_idx``; ``weights`` are the initial weights when
        the scheme sends some. On a receiver it takes no ``weights``; ``worker_idx`` defaults
        to the one given at initialisation.
        """
        self._check_alive("connect")
        if self._initialized_on_sender:
            if self._synchronized_on_sender:
                raise SchemeStateError("connect: the sender is already connected")
            if worker_idx is not None:
                raise InvalidArgumentError(
                    f"connect: the sender takes no worker_idx (got {worker_idx})"
                )
            self._synchronized_on_sender = True
            try:
                self._setup_connection_and_weights_on_sender_impl(weights=weights)
            except BaseException:
                self._synchronized_on_sender = False
                raise
        elif self._initialized_on_receiver:
            if self._synchronized_on_receiver:
                raise SchemeStateError(
                    f"connect: receiver {self._worker_idx} is already connected"
                )
            if weights is not None:
                raise InvalidArgumentError(
                    "connect: a receiver takes no weights; initial weights come from the sender"
                )
            if worker_idx is not None:
                self._worker_idx = worker_idx
            self._synchronized_on_receiver = True
            try:
                self._setup_connection_and_weights_on_receiver_impl(worker_idx=self._worker_idx)
            except BaseException:
                self._synchronized_on_receiver = False
                raise
        else:
            raise SchemeStateError("connect called before init_on_sender or init_on_receiver")

    def _setup_connection_and_weights_on_sender_impl(self, *, weights: Any | None = None) -> None:
        """Run the sender half of each transport's first rendez-vous (when it has one)."""
        for transport in self._iterate_transports():
            if isinstance(transport, InitialSyncTransport):
                transport.setup_connection_and_weights_on_sender()

    def _setup_connection_and_weights_on_receiver_impl(
        self, *, worker_idx: int | None = None
    ) -> None:
        """Run the receiver half of the transport's rendez-vous; apply what it returns."""
        transport = self.receiver_transport
        if not isinstance(transport, InitialSyncTransport):
            return
        initial = transport.setup_connection_and_weights_on_receiver(
            worker_idx=worker_idx, weights=self._weights, model=self.model,
            strategy=self._strategy,
        )
        if initial is not None:
            model = self._require_model("connect")
            self._strategy.apply_weights(model, initial, inplace=True)

    # -- sending -------------------------------------------------------------------------------

    def send(self, weights: Any = None, worker_ids: int | list[int] | None = None) -> None:
        """Send weights to the workers (all, or ``worker_ids``).

        Args:
            weights: an ``nn.Module``, a TensorDict, a dict, a model path in the context, or
                ``None`` for the weights of the model registered at initialisation.
            worker_ids: one worker index, a list of them, or ``None`` for all.

        Raises:
            SchemeStateError: not initialised and connected as a sender, after shutdown, or
                nothing to send.
            UnknownWorkerError: a worker id without a transport (nothing was sent).
        """
        self._check_alive("send")
        if not self._initialized_on_sender:
            raise SchemeStateError("send: the scheme is not initialised as a sender "
                                   "(call init_on_sender first)")
        if not self._synchronized_on_sender:
            raise SchemeStateError("send: the sender is not connected (call connect first)")
        ids = _worker_list(worker_ids)
        if type(self).prepare_weights is WeightSyncScheme.prepare_weights:
            # The base's preparation, with the strategy's cached tree for a module instead of
            # a fresh copy per send: only the transports see it, and what they cache per
            # weights object (a copy plan, a layout) then holds from one send to the next.
            prepared = _prepare(weights, self._model_id, self._strategy._extract, self.context)
        else:
            prepared = self.prepare_weights(weights, self._model_id, self._strategy, self.context)
        if prepared is None and weights is None:
            model = self.model
            if model is not None:
                prepared = self._strategy._extract(model)
        if prepared is None:
            raise SchemeStateError(
                f"send: no weights given and no model to take them from (model_id="
                f"{self._model_id!r}, context={type(self.context).__name__}); pass weights="
            )
        version = self._version + 1
        self._send_impl(prepared, ids, version)
        self._version = version

    def _send_impl(self, weights: Any, worker_ids: list[int] | None, version: int) -> None:
        """Deliver ``weights`` as ``version`` through the selected transports."""
        transports = self._iterate_transports(worker_ids)
        if not transports:
            raise SchemeStateError("send: the scheme has no transport")
        for transport in transports:
            transport.send_weights(weights)

    def prepare_weights(self, weights: Any, model_id: str, strategy: WeightStrategy,
                        context: Any = None) -> Any:
        """Turn what the caller passed to ``send`` into the weights to transmit.

        Args:
            weights: ``None`` (take the model ``model_id`` from ``context``), an
                ``nn.Module``, a model path in ``context``, a TensorDict or a dict.
            model_id: the model's name / path in ``context``.
            strategy: extracts weights from a module.
            context: where model paths are looked up.

        Returns:
            The weights to send, or ``None`` when ``weights`` is ``None`` and no model could
            be found.
        """
        return _prepare(weights, model_id, strategy.extract_weights, context)

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Any | None:
        """Apply the next weights if new ones arrived (waiting up to ``timeout`` seconds).

        Returns:
            The weights that were applied, or ``None`` when nothing new arrived.
        """
        self._check_alive("receive")
        if not self._initialized_on_receiver:
            raise SchemeStateError("receive: the scheme is not initialised as a receiver "
                                   "(call init_on_receiver first)")
        if not self._synchronized_on_receiver:
            raise SchemeStateError("receive: the receiver is not connected (call connect first)")
        weights = self._receive_impl(timeout)
        if weights is None:
            return None
        return self._received(weights)

    def _received(self, weights: Any) -> Any:
        """Count a version applied on this receiver and tell the context; returns ``weights``."""
        self._version += 1
        self._after_receive(weights)
        return weights

    def _receive_impl(self, timeout: float | None) -> Any | None:
        """Let the receiver transport take and apply the next weights."""
        transport = self.receiver_transport
        if transport is None:
            return None
        weights = transport.receive_weights(
            timeout=timeout, weights=self._weights, model=self.model, strategy=self._strategy
        )
        if weights is not None:
            self._ack(transport)
        return weights

    def _after_receive(self, weights: Any) -> None:
        """Tell the context that new weights were applied (TorchRL's cascade to nested
        collectors and policy-version bump)."""
        context = self.context
        update = getattr(context, "update_policy_weights_", None) if context is not None else None
        if update is not None:
            update(model_id=self._model_id or "policy", policy_or_weights=weights)

    @staticmethod
    def _ack(transport: Any) -> None:
        # Acknowledgement is an optional transport capability (TorchRL's transports have it).
        send_ack = getattr(transport, "send_ack", None)
        if send_ack is not None:
            send_ack("updated")

    def apply_weights(self, weights: TensorDictBase, inplace: bool = True) -> None:
        """Write ``weights`` into this receiver's model and count one applied version.

        Args:
            weights: a TensorDict or dict matching the model's keys, shapes and dtypes.
            inplace: copy into the model's tensors (``True``), or make the model point at the
                given tensors (``False``).

        Raises:
            SchemeStateError: not initialised as a receiver, or no model registered.
            KeyMismatchError / ShapeMismatchError / DTypeMismatchError: the weights do not fit
                the model; the model is unchanged.
        """
        self._check_alive("apply_weights")
        if not self._initialized_on_receiver:
            if self._initialized_on_sender:
                raise SchemeStateError("apply_weights is a receiver call; this scheme is "
                                       "initialised as a sender")
            raise SchemeStateError("apply_weights called before init_on_receiver")
        model = self._require_model("apply_weights")
        self._strategy.apply_weights(model, weights, inplace=inplace)
        self._version += 1
        if self.receiver_transport is not None:
            self._ack(self.receiver_transport)

    def _require_model(self, what: str) -> Any:
        model = self.model
        if model is None:
            raise SchemeStateError(
                f"{what}: no model registered (pass model= to init_on_receiver, or a context "
                f"holding model_id={self._model_id!r})"
            )
        return model

    # -- background receiver -------------------------------------------------------------------

    def _start_background_receiver(self, poll_interval: float = 0.05) -> None:
        """Apply updates as they arrive, from a daemon thread, until :meth:`shutdown`."""
        if not (self._initialized_on_receiver and self._synchronized_on_receiver):
            raise SchemeStateError("the background receiver needs a connected receiver")
        if self._background_thread is not None:
            raise SchemeStateError("the background receiver is already running")
        stop = threading.Event()
        thread = threading.Thread(
            target=self._background_loop, args=(stop, poll_interval), daemon=True,
            name=f"weightsync-receiver-{self._model_id}-{self._worker_idx}",
        )
        self._stop_event = stop
        self._background_thread = thread
        self._background_error = None
        thread.start()
        _RUNNING_RECEIVERS.add(self)

    def _background_loop(self, stop: threading.Event, poll_interval: float) -> None:
        try:
            while not stop.is_set():
                if self._wait_for_update(poll_interval, stop) and not stop.is_set():
                    self.receive(timeout=poll_interval)
        except Exception as exc:  # reported, not swallowed: the thread cannot raise anywhere
            self._background_error = exc
            warnings.warn(
                f"weightsync background receiver of worker {self._worker_idx} stopped: "
                f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=1,
            )

    def _wait_for_update(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until an update may be ready (or ``timeout``); True to try a receive.

        The default polls: it sleeps ``timeout`` unless stopped. Schemes with a wake-up
        signal (a futex on the version word) override it.
        """
        return not stop.wait(timeout)

    @property
    def background_error(self) -> BaseException | None:
        """The error that stopped the background receiver, if one did."""
        return self._background_error

    def _stop_background_receiver(self, timeout: float = _BACKGROUND_JOIN_TIMEOUT_S) -> None:
        thread, stop = self._background_thread, self._stop_event
        self._background_thread = None
        self._stop_event = None
        _RUNNING_RECEIVERS.discard(self)
        if thread is None:
            return
        if stop is not None:
            stop.set()
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            raise WeightSyncTimeout(
                f"the background receiver of worker {self._worker_idx} did not stop within "
                f"{timeout} s", workers=[self._worker_idx] if self._worker_idx is not None else [],
            )

    # -- shutdown and pickling -----------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the scheme's resources: stop the background receiver, then run the
        scheme's own cleanup.

        Safe to call any number of times; every later call does nothing. Any other call
        after it raises :class:`~weightsync.errors.SchemeStateError`.
        """
        if self._is_shutdown:
            return
        self._is_shutdown = True
        try:
            self._stop_background_receiver()
        finally:
            self._shutdown_impl()

    def _shutdown_impl(self) -> None:
        """Release the scheme's resources (transports, segments); runs once."""

    def _check_alive(self, what: str) -> None:
        if self._is_shutdown:
            raise SchemeStateError(f"{what} called after shutdown()")

    def __getstate__(self) -> dict[str, Any]:
        """State for another process: no weak references, threads, events or locks cross,
        and the copy starts uninitialised (it picks its side with init_on_*)."""
        state = {
            k: (None if isinstance(v, _UNPICKLABLE_RUNTIME) else v)
            for k, v in self.__dict__.items()
        }
        state.update(
            _context_ref=None, _model_ref=None, _background_thread=None, _stop_event=None,
            _background_error=None, _initialized_on_sender=False,
            _initialized_on_receiver=False, _synchronized_on_sender=False,
            _synchronized_on_receiver=False, _version=0, _is_shutdown=False,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# Our schemes must pass TorchRL's ``isinstance(scheme, WeightSyncScheme)`` checks for a
# collector to accept them. Registered now if TorchRL's module is loaded, else as soon as it
# is (TorchRL is never imported from here: it takes seconds).
register_with_torchrl(
    "torchrl.weight_update.weight_sync_schemes", "WeightSyncScheme", WeightSyncScheme)
