"""Shared-memory transport: moves whole weight versions through arenas, both ends.

The sender end (:class:`SharedMemSenderTransport`) owns one :class:`~weightsync.transports.arena.Arena`
per source and device group and writes each new version into a free slot of every targeted
arena; the worker end (:class:`SharedMemReceiverTransport`) takes the newest version offered to
it, in one of two ways:

- ``"copy"``: one batched copy from the slot into the worker's own tensors. For a worker whose
  tensors live on one GPU: one host-to-device DMA of the slot into a staging buffer, then one
  unpack launch (or, for a worker on the sender's GPU, one device-to-device copy out of a
  device arena shared by CUDA IPC).
- ``"view"`` (CPU workers): the worker's tensors *are* views into the slot. Taking a version
  re-points them (``tensor.data = view``, a pointer swap per tensor) at the new slot and lets
  the old one go. No payload byte moves on the worker.

Where weights live on each side:

- sender on CPU: ``pack`` of the source tensors straight into the slot (one native call);
- sender on a GPU: ``pack`` on the GPU into a device staging buffer (one launch), then one
  device-to-host DMA into the slot, which is page-locked with ``cudaHostRegister``;
- workers on the sender's GPU: the slots themselves live on that GPU.

The trainer's tensors are only ever read.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tensordict import is_non_tensor
from torch import nn

from weightsync import ops
from weightsync.engine import CopyPlan
from weightsync.engine.window import StorageWindow
from weightsync.errors import (
    BackendUnavailableError,
    DeviceMismatchError,
    LayoutMismatchError,
    PeerDiedError,
    SchemeStateError,
    WeightSyncTimeout,
)
from weightsync.transports.arena import _MAX_SLOTS, DEFAULT_TIMEOUT, Arena, Layout
from weightsync.transports.receive_loop import (
    MODE_COPY,
    MODE_WINDOW,
    NativeReceiveLoop,
    ReceiverLock,
    native_loop_available,
)
from weightsync.transports.send_path import (
    ACK_TIMEOUT,
    NEED_WRITE,
    NO_SLOT,
    WRITE_FAILED,
    NativeSendPath,
    native_send_available,
)

__all__ = [
    "ArenaTicket",
    "MODES",
    "SharedMemReceiverTransport",
    "SharedMemSenderTransport",
    "default_slots",
    "named_tensors",
]

#: The two ways a worker takes a version.
MODES = ("copy", "view")
#: Where TorchRL puts a module's extra state in a weights TensorDict (not carried here).
EXTRA_STATE_KEY = "__extra_state__"


# --------------------------------------------------------------------------------------------
# Weights <-> named tensors
# --------------------------------------------------------------------------------------------


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def _td_leaves(td: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """The tensor leaves of a TensorDict, walking its storage dicts directly: several times
    faster than ``items(True, True)``, which tests every entry with ``is_leaf``."""
    store = getattr(td, "_tensordict", None)
    if type(store) is not dict:  # lazy stacks, TensorDictParams, ...: the generic walk
        for k, v in td.items(True, True):
            if isinstance(v, torch.Tensor):
                out[prefix + (k if isinstance(k, str) else ".".join(k))] = v
        out.pop(prefix + EXTRA_STATE_KEY, None)
        return
    for k, v in store.items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif k != EXTRA_STATE_KEY and hasattr(v, "batch_size") and not is_non_tensor(v):
            _td_leaves(v, prefix + k + ".", out)


def named_tensors(weights: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, keyed by dotted names, in a stable order.

    Accepts an ``nn.Module`` (parameters then buffers, persistent or not, tied ones once), a
    TensorDict (leaves; nested keys joined with ``"."``) or a mapping (a state_dict, possibly
    nested). Returns the objects themselves (a module's parameters, not copies).
    """
    if isinstance(weights, nn.Module):
        return _module_tensors(weights)
    items = getattr(weights, "items", None)
    if items is None:
        raise TypeError(
            f"weights must be an nn.Module, a TensorDict or a mapping of tensors, "
            f"got {type(weights).__name__}"
        )
    if hasattr(weights, "batch_size"):  # a TensorDict
        out: dict[str, torch.Tensor] = {}
        _td_leaves(weights, "", out)
        return out
    out = {}
    stack: list[tuple[str, Mapping[str, Any]]] = [("", weights)]
    while stack:
        prefix, mapping = stack.pop()
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                out[key] = v
            elif isinstance(v, Mapping) or hasattr(v, "batch_size"):
                stack.append((key + ".", v if isinstance(v, Mapping) else named_tensors(v)))
            else:
                raise TypeError(f"weights entry {key!r} is a {type(v).__name__}, not a tensor")
    return out


