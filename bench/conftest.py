"""Shared setup of the pytest-benchmark files in bench/.

- bench/ and the repository root are importable (``import weight_sets``, ``import weightsync``)
  whatever directory pytest runs from.
- A test taking a ``weight_set`` argument (and not parametrizing it itself) is parametrized
  over the selected weight sets, with module scope: a module-scoped fixture built from it
  holds one set at a time, so the 400 MB ``large`` set is freed before the next is built.
  Test ids carry the set name, so ``-k "not large"`` works too.
- The header of the run records what the numbers depend on: backend, host copier options,
  torch threads, load average.

Environment:
    WEIGHTSYNC_BENCH_SETS=mlp-small,many-small   only these sets ("small" = the SMALL_SETS,
                                                 "all" or unset = every set)
    WEIGHTSYNC_BENCH_ROUNDS=N                    rounds per benchmark (files decide the default)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_BENCH_DIR = Path(__file__).resolve().parent
for _entry in (_BENCH_DIR.parent, _BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import torch  # noqa: E402
from weight_sets import SMALL_SETS, WEIGHT_SETS  # noqa: E402


def selected_sets() -> list[str]:
    """The weight sets named by WEIGHTSYNC_BENCH_SETS (all of them by default), in set order."""
    raw = os.environ.get("WEIGHTSYNC_BENCH_SETS", "").strip()
    if raw in ("", "all"):
        return list(WEIGHT_SETS)
    if raw == "small":
        return list(SMALL_SETS)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in WEIGHT_SETS]
    if unknown:
        raise pytest.UsageError(
            f"WEIGHTSYNC_BENCH_SETS names unknown sets {unknown}; choose from "
            f"{', '.join(WEIGHT_SETS)} (or 'small', 'all')")
    return [n for n in WEIGHT_SETS if n in names]


def _rounds_override() -> int | None:
    raw = os.environ.get("WEIGHTSYNC_BENCH_ROUNDS", "").strip()
    if not raw:
        return None
    try:
        rounds = int(raw)
    except ValueError:
        rounds = 0
    if rounds < 1:
        raise pytest.UsageError(f"WEIGHTSYNC_BENCH_ROUNDS must be a positive integer, got {raw!r}")
    return rounds


@pytest.fixture(scope="session")
def bench_rounds() -> Callable[[int], int]:
    """``bench_rounds(default)``: WEIGHTSYNC_BENCH_ROUNDS when set, else ``default``."""
    override = _rounds_override()
    return lambda default: default if override is None else override


def _parametrized_by_hand(metafunc: pytest.Metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = names.split(",")
        if name in (n.strip() for n in names):
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A file that parametrizes weight_set itself keeps its own list.
    if "weight_set" in metafunc.fixturenames and not _parametrized_by_hand(metafunc, "weight_set"):
        sets = selected_sets()
        metafunc.parametrize("weight_set", sets, ids=sets, scope="module")


def pytest_report_header(config: pytest.Config) -> list[str]:
    from weightsync.engine import backend_info

    info = backend_info()
    copier = info["extension"].get("host_copier")
    return [
        f"weightsync: cpu backend {info['devices']['cpu'].get('active')}, "
        f"cuda backend {info['devices']['cuda'].get('active')}, host copier {copier}",
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        f"weight sets: {', '.join(selected_sets())}",
    ]
