"""Named shared-memory segments with a lifetime tied to the process that made them.

A segment is a file under ``/dev/shm`` named ``weightsync-<32 random hex digits>``, created with
``O_CREAT | O_EXCL`` and mode ``0600``, sized with ``ftruncate`` and mapped ``MAP_SHARED``. The
process that creates it (the *owner*, the weight sender) is the only one that ever removes the
name; attaching processes only map it.

The name is removed

- by :meth:`ShmSegment.unlink` (what a scheme's ``shutdown`` calls),
- at interpreter exit, for every segment this process still owns (``atexit``),
- when the owner dies without running either (``SIGKILL``, a crash): each owning process starts
  one tiny *reaper* process on first use, tells it every name it creates or removes over a pipe,
  and the reaper removes the names still registered when that pipe reaches end-of-file, i.e.
  when the owner is gone. Processes that attached keep their mapping: removing a name never
  invalidates memory that is mapped.

We do not use :class:`multiprocessing.shared_memory.SharedMemory`: on Python 3.11 every process
that attaches registers the segment with the resource tracker, which removes it when that
worker exits, under the sender's feet. Its resource tracker is also shared with the parent in
spawned children, so it cannot notice a killed child sender; the reaper here belongs to the
process that owns the names.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import stat
import subprocess
import sys
import threading
from typing import IO

import torch

from weightsync.errors import PeerDiedError, WeightSyncError

__all__ = ["SEGMENT_PREFIX", "SHM_DIR", "ShmSegment", "list_segments"]

#: Every segment name starts with this; tests use it to look for leaks.
SEGMENT_PREFIX = "weightsync-"
#: Where POSIX shared memory lives on Linux (what ``shm_open`` uses).
SHM_DIR = "/dev/shm"

_NAME_RE = re.compile(r"^weightsync-[0-9a-f]{32}$")
_PAGE = mmap.PAGESIZE


def list_segments() -> list[str]:
    """Names of the weightsync segments that currently exist (any owner)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(SEGMENT_PREFIX))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------------
# The reaper: removes the owner's names once the owner is gone.
# --------------------------------------------------------------------------------------------

# Runs under ``python -I -S``: no site, no user paths, nothing imported but os/sys/signal, so
# it starts in a few milliseconds. It reads "+name"/"-name" lines until end-of-file, which the
# kernel delivers when every copy of the write end is closed, i.e. when the owner has died.
_REAPER_SOURCE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
names = set()
for line in sys.stdin.buffer:
    line = line.strip().decode("ascii", "replace")
    if line[:1] == "+":
        names.add(line[1:])
    elif line[:1] == "-":
        names.discard(line[1:])
for name in names:
    try:
        os.unlink(os.path.join(%r, name))
    except OSError:
        pass
""" % SHM_DIR


class _Reaper:
    """The per-process reaper: one child process, fed over its stdin."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._pid = os.getpid()
        self.unavailable: str | None = None

    def _start(self) -> None:
        # A new session: Ctrl-C in the terminal, or a kill of our process group, must not take
        # the reaper down with us; it is exactly what has to outlive us.
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _REAPER_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self.unavailable = f"could not start the reaper process ({exc})"
            return
        self._pipe = self._proc.stdin

    def _send(self, line: str) -> None:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the pipe belongs to the parent's reaper; never use it here.
                return
            if self._pipe is None and self.unavailable is None:
                self._start()
            if self._pipe is None:
                return
            try:
                self._pipe.write(line.encode("ascii") + b"\n")
                self._pipe.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                self.unavailable = f"the reaper process is gone ({exc})"
                self._pipe = None

    def register(self, name: str) -> None:
        self._send("+" + name)

    def unregister(self, name: str) -> None:
        self._send("-" + name)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        """Close the pipe (the reaper then exits, having nothing left to remove) and reap it."""
        with self._lock:
            if self._pid != os.getpid() or self._proc is None:
                return
            pipe, self._pipe = self._pipe, None
            proc, self._proc = self._proc, None
            self.unavailable = "stopped at interpreter exit"
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass

    def forget_after_fork(self) -> None:
        """In a forked child: drop our copy of the parent's pipe so its EOF still means death."""
        if self._pipe is not None:
            try:
                os.close(self._pipe.fileno())
            except OSError:
                pass
        self._pipe = None
        self._proc = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.unavailable = None