class _ModuleReader:
    """Reads a module's current tensors in layout order without walking the module each time.

    Holds (owner dict, name) pairs, so a parameter that is *replaced* (``m.weight = ...``) is
    still seen; only adding or removing submodules needs a new reader.
    """

    def __init__(self, module: nn.Module, keys: Sequence[str]) -> None:
        self._slots: list[tuple[dict[str, Any], str]] = []
        for key in keys:
            owner_path, _, name = key.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            table = owner._parameters if name in owner._parameters else owner._buffers
            self._slots.append((table, name))

    def read(self) -> list[torch.Tensor]:
        return [table[name] for table, name in self._slots]


# --------------------------------------------------------------------------------------------
# Small device helpers
# --------------------------------------------------------------------------------------------


def _single_device(tensors: Iterable[torch.Tensor]) -> torch.device | None:
    """The device all ``tensors`` are on, or None when they span several."""
    device = None
    for t in tensors:
        if device is None:
            device = t.device
        elif t.device != device:
            return None
    return device if device is not None else torch.device("cpu")


def _copier(dst: list[torch.Tensor], src: list[torch.Tensor], parallel_min_bytes: int = 0
            ) -> Callable[[], None]:
    """A no-argument callable copying ``src`` into ``dst``, validated now (typed errors).

    A native plan runs as one call (``parallel_min_bytes`` as in :class:`CopyPlan`). Host-only
    lists on the torch backend skip the plan's per-call revalidation (a Python pass over every
    tensor) and run one ``_foreach_copy_``: the pairs were checked here, and the tensors it is
    handed are re-read at every call.
    """
    plan = CopyPlan(dst, src, parallel_min_bytes=parallel_min_bytes)
    if plan.backend == "native" or any(t.is_cuda for t in (*dst, *src)):
        return plan.run  # re-checks every tensor's storage, sizes and dtype in C++
    shapes, dtypes = [t.shape for t in dst], [t.dtype for t in dst]

    def run() -> None:
        # The same guarantee as the native plan's, for the cost of two list passes: a tensor
        # resized or re-viewed in place since (same object) must not be broadcast into.
        if [t.shape for t in src] != shapes or [t.shape for t in dst] != shapes \
                or [t.dtype for t in src] != dtypes or [t.dtype for t in dst] != dtypes:
            CopyPlan(dst, src)  # raises the typed error naming the index
        with torch.no_grad():
            torch._foreach_copy_(dst, src)

    return run


def _plan_address(copy: Callable[[], None]) -> int | None:
    """The native plan behind a :func:`_copier` callable, for C callers; None when Python runs it."""
    return getattr(getattr(copy, "__self__", None), "native_address", None)


class _Pinned:
    """Page-locks a host buffer for full-speed DMAs; undone by :meth:`release`."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer
        self._how: str | None = None
        try:
            ops.pin_memory_(buffer)
            self._how = "ops"
        except BackendUnavailableError:
            # The engine is not built: torch's own binding of the CUDA runtime does the same.
            err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
            if int(err) != 0:
                raise BackendUnavailableError(
                    f"cudaHostRegister of {buffer.numel()} bytes failed with CUDA error {int(err)}"
                ) from None
            self._how = "cudart"

    def release(self) -> None:
        how, self._how = self._how, None
        if how == "ops":
            ops.unpin_memory_(self._buffer)
        elif how == "cudart":
            torch.cuda.cudart().cudaHostUnregister(self._buffer.data_ptr())


# --------------------------------------------------------------------------------------------
# Tickets: what a worker needs to find its arena (picklable)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArenaTicket:
    """Where worker ``worker`` finds its weights.

    Attributes:
        name: the arena's shared-memory segment.
        index: the worker's index inside that arena.
        slot_device: ``"cpu"`` for a host arena, ``"cuda:k"`` for a device arena.
        device_slots: for a device arena, the CUDA IPC reduction ``(rebuild, args)`` of the
            tensor that holds every slot; None for a host arena.
    """

    name: str
    index: int
    slot_device: str = "cpu"
    device_slots: tuple[Callable[..., torch.Tensor], tuple[Any, ...]] | None = None


# --------------------------------------------------------------------------------------------
# Sender end
# --------------------------------------------------------------------------------------------


def _sender_parallel_min_bytes(workers: int) -> int:
    """The copier's threading threshold for a sender's host writes (0: the process default).

    A sender's workers run on the same machine (that is what shared memory is for) and, while
    sends come back to back, spin between them. When they can occupy every other core, a
    helper thread only takes turns with them and the sender waits for its last chunk: measured
    on a 2-core VM with 2 workers, a 0.9 MB send took 126 us with the write on one thread and
    158 us on two (view mode; copy mode 188 vs 273 us), while a 4.1 MB one took 604 us on one
    and 436 us on two. So with no core to spare, payloads under 2 MiB are written on one thread.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return _BUSY_MACHINE_PARALLEL_MIN_BYTES if workers + 1 >= cores else 0


