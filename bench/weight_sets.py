"""The four weight sets every benchmark measures, built the same way everywhere.

- ``mlp-small``: a 4-layer MLP of width 256 (8 tensors, about 0.8 MB).
- ``many-small``: 1000 tensors of 1024 float32 (4 KB each, 4 MB in all).
- ``conv-mid``: 50 3x3 convolutions (100 tensors, about 25M parameters, 100 MB).
- ``large``: 50 linear layers of width 1414 (100 tensors, about 100M parameters, 400 MB).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["WEIGHT_SETS", "SMALL_SETS", "make_module", "payload_nbytes"]


class _ManySmall(nn.Module):
    def __init__(self, count: int = 1000, numel: int = 1024) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(count))


def _mlp_small() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 256), nn.Tanh(),
        nn.Linear(256, 256), nn.Tanh(),
        nn.Linear(256, 256), nn.Tanh(),
        nn.Linear(256, 64),
    )


def _conv_mid() -> nn.Module:
    return nn.Sequential(*(nn.Conv2d(236, 236, 3) for _ in range(50)))


def _large() -> nn.Module:
    return nn.Sequential(*(nn.Linear(1414, 1414) for _ in range(50)))


WEIGHT_SETS: dict[str, Callable[[], nn.Module]] = {
    "mlp-small": _mlp_small,
    "many-small": _ManySmall,
    "conv-mid": _conv_mid,
    "large": _large,
}

#: The sets cheap enough for smoke runs.
SMALL_SETS = ("mlp-small", "many-small")


def make_module(name: str, seed: int = 0) -> nn.Module:
    """Build weight set ``name`` with deterministic values (seeded)."""
    try:
        factory = WEIGHT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown weight set {name!r}; choose one of {sorted(WEIGHT_SETS)}") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def payload_nbytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module``."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
