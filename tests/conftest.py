"""Shared fixtures: the engine backend under test, GPU skipping, spawn helpers on sys.path.

Set WEIGHTSYNC_REQUIRE_NATIVE=1 (CI does) to turn "native extension not loaded" from a skip
into a failure, so a broken build can never pass as skipped tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Spawned workers import their entry points from tests/; make that importable everywhere.
sys.path.insert(0, str(Path(__file__).parent))

from weightsync import _extension  # noqa: E402


def native_loaded() -> bool:
    return _extension.load().loaded


def _skip_or_fail_native() -> None:
    reason = _extension.load().reason
    if os.environ.get("WEIGHTSYNC_REQUIRE_NATIVE", "") not in ("", "0"):
        pytest.fail(f"native extension required but not loaded: {reason}")
    pytest.skip(f"native extension not loaded: {reason}")


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch) -> str:
    """Runs the test once per engine backend, forcing it through WEIGHTSYNC_BACKEND.

    The tree-identity check behind cached plans follows: the compiled walk with ``native``,
    its pure-Python twin with ``torch``, so both fallbacks are exercised together.
    """
    if request.param == "native" and not native_loaded():
        _skip_or_fail_native()
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", request.param)
    monkeypatch.setattr("weightsync.strategy.same_entries", tree_check(
        "native" if request.param == "native" else "python"))
    return request.param


def tree_check(name: str):
    """The tree-identity check ``name`` (``native`` or ``python``); skips (or fails under
    WEIGHTSYNC_REQUIRE_NATIVE) when the compiled one is not built."""
    from weightsync import tree_identity

    if name == "python":
        return tree_identity.same_entries_python
    if tree_identity.implementation()["active"] != "native":
        reason = tree_identity.implementation()["reason"]
        if os.environ.get("WEIGHTSYNC_REQUIRE_NATIVE", "") not in ("", "0"):
            pytest.fail(f"compiled tree check required but not active: {reason}")
        pytest.skip(f"compiled tree check not active: {reason}")
    return tree_identity.same_entries


@pytest.fixture
def native() -> None:
    """For tests of the compiled library itself."""
    if not native_loaded():
        _skip_or_fail_native()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