_BUSY_MACHINE_PARALLEL_MIN_BYTES = 2 << 20


class _SenderArena:
    """One arena on the sender side and the fastest way to write it from the source device."""

    def __init__(
        self,
        layout: Layout,
        workers: Sequence[int],
        nslots: int,
        slot_device: torch.device,
        pin: bool,
        parallel_min_bytes: int = 0,
    ) -> None:
        self.layout = layout
        self.parallel_min_bytes = parallel_min_bytes
        self.workers = list(workers)
        self.local = {w: i for i, w in enumerate(self.workers)}
        self.slot_device = slot_device
        host = slot_device.type == "cpu"
        self.arena = Arena.create(layout, nslots, len(self.workers), host_slots=host)
        self.arena.worker_ids = self.workers
        self._pinned: _Pinned | None = None
        self._stage: torch.Tensor | None = None
        self._device_slots: torch.Tensor | None = None
        # Per slot, the last host source list written into it: (that list, its copy plan into
        # the slot, the native plan's address or 0).
        self._host_copies: list[tuple[list[torch.Tensor], Callable[[], None], int] | None] = \
            [None] * nslots
        # The same sends in one native call, when the library is active (see send_native).
        self._native: NativeSendPath | None = None
        try:
            if host:
                self.slots = [self.arena.slot_bytes(s) for s in range(nslots)]
                if pin:
                    self._pinned = _Pinned(self.arena.all_slots())
            else:
                stride = self.arena.slot_stride
                self._device_slots = torch.empty(nslots * stride, dtype=torch.uint8, device=slot_device)
                self.slots = [
                    self._device_slots[s * stride : s * stride + layout.nbytes] for s in range(nslots)
                ]
            self.views = [layout.views(flat) for flat in self.slots]
            if native_send_available():
                self._native = NativeSendPath(self.arena)
        except BaseException:
            self.close()
            raise
        self.offsets = list(layout.offsets)

    def ticket(self, worker: int) -> ArenaTicket:
        device_slots = None
        if self._device_slots is not None:
            from torch.multiprocessing.reductions import reduce_tensor

            device_slots = reduce_tensor(self._device_slots)
        return ArenaTicket(self.arena.name, self.local[worker], str(self.slot_device), device_slots)

    def write(self, slot: int, src: list[torch.Tensor], theirs: str = "weights to send") -> None:
        """Fill ``slot`` with ``src`` (layout order), complete on return.

        Validates before writing: a shape or dtype that differs from the layout raises
        naming the key, and the slot is left as it was.
        """
        cached = self._host_copies[slot]
        if cached is not None and cached[0] is src:
            # The scheme hands the very same list when it sends the same weights again; the
            # plan built for it then runs as one native call that re-checks, without Python
            # work per tensor, that no tensor was reallocated, resized or re-viewed (checking
            # 1000 shapes and dtypes in Python costs more than copying their bytes).
            try:
                cached[1]()
            except LayoutMismatchError:
                self.layout.check(src, theirs=theirs)  # the same refusal, naming the key
                raise
            return
        self.layout.check(src, theirs=theirs)
        flat = self.slots[slot]
        # The first tensor tells the path; the engine checks the others.
        src_device = src[0].device if src else self.slot_device
        if self.slot_device.type == "cuda":
            # Device arena: pack straight into the slot on the arena's GPU.
            with torch.cuda.device(self.slot_device):
                ops.pack_(src, flat, self.offsets)
                torch.cuda.current_stream().synchronize()
        elif src_device.type == "cuda":
            # One pack launch on the sender's GPU, then one DMA into the pinned slot.
            with torch.cuda.device(src_device):
                if self._stage is None or self._stage.device != src_device:
                    self._stage = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=src_device)
                ops.pack_(src, self._stage, self.offsets)
                flat.copy_(self._stage, non_blocking=True)
                torch.cuda.current_stream().synchronize()
        elif not any(t.is_cuda for t in src):
            # Host to host: a copy plan from the sources into the slot's typed views, kept for
            # the next write of the same source list into this slot (see above).
            copy = _copier(self.views[slot], src, self.parallel_min_bytes)
            self._host_copies[slot] = (src, copy, _plan_address(copy) or 0)
            copy()
        else:
            ops.pack_(src, flat, self.offsets)
            # Complete before publishing: wait for the streams that read the sources, not for
            # the whole device.
            for device in {t.device for t in src if t.is_cuda}:
                torch.cuda.current_stream(device).synchronize()

    def send_native(self, src: list[torch.Tensor], workers: list[int], version: int, *,
                    sync: bool, deadline: float) -> int:
        """Publish ``src`` as ``version`` to ``workers`` (arena indices) in one native call.

        Returns ``SENT``; ``ACK_TIMEOUT`` (published, and a target did not ack by
        ``deadline``: the caller's ``wait_acks`` names it); or ``NO_SLOT`` when nothing was
        published and the caller must take the Python path (no native path, no slot free at
        the first look, or a write that failed: that path waits, or raises the typed error).
        """
        native = self._native
        if native is None:
            return NO_SLOT
        plans = [c[2] if c is not None and c[0] is src else 0 for c in self._host_copies]
        code, slot = native.send(plans, workers, version, sync=sync,
                                 timeout=max(0.0, deadline - time.monotonic()))
        if code == NEED_WRITE:
            try:
                self.write(slot, src)
            except BaseException:
                native.abort(slot)
                raise
            code = native.finish(slot, workers, version, sync=sync,
                                 timeout=max(0.0, deadline - time.monotonic()))
        return NO_SLOT if code == WRITE_FAILED else code

    def close(self) -> None:
        if self._native is not None:
            self._native.free()
            self._native = None
        if self._pinned is not None:
            self._pinned.release()
            self._pinned = None
        self._device_slots = None
        self._stage = None
        self._host_copies = [None] * len(self._host_copies)  # their plans write into the mapping
        self.arena.close()


