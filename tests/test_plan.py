"""CopyPlan: validated once, run many times, rebuilt when a tensor moves."""

from __future__ import annotations

import pytest
import torch

from weightsync.engine import CopyPlan
from weightsync.errors import AliasingError, DTypeMismatchError, ShapeMismatchError


def make_pairs(n: int = 5):
    dst = [torch.zeros(i + 1, 3) for i in range(n)]
    src = [torch.randn(i + 1, 3) for i in range(n)]
    return dst, src


def test_plan_copies_and_reports(backend):
    dst, src = make_pairs()
    plan = CopyPlan(dst, src)
    assert len(plan) == 5 and plan.backend == backend
    assert plan.nbytes == sum(t.numel() * 4 for t in dst)
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    for s in src:
        s.add_(1)  # in-place changes are picked up: the plan holds the tensors, not copies
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert plan.rebuilds == 0 and plan.is_valid()


def test_plan_validates_at_construction(backend):
    with pytest.raises(DTypeMismatchError, match="index 0"):
        CopyPlan([torch.zeros(2)], [torch.zeros(2, dtype=torch.int64)])
    buf = torch.zeros(4)
    with pytest.raises(AliasingError):
        CopyPlan([buf[:3], buf[2:]], [torch.zeros(3), torch.zeros(2)])


def test_plan_rebuilds_after_reallocation(backend):
    dst, src = make_pairs()
    params = [torch.nn.Parameter(d) for d in dst]
    plan = CopyPlan(params, src)
    plan.run()
    params[2].data = torch.zeros(3, 3)  # e.g. module.to() or load_state_dict(assign=True)
    assert not plan.is_valid()
    src[2].fill_(7)
    plan.run()
    assert plan.rebuilds == 1 and plan.is_valid()
    assert torch.equal(params[2].detach(), src[2])


def test_plan_raises_when_reallocated_tensor_no_longer_fits(backend):
    dst, src = make_pairs()
    plan = CopyPlan(dst, src)
    dst[1].data = torch.full((5, 3), 9.0)
    before = [d.clone() for d in dst]
    with pytest.raises(ShapeMismatchError, match=r"index 1: dst shape \[5, 3\] != src shape \[2, 3\]"):
        plan.run()
    assert all(torch.equal(d, b) for d, b in zip(dst, before))


def test_plan_works_on_parameters_outside_no_grad(backend):
    lin = torch.nn.Linear(4, 3)
    src = [torch.randn(3, 4), torch.randn(3)]
    plan = CopyPlan(list(lin.parameters()), src)
    plan.run()
    assert torch.equal(lin.weight.detach(), src[0]) and lin.weight.requires_grad
