"""setup.py's choice of CUDA archs and what it records in weightsync/_build_info.json.

setup.py only builds when run as __main__, so its helpers are imported here without building
or writing anything. GPUs are faked: the archs must be settled the same way on machines with
and without one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py():
    spec = importlib.util.spec_from_file_location("weightsync_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_torch(capabilities, built=("sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
    """A torch whose CUDA reports `capabilities` as the visible GPUs (none: unavailable)."""
    return SimpleNamespace(cuda=SimpleNamespace(
        is_available=lambda: bool(capabilities),
        device_count=lambda: len(capabilities),
        get_device_capability=lambda i: capabilities[i],
        get_arch_list=lambda: list(built) if capabilities else [],
    ))


@pytest.mark.parametrize(
    "capabilities, built, expected",
    [
        ([(9, 0), (8, 6), (9, 0)], ("sm_80", "sm_86", "sm_90"), "8.6;9.0+PTX"),  # once each
        ([(12, 0)], ("sm_80", "sm_90a"), "9.0+PTX"),  # capped at the newest arch torch has
        ([(10, 0), (9, 0)], ("sm_90", "sm_100"), "9.0;10.0+PTX"),  # by number, not as strings
        ([(8, 0)], (), "8.0+PTX"),
    ],
    ids=["dedup-sorted", "capped", "numeric-order", "no-arch-list"],
)
@pytest.mark.parametrize("requested", [None, "native"])
def test_archs_of_the_visible_gpus(setup_py, monkeypatch, capabilities, built, expected, requested):
    if requested is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", requested)
    assert setup_py._cuda_archs(fake_torch(capabilities, built)) == expected


def test_archs_without_a_gpu_are_the_default(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_py._cuda_archs(fake_torch([])) == setup_py.DEFAULT_CUDA_ARCHS


def test_an_explicit_arch_list_is_kept_without_asking_cuda(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;9.0a")

    def no_query():
        raise AssertionError("CUDA queried although TORCH_CUDA_ARCH_LIST was given")

    untouchable = SimpleNamespace(cuda=SimpleNamespace(is_available=no_query))
    assert setup_py._cuda_archs(untouchable) == "7.5;9.0a"


@pytest.mark.skipif(not torch.version.cuda or shutil.which("nvcc") is None,
                    reason="needs a CUDA build of torch and nvcc")
def test_build_info_records_the_archs_built_for_visible_gpus(setup_py, monkeypatch):
    # Before, this recorded the placeholder "visible GPUs" instead of the archs.
    for name in ("TORCH_CUDA_ARCH_LIST", "WEIGHTSYNC_BUILD_EXT", "WEIGHTSYNC_BUILD_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # restored afterwards
    capabilities = [(9, 0), (8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    _, _, info = setup_py._extensions()
    assert info["with_cuda"] is True
    assert info["cuda_archs"] == "8.0;9.0+PTX"
    # What torch's builder will read: the recorded list is the compiled one.
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