def default_slots(mode: str, sync: bool, workers: int) -> int:
    """The slots an arena shared by ``workers`` workers gets unless told otherwise.

    A slot is busy while it is offered to a worker that has not taken that offer yet, or
    while a worker holds it: the slot a view-mode worker's tensors view (until its next
    take), or the slot a copy-mode worker copies from (for that one copy). The sender needs
    one more slot to write, so each default is the busiest case plus one:

    - view, ``sync=False``: every worker can view one slot and have an untaken offer of
      another; after sends to subsets of them those offers all differ (worker 0 offered v,
      worker 1 offered v+1, ...): 2 x workers busy, 2 x workers + 1 slots. With fewer, a
      send can wait for a worker to take a version, which ``sync=False`` promises it never
      does.
    - view, ``sync=True``: a send returns once its targets took it, so no live worker keeps
      an untaken offer: workers viewed, one to write, one spare for a worker between taking
      a slot and letting go of the one it viewed: workers + 2.
    - copy, ``sync=False``: untaken offers (one per worker at most) and one to write; one
      spare for a copy under way: workers + 2. A slot held longer than one copy is always
      an offer, so a send waits at most for a copy already started, never for a worker that
      is slow to take versions.
    - copy, ``sync=True``: the version being copied, one to write, one spare: 3.

    Capped at the arena's limit of 255 slots (view mode without ``sync`` past 127 workers
    sharing one arena then loses the guarantee). With ``sync=True``, a send that timed out
    leaves untaken offers behind, so a later send can wait for a slot: it is bounded by the
    timeout and raises :class:`~weightsync.errors.WeightSyncTimeout` naming the holders, as
    the acks would.
    """
    if mode == "view":
        n = workers + 2 if sync else 2 * workers + 1
    else:
        n = 3 if sync else workers + 2
    return min(n, _MAX_SLOTS)


