"""StorageWindow: a host buffer whose views all follow it when it is pointed elsewhere."""

from __future__ import annotations

import pytest
import torch

from weightsync.engine import StorageWindow
from weightsync.errors import BackendUnavailableError


@pytest.fixture
def native_window(native, monkeypatch):
    """The native library, used even in the run that forces the torch backend elsewhere."""
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")


def test_views_follow_the_window(native_window):
    a = torch.arange(64, dtype=torch.uint8)
    b = torch.arange(64, 128, dtype=torch.uint8)
    window = StorageWindow(64)
    floats = window.tensor[:32].view(torch.float32)  # typed views, as a layout makes them
    tail = window.tensor[32:]
    window.point_at(a.data_ptr())
    assert floats.data_ptr() == a.data_ptr() and tail.data_ptr() == a.data_ptr() + 32
    assert torch.equal(floats, a[:32].view(torch.float32))
    window.point_at(b.data_ptr())
    assert torch.equal(tail, b[32:]) and torch.equal(floats, b[:32].view(torch.float32))
    tail.fill_(7)  # writes land in the memory pointed at
    assert torch.equal(b[32:], torch.full((32,), 7, dtype=torch.uint8))
    assert torch.equal(a[32:], torch.arange(32, 64, dtype=torch.uint8))


def test_parameters_viewing_a_window_move_together(native_window):
    slots = [torch.full((16,), float(v)) for v in (1, 2)]
    window = StorageWindow(64)
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(4)]
    for i, p in enumerate(params):
        p.data = window.tensor[16 * i : 16 * (i + 1)].view(torch.float32).view(2, 2)
    for v, slot in zip((1, 2), slots):
        window.point_at(slot.data_ptr())
        assert all(torch.equal(p, torch.full((2, 2), float(v))) for p in params)
        assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)


def test_window_needs_the_native_library(monkeypatch):
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "torch")
    assert not StorageWindow.available()
    with pytest.raises(BackendUnavailableError, match="native library"):
        StorageWindow(16)


def test_null_address_is_refused(native_window):
    from weightsync.errors import InvalidArgumentError

    window = StorageWindow(16)
    with pytest.raises(InvalidArgumentError, match="null storage or data"):
        window.point_at(0)


def test_bound_tells_whether_every_tensor_still_views_the_window(native_window):
    window = StorageWindow(64)
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(4)]
    views = [window.tensor[16 * i : 16 * (i + 1)].view(torch.float32) for i in range(4)]
    assert not window.bound()
    window.bind(params, views)
    assert window.bound()
    assert all(p.untyped_storage()._cdata == window.tensor.untyped_storage()._cdata for p in params)
    params[2].data = torch.ones(4)  # given storage of its own: it would not follow the window
    assert not window.bound()
    window.bind(params, views)
    assert window.bound()
    params[1].data = views[0]  # the window, but another tensor's place
    assert not window.bound()
    window.unbind()
    assert not window.bound()
