"""SharedMemWeightSyncScheme: weights through versioned shared-memory arenas.

The drop-in for TorchRL's ``SharedMemWeightSyncScheme`` (same constructor, same
``init_on_sender`` forms, same lifecycle), built on :mod:`weightsync.transports.shared_mem`:

- ``send`` copies the weights once into a free slot of each targeted arena and publishes a
  new version; workers apply whole versions only, never a mix of two.
- The trainer's tensors are only read: nothing of the trainer lives in shared memory, and
  ``send(other_weights)`` leaves the trainer's model untouched.
- Per update: no pickling, no queue; a futex wake per worker and an acknowledgement word.
- ``sync=True``: ``send`` returns once every targeted worker applied the version, or raises
  :class:`~weightsync.errors.WeightSyncTimeout` naming those that did not and whether their
  processes are alive. ``sync=False`` never waits for a worker.

On a worker, updates land either when it calls :meth:`receive` (``background=False``) or, as in
TorchRL, from a background thread as they arrive (``background=True``, the default). Either way
every update is applied under :meth:`SharedMemWeightSyncScheme.guard`; hold it around inference
so an update never lands in the middle of a forward pass::

    with scheme.guard():
        action = policy(obs)

Entering the guard also applies a version already on offer, so each forward pass starts on the
newest published weights, and a worker that is inside the guard almost all the time still
takes updates at once (its background thread would otherwise queue for the lock).

With the native library the background thread takes versions in C++ without the GIL
(:mod:`weightsync.transports.receive_loop`): a worker whose main thread runs Python (an
environment step) still applies and acknowledges each update as it arrives, instead of waiting
for the interpreter to hand its thread the GIL. The Python loop remains for the torch fallback,
for GPU workers and for a context that is told of every update.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from weightsync.errors import (
    InvalidArgumentError,
    PeerDiedError,
    SchemeStateError,
    UnsupportedWeightsError,
)
from weightsync.schemes.base import (
    _BACKGROUND_JOIN_TIMEOUT_S,
    UnknownWorkerError,
    WeightSyncScheme,
    resolve_attr,
)
from weightsync.strategy import (
    UncacheableTree,
    materialize_meta,
    modules_with_extra_state,
    tree_snapshot,
)
from weightsync.transports.arena import _LIVENESS_PERIOD, DEFAULT_TIMEOUT, Layout
from weightsync.transports.receive_loop import STOPPED, NativeReceiveLoop, ReceiverLock
from weightsync.transports.shared_mem import (
    MODES,
    ArenaTicket,
    SharedMemReceiverTransport,
    SharedMemSenderTransport,
    _ModuleReader,
    named_tensors,
)

__all__ = ["SharedMemWeightSyncScheme"]

# How long one wait of the background receiver lasts before it looks at its stop event.
_BACKGROUND_POLL = 0.05


def _device_of(named: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {t.device for t in named.values()}
    if len(devices) == 1:
        return devices.pop()
    return torch.device("cpu")


def _same_weights_key(source: Any, named: Mapping[str, torch.Tensor]) -> tuple:
    """What makes two workers' sources the same weights, so that they share an arena.

    The same object, or objects whose tensors are the very same memory: the same keys, each
    on the same device at the same address with the same dtype, shape and strides (say
    ``params_map={0: TensorDict.from_module(m), 1: TensorDict.from_module(m)}``). TorchRL's
    ``params_map`` gives each worker "its weights on its device" and, without
    ``per_worker_weights``, every send writes the same weights into all of them; sources that
    are one memory can only ever hold the same values, so one arena per device group serves
    them all with one write. Sources in memory of their own (copies, even equal ones) are
    different weights: each can change on its own, and ``send()`` without weights reads each,
    so each keeps its arena. Judged once, at ``init_on_sender``.
    """
    if any(t.is_meta for t in named.values()):  # no memory to compare
        return ("object", id(source))
    return ("memory", tuple(
        (k, str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        for k, t in named.items()
    ))


def _slot_device(source: torch.device, worker: torch.device | None) -> torch.device:
    """Where an arena's slots live: on the GPU when sender and worker share it, else on the host."""
    if worker is not None and worker.type == "cuda" and source == worker:
        return worker
    return torch.device("cpu")


