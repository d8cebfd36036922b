"""The versioned shared-memory arena: layout, header, slots and the version protocol.

An arena carries the weights of one model (one device group) from one sender to a fixed set of
workers. It lives in a :class:`~weightsync.transports.shm_segment.ShmSegment`::

    [ header | worker records | layout (JSON) | slot 0 | slot 1 | ... | slot N-1 ]

- The **layout** is the ordered list of ``(key, dtype, shape, offset, nbytes)`` entries of one
  flat buffer; every offset is 256-byte aligned (what vectorised CPU and CUDA copies want).
  Both ends compare its hash at connect.
- A **slot** holds one whole version of the weights in that layout. The sender only writes a
  slot that no worker is reading or viewing and that is not offered to any worker; then it
  *offers* ``(version, slot)`` to the targeted workers. A worker applies a slot only if it still
  holds the version it was offered, so it never sees a mix of two versions.
- **Exclusion** uses Linux open-file-description byte-range locks (``F_OFD_SETLK``) on the
  segment's file, one byte per slot: a worker holds a shared lock on a slot while it copies from
  it (copy mode) or for as long as its tensors are views into it (view mode); the sender takes a
  non-blocking exclusive lock on a slot before writing it. The kernel drops the locks of a
  process that dies, so a killed worker never wedges a slot. Lock and unlock also order memory
  (the kernel's lock is a release/acquire pair), so a reader that got the lock after the writer
  released it sees every byte the writer stored, on any CPU. A per-slot sequence number
  (seqlock) is checked as a second line of defence.
- **Presence** is a lock too: the sender and each connected worker hold an exclusive lock on
  their own byte for as long as they live; the other side tests it with ``F_OFD_GETLK``. A
  dead process (even an unreaped zombie) holds no lock, and pids that are reused do not fool it.
- **Signalling**: each worker record has an offer word written only by the sender, and an
  acked version and a 32-bit futex word written only by that worker; the header has one
  publish futex word, bumped by the sender (one wake per publish, whatever the number of
  workers). Single-writer words need no atomic read-modify-write, and a waiter always sees a
  changed word or gets the wake. No pickling and no queues per update.

Memory ordering: header words are aligned 8-byte (or 4-byte) stores and loads through a
memoryview, single instructions on x86-64 and aarch64. The payload-before-offer order relies on
the slot lock above; the acked-version word carries no payload, so it needs no barrier.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from weightsync.engine import futex_wait, futex_wake, native_futex
from weightsync.errors import (
    DTypeMismatchError,
    KeyMismatchError,
    LayoutMismatchError,
    PeerDiedError,
    SchemeStateError,
    ShapeMismatchError,
    WeightSyncError,
    WeightSyncTimeout,
)
from weightsync.transports.shm_segment import ShmSegment

__all__ = [
    "ALIGNMENT",
    "Arena",
    "Layout",
    "LayoutEntry",
    "DEFAULT_TIMEOUT",
]

#: Alignment of every tensor inside a slot, in bytes.
ALIGNMENT = 256
#: Slots start on page boundaries so that each can be pinned or mapped on its own.
_SLOT_ALIGNMENT = 4096
#: Default bound on every wait, in seconds.
DEFAULT_TIMEOUT = 10.0
#: How often a long wait looks at whether the other side is still alive, in seconds.
_LIVENESS_PERIOD = 0.02


def spin_seconds(name: str, default_us: int) -> float:
    """Microseconds from environment variable ``name`` (``default_us`` when unset), in seconds."""
    value = os.environ.get(name, "").strip()
    try:
        return max(0, int(value)) * 1e-6 if value else default_us * 1e-6
    except ValueError:
        raise ValueError(f"{name} must be a whole number of microseconds, got {value!r}") from None


#: A sync sender waiting for acks first looks at the ack word this long (yielding the core)
#: before it sleeps, while acks come quickly (the last send's all came within twice this):
#: idle workers answer within tens of microseconds, and a sleep costs a wake-up as long. Busy
#: workers answer late; spinning would only take a core they need.
#: (WEIGHTSYNC_ACK_SPIN_US; 0 turns it off.)
_ACK_SPIN = spin_seconds("WEIGHTSYNC_ACK_SPIN_US", 100)

_MAGIC = 0x314E455241535357  # b"WSSAREN1", little-endian
_FORMAT = 2
_MAX_SLOTS = 255  # the slot index lives in the low byte of an offer word

# Header: constants (int64 words, by byte offset), then the publish futex word on its own line.
_H_MAGIC, _H_FORMAT, _H_HASH, _H_NSLOTS, _H_NWORKERS = 0, 8, 16, 24, 32
_H_SLOT_STRIDE, _H_SLOTS_OFF, _H_LAYOUT_OFF, _H_LAYOUT_LEN = 40, 48, 56, 64
_H_SENDER_PID, _H_CLOSED, _H_PAYLOAD, _H_HOST_SLOTS = 72, 80, 88, 96
_H_PUB_FUTEX = 128  # bumped by the sender on every publish
# 1 while the sender sleeps on an ack word: only then does an ack cost the worker a wake
# syscall (an async sender never sleeps on acks, so its workers never pay it).
_H_ACK_SLEEPING = 136
_SLOT_RECORDS = 192  # 64 bytes per slot from here: seq, version
_SLOT_RECORD = 64
_S_SEQ, _S_VERSION = 0, 8
_WORKER_RECORD = 128  # two cache lines: the first written by the sender, the second by the worker
_W_OFFER = 0
_W_ACKED, _W_ACK_FUTEX, _W_PID, _W_MAPPED, _W_JOINED = 64, 72, 80, 88, 96

# Lock bytes (advisory; they do not overlap anything real, locks may lie beyond the end of file).
_LOCK_SENDER = 1 << 30
_LOCK_WORKER = (1 << 30) + 1

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


# --------------------------------------------------------------------------------------------
# futex
# --------------------------------------------------------------------------------------------


def _futex_calls() -> tuple[Callable[..., bool], Callable[[torch.Tensor], int]]:
    """(wait, wake) for header words, chosen once per arena.

    With the native futex these call the engine's ops directly: the checked wrappers of
    :mod:`weightsync.engine` re-read the backend choice from the environment on every call,
    which costs more than the syscall itself, on a path taken several times per update. The
    words here are always valid (1-element int32 views of the mapping).
    """
    if not native_futex():
        return futex_wait, futex_wake
    wait_op = torch.ops.weightsync.futex_wait
    wake_op = torch.ops.weightsync.futex_wake

    def wait(word: torch.Tensor, expected: int, timeout: float, spin: float = 0.0) -> bool:
        return bool(wait_op(word, expected, timeout, spin))

    def wake(word: torch.Tensor) -> int:
        return int(wake_op(word, 2**31 - 1))

    return wait, wake


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise LayoutMismatchError(f"unknown dtype {name!r} in arena layout")
    return dtype


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of a layout: where its bytes live inside a slot."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class Layout:
    """The ordered, aligned placement of a set of named tensors in one flat buffer.

    Args:
        entries: the entries, in order; offsets must be :data:`ALIGNMENT`-aligned and disjoint.
    """

    def __init__(self, entries: Sequence[LayoutEntry]) -> None:
        self.entries: tuple[LayoutEntry, ...] = tuple(entries)
        self.keys: tuple[str, ...] = tuple(e.key for e in self.entries)
        self.offsets: tuple[int, ...] = tuple(e.offset for e in self.entries)
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.keys)}
        if len(self.index) != len(self.keys):
            dup = next(k for k in self.keys if self.keys.count(k) > 1)
            raise KeyMismatchError(f"key {dup!r} appears twice in the layout")
        self.nbytes: int = max((e.offset + e.nbytes for e in self.entries), default=0)
        self.hash: int = self._digest()
        self.shapes: list[tuple[int, ...]] = [e.shape for e in self.entries]
        self.dtypes: list[torch.dtype] = [e.dtype for e in self.entries]

    @classmethod
    def from_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Layout:
        """Place ``named`` tensors one after the other, each on an :data:`ALIGNMENT` boundary."""
        entries = []
        offset = 0
        for key, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weight {key!r} is a {type(t).__name__}, not a tensor")
            nbytes = t.numel() * t.element_size()
            entries.append(LayoutEntry(key, t.dtype, tuple(t.shape), offset, nbytes))
            offset = _align(offset + nbytes, ALIGNMENT)
        return cls(entries)

    def _digest(self) -> int:
        h = hashlib.blake2b(digest_size=8)
        for e in self.entries:
            h.update(f"{e.key}\0{_dtype_name(e.dtype)}\0{e.shape}\0{e.offset}\0{e.nbytes}\n".encode())
        return int.from_bytes(h.digest(), "little") & (2**63 - 1)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.entries == other.entries

    def __hash__(self) -> int:
        return self.hash

    def __repr__(self) -> str:
        return f"Layout({len(self)} tensors, {self.nbytes} bytes, hash={self.hash:016x})"

    def to_json(self) -> bytes:
        return json.dumps(
            [[e.key, _dtype_name(e.dtype), list(e.shape), e.offset, e.nbytes] for e in self.entries],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Layout:
        return cls(
            [LayoutEntry(k, _dtype_from_name(d), tuple(s), o, n) for k, d, s, o, n in json.loads(data)]
        )

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each entry into ``flat`` (1-D ``uint8``, at least :attr:`nbytes` long)."""
        out = []
        for e in self.entries:
            chunk = flat[e.offset : e.offset + e.nbytes]
            out.append(chunk.view(e.dtype).view(e.shape))
        return out

    def check(self, tensors: Sequence[torch.Tensor], *, theirs: str, ours: str = "arena") -> None:
        """Raise naming the key when ``tensors`` (in this layout's order) differ in shape or
        dtype from it; return when they fit."""
        if [t.shape for t in tensors] == self.shapes and [t.dtype for t in tensors] == self.dtypes:
            return
        if len(tensors) != len(self.entries):
            raise KeyMismatchError(f"{theirs}: {len(tensors)} tensors for the {len(self.entries)} of the {ours}")
        for e, t in zip(self.entries, tensors):
            if tuple(t.shape) != e.shape:
                raise ShapeMismatchError(f"key {e.key!r}: {ours} shape {list(e.shape)}, {theirs} shape {list(t.shape)}")
            if t.dtype != e.dtype:
                raise DTypeMismatchError(
                    f"key {e.key!r}: {ours} dtype {_dtype_name(e.dtype)}, {theirs} dtype {_dtype_name(t.dtype)}"
                )

    def match(
        self,
        named: dict[str, torch.Tensor],
        *,
        theirs: str = "worker model",
        ours: str = "sender",
    ) -> list[torch.Tensor]:
        """Return ``named``'s tensors in this layout's order, or raise naming what differs.

        Raises:
            KeyMismatchError: a key is missing from ``named`` or only in ``named``.
            ShapeMismatchError / DTypeMismatchError: a key has another shape or dtype.
        """
        # The common case (everything fits) in a few list passes; the loop below names the
        # first difference otherwise.
        if len(named) == len(self.keys):
            try:
                out = [named[k] for k in self.keys]
                if [t.shape for t in out] == self.shapes and [t.dtype for t in out] == self.dtypes:
                    return out
            except (KeyError, AttributeError):
                pass
        out = []
        for e in self.entries:
            t = named.get(e.key)
            if t is not None and not isinstance(t, torch.Tensor):
                raise DTypeMismatchError(f"{theirs} entry {e.key!r} is a {type(t).__name__}, not a tensor")
            if t is None:
                raise KeyMismatchError(
                    f"{theirs} has no tensor {e.key!r} ({_dtype_name(e.dtype)}{list(e.shape)}) "
                    f"that the {ours} sends"
                )
            if tuple(t.shape) != e.shape:
                raise ShapeMismatchError(
                    f"key {e.key!r}: {ours} shape {list(e.shape)}, {theirs} shape {list(t.shape)}"
                )
            if t.dtype != e.dtype:
                raise DTypeMismatchError(
                    f"key {e.key!r}: {ours} dtype {_dtype_name(e.dtype)}, "
                    f"{theirs} dtype {_dtype_name(t.dtype)}"
                )
            out.append(t)
        if len(named) != len(self.entries):
            extra = [k for k in named if k not in self.index]
            raise KeyMismatchError(
                f"{theirs} has tensor {extra[0]!r} that the {ours} does not send"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        return out


# --------------------------------------------------------------------------------------------
# OFD locks
# --------------------------------------------------------------------------------------------


def _lock(fd: int, start: int, kind: int) -> bool:
    """Non-blocking OFD lock of one byte; False if another open file description conflicts."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int, start: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, 1, 0))


def _held_by_other(fd: int, start: int) -> bool:
    """Whether another open file description holds any lock on byte ``start``."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


# --------------------------------------------------------------------------------------------
# Arena
# --------------------------------------------------------------------------------------------


class Arena:
    """One end (sender or worker) of a shared-memory arena.

    Build the sender end with :meth:`create` and worker ends with :meth:`attach`. An arena is
    used by one thread at a time on each end (the transport serialises its callers).

    Args:
        segment: the mapped segment.
        role: ``"sender"`` or ``"worker"``.
    """

    def __init__(self, segment: ShmSegment, role: str) -> None:
        self.segment = segment
        self.role = role
        buf = segment.buffer
        self._q = buf.cast("q")
        self._i = buf.cast("i")
        try:
            self._read_header(segment)
        except BaseException:
            self._q.release()
            self._i.release()
            raise
        #: How messages name the workers of this arena (the scheme's ids; indices by default).
        self.worker_ids: list[int] = list(range(self.nworkers))
        self.worker: int | None = None
        self._slot_cursor = 0
        self._acks_quick = True  # whether the last sync send's acks all came quickly

    def _read_header(self, segment: ShmSegment) -> None:
        buf = segment.buffer
        q = self._q
        if q[_H_MAGIC // 8] != _MAGIC or q[_H_FORMAT // 8] != _FORMAT:
            raise LayoutMismatchError(
                f"segment {segment.name} is not a weightsync arena of format {_FORMAT} "
                f"(magic {q[_H_MAGIC // 8]:#x}, format {q[_H_FORMAT // 8]})"
            )
        self.nslots: int = q[_H_NSLOTS // 8]
        self.nworkers: int = q[_H_NWORKERS // 8]
        self.slot_stride: int = q[_H_SLOT_STRIDE // 8]
        self.slots_offset: int = q[_H_SLOTS_OFF // 8]
        self.host_slots: bool = bool(q[_H_HOST_SLOTS // 8])
        lo, ln = q[_H_LAYOUT_OFF // 8], q[_H_LAYOUT_LEN // 8]
        self.layout: Layout = Layout.from_json(bytes(buf[lo : lo + ln]))
        if self.layout.hash != q[_H_HASH // 8]:
            raise LayoutMismatchError(
                f"arena {segment.name}: layout hash {self.layout.hash:#x} does not match the "
                f"header's {q[_H_HASH // 8]:#x}"
            )
        self._wait, self._wake = _futex_calls()
        words = segment.tensor
        self._pub_word = self._word(words, _H_PUB_FUTEX)
        self._ack_words = [self._word(words, self._wrec(w) + _W_ACK_FUTEX) for w in range(self.nworkers)]

    @staticmethod
    def _word(flat: torch.Tensor, offset: int) -> torch.Tensor:
        return flat[offset : offset + 4].view(torch.int32)

    def _wrec(self, w: int) -> int:
        return _SLOT_RECORDS + _SLOT_RECORD * self.nslots + _WORKER_RECORD * w

    @staticmethod
    def _srec(s: int) -> int:
        return _SLOT_RECORDS + _SLOT_RECORD * s

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, layout: Layout, nslots: int, nworkers: int, *, host_slots: bool = True) -> Arena:
        """Create the sender end: a new segment with ``nslots`` slots for ``nworkers`` workers.

        Args:
            host_slots: put the slots in the segment. ``False`` builds a header-only arena whose
                slot memory lives elsewhere (a device arena shared by CUDA IPC).
        """
        if not 2 <= nslots <= _MAX_SLOTS:
            raise ValueError(f"slots must be between 2 and {_MAX_SLOTS}, got {nslots}")
        if nworkers < 1:
            raise ValueError(f"an arena needs at least one worker, got {nworkers}")
        meta = layout.to_json()
        layout_off = _SLOT_RECORDS + _SLOT_RECORD * nslots + _WORKER_RECORD * nworkers
        slots_off = _align(layout_off + len(meta), _SLOT_ALIGNMENT)
        stride = _align(max(layout.nbytes, 1), _SLOT_ALIGNMENT)
        size = slots_off + (stride * nslots if host_slots else 0)
        seg = ShmSegment.create(size)
        try:
            q = seg.buffer.cast("q")
            seg.buffer[layout_off : layout_off + len(meta)] = meta
            for off, value in (
                (_H_FORMAT, _FORMAT),
                (_H_HASH, layout.hash),
                (_H_NSLOTS, nslots),
                (_H_NWORKERS, nworkers),
                (_H_SLOT_STRIDE, stride),
                (_H_SLOTS_OFF, slots_off),
                (_H_LAYOUT_OFF, layout_off),
                (_H_LAYOUT_LEN, len(meta)),
                (_H_SENDER_PID, os.getpid()),
                (_H_PAYLOAD, layout.nbytes),
                (_H_HOST_SLOTS, int(host_slots)),
            ):
                q[off // 8] = value
            for w in range(nworkers):
                q[(_SLOT_RECORDS + _SLOT_RECORD * nslots + _WORKER_RECORD * w + _W_MAPPED) // 8] = -1
            # Magic last: an arena is valid only once everything else is in place.
            q[_H_MAGIC // 8] = _MAGIC
            q.release()
            arena = cls(seg, "sender")
            if not _lock(seg.fd, _LOCK_SENDER, fcntl.F_WRLCK):
                raise WeightSyncError(f"could not take the sender lock of new arena {seg.name}")
        except BaseException:
            seg.close()
            raise
        return arena

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Open a worker end of the arena in segment ``name`` (call :meth:`join` next)."""
        seg = ShmSegment.attach(name)
        try:
            return cls(seg, "worker")
        except BaseException:
            seg.close()
            raise

    @property
    def name(self) -> str:
        return self.segment.name

    def slot_bytes(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` of a host arena as a ``uint8`` tensor of the layout's size."""
        if not self.host_slots:
            raise SchemeStateError(f"arena {self.name} keeps its slots outside the segment")
        start = self.slots_offset + slot * self.slot_stride
        return self.segment.tensor[start : start + self.layout.nbytes]

    def all_slots(self) -> torch.Tensor:
        """Every slot of a host arena, as one ``uint8`` tensor (for pinning)."""
        start = self.slots_offset
        return self.segment.tensor[start : start + self.slot_stride * self.nslots]

    # -- header words ------------------------------------------------------------------------

    def offer(self, w: int) -> tuple[int, int]:
        """``(version, slot)`` last offered to worker ``w`` (version 0: nothing yet)."""
        word = self._q[(self._wrec(w) + _W_OFFER) // 8]
        return word >> 8, word & 0xFF

    def acked(self, w: int) -> int:
        return self._q[(self._wrec(w) + _W_ACKED) // 8]

    def worker_pid(self, w: int) -> int:
        return self._q[(self._wrec(w) + _W_PID) // 8]

    def mapped_slot(self, w: int) -> int:
        return self._q[(self._wrec(w) + _W_MAPPED) // 8]

    def slot_version(self, s: int) -> int:
        return self._q[(self._srec(s) + _S_VERSION) // 8]

    def slot_seq(self, s: int) -> int:
        return self._q[(self._srec(s) + _S_SEQ) // 8]

    @property
    def sender_pid(self) -> int:
        return self._q[_H_SENDER_PID // 8]

    @property
    def closed(self) -> bool:
        return bool(self._q[_H_CLOSED // 8])

    def worker_alive(self, w: int) -> bool:
        """Whether worker ``w``'s process holds its presence lock (is connected and alive)."""
        return _held_by_other(self.segment.fd, _LOCK_WORKER + w)

    def worker_joined(self, w: int) -> bool:
        """Whether worker ``w`` ever connected to this arena."""
        return self._q[(self._wrec(w) + _W_JOINED) // 8] > 0

    def sender_alive(self) -> bool:
        """Whether the sender is alive and has not shut the arena down."""
        return not self.closed and _held_by_other(self.segment.fd, _LOCK_SENDER)

    # -- sender side -------------------------------------------------------------------------

    def _pending_offers(self, skip_dead: bool) -> dict[int, int]:
        """Worker -> slot of every offer not taken yet: those slots must keep their version."""
        pending = {}
        for w in range(self.nworkers):
            version, slot = self.offer(w)
            # Taken (acked): the worker never opens an offer it holds. A slot it still reads
            # or views is protected by its lock on the slot, tried in acquire_slot.
            if version <= 0 or self.acked(w) >= version:
                continue
            # A worker that connected and died will never take its offer: its slot is free.
            if skip_dead and self.worker_joined(w) and not self.worker_alive(w):
                continue
            pending[w] = slot
        return pending

    def acquire_slot(self, timeout: float) -> int:
        """Lock a slot for writing: not locked by a worker, not offered to a live worker.

        Marks it as being written (odd sequence number) and returns its index.

        Raises:
            WeightSyncTimeout: every slot stayed busy for ``timeout`` seconds; names the workers
                that hold them.
        """
        busy = set(self._pending_offers(skip_dead=False).values())
        deadline = None
        pause = 1e-5
        while True:
            for i in range(self.nslots):
                s = (self._slot_cursor + i) % self.nslots
                if s in busy:
                    continue
                if _lock(self.segment.fd, s, fcntl.F_WRLCK):
                    self._slot_cursor = s + 1
                    sq = (self._srec(s) + _S_SEQ) // 8
                    self._q[sq] = self._q[sq] + 1 | 1
                    return s
            # Every other slot is being read (a copy-mode reader holds one for one copy only)
            # or viewed (view mode).
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
                busy = set(self._pending_offers(skip_dead=True).values())
            elif now >= deadline:
                pending = self._pending_offers(skip_dead=True)
                viewing = {w: self.mapped_slot(w) for w in range(self.nworkers) if self.mapped_slot(w) >= 0}
                holders = sorted(set(pending) | set(viewing))
                ids = self.worker_ids
                raise WeightSyncTimeout(
                    f"arena {self.name}: no free slot among {self.nslots} for {timeout:.3g} s; "
                    f"slots offered and not yet taken by workers "
                    f"{ {ids[w]: s for w, s in pending.items()} }, slots viewed by workers "
                    f"{ {ids[w]: s for w, s in viewing.items()} }; use more slots",
                    workers=[ids[w] for w in holders],
                    alive={ids[w]: self.worker_alive(w) for w in holders},
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def commit_slot(self, slot: int, version: int) -> None:
        """Mark ``slot`` as holding ``version`` complete, and unlock it."""
        self._q[(self._srec(slot) + _S_VERSION) // 8] = version
        sq = (self._srec(slot) + _S_SEQ) // 8
        self._q[sq] = self._q[sq] + 1
        _unlock(self.segment.fd, slot)

    def abort_slot(self, slot: int) -> None:
        """Give back a slot whose write failed; it holds no version afterwards."""
        self._q[(self._srec(slot) + _S_VERSION) // 8] = 0
        sq = (self._srec(slot) + _S_SEQ) // 8
        self._q[sq] = self._q[sq] + 1
        _unlock(self.segment.fd, slot)

    def publish(self, slot: int, version: int, workers: Iterable[int]) -> None:
        """Offer ``(version, slot)`` to ``workers`` and wake them."""
        word = version << 8 | slot
        q, i = self._q, self._i
        for w in workers:
            q[(self._wrec(w) + _W_OFFER) // 8] = word
        # One word and one wake for every worker: those not targeted wake, find their offer
        # unchanged and wait again; a syscall per publish instead of one per worker.
        pub = _H_PUB_FUTEX // 4
        i[pub] = (i[pub] + 1) & 0x7FFFFFFF
        self._wake(self._pub_word)

    def wait_acks(self, workers: Sequence[int], version: int, timeout: float) -> None:
        """Return once every worker in ``workers`` acked ``version`` (or a newer one).

        Stops waiting for a worker as soon as its process is found dead.

        Raises:
            WeightSyncTimeout: naming the workers that did not ack and whether they are alive.
        """
        pending = [w for w in workers if self.acked(w) < version]
        if not pending:
            return
        started = time.monotonic()
        deadline = started + timeout
        spin = _ACK_SPIN if self._acks_quick else 0.0
        dead: set[int] = set()
        q, sleeping = self._q, _H_ACK_SLEEPING // 8
        next_check = time.monotonic() + _LIVENESS_PERIOD
        while pending:
            w = pending[0]
            seen = self._i[(self._wrec(w) + _W_ACK_FUTEX) // 4]
            if self.acked(w) >= version:
                pending.pop(0)
                continue
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _LIVENESS_PERIOD
                # Stop waiting for workers that connected and are gone; one that never
                # connected may still be starting, so it gets the whole timeout.
                for p in pending:
                    if self.worker_joined(p) and not self.worker_alive(p):
                        dead.add(p)
                pending = [p for p in pending if p not in dead]
                continue
            left = deadline - now
            if left <= 0:
                break
            # Announce the sleep, then look once more: an ack that landed before the worker
            # could see the flag is caught here, and one after it finds the flag and wakes us
            # (the futex word check closes the gap between the two). At worst a wake is lost
            # to store reordering and the wait ends after _LIVENESS_PERIOD.
            q[sleeping] = 1
            if self.acked(w) < version:
                self._wait(self._ack_words[w], seen, min(left, _LIVENESS_PERIOD), spin)
            q[sleeping] = 0
        pending = [w for w in workers if self.acked(w) < version]
        if not pending:
            self._acks_quick = time.monotonic() - started <= 2 * _ACK_SPIN
            return
        self._acks_quick = False
        ids = self.worker_ids
        alive = {w: (w not in dead) and self.worker_alive(w) for w in pending}
        detail = ", ".join(
            f"worker {ids[w]} (pid {self.worker_pid(w) or 'never connected'}, "
            f"{'alive' if alive[w] else 'dead or disconnected'}, acked version {self.acked(w)})"
            for w in pending
        )
        raise WeightSyncTimeout(
            f"workers {[ids[w] for w in pending]} did not acknowledge version {version} "
            f"within {timeout:.3g} s: {detail}",
            workers=[ids[w] for w in pending],
            alive={ids[w]: a for w, a in alive.items()},
        )

    def mark_closed(self) -> None:
        """Tell workers the sender shut down on purpose."""
        self._q[_H_CLOSED // 8] = 1
        pub = _H_PUB_FUTEX // 4
        self._i[pub] = (self._i[pub] + 1) & 0x7FFFFFFF
        self._wake(self._pub_word)

    # -- worker side -------------------------------------------------------------------------

    def join(self, worker: int, worker_id: int | None = None) -> None:
        """Claim worker slot ``worker``: take its presence lock and record our pid.

        ``worker_id`` is how messages name this worker (the scheme's id; ``worker`` is the
        index within this arena).

        Raises:
            SchemeStateError: the id is out of range or another live process holds it.
        """
        name = worker if worker_id is None else worker_id
        if not 0 <= worker < self.nworkers:
            raise SchemeStateError(
                f"worker {name} (index {worker}) is not a worker of arena {self.name} "
                f"(indices 0..{self.nworkers - 1})"
            )
        if not _lock(self.segment.fd, _LOCK_WORKER + worker, fcntl.F_WRLCK):
            raise SchemeStateError(
                f"worker {name} of arena {self.name} is already connected "
                f"(pid {self.worker_pid(worker)})"
            )
        self.worker_ids[worker] = name
        base = self._wrec(worker)
        self._q[(base + _W_PID) // 8] = os.getpid()
        self._q[(base + _W_MAPPED) // 8] = -1
        self._q[(base + _W_JOINED) // 8] = self._q[(base + _W_JOINED) // 8] + 1
        self.worker = worker

    def wait_offer(self, newer_than: int, timeout: float) -> bool:
        """Wait until this worker is offered a version above ``newer_than``.

        Returns False on timeout.

        Raises:
            PeerDiedError: the sender died or shut down and nothing newer is on offer.
        """
        w = self.worker
        word = self._pub_word
        pub_i = _H_PUB_FUTEX // 4
        deadline = time.monotonic() + timeout
        check_sender = False
        while True:
            seen = self._i[pub_i]
            if self.offer(w)[0] > newer_than:
                return True
            # The sender's lock is tested (a syscall) only after a wait that ran out, so at
            # least every _LIVENESS_PERIOD; a clean shutdown also wakes us and sets the closed
            # flag, read every time.
            if self.closed or (check_sender and not self.sender_alive()):
                if self.offer(w)[0] > newer_than:
                    return True
                raise PeerDiedError(self._sender_gone_message())
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            check_sender = not self._wait(word, seen, min(left, _LIVENESS_PERIOD))

    def _sender_gone_message(self) -> str:
        how = "shut down" if self.closed else "died"
        who = "" if self.worker is None else f"worker {self.worker_ids[self.worker]}: "
        return f"{who}the sender of arena {self.name} (pid {self.sender_pid}) {how}"

    def open_offer(self, newer_than: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int] | None:
        """Lock the slot of the newest version offered to this worker, if above ``newer_than``.

        Returns ``(version, slot)`` with a shared lock held on ``slot`` (release it with
        :meth:`release_slot`, or keep it while tensors view the slot), or None when nothing
        newer is offered. Never returns a slot that is being written or holds another version.
        """
        w = self.worker
        fd = self.segment.fd
        deadline = None
        while True:
            version, slot = self.offer(w)
            if version <= newer_than:
                return None
            if _lock(fd, slot, fcntl.F_RDLCK):
                seq = self.slot_seq(slot)
                if not seq & 1 and self.slot_version(slot) == version:
                    return version, slot
                _unlock(fd, slot)
            # The offer moved on while we looked (the slot is being rewritten): read it again.
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now > deadline:
                raise WeightSyncTimeout(
                    f"arena {self.name}: worker {self.worker_ids[w]} could not lock offered "
                    f"version {version} in slot {slot} for {timeout:.3g} s",
                    workers=[self.worker_ids[w]],
                )
            if not self.sender_alive() and self.offer(w) == (version, slot):
                raise PeerDiedError(self._sender_gone_message() + f" while writing slot {slot}")
            time.sleep(0)

    def native_words(self) -> list[int]:
        """Addresses of this worker's protocol words, in the order of ``csrc/receive_loop.cpp``
        (publish futex, offer, acked, ack futex, ack-sleeping flag, closed flag, mapped slot,
        slot records): the native receive loop follows the same protocol as the methods here."""
        base = self.segment.tensor.data_ptr()
        rec = self._wrec(self.worker)
        return [base + off for off in (
            _H_PUB_FUTEX, rec + _W_OFFER, rec + _W_ACKED, rec + _W_ACK_FUTEX, _H_ACK_SLEEPING,
            _H_CLOSED, rec + _W_MAPPED, _SLOT_RECORDS,
        )]

    def native_sender_words(self) -> list[int]:
        """Addresses of the sender's protocol words, in the order of ``csrc/send_path.cpp``:
        publish futex, ack-sleeping flag, (sequence, version) per slot, then (offer, acked,
        ack futex, joined) per worker. The native send follows the protocol of the methods
        here (``acquire_slot``, ``commit_slot``, ``publish``, ``wait_acks``)."""
        base = self.segment.tensor.data_ptr()
        words = [base + _H_PUB_FUTEX, base + _H_ACK_SLEEPING]
        for s in range(self.nslots):
            words += [base + self._srec(s) + _S_SEQ, base + self._srec(s) + _S_VERSION]
        for w in range(self.nworkers):
            rec = base + self._wrec(w)
            words += [rec + _W_OFFER, rec + _W_ACKED, rec + _W_ACK_FUTEX, rec + _W_JOINED]
        return words

    def release_slot(self, slot: int) -> None:
        """Drop this worker's shared lock on ``slot``."""
        _unlock(self.segment.fd, slot)

    def set_mapped(self, slot: int) -> None:
        """Record which slot this worker's tensors view (``-1``: none)."""
        self._q[(self._wrec(self.worker) + _W_MAPPED) // 8] = slot

    def ack(self, version: int) -> None:
        """Tell the sender this worker now holds ``version``."""
        base = self._wrec(self.worker)
        self._q[(base + _W_ACKED) // 8] = version
        ai = (base + _W_ACK_FUTEX) // 4
        self._i[ai] = (self._i[ai] + 1) & 0x7FFFFFFF
        if self._q[_H_ACK_SLEEPING // 8]:
            self._wake(self._ack_words[self.worker])

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release locks and the mapping; on the sender, also remove the segment's name."""
        if self.segment.closed:
            return
        if self.role == "sender":
            self.mark_closed()
        self._pub_word = None
        self._ack_words = []
        self._q.release()
        self._i.release()
        # Closing the fd drops every OFD lock we hold (slots, presence).
        self.segment.close()

    def __repr__(self) -> str:
        return (
            f"Arena({self.name!r}, {self.role}, slots={self.nslots}, workers={self.nworkers}, "
            f"{self.layout!r})"
        )