class SharedMemSenderTransport:
    """The sender end: one arena per (source, device group), written on every send.

    Args:
        sources: per arena to build, ``(named tensors, worker ids, slot device)``: the tensors
            define the layout; ``slot device`` is ``cpu`` (host arena) or the CUDA device of a
            device arena for workers on the sender's GPU.
        mode: ``"copy"`` or ``"view"``.
        slots: slots per arena; default :func:`default_slots` for the arena's workers, from
            ``mode`` and ``sync``.
        pin: page-lock host arenas (a GPU is on either end).
        sync: default of :meth:`send_weights`, and what the default slot count is sized for.
        timeout: default bound on every wait.
    """

    def __init__(
        self,
        sources: Sequence[tuple[Mapping[str, torch.Tensor], Sequence[int], torch.device]],
        *,
        mode: str = "copy",
        slots: int | None = None,
        pin: bool = False,
        sync: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.sync = sync
        self.timeout = timeout
        self._arenas: list[_SenderArena] = []
        self._by_worker: dict[int, _SenderArena] = {}
        self._lock = threading.Lock()
        self.version = 0
        parallel_min_bytes = _sender_parallel_min_bytes(sum(len(s[1]) for s in sources))
        try:
            for named, workers, slot_device in sources:
                layout = Layout.from_tensors(named.items())
                n = slots if slots is not None else default_slots(mode, sync, len(workers))
                sa = _SenderArena(layout, workers, n, torch.device(slot_device), pin,
                                  parallel_min_bytes)
                self._arenas.append(sa)
                for w in workers:
                    if w in self._by_worker:
                        raise ValueError(f"worker {w} is listed in two arenas")
                    self._by_worker[w] = sa
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> list[int]:
        return sorted(self._by_worker)

    def layout_of(self, worker: int) -> Layout:
        return self._arena_of(worker).layout

    def arena_names(self) -> list[str]:
        return [sa.arena.name for sa in self._arenas]

    def tickets(self) -> dict[int, ArenaTicket]:
        """What each worker needs to attach (picklable)."""
        return {w: sa.ticket(w) for w, sa in self._by_worker.items()}

    def _arena_of(self, worker: int) -> _SenderArena:
        try:
            return self._by_worker[worker]
        except KeyError:
            raise SchemeStateError(
                f"worker {worker} is not registered with this sender (workers {self.workers})"
            ) from None

    def send(
        self,
        weights: Callable[[Layout, Sequence[int]], list[torch.Tensor]],
        worker_ids: Sequence[int] | None = None,
        *,
        sync: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> int:
        """Publish a new version to ``worker_ids`` (all workers when None).

        Args:
            weights: ``weights(layout, workers)`` returns the source tensors in ``layout``
                order for the workers of one arena (it raises for missing keys). Shapes and
                dtypes are checked by each arena's write before its slot changes; any failure
                publishes nothing.
            sync: wait until every targeted worker acked the version.
            timeout: bound on finding a free slot and on the acks.

        Returns:
            The version published.

        Raises:
            WeightSyncTimeout: ``sync`` and a worker did not ack within ``timeout``.
        """
        targets = self.workers if worker_ids is None else list(worker_ids)
        plan: list[tuple[_SenderArena, list[int], list[torch.Tensor]]] = []
        grouped: dict[int, tuple[_SenderArena, list[int]]] = {}
        for w in targets:
            sa = self._arena_of(w)
            grouped.setdefault(id(sa), (sa, []))[1].append(w)
        # Validate every arena's sources before the first byte is written.
        for sa, ws in grouped.values():
            plan.append((sa, ws, weights(sa.layout, ws)))
        with self._lock:
            deadline = time.monotonic() + timeout
            if len(plan) == 1:
                sa, ws, src = plan[0]
                local = [sa.local[w] for w in ws]
                code = sa.send_native(src, local, self.version + 1, sync=sync, deadline=deadline)
                if code != NO_SLOT:
                    self.version += 1
                    if code == ACK_TIMEOUT:
                        sa.arena.wait_acks(local, self.version, 0.0)  # raises, naming them
                    return self.version
            # Every arena's slot is written before any is published: a version reaches all
            # the targeted workers or none (no free slot in one arena publishes nothing).
            written: list[tuple[_SenderArena, int]] = []
            try:
                for sa, ws, src in plan:
                    slot = sa.arena.acquire_slot(max(0.0, deadline - time.monotonic()))
                    written.append((sa, slot))
                    sa.write(slot, src)
            except BaseException:
                for sa, slot in written:
                    sa.arena.abort_slot(slot)
                raise
            self.version += 1
            version = self.version
            for sa, slot in written:
                sa.arena.commit_slot(slot, version)
            for (sa, slot), (_, ws, _) in zip(written, plan):
                sa.arena.publish(slot, version, [sa.local[w] for w in ws])
            if sync:
                for sa, ws, _ in plan:
                    sa.arena.wait_acks(
                        [sa.local[w] for w in ws], version, max(0.0, deadline - time.monotonic())
                    )
        return version

    def send_weights(self, weights: Any, worker_ids: Sequence[int] | None = None) -> None:
        """TransportBackend: publish ``weights`` (a module, TensorDict or dict) to the workers."""

        def source(layout: Layout, workers: Sequence[int]) -> list[torch.Tensor]:
            return layout.match(named_tensors(weights), theirs="weights to send", ours="arena")

        self.send(source, worker_ids, sync=self.sync, timeout=self.timeout)

    def receive_weights(self, timeout: float | None = None, **kwargs: Any) -> None:
        """TransportBackend: a sender receives nothing."""
        raise SchemeStateError("receive_weights is a worker call; this is the sender end")

    def acked(self, worker: int) -> int:
        """The newest version ``worker`` acknowledged."""
        sa = self._arena_of(worker)
        return sa.arena.acked(sa.local[worker])

    def worker_alive(self, worker: int) -> bool:
        sa = self._arena_of(worker)
        return sa.arena.worker_alive(sa.local[worker])

    def close(self) -> None:
        """Tell workers we are gone, and remove every segment."""
        arenas, self._arenas = self._arenas, []
        self._by_worker = {}
        for sa in arenas:
            sa.close()


# --------------------------------------------------------------------------------------------
# Worker end
# --------------------------------------------------------------------------------------------


class SharedMemReceiverTransport:
    """The worker end: takes the newest version offered to it.

    Args:
        ticket: where the arena is (from the sender's :meth:`SharedMemSenderTransport.tickets`).
        worker: this worker's id (for messages).
        mode: ``"copy"`` or ``"view"``.

    Every apply runs under :attr:`lock`, an ``RLock``; hold it around inference to keep an
    update from landing in the middle of a forward pass.
    """

    def __init__(self, ticket: ArenaTicket, worker: int, *, mode: str = "copy") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.ticket = ticket
        self.worker = worker
        self.mode = mode
        self._version = 0
        #: Held around every apply; hold it around inference (the scheme's ``guard()`` does).
        self.lock = ReceiverLock()
        #: Called under ``lock`` after each version :meth:`poll` applied, before its ack: the
        #: scheme counts it there, so whoever sees the new weights (under the lock) or the
        #: sender's return (after the ack) also sees the count. The native loop counts its own.
        self.on_applied: Callable[[], None] | None = None
        # The C++ loop applying versions while a background receiver runs (native library);
        # while it exists, it holds this worker's version and mapped slot.
        self._loop: NativeReceiveLoop | None = None
        self.arena: Arena | None = None
        self.tensors: list[torch.Tensor] = []
        self.keys: tuple[str, ...] = ()
        self._apply: Callable[[int], int] | None = None
        self._views: list[list[torch.Tensor]] = []
        # View mode with the native library: the tensors view one window re-pointed per slot.
        self._window: StorageWindow | None = None
        self._window_views: list[torch.Tensor] = []
        self._slot_addresses: list[int] = []
        self._plans: list[Callable[[], None]] = []
        self._mapped_slot = -1
        self._pinned: _Pinned | None = None
        self._device_slots: torch.Tensor | None = None
        self._stage: torch.Tensor | None = None
        self._unpack: Callable[[], None] | None = None
        self._cuda: torch.device | None = None
        # CUDA devices whose current stream must finish a copy before its slot is released.
        self._sync_devices: list[torch.device] = []

    @property
    def version(self) -> int:
        """The version this worker holds (0: none yet)."""
        return self._loop.version if self._loop is not None else self._version

    @version.setter
    def version(self, value: int) -> None:
        if self._loop is not None:
            self._loop.version = value
        else:
            self._version = value

    @property
    def _mapped(self) -> int:
        """View mode: the slot this worker's tensors view (-1: none)."""
        return self._loop.mapped if self._loop is not None else self._mapped_slot

    @_mapped.setter
    def _mapped(self, slot: int) -> None:
        if self._loop is not None:
            self._loop.mapped = slot
        else:
            self._mapped_slot = slot

    @property
    def layout(self) -> Layout:
        if self.arena is None:
            raise SchemeStateError(f"worker {self.worker} is not connected")
        return self.arena.layout

    # -- connect -----------------------------------------------------------------------------

    def connect(
        self,
        destination: Mapping[str, torch.Tensor] | None,
        *,
        device: torch.device | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        materialize: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Attach, check the layout against ``destination``, and take the first version.

        Args:
            destination: the worker's tensors by name (a model's parameters and buffers); None
                to receive into tensors of our own (``device``, CPU by default).
            timeout: how long to wait for the sender's first version.
            materialize: for a ``destination`` of meta tensors: called once the layout
                matched, returns the tensors with storage to receive into.

        Raises:
            KeyMismatchError / ShapeMismatchError / DTypeMismatchError: ``destination`` differs
                from the sender's layout; nothing is applied.
            WeightSyncTimeout / PeerDiedError: no first version within ``timeout``.
        """
        arena = Arena.attach(self.ticket.name)
        try:
            layout = arena.layout
            if destination is not None:
                theirs = f"worker {self.worker} model"
                dst = layout.match(dict(destination), theirs=theirs)
                mine = Layout.from_tensors(zip(layout.keys, dst))
                if mine.hash != layout.hash:
                    raise LayoutMismatchError(
                        f"worker {self.worker}: layout hash {mine.hash:#x} differs from the "
                        f"sender's {layout.hash:#x} although every key, shape and dtype matches "
                        "(different weightsync versions on the two ends?)"
                    )
                if materialize is not None:
                    dst = layout.match(dict(materialize()), theirs=theirs)
            else:
                dev = torch.device(device or "cpu")
                dst = [torch.empty(e.shape, dtype=e.dtype, device=dev) for e in layout.entries]
            self._setup(arena, dst)
            arena.join(self.ticket.index, worker_id=self.worker)
        except BaseException:
            self._teardown()
            arena.close()
            raise
        self.arena = arena
        self.keys = layout.keys
        self.tensors = dst
        try:
            if not arena.wait_offer(0, timeout):
                raise WeightSyncTimeout(
                    f"worker {self.worker}: no weights from the sender of arena {arena.name} "
                    f"within {timeout:.3g} s",
                    workers=[self.worker],
                    alive={self.worker: True},
                )
            if not self.poll():
                raise SchemeStateError(f"worker {self.worker}: the first version vanished at connect")
        except BaseException:
            self.close()
            raise

    def _setup(self, arena: Arena, dst: list[torch.Tensor]) -> None:
        layout = arena.layout
        ticket = self.ticket
        dst_device = _single_device(dst)
        if self.mode == "view":
            if ticket.slot_device != "cpu" or dst_device is None or dst_device.type != "cpu":
                raise DeviceMismatchError(
                    f"worker {self.worker}: view mode needs a CPU worker reading a host arena; "
                    f"its tensors are on {sorted({str(t.device) for t in dst})} and the arena's "
                    f"slots on {ticket.slot_device}; use mode='copy'"
                )
            if StorageWindow.available():
                self._slot_addresses = [arena.slot_bytes(s).data_ptr() for s in range(arena.nslots)]
                self._window = StorageWindow(layout.nbytes)
                self._window_views = layout.views(self._window.tensor)
                self._apply = self._apply_window
            else:
                self._views = [layout.views(arena.slot_bytes(s)) for s in range(arena.nslots)]
                self._apply = self._apply_view
            return
        if ticket.device_slots is not None:
            fn, args = ticket.device_slots
            self._device_slots = fn(*args)
            stride = arena.slot_stride
            flats = [self._device_slots[s * stride : s * stride + layout.nbytes] for s in range(arena.nslots)]
            self._cuda = self._device_slots.device
            self._sync_devices = [self._cuda]
            self._plans = [_copier(dst, layout.views(f)) for f in flats]
            self._apply = self._apply_plan
            return
        if dst_device is not None and dst_device.type == "cuda":
            # One DMA of the whole slot into a staging buffer, then one unpack launch.
            self._pinned = _Pinned(arena.all_slots())
            self._cuda = dst_device
            self._stage = torch.empty(layout.nbytes, dtype=torch.uint8, device=dst_device)
            self._unpack = _copier(dst, layout.views(self._stage))
            self._apply = self._apply_staged
            return
        if any(t.is_cuda for t in dst):
            # Tensors on several devices: a batched copy per slot, through pinned memory.
            self._pinned = _Pinned(arena.all_slots())
            self._sync_devices = sorted({t.device for t in dst if t.is_cuda}, key=str)
        self._plans = [_copier(dst, layout.views(arena.slot_bytes(s))) for s in range(arena.nslots)]
        self._apply = self._apply_plan

    # -- taking versions ---------------------------------------------------------------------

    # Each _apply_* applies ``slot`` and returns the slot this worker no longer needs (-1:
    # none); poll() acks first and releases after, so the sender hears one syscall sooner.

    def _apply_plan(self, slot: int) -> int:
        self._plans[slot]()
        for device in self._sync_devices:
            # The copy is complete only once the GPU finished it; then the slot may be reused.
            torch.cuda.current_stream(device).synchronize()
        return slot

    def _apply_staged(self, slot: int) -> int:
        with torch.cuda.device(self._cuda):
            stream = torch.cuda.current_stream()
            self._stage.copy_(self.arena.slot_bytes(slot), non_blocking=True)
            stream.synchronize()
            # The slot is no longer read: let the sender have it while the GPU unpacks.
            self.arena.release_slot(slot)
            self._unpack()
            stream.synchronize()
        return -1

    def _apply_view(self, slot: int) -> int:
        views = self._views[slot]
        # ``.data =`` swaps the tensor's storage pointer and keeps the Python object (the
        # module's Parameter stays the same object); it is about 6x cheaper than set_().
        for t, v in zip(self.tensors, views):
            t.data = v
        return self._now_viewing(slot)

    def _apply_window(self, slot: int) -> int:
        # The tensors view the window; pointing it at the slot moves all of them at once. They
        # are (re)bound the first time, after privatize(), and whenever one was given other
        # storage since (it would keep an old version while the others move on).
        window = self._window
        window.point_at(self._slot_addresses[slot])
        if not window.bound():
            window.bind(self.tensors, self._window_views)
            if self._loop is not None:
                self._loop.bind(window.impls, window.offsets, len(self.tensors))
        return self._now_viewing(slot)

    def _now_viewing(self, slot: int) -> int:
        old, self._mapped = self._mapped, slot
        self.arena.set_mapped(slot)
        return old if old != slot else -1

    def poll(self) -> bool:
        """Apply the newest version offered to this worker if it is newer. Never blocks."""
        arena = self.arena
        if arena is None:
            raise SchemeStateError(f"worker {self.worker} is not connected")
        with self.lock:
            got = arena.open_offer(self.version)
            if got is None:
                return False
            version, slot = got
            try:
                done = self._apply(slot)
            except BaseException:
                if slot != self._mapped:
                    arena.release_slot(slot)
                raise
            self.version = version
            if self.on_applied is not None:
                self.on_applied()
            arena.ack(version)
            if done >= 0:
                arena.release_slot(done)
            return True

    def receive(self, wait: float = 0.0) -> int | None:
        """Apply the newest version if newer, waiting up to ``wait`` seconds for one.

        Returns the version applied, or None when nothing newer came.

        Raises:
            PeerDiedError: the sender died or shut down and nothing newer is on offer.
        """
        if self.poll():
            return self.version
        arena = self.arena
        if wait > 0 and arena.wait_offer(self.version, wait):
            if self.poll():
                return self.version
        if not arena.sender_alive():
            if self.poll():
                return self.version
            # The same words whichever wait noticed first (see Arena.wait_offer).
            raise PeerDiedError(arena._sender_gone_message())
        return None

    def receive_weights(
        self,
        timeout: float | None = None,
        *,
        weights: Any = None,
        model: Any = None,
        strategy: Any = None,
    ) -> dict[str, torch.Tensor] | None:
        """TransportBackend: apply the newest version if newer (waiting up to ``timeout``).

        The weights land in the tensors bound at :meth:`connect` (``model`` and ``strategy``
        are not needed); returns them by name, or None when nothing newer came.
        """
        if self.receive(0.0 if timeout is None else timeout) is None:
            return None
        return dict(zip(self.keys, self.tensors))

    def send_weights(self, weights: Any) -> None:
        """TransportBackend: a worker sends nothing."""
        raise SchemeStateError("send_weights is a sender call; this is a worker end")

    def wait(self, timeout: float) -> bool:
        """Block until a version newer than ours is offered (True) or ``timeout`` (False)."""
        return self.arena.wait_offer(self.version, timeout)

    # -- the native loop ---------------------------------------------------------------------

    def start_native_loop(self) -> NativeReceiveLoop | None:
        """Build and attach the C++ receive loop, if this worker's takes can run natively.

        They can with the native library, on a host arena, in copy mode with native copy plans
        into CPU tensors, or in view mode with a storage window. Returns the loop (run it from
        one thread, then :meth:`stop_native_loop`), or None: the Python path applies then.
        """
        arena = self.arena
        if arena is None or self._loop is not None or not native_loop_available():
            return None
        if self._apply == self._apply_window and self._window is not None:
            mode, targets, window = MODE_WINDOW, list(self._slot_addresses), self._window.storage
        elif self._apply == self._apply_plan and not self._sync_devices and self._plans:
            addresses = [_plan_address(p) for p in self._plans]
            if any(a is None for a in addresses):
                return None
            mode, targets, window = MODE_COPY, addresses, 0
        else:
            return None
        with self.lock:
            loop = NativeReceiveLoop(arena.native_words(), arena.segment.fd, mode, targets,
                                     window=window, version=self._version,
                                     mapped=self._mapped_slot)
            if mode == MODE_WINDOW:
                if self._window.bound():
                    loop.bind(self._window.impls, self._window.offsets, len(self.tensors))
                else:
                    loop.bind(None, None, -1)
            self._loop = loop
            self.lock.attach(loop)
        return loop

    def stop_native_loop(self) -> None:
        """Detach and free the loop (its ``run`` must have returned); state moves back here."""
        loop = self._loop
        if loop is None:
            return
        with self.lock:
            self._version, self._mapped_slot = loop.version, loop.mapped
            self._loop = None
            self.lock.attach(None)
        loop.free()

    # -- teardown ----------------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._pinned is not None:
            self._pinned.release()
            self._pinned = None
        self._plans = []
        self._unpack = None
        self._stage = None
        self._device_slots = None

    def privatize(self) -> None:
        """View mode: give the tensors private copies of the version they view and let the
        slot go (before anything writes into them; the next version re-points them)."""
        with self.lock:
            if self._mapped < 0:
                return
            for t in self.tensors:
                t.data = t.data.clone()
            if self._window is not None:
                self._window.unbind()
                if self._loop is not None:
                    self._loop.bind(None, None, -1)
            slot, self._mapped = self._mapped, -1
            if self.arena is not None:
                self.arena.set_mapped(-1)
                self.arena.release_slot(slot)

    def close(self) -> None:
        """Detach. In view mode the tensors first get private copies of the version they view."""
        if self._loop is not None:
            # A native loop still attached means its thread did not stop in time: it may yet
            # read the mapping, so the mapping stays (the sender removes the segment's name).
            self._loop.stop()
            return
        with self.lock:
            self.privatize()
            self._views = []
            self._window_views = []
            self._window = None  # points into the mapping: dropped before it is unmapped
            self._teardown()
            arena, self.arena = self.arena, None
            if arena is not None:
                arena.close()