class SharedMemWeightSyncScheme(WeightSyncScheme):
    """Weight synchronisation through versioned shared-memory arenas on one machine.

    The arenas hold parameters and buffers (any dtype); a module's extra state
    (``get_extra_state``) is not carried, and ``init_on_sender`` warns when the model has
    some. Worker models on the meta device (as TorchRL's collectors create them) are given
    storage on the worker's device at ``connect``.

    Args:
        strategy: ``"tensordict"`` (default) or ``"state_dict"``: the format :meth:`receive`
            returns the applied weights in.
        sync: ``send`` waits until every targeted worker applied the version (default).
        per_worker_weights: one arena per worker, so each can get different weights
            (``send({worker: weights, ...})``); otherwise the workers of one device group
            share one when their sources are the same weights (the same object, or objects
            over the same tensors; copies keep an arena each).
        mode: how workers take a version: ``"copy"`` (default; one batched copy into the
            worker's own tensors; the only way for GPU workers) or ``"view"`` (CPU workers;
            their tensors become views into the shared slot, re-pointed at each version, so no
            byte moves on the worker; the tensors must not be written by the worker).
        slots: slots per arena. Default, for the workers sharing an arena: 2 x workers + 1
            in view mode without ``sync`` (a lagging view-mode worker holds the slot it views
            and an offer it has not taken, different for each worker after sends to subsets);
            3 in copy mode with ``sync``; workers + 2 otherwise. These are enough that
            ``sync=False`` never waits for a free slot because a worker is slow (see
            :func:`~weightsync.transports.shared_mem.default_slots`). Chosen at
            ``init_on_sender`` from ``mode`` and ``sync``: set ``sync`` before then. With
            fewer slots, a send that finds none free within ``timeout`` raises
            :class:`~weightsync.errors.WeightSyncTimeout` naming the workers holding them.
        timeout: bound in seconds on every wait (acks, a free slot, the first weights at
            connect). Default 10.
        background: on workers, apply updates from a background thread as they arrive, like
            TorchRL (default). With ``False`` they land only when the worker calls
            :meth:`receive`. The thread stops quietly when the sender shuts down; on an error
            (the sender died: :class:`~weightsync.errors.PeerDiedError`) it stops, warns and
            keeps the error in :attr:`background_error`, and :meth:`receive` raises it too.
            The model keeps the last version taken, and :meth:`guard` keeps working.

    Extra state (``Module.get_extra_state``) is not carried: only parameters and buffers.
    """

    def __init__(
        self,
        strategy: Literal["tensordict", "state_dict"] = "tensordict",
        sync: bool = True,
        per_worker_weights: bool = False,
        *,
        mode: Literal["copy", "view"] = "copy",
        slots: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        background: bool = True,
    ) -> None:
        super().__init__(strategy)
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        if slots is not None and not 2 <= int(slots) <= 255:
            raise InvalidArgumentError(f"slots must be between 2 and 255, got {slots}")
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}")
        self.sync = bool(sync)
        self.per_worker_weights = bool(per_worker_weights)
        self.mode = mode
        self.slots = None if slots is None else int(slots)
        self.timeout = float(timeout)
        self.background = bool(background)
        self._tickets: dict[int, ArenaTicket] = {}
        self._worker_devices: dict[int, str | None] = {}
        # Sender only (never pickled): the transport and what send() snapshots when called
        # without weights.
        self._sender: SharedMemSenderTransport | None = None
        self._sources: dict[int, Any] = {}
        # Per layout: the module sent last, a reader of its tensors, and the list last read.
        self._readers: dict[int, tuple[weakref.ReferenceType, _ModuleReader, list[torch.Tensor]]] = {}
        self._tree_reads: dict[int, tuple[weakref.ReferenceType, Any, list[torch.Tensor]]] = {}
        self._call_timeout: float | None = None
        # Receiver only.
        self._applied: Any = None
        self._weights_version = 0
        self._guard = ReceiverLock()
        # The C++ loop the background receiver runs (native library), from its start until
        # the background receiver is stopped.
        self._native_loop: NativeReceiveLoop | None = None

    # -- transports ----------------------------------------------------------------------------

    def create_transport(self, **kwargs: Any) -> SharedMemReceiverTransport:
        """The receiver end for ``worker_idx`` (the sender end is built by init_on_sender)."""
        worker = kwargs["worker_idx"]
        ticket = self._tickets.get(worker)
        if ticket is None:
            raise SchemeStateError(
                f"worker {worker} has no arena; the sender registered workers {sorted(self._tickets)}"
            )
        return SharedMemReceiverTransport(ticket, worker, mode=self.mode)

    # -- sender ----------------------------------------------------------------------------------

    def _init_on_sender_impl(
        self,
        *,
        model_id: str | None = None,
        context: Any = None,
        weights: Any = None,
        model: nn.Module | None = None,
        params_map: Mapping[int, Any] | None = None,
        devices: Sequence[torch.device | str] | None = None,
        device_map_fn: Callable[[int, Any], Any] | None = None,
        num_workers: int | None = None,
        ctx: Any = None,
    ) -> None:
        """Build the arenas. The forms (TorchRL's):

        - ``(model_id=..., context=...)``: the model at ``model_id`` in the context (e.g. a
          collector), workers on ``context.policy_device``;
        - ``(params_map={worker: weights})``: each worker's weights (and device) given;
        - ``(weights=... | model=..., devices=[...])``: worker ``i`` on ``devices[i]``;
        - ``(weights=... | model=..., device_map_fn=fn, num_workers=n)``: worker ``i``'s
          weights live where ``fn(i, weights)`` puts them (``weights``: a TensorDict of the
          weights' detached tensors). As in TorchRL, ``fn``'s result only places the worker:
          every send, ``send()`` included, carries the registered weights as they are then.

        Workers whose sources are the same weights share one arena per device group (one
        write per send, whatever their number): the same object, or objects over the very same
        tensors, as ``params_map={0: TensorDict.from_module(m), 1: TensorDict.from_module(m)}``.
        Sources in memory of their own (copies, even equal ones) keep an arena each, since
        each can change on its own and ``send()`` reads each; so does every worker with
        ``per_worker_weights=True``.

        ``ctx`` (a multiprocessing context) is accepted for TorchRL compatibility and unused:
        nothing here needs one.
        """
        sources, worker_devices = self._sources_from(
            model_id, context, weights, model, params_map, devices, device_map_fn, num_workers
        )
        if not sources:
            raise InvalidArgumentError("init_on_sender: no workers to send to")
        groups: dict[tuple[int, str], tuple[dict[str, torch.Tensor], list[int], torch.device]] = {}
        named_of: dict[int, dict[str, torch.Tensor]] = {}
        # Sources that are the same weights (see _same_weights_key) share arenas: the first
        # of them stands for all, so every send reads one object per arena.
        same_as: dict[tuple, Any] = {}
        canonical_of: dict[int, Any] = {}
        any_cuda = False
        sources = dict(sources)
        for w in sorted(sources):
            src = sources[w]
            named = named_of.get(id(src))
            if named is None:
                named = named_of[id(src)] = named_tensors(src)
                if not named:
                    raise InvalidArgumentError(f"init_on_sender: the weights of worker {w} hold no tensor")
                if isinstance(src, nn.Module) and (extra := modules_with_extra_state(src)):
                    warnings.warn(
                        f"SharedMemWeightSyncScheme moves parameters and buffers only; the extra "
                        f"state (get_extra_state) of {extra} is not sent to the workers. Keep "
                        "such state in buffers, or send it with WeightStrategy / "
                        "VanillaWeightUpdater, which carry it.",
                        UserWarning, stacklevel=3,
                    )
                canonical_of[id(src)] = same_as.setdefault(_same_weights_key(src, named), src)
            if not self.per_worker_weights:
                src = sources[w] = canonical_of[id(src)]
                named = named_of[id(src)]
            source_device = _device_of(named)
            wdev = worker_devices.get(w)
            slot_device = _slot_device(source_device, wdev)
            any_cuda |= source_device.type == "cuda" or (wdev is not None and wdev.type == "cuda")
            key = (w if self.per_worker_weights else id(src), str(slot_device))
            groups.setdefault(key, (named, [], slot_device))[1].append(w)
        slots = self.slots  # None: the transport sizes each arena (default_slots)
        if slots is not None and self.mode == "view":
            biggest = max(len(ws) for _, ws, _ in groups.values())
            if slots < biggest + 2:
                raise InvalidArgumentError(
                    f"view mode needs at least workers + 2 = {biggest + 2} slots per arena "
                    f"(each worker keeps one slot mapped), got slots={slots}"
                )
        self._sender = SharedMemSenderTransport(
            [(named, ws, dev) for named, ws, dev in groups.values()],
            mode=self.mode,
            slots=slots,
            pin=any_cuda and torch.cuda.is_available(),
            sync=self.sync,
            timeout=self.timeout,
        )
        self._tickets = self._sender.tickets()
        self._worker_devices = {w: (None if d is None else str(d)) for w, d in worker_devices.items()}
        self._sources = dict(sources)
        self.model_id = model_id
        if context is not None:
            self.context = context
        if model is not None:
            self.model = model

    def _sources_from(self, model_id, context, weights, model, params_map, devices, device_map_fn, num_workers):
        """Normalise the init_on_sender forms to ({worker: source}, {worker: device or None})."""

        def forbid(form: str, **given: Any) -> None:
            bad = [k for k, v in given.items() if v is not None]
            if bad:
                raise InvalidArgumentError(f"init_on_sender: {', '.join(bad)} cannot be combined with {form}")

        if params_map is not None:
            forbid("params_map", context=context, weights=weights, model=model, devices=devices,
                   device_map_fn=device_map_fn, num_workers=num_workers)
            if not isinstance(params_map, Mapping) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in params_map
            ):
                raise InvalidArgumentError("params_map must map int worker ids to weights")
            sources = dict(params_map)
            return sources, {w: _device_of(named_tensors(v)) for w, v in sources.items()}
        if context is not None:
            forbid("context", weights=weights, model=model, devices=devices, device_map_fn=device_map_fn)
            if model_id is None:
                raise InvalidArgumentError("init_on_sender: model_id is required with a context")
            devices = list(getattr(context, "policy_device", None) or [])
            if num_workers is not None and devices and num_workers != len(devices):
                raise InvalidArgumentError(
                    f"init_on_sender: num_workers={num_workers} but the context has {len(devices)} workers"
                )
            try:
                model = resolve_attr(context, model_id)
            except (AttributeError, KeyError, IndexError, TypeError):
                model = None
            if model is None:
                model = self._model_from_factories(context, model_id, devices)
                if isinstance(model, dict):
                    self.per_worker_weights = True
                    return model, {w: _device_of(named_tensors(v)) for w, v in model.items()}
            if not isinstance(model, nn.Module):
                raise InvalidArgumentError(
                    f"init_on_sender: the context's {model_id!r} is a {type(model).__name__}, not an "
                    "nn.Module; a policy without weights needs no weight sync"
                )
            n = len(devices) if devices else num_workers
            if not n:
                raise InvalidArgumentError("init_on_sender: the context lists no worker devices")
            devs = [None if d is None else torch.device(d) for d in devices] if devices else [None] * n
            return {w: model for w in range(n)}, dict(enumerate(devs))
        if model is not None and weights is not None:
            raise InvalidArgumentError("init_on_sender: pass weights= or model=, not both")
        source = model if model is not None else weights
        if source is None:
            raise InvalidArgumentError(
                "init_on_sender: pass params_map=, model_id= and context=, or weights=/model= "
                "with devices= or device_map_fn= and num_workers="
            )
        if devices is not None:
            forbid("devices", device_map_fn=device_map_fn)
            if num_workers is not None and num_workers != len(devices):
                raise InvalidArgumentError(
                    f"init_on_sender: num_workers={num_workers} but {len(devices)} devices given"
                )
            return {w: source for w in range(len(devices))}, {
                w: torch.device(d) for w, d in enumerate(devices)
            }
        if device_map_fn is not None:
            if num_workers is None or num_workers < 1:
                raise InvalidArgumentError("init_on_sender: device_map_fn needs num_workers >= 1")
            return {w: source for w in range(num_workers)}, self._devices_from_map_fn(
                source, device_map_fn, num_workers
            )
        if num_workers is not None:
            return {w: source for w in range(num_workers)}, {w: None for w in range(num_workers)}
        raise InvalidArgumentError(
            "init_on_sender: with weights= or model=, also pass devices=, device_map_fn= and "
            "num_workers=, or num_workers="
        )

    @staticmethod
    def _devices_from_map_fn(
        source: Any, device_map_fn: Callable[[int, Any], Any], num_workers: int
    ) -> dict[int, torch.device]:
        """Each worker's device, as ``device_map_fn(i, weights)`` places its weights.

        As in TorchRL, the function's result only says where worker ``i``'s weights live
        (typically ``w.to(device)``, a copy): every send carries the registered weights as
        they are then, moved to that device. Its result is read for its device and checked
        against the registered layout, then dropped: holding it would keep a stale copy (on
        a GPU, maybe) that no send reads. The function gets a TensorDict of the weights'
        detached tensors, as in TorchRL, never the module itself: ``module.to(device)`` would
        move the trainer's own parameters.
        """
        named = named_tensors(source)
        layout = Layout.from_tensors(named.items())
        if isinstance(source, nn.Module):
            from tensordict import TensorDict

            detached = {k: t.detach() for k, t in named.items()}
            given = TensorDict(detached, batch_size=[]).unflatten_keys(".")
        else:
            given = source
        devices = {}
        for w in range(num_workers):
            mapped = device_map_fn(w, given)
            theirs = f"the weights device_map_fn returned for worker {w}"
            try:
                mapped_named = named_tensors(mapped)
            except TypeError as exc:
                raise UnsupportedWeightsError(f"init_on_sender: {theirs}: {exc}") from None
            layout.match(mapped_named, theirs=theirs, ours="sender")
            devices[w] = _device_of(mapped_named)
        return devices

    @staticmethod
    def _model_from_factories(context: Any, model_id: str, devices: Sequence[Any]) -> Any:
        """TorchRL collectors built from policy factories: one shared model or one per worker."""
        factories = list(getattr(context, "policy_factory", None) or [])
        if model_id != "policy" or not factories or all(f is None for f in factories):
            return None
        if all(f is factories[0] for f in factories):
            return factories[0]()
        per_worker = {}
        for w, factory in enumerate(factories):
            if factory is None:
                continue
            worker_model = factory()
            if isinstance(worker_model, nn.Module):
                if devices and w < len(devices) and devices[w] is not None:
                    worker_model = worker_model.to(devices[w])
                per_worker[w] = worker_model
        return per_worker

    def _setup_connection_and_weights_on_sender_impl(self, *, weights: Any | None = None) -> None:
        """Publish the initial weights (``weights``, or a snapshot of the registered ones).

        Does not wait for the workers: they take this version when they connect.
        """
        self._publish(weights, None, sync=False)

    def prepare_weights(self, weights: Any, model_id: str, strategy: Any, context: Any = None) -> Any:
        """Pass weights through untouched: :meth:`send` reads tensors straight into the arena.

        ``None`` stands for the registered weights (read at send time); a model path is
        resolved in the context. Per-worker dicts (``{worker: weights}``) pass through too.
        """
        if weights is None:
            return self._sources
        if isinstance(weights, str):
            if context is None:
                raise InvalidArgumentError(f"cannot resolve the model path {weights!r}: the scheme has no context")
            return resolve_attr(context, weights)
        return weights

    def send(
        self,
        weights: Any = None,
        worker_ids: int | list[int] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Publish new weights to the workers (all, or ``worker_ids``).

        Args:
            weights: an ``nn.Module``, a TensorDict, a dict of tensors, a model path in the
                context, ``{worker: weights}`` (with ``per_worker_weights``), or ``None`` to
                snapshot the weights registered at initialisation.
            worker_ids: one worker id, a list of them, or ``None`` for all.
            timeout: overrides the scheme's timeout for this call.

        Raises:
            KeyMismatchError / ShapeMismatchError / DTypeMismatchError: the weights do not fit
                the arena; nothing was written.
            WeightSyncTimeout: ``sync`` and a targeted worker did not apply the version in
                time (the others did).
        """
        self._call_timeout = timeout
        try:
            super().send(weights, worker_ids)
        finally:
            self._call_timeout = None

    def _send_impl(self, weights: Any, worker_ids: list[int] | None, version: int) -> None:
        self._publish(weights, worker_ids, sync=self.sync)

    def _publish(self, weights: Any, worker_ids: list[int] | None, *, sync: bool) -> None:
        sender = self._sender
        if sender is None:
            raise SchemeStateError("send: the scheme has no arenas (init_on_sender did not run)")
        per_worker = None
        if weights is None or weights is self._sources:
            per_worker = self._sources
        elif (
            isinstance(weights, Mapping)
            and not hasattr(weights, "batch_size")  # a TensorDict is a Mapping too
            and len(weights) > 0
            and all(isinstance(k, int) and not isinstance(k, bool) for k in weights)
        ):
            if not self.per_worker_weights:
                raise InvalidArgumentError(
                    "send: weights keyed by worker need per_worker_weights=True (the workers share one arena)"
                )
            per_worker = weights
            if worker_ids is None:
                worker_ids = sorted(weights)
        if worker_ids is not None:
            unknown = [w for w in worker_ids if w not in sender.workers]
            if unknown:
                raise UnknownWorkerError(
                    f"worker {unknown[0]} has no arena; registered workers: {sender.workers}"
                )
            if per_worker is not None and per_worker is not self._sources:
                missing = [w for w in worker_ids if w not in per_worker]
                if missing:
                    raise InvalidArgumentError(f"send: no weights given for worker {missing[0]}")

        def source_tensors(layout: Layout, workers: Sequence[int]) -> list[torch.Tensor]:
            src = weights if per_worker is None else per_worker[workers[0]]
            if isinstance(src, nn.Module):
                return self._read_module(src, layout)
            return self._read_tree(src, layout)

        timeout = self.timeout if self._call_timeout is None else self._call_timeout
        sender.send(source_tensors, worker_ids, sync=sync, timeout=timeout)

    def _read_module(self, module: nn.Module, layout: Layout) -> list[torch.Tensor]:
        """A module's current tensors in layout order; matched once per (module, layout).

        Shapes and dtypes are checked where the tensors are written (see
        ``_SenderArena.write``: in C++ when the same list is sent again).
        """
        cached = self._readers.get(id(layout))
        if cached is None or cached[0]() is not module:
            tensors = layout.match(named_tensors(module), theirs="model to send", ours="arena")
            self._readers[id(layout)] = (weakref.ref(module), _ModuleReader(module, layout.keys), tensors)
            return tensors
        ref, reader, last = cached
        try:
            tensors = reader.read()
        except (AttributeError, KeyError):
            # The module changed under us: the full check names what differs.
            return layout.match(named_tensors(module), theirs="model to send", ours="arena")
        if len(tensors) == len(last) and all(map(operator.is_, tensors, last)):
            return last  # the same list object: the transport reuses its copy plan for it
        if not all(isinstance(t, torch.Tensor) for t in tensors):  # a tensor set to None
            return layout.match(named_tensors(module), theirs="model to send", ours="arena")
        self._readers[id(layout)] = (ref, reader, tensors)
        return tensors

    def _read_tree(self, tree: Any, layout: Layout) -> list[torch.Tensor]:
        """A TensorDict's (or dict's) tensors in layout order.

        Flattening and matching a tree costs more than packing it on small models (about 15 us
        for an 8-tensor MLP, 0.8 ms for 1000 tensors), and trainers usually send the same
        TensorDict again and again: the match is kept per layout while the tree holds the same
        tensor objects (locked TensorDicts are checked in O(1)) and they keep their shapes and
        dtypes. Plain dicts are matched every time.
        """
        cached = self._tree_reads.get(id(layout))
        if cached is not None and cached[0]() is tree and cached[1].unchanged(tree):
            # Same tensor objects: their shapes and dtypes are checked where they are written
            # (see _SenderArena.write), in C++ when the same list is sent again.
            return cached[2]
        tensors = layout.match(named_tensors(tree), theirs="weights to send", ours="arena")
        try:
            self._tree_reads[id(layout)] = (weakref.ref(tree), tree_snapshot(tree), tensors)
        except (UncacheableTree, TypeError):  # TypeError: not weakly referenceable
            self._tree_reads.pop(id(layout), None)
        return tensors

    # -- receiver ---------------------------------------------------------------------------------

    def _init_on_receiver_impl(
        self,
        *,
        model_id: str,
        context: Any = None,
        model: Any = None,
        worker_idx: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise InvalidArgumentError(f"init_on_receiver: unexpected arguments {sorted(kwargs)}")
        self.model_id = model_id
        if context is not None:
            self.context = context
            getter = getattr(context, "get_model", None)
            if model is None and getter is not None:
                model = getter(model_id)
            if worker_idx is None:
                worker_idx = getattr(context, "worker_idx", None)
        if model is not None:
            self.model = model
        if worker_idx is not None:
            self.worker_idx = worker_idx

    def _setup_connection_and_weights_on_receiver_impl(self, *, worker_idx: int | None = None) -> None:
        """Attach to this worker's arena, check the layout, apply the sender's first version."""
        if worker_idx is None:
            raise SchemeStateError("connect: a receiver needs its worker_idx")
        transport = self.create_transport(worker_idx=worker_idx)
        model = self.model
        destination = None
        materialize = None
        if model is not None:
            destination = named_tensors(model)
        elif self._weights is not None:
            destination = named_tensors(self._weights)
        if isinstance(model, nn.Module) and any(t.is_meta for t in destination.values()):
            # A stateless (meta-device) policy, as TorchRL's collectors send to workers: it
            # gets storage once its layout matched the sender's (a mismatch leaves it as it
            # was), and the first version fills that storage.
            device = self._worker_devices.get(worker_idx)

            def give_storage() -> dict[str, torch.Tensor]:
                materialize_meta(model, device)
                return named_tensors(model)

            materialize = give_storage

        transport.lock = self._guard
        transport.connect(destination, device=self._worker_devices.get(worker_idx),
                          timeout=self.timeout, materialize=materialize)
        self._receiver_transport = transport
        self._applied = self._weights_view(transport)
        self._weights_version = transport.version - 1
        transport.on_applied = self._count_applied  # after the first version, not counted
        if self.background:
            self._start_background_receiver(_BACKGROUND_POLL)

    def apply_weights(self, weights: Any, inplace: bool = True) -> None:
        """Apply ``weights`` to the model (see the base class).

        In view mode the model's tensors are views into shared memory that other workers
        read: they first get private copies, so the write stays local (the next version
        re-points them).
        """
        transport = self._receiver_transport
        if transport is not None and self.mode == "view":
            transport.privatize()
        super().apply_weights(weights, inplace)

    def _weights_view(self, transport: SharedMemReceiverTransport) -> Any:
        named = dict(zip(transport.keys, transport.tensors))
        if self.strategy_str == "state_dict":
            return named
        from tensordict import TensorDict

        return TensorDict(named, batch_size=[]).unflatten_keys(".")

    def _receive_impl(self, timeout: float | None) -> Any | None:
        transport = self._receiver_transport
        got = transport.receive(0.0 if timeout is None else max(0.0, float(timeout)))
        if got is None:
            return None
        self._weights_version = got - 1
        return self._applied

    def _wait_for_update(self, timeout: float, stop: threading.Event) -> bool:
        transport = self._receiver_transport
        if stop.is_set() or transport is None:
            return False
        try:
            return transport.wait(timeout) and not stop.is_set()
        except PeerDiedError:
            if transport.arena is not None and transport.arena.closed:
                # The sender shut down on purpose: nothing more will come; stop quietly.
                stop.set()
                return False
            raise

    @property
    def weights_version(self) -> int:
        """Which publication of the sender's weights is in place (0: the initial weights).

        On the sender: how many versions it published after the initial one; this is
        :attr:`version` unless a ``sync`` send raised after publishing (its version counts
        here). On a worker: the sender's ``weights_version`` of the weights it holds.
        """
        if self._sender is not None:
            return self._sender.version - 1
        transport = self._receiver_transport
        if transport is not None:
            # Set before the ack goes out, so a sync sender that returned sees it.
            return transport.version - 1
        return self._weights_version

    @property
    def lock(self) -> ReceiverLock:
        """The lock every update is applied under (see :meth:`guard`)."""
        return self._guard

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold off updates for the duration of the block (e.g. one forward pass).

        Entering the block first applies a version already on offer (never waiting), so the
        block runs on the newest published weights, and a worker that holds the guard nearly
        all the time still takes every update promptly: the background thread alone would
        queue for the lock behind it. An update that arrives during the block is applied
        right after it (by the background thread, the next :meth:`receive`, or the next
        ``guard()``). Re-entrant: an inner block takes nothing, so the outer one stays on
        one version throughout.
        """
        with self._guard:
            if self._guard.outermost:
                self._take_offered()
            yield

    def _take_offered(self) -> None:
        """Apply the version on offer if it is newer than ours; never waits or raises for a
        missing sender (the background thread or :meth:`receive` report that)."""
        transport = self._receiver_transport
        if transport is None or transport.arena is None:
            return
        try:
            taken = transport.poll()
        except PeerDiedError:  # the sender died while writing the offered slot
            return
        if taken:
            self._weights_version = transport.version - 1
            self._received(self._applied)

    def _count_applied(self) -> None:
        # Called by the transport under the guard, before the version's ack (see on_applied):
        # counted after the ack instead, a thread could see the new weights, or a sync sender
        # return, with `version` one short.
        self._version += 1

    def _received(self, weights: Any) -> Any:
        # Counted already (_count_applied); the context hears of it under the guard.
        with self._guard:
            self._after_receive(weights)
        return weights

    @property
    def version(self) -> int:
        """Sender: completed ``send`` calls. Receiver: weight versions applied since connect
        (by :meth:`receive`, :meth:`guard` or the background receiver)."""
        loop = self._native_loop
        return self._version + (loop.applied if loop is not None else 0)

    def _background_loop(self, stop: threading.Event, poll_interval: float) -> None:
        # With the native library the takes run in C++ without the GIL (see
        # transports/receive_loop.py); Python looks only when the loop hands back: the sender
        # is gone, or a case whose error the Python path reports. A context that wants to hear
        # of every update (TorchRL's update_policy_weights_ cascade) keeps the Python loop.
        transport = self._receiver_transport
        context = self.context
        wants_updates = context is not None and getattr(context, "update_policy_weights_", None)
        loop = None if transport is None or wants_updates else transport.start_native_loop()
        if loop is None:
            super()._background_loop(stop, poll_interval)
            return
        self._native_loop = loop  # before the stop check: _stop_background_receiver reads it
        try:
            while not stop.is_set():
                if loop.run(_LIVENESS_PERIOD) == STOPPED or stop.is_set():
                    break
                try:
                    self.receive(timeout=0)
                except PeerDiedError:
                    arena = transport.arena
                    if arena is not None and arena.closed:
                        break  # the sender shut down on purpose: nothing more will come
                    raise
        except Exception as exc:  # reported as the Python loop does
            self._background_error = exc
            warnings.warn(
                f"weightsync background receiver of worker {self._worker_idx} stopped: "
                f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=1,
            )

    def _stop_background_receiver(self, timeout: float = _BACKGROUND_JOIN_TIMEOUT_S) -> None:
        # Stop event first, then the loop: a loop created after this read sees the event
        # before it runs (it is published before the background thread checks the event).
        if self._stop_event is not None:
            self._stop_event.set()
        loop = self._native_loop
        if loop is not None:
            loop.stop()
        super()._stop_background_receiver(timeout)  # joins; raises if the thread hangs on
        loop = self._native_loop
        if loop is not None:
            self._native_loop = None
            self._version += loop.applied
            if self._receiver_transport is not None:
                self._receiver_transport.stop_native_loop()

    def start_background(self) -> None:
        """Start applying updates from a background thread (when built with ``background=False``)."""
        self._start_background_receiver(_BACKGROUND_POLL)

    def stop_background(self) -> None:
        """Stop the background thread; updates then land only at :meth:`receive`."""
        self._stop_background_receiver()

    # -- status and teardown ----------------------------------------------------------------------

    def acked_versions(self) -> dict[int, int]:
        """Sender: the newest version each worker applied (``-1``: nothing yet)."""
        if self._sender is None:
            raise SchemeStateError("acked_versions is a sender call")
        return {w: self._sender.acked(w) - 1 for w in self._sender.workers}

    def workers_alive(self) -> dict[int, bool]:
        """Sender: whether each worker's process is connected and alive."""
        if self._sender is None:
            raise SchemeStateError("workers_alive is a sender call")
        return {w: self._sender.worker_alive(w) for w in self._sender.workers}

    def segment_names(self) -> list[str]:
        """Sender: the shared-memory segments of this scheme (``/dev/shm/<name>``)."""
        return [] if self._sender is None else self._sender.arena_names()

    def _shutdown_impl(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        receiver, self._receiver_transport = self._receiver_transport, None
        if receiver is not None:
            self._weights_version = receiver.version - 1
            receiver.close()
        self._sources = {}
        self._readers = {}
        self._tree_reads = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            _sender=None,
            _sources={},
            _readers={},
            _tree_reads={},
            _receiver_transport=None,
            _applied=None,
            _weights_version=0,
            _guard=None,
            _native_loop=None,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._guard = ReceiverLock()
