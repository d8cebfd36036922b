"""Entry points of the processes the API tests spawn (schemes and updaters).

Spawned processes import this module by name (tests/ is on ``sys.path`` via conftest and via
the spawn preparation data), so everything here is top level and cheap to import.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import nn

#: Timeout of every join and every queue wait in these tests, in seconds.
JOIN_TIMEOUT = 120.0


def make_policy(seed: int) -> nn.Module:
    """The small policy both sides of the spawn tests build."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes: results cross the queue as bytes, not as tensors, because
    torch shares tensor storage through file descriptors that die with the child."""
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def receiver_applies(scheme: Any, weights: dict[str, torch.Tensor], results: Any) -> None:
    """Child side of the pickling test: report the scheme's state as it arrived, initialise it
    as receiver 1 of ``policy``, apply ``weights`` and send back the policy's weights."""
    try:
        arrived = {
            "type": type(scheme).__name__,
            "initialized_on_sender": scheme.initialized_on_sender,
            "initialized_on_receiver": scheme.initialized_on_receiver,
            "synchronized_on_sender": scheme.synchronized_on_sender,
            "context": scheme.context,
            "model": scheme.model,
            "version": scheme.version,
            "model_id": scheme.model_id,
            "strategy": scheme.strategy.extract_as,
        }
        policy = make_policy(seed=1)
        scheme.init_on_receiver(model_id="policy", model=policy, worker_idx=1)
        scheme.connect(worker_idx=1)
        scheme.apply_weights(weights)
        results.put({
            "arrived": arrived,
            "worker_idx": scheme.worker_idx,
            "version": scheme.version,
            "weights": {k: tensor_bytes(v) for k, v in policy.state_dict().items()},
        })
        scheme.shutdown()
    except BaseException:
        results.put({"error": traceback.format_exc()})
