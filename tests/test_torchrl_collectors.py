"""Our schemes inside TorchRL's own collectors (torchrl is an optional extra: skipped without it).

TorchRL's multi-process collectors send workers a stateless (meta-device) copy of the policy,
let the scheme connect in each worker, and never shut the worker's scheme down: the policy
must come out materialised with the trainer's weights, follow ``update_policy_weights_()``,
and the workers must exit cleanly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsync
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


# -- registration with TorchRL's bases, whatever the import order ---------------------------------

# Run in a fresh interpreter: the test process has long imported TorchRL. The updater and the
# scheme are built before TorchRL's collector module exists in "weightsync-first" (the audit's
# repro), after it in "torchrl-first".
_IMPORT_ORDER_SCRIPT = textwrap.dedent("""
    import sys
    import warnings
    warnings.simplefilter("ignore")
    import torch
    from torch import nn
    ORDER = sys.argv[1]
    if ORDER == "torchrl-first":
        import torchrl.collectors, torchrl.weight_update
    import weightsync as ws
    from weightsync import _torchrl_compat
    if ORDER == "weightsync-first":
        assert "torchrl" not in sys.modules, "importing weightsync imported torchrl"
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule
    from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv
    env = ContinuousActionVecMockEnv()
    obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    policy = TensorDictModule(nn.Linear(obs, act), in_keys=["observation"], out_keys=["action"])
    trainer = TensorDictModule(nn.Linear(obs, act), in_keys=["observation"], out_keys=["action"])
    updater = ws.VanillaWeightUpdater.from_policy(policy)
    scheme = ws.NoWeightSyncScheme()
    if ORDER == "weightsync-first":
        assert "torchrl.collectors.weight_update" not in sys.modules
        assert "torchrl.weight_update.weight_sync_schemes" not in sys.modules
    from torchrl.collectors import Collector, WeightUpdaterBase
    import torchrl.weight_update as twu
    assert isinstance(updater, WeightUpdaterBase)
    assert isinstance(scheme, twu.WeightSyncScheme)
    assert issubclass(ws.NoWeightSyncScheme, twu.WeightSyncScheme)
    collector = Collector(env, policy, frames_per_batch=4, total_frames=8, weight_updater=updater)
    try:
        assert collector.weight_updater is updater and updater.collector is collector
        collector.update_policy_weights_(TensorDict.from_module(trainer))
        assert torch.equal(policy.module.weight, trainer.module.weight)
        assert updater.version == 1
    finally:
        collector.shutdown()
    # Everything registered: nothing pending and the import hook gone.
    assert not _torchrl_compat._PENDING, _torchrl_compat._PENDING
    assert not any(f is _torchrl_compat._HOOK for f in sys.meta_path)
    print("REGISTERED")
""")


@pytest.mark.slow
@pytest.mark.parametrize("order", ["weightsync-first", "torchrl-first"])
def test_registration_with_torchrl_in_either_import_order(order):
    root = Path(weightsync.__file__).resolve().parents[1]  # the checkout under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SCRIPT, order], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "REGISTERED" in done.stdout, done.stdout + done.stderr
