"""Entry points of the processes the shared-memory tests spawn, and their leak check.

Spawned processes import this module by name (tests/ is on ``sys.path`` via conftest and via
the spawn preparation data), so everything here is top level and cheap to import.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from typing import Any

import pytest
import torch
from torch import nn

from weightsync.transports.shm_segment import ShmSegment, list_segments

#: Timeout of every join and every message wait in these tests, in seconds.
JOIN_TIMEOUT = 60.0


def _ours(pid: int) -> bool:
    """Whether ``pid`` is this process or one of its descendants."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _foreign(name: str) -> bool:
    """Whether segment ``name`` is in use by a process outside this test session (another run
    on the same machine); those are not ours to judge."""
    needle = f"/dev/shm/{name}"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                mapped = needle in f.read()
        except OSError:
            continue
        if mapped and not _ours(int(entry)):
            return True
    return False


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test that leaves a weightsync segment behind (waiting a little for reapers).

    Segments mapped by processes of another test run on the same machine are ignored.
    """
    before = set(list_segments())
    yield
    gc.collect()
    deadline = time.monotonic() + 5.0
    while True:
        left = {n for n in set(list_segments()) - before if not _foreign(n)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


# --------------------------------------------------------------------------------------------
# Segment processes
# --------------------------------------------------------------------------------------------


def segment_owner(conn: Any, size: int, fill: int, exit_normally: bool) -> None:
    """Create a segment, fill it, report its name; then exit without cleaning up, or hang."""
    seg = ShmSegment.create(size)
    seg.tensor.fill_(fill)
    conn.send(seg.name)
    if exit_normally:
        return  # no close(): the atexit hook must remove the name
    while True:
        time.sleep(1.0)  # until SIGKILLed


def segment_reader(conn: Any, name: str) -> None:
    """Attach to ``name``, report its first byte, then report it again on request."""
    seg = ShmSegment.attach(name)
    conn.send(int(seg.tensor[0]))
    conn.recv()
    conn.send(int(seg.tensor[0]))
    seg.close()


# --------------------------------------------------------------------------------------------
# Scheme workers
# --------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """A few tensors of a few elements, with mixed dtypes, a buffer and no extra state."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 3)
        self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def fill_version(model: nn.Module, version: int) -> None:
    """Set every tensor of ``model`` to ``version``."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.fill_(version)


def _report_errors(conn: Any, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # sent back so the test shows the worker's traceback
        conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))


def scheme_worker(conn: Any, schemes: Any, worker_idx: int, model_kind: str, plan: str, opts: dict) -> None:
    """A worker running ``plan`` on ``schemes`` (one scheme, or several one after the other)."""
    _report_errors(conn, _scheme_worker, conn, schemes, worker_idx, model_kind, plan, opts)


def scheme_sender(conn: Any, mode: str = "copy") -> None:
    """A sender of a TinyModel to one worker: sends the pickled scheme, connects, then idles."""
    import pickle

    from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme

    scheme = SharedMemWeightSyncScheme(mode=mode, background=False, timeout=10.0)
    scheme.init_on_sender(model=TinyModel(), num_workers=1)
    conn.send(("scheme", pickle.dumps(scheme)))
    scheme.connect()
    while True:
        time.sleep(1.0)  # until SIGKILLed


def _make_model(kind: str) -> nn.Module:
    if kind == "tiny":
        return TinyModel()
    if kind == "tiny-cuda":
        return TinyModel().cuda()
    if kind.startswith("set:"):
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from weight_sets import make_module

        return make_module(kind[4:], seed=1)
    raise ValueError(kind)


def _scheme_worker(conn: Any, schemes: Any, worker_idx: int, model_kind: str, plan: str, opts: dict) -> None:
    torch.set_num_threads(1)
    for scheme in schemes if isinstance(schemes, list) else [schemes]:
        model = _make_model(model_kind)
        scheme.init_on_receiver(model_id="policy", model=model, worker_idx=worker_idx)
        try:
            scheme.connect(worker_idx=worker_idx)
        except Exception as exc:
            conn.send(("connect-error", type(exc).__name__, str(exc)))
            return
        conn.send(("connected", os.getpid(), scheme.weights_version, _snapshot(model)))
        try:
            if plan == "follow":
                _follow(conn, scheme, model)
            elif plan == "hammer":
                _hammer(conn, scheme, model, opts)
            elif plan == "guarded-hammer":
                _guarded_hammer(conn, scheme, model, opts)
            elif plan == "gil-held":
                _gil_held(conn, scheme, model, opts)
            elif plan == "bench":
                _bench(conn, scheme)
            else:
                raise ValueError(plan)
        finally:
            scheme.shutdown()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _follow(conn: Any, scheme: Any, model: nn.Module) -> None:
    """Keep up with every version (background thread, or a receive loop without one); on
    'report', send the version held and the weights."""
    while True:
        if scheme.background:
            if not conn.poll(0.5):
                continue
        elif not conn.poll():
            scheme.receive(timeout=0.01)
            continue
        msg = conn.recv()
        if msg == "stop":
            return
        if msg == "report":
            with scheme.guard():
                conn.send(("state", scheme.weights_version, _snapshot(model)))


def _hammer(conn: Any, scheme: Any, model: nn.Module, opts: dict) -> None:
    """Take versions up to ``opts['last']``; after every take check that every element of
    every tensor holds the version number taken."""
    last = opts["last"]
    tensors = [*model.parameters(), *model.buffers()]
    mixed = takes = 0
    while scheme.weights_version < last:
        if scheme.receive(timeout=1.0) is None:
            continue
        takes += 1
        v = float(scheme.weights_version)
        with torch.no_grad():
            if any(float(t.min()) != v or float(t.max()) != v for t in tensors):
                mixed += 1
    conn.send(("hammered", takes, mixed, scheme.weights_version))
    conn.recv()


def _guarded_hammer(conn: Any, scheme: Any, model: nn.Module, opts: dict) -> None:
    """Background receiver: look at the model under the guard, as a forward pass would, until
    version ``opts['last']``; every look must find every element equal to the version held."""
    last = opts["last"]
    tensors = [*model.parameters(), *model.buffers()]
    mixed = looks = 0
    version = 0
    while version < last:
        with scheme.guard():
            version = scheme.weights_version
            if version > 0:  # version 0: the sender's initial weights, not filled
                looks += 1
                with torch.no_grad():
                    if any(float(t.min()) != version or float(t.max()) != version for t in tensors):
                        mixed += 1
    conn.send(("hammered", looks, mixed, version, scheme._native_loop is not None, scheme.version))
    conn.recv()


def _gil_held(conn: Any, scheme: Any, model: nn.Module, opts: dict) -> None:
    """On "go", hold the GIL in pure Python for ``opts['seconds']``, never giving it up (the
    switch interval is set far beyond that), as a long environment step would; then report."""
    deadline = time.monotonic() + 5.0  # the background thread builds the loop as it starts
    while scheme._native_loop is None and time.monotonic() < deadline:
        time.sleep(0.001)
    native = scheme._native_loop is not None
    # The parent has unpickled the "connected" snapshot by now: its tensors travel as file
    # descriptors that a Python thread of this process hands out, which needs the GIL.
    assert conn.recv() == "go"
    sys.setswitchinterval(1000.0)
    conn.send(("busy", native))
    deadline = time.monotonic() + opts["seconds"]
    while time.monotonic() < deadline:
        pass
    sys.setswitchinterval(0.005)
    with scheme.guard():
        conn.send(("state", scheme.weights_version, _snapshot(model)))
    conn.recv()


def _bench(conn: Any, scheme: Any) -> None:
    """Take versions as they arrive until told to stop (the sender measures)."""
    while not conn.poll():
        scheme.receive(timeout=0.05)
    conn.recv()