_REAPER = _Reaper()
_OWNED: dict[str, ShmSegment] = {}
_OWNED_LOCK = threading.Lock()


def _unlink_owned_at_exit() -> None:
    with _OWNED_LOCK:
        segments = list(_OWNED.values())
    for seg in segments:
        seg.unlink()
    _REAPER.stop()


def _after_fork_in_child() -> None:
    # A forked child owns nothing: it must not remove the parent's names at its exit.
    global _OWNED_LOCK
    _OWNED_LOCK = threading.Lock()
    _OWNED.clear()
    _REAPER.forget_after_fork()


atexit.register(_unlink_owned_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


class ShmSegment:
    """A mapped shared-memory segment.

    Build one with :meth:`create` (the owner) or :meth:`attach` (everyone else). ``tensor`` is a
    ``uint8`` tensor over the whole mapping; views of it keep the mapping alive, so closing a
    segment while tensors still point into it is safe (the memory goes away with the last one).

    Segments are not picklable: pass :attr:`name` to another process and :meth:`attach` there.
    """

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._fd: int | None = fd
        self._owner_pid = os.getpid()
        self._unlinked = False
        self._mmap: mmap.mmap | None = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        # Tensors are built on a memoryview, not on the mmap: the memoryview holds a buffer
        # export, so mmap.close() refuses (BufferError) while any tensor is alive instead of
        # unmapping memory that tensors still point into.
        self._view: memoryview | None = memoryview(self._mmap)
        self._tensor: torch.Tensor | None = torch.frombuffer(self._view, dtype=torch.uint8)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, size: int) -> ShmSegment:
        """Create a new segment of at least ``size`` bytes (rounded up to whole pages).

        The name is registered with this process's reaper *before* the file exists, so there is
        no instant at which a dying owner could leave it behind.
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        size = -(-size // _PAGE) * _PAGE
        name = SEGMENT_PREFIX + secrets.token_hex(16)
        _REAPER.register(name)
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            _REAPER.unregister(name)
            raise
        try:
            # The umask can only clear bits, but be explicit: nobody else may map this.
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            seg = cls(name, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            _REAPER.unregister(name)
            raise
        with _OWNED_LOCK:
            _OWNED[name] = seg
        return seg

    @classmethod
    def attach(cls, name: str) -> ShmSegment:
        """Map an existing segment created by another process (or this one).

        Raises:
            ValueError: ``name`` is not a weightsync segment name.
            PeerDiedError: the segment no longer exists (its owner shut down or died).
            WeightSyncError: the segment is not private to this user.
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"not a weightsync segment name: {name!r}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PeerDiedError(
                f"shared-memory segment {name} does not exist: the sender shut down or died"
            ) from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o600:
                raise WeightSyncError(
                    f"refusing segment {name}: owner uid {st.st_uid} mode "
                    f"{stat.S_IMODE(st.st_mode):o}, expected uid {os.geteuid()} mode 600"
                )
            if st.st_size <= 0:
                raise PeerDiedError(f"shared-memory segment {name} is empty")
            return cls(name, fd, st.st_size, owner=False)
        except BaseException:
            os.close(fd)
            raise

    # -- access ------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def tensor(self) -> torch.Tensor:
        """The whole mapping as a 1-D ``uint8`` tensor."""
        if self._tensor is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._tensor

    @property
    def buffer(self) -> memoryview:
        """The whole mapping as a writable memoryview (for header words)."""
        if self._view is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._view

    # -- teardown ----------------------------------------------------------------------------

    def unlink(self) -> None:
        """Remove the name (owner only; idempotent). Mappings stay valid."""
        if not self.owner or self._unlinked or self._owner_pid != os.getpid():
            return
        self._unlinked = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        _REAPER.unregister(self.name)
        with _OWNED_LOCK:
            _OWNED.pop(self.name, None)

    def close(self) -> None:
        """Drop this process's fd and mapping; the owner also removes the name.

        The mapping itself is released when the last tensor viewing it is freed.
        """
        self.unlink()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        self._tensor = None
        self._view = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Tensors still view it; the mapping goes when they do.
                pass

    def __enter__(self) -> ShmSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError(f"ShmSegment {self.name} cannot be pickled; pass its name and attach()")

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("owner" if self.owner else "attached")
        return f"ShmSegment({self.name!r}, size={self.size}, {state})"
