"""Entry points of the processes the API tests spawn (schemes and updaters).

Spawned processes import this module by name (tests/ is on ``sys.path`` via conftest and via
the spawn preparation data), so everything here is top level and cheap to import.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

#: Timeout of every join and every queue wait in these tests, in seconds.
JOIN_TIMEOUT = 120.0


def run_spawned(target: Any, *args: Any) -> dict[str, Any]:
    """Run ``target(*args, results)`` in a spawned process and return the dict it puts on
    ``results``; the process is joined (killed if it outlives the timeout) and must exit 0."""
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    proc = spawn.Process(target=target, args=(*args, results))
    proc.start()
    try:
        out = results.get(timeout=JOIN_TIMEOUT)
    finally:
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT)
    assert "error" not in out, out.get("error")
    assert proc.exitcode == 0, f"the spawned {target.__name__} exited with {proc.exitcode}"
    return out


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


def trainer_weights() -> TensorDict:
    """A weight getter that pickles (it is top level): the weights of ``make_policy(0)``."""
    return TensorDict.from_module(make_policy(seed=0))


#: What :func:`count_push` recorded in this process.
HOOK_CALLS: list[int] = []


def count_push() -> None:
    """A post-hook that pickles: counts the pushes made in this process."""
    HOOK_CALLS.append(1)


def updater_pushes(updater: Any, results: Any) -> None:
    """Child side of the updater pickling test: report the updater's state as it arrived,
    push through its weight getter, then push ``make_policy(2)`` to worker 0, and send back
    the policy weights after each push."""
    try:
        policy = updater.policy_weights
        if not isinstance(policy, TensorDictBase):  # MultiProcessedWeightUpdater: worker 0's
            policy = policy[0]
        arrived = {
            "type": type(updater).__name__,
            "version": updater.version,
            "collector": updater.collector,
            "post_hooks": updater.post_hooks == [count_push],
            "plans_cached": len(updater._strategy._destinations),
        }
        updater.push_weights()
        from_getter = {".".join(k): tensor_bytes(v) for k, v in policy.items(True, True)}
        updater.push_weights(make_policy(seed=2), worker_ids=0)
        results.put({
            "arrived": arrived,
            "version": updater.version,
            "hook_calls": len(HOOK_CALLS),
            "from_getter": from_getter,
            "pushed": {".".join(k): tensor_bytes(v) for k, v in policy.items(True, True)},
        })
    except BaseException:
        results.put({"error": traceback.format_exc()})
