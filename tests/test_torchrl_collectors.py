"""Our schemes inside TorchRL's own collectors (torchrl is an optional extra: skipped without it).

TorchRL's multi-process collectors send workers a stateless (meta-device) copy of the policy,
let the scheme connect in each worker, and never shut the worker's scheme down: the policy
must come out materialised with the trainer's weights, follow ``update_policy_weights_()``,
and the workers must exit cleanly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsync.schemes.shared_mem import SharedMemWeightSyncScheme

collectors = pytest.importorskip("torchrl.collectors")
mocking = pytest.importorskip("torchrl.testing.mocking_classes")
tensordict_nn = pytest.importorskip("tensordict.nn")


def _make_env():
    return mocking.ContinuousActionVecMockEnv()


def _actions_of(policy, batch) -> torch.Tensor:
    with torch.no_grad():
        return policy.module(batch["observation"])


@pytest.mark.parametrize("mode", ["copy", "view"])
def test_multisync_collector_workers_follow_the_trainer(mode):
    env = _make_env()
    obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    env.close()
    torch.manual_seed(0)
    policy = tensordict_nn.TensorDictModule(nn.Linear(obs, act), in_keys=["observation"],
                                            out_keys=["action"])
    scheme = SharedMemWeightSyncScheme(mode=mode, timeout=60.0)
    collector = collectors.MultiSyncCollector(
        [_make_env, _make_env], policy, frames_per_batch=20, total_frames=-1,
        weight_sync_schemes={"policy": scheme},
    )
    try:
        batches = iter(collector)
        first = next(batches)
        # The workers' meta policies were materialised with the trainer's initial weights.
        torch.testing.assert_close(first["action"], _actions_of(policy, first))
        with torch.no_grad():
            policy.module.weight.fill_(0.5)
            policy.module.bias.fill_(-1.0)
        collector.update_policy_weights_()
        next(batches)  # may hold steps taken before the update reached the workers
        later = next(batches)
        torch.testing.assert_close(later["action"], _actions_of(policy, later))
        assert not torch.allclose(_actions_of(policy, first), first["action"])
    finally:
        collector.shutdown()
