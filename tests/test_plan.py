"""CopyPlan: validated once, run many times, rebuilt when a tensor moves."""

from __future__ import annotations

import pytest
import torch

from weightsync.engine import CopyPlan
from weightsync.errors import (
    AliasingError,
    BackendUnavailableError,
    DTypeMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
)


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


def test_plan_names_a_non_tensor_by_index(backend):
    dst, src = make_pairs(3)
    with pytest.raises(InvalidArgumentError, match=r"CopyPlan: index 1: expected tensors, got NoneType"):
        CopyPlan([dst[0], None, dst[2]], src)


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


@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_plan_over_views_of_buffers_lands_every_byte(backend, order):
    # The native plan copies in destination-address order and merges spans that touch on
    # both sides; views listed in any order, with sources that touch only sometimes, must
    # still land exactly where their own tensor says.
    n, width = 64, 1000
    dst_buf = torch.zeros(n * width)
    src_buf = torch.randn(n * width)
    dst_views = list(dst_buf.view(n, width).unbind(0))
    src_views = list(src_buf.view(n, width).unbind(0))
    # Sources 10..19 come from a permuted region: their destinations touch, their sources not.
    perm = list(range(10, 20))[::-1]
    src_views[10:20] = [src_views[i] for i in perm]
    pairs = list(zip(dst_views, src_views))
    if order == "reversed":
        pairs.reverse()
    elif order == "shuffled":
        pairs = [pairs[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    plan = CopyPlan([d for d, _ in pairs], [s for _, s in pairs])
    for step in range(3):
        src_buf.add_(step)
        plan.run()
        for d, s in pairs:
            assert torch.equal(d, s)
    assert plan.rebuilds == 0


def test_plan_notices_reallocation_of_any_tensor_in_a_long_list(backend):
    # The check walks tensors in address order with prefetching; a moved tensor anywhere
    # (first, middle, last, a source) must still be seen.
    n = 300
    dst = [torch.zeros(257) for _ in range(n)]
    src = [torch.randn(257) for _ in range(n)]
    plan = CopyPlan(dst, src)
    plan.run()
    for moved, side in [(0, dst), (n // 2, src), (n - 1, dst), (n - 1, src)]:
        side[moved].data = side[moved].clone().add_(1)
        assert not plan.is_valid()
        plan.run()
        assert plan.is_valid()
        assert all(torch.equal(d, s) for d, s in zip(dst, src))


@pytest.mark.parametrize(
    "review, error, message",
    [
        (lambda t: t.view(torch.int32), DTypeMismatchError, r"index 1: dst dtype int32 != src dtype float32"),
        (lambda t: t.view(-1), ShapeMismatchError, r"index 1: dst shape \[6\] != src shape \[2, 3\]"),
        (lambda t: t.view(3, 2), ShapeMismatchError, r"index 1: dst shape \[3, 2\] != src shape \[2, 3\]"),
        (lambda t: t.view(1, 1, 1, 1, 2, 3), ShapeMismatchError, r"index 1: dst shape \[1, 1, 1, 1, 2, 3\]"),
    ],
    ids=["dtype-view", "flattened", "same-rank", "six-dims"],
)
def test_plan_notices_a_re_view_of_the_same_storage(backend, review, error, message):
    # Same storage, offset and byte count: only the dtype, the rank or the sizes changed.
    # The plan must re-validate (and refuse) instead of copying on as before.
    dst, src = make_pairs(3)
    plan = CopyPlan(dst, src)
    plan.run()
    dst[1].data = review(dst[1].data)
    before = [d.clone() for d in dst]
    with pytest.raises(error, match=message):
        plan.run()
    assert all(torch.equal(d, b) for d, b in zip(dst, before))


def test_plan_notices_a_reshape_beyond_five_dimensions(backend):
    # Sizes past the fifth are compared through a mix of their values, not left out.
    dst = [torch.zeros(1, 1, 1, 1, 2, 6), torch.zeros(3)]
    src = [torch.ones(1, 1, 1, 1, 2, 6), torch.ones(3)]
    plan = CopyPlan(dst, src)
    plan.run()
    dst[0].data = dst[0].data.view(1, 1, 1, 1, 3, 4)
    with pytest.raises(ShapeMismatchError, match=r"index 0: dst shape \[1, 1, 1, 1, 3, 4\]"):
        plan.run()


@pytest.mark.parametrize("review", ["offset", "strides"])
def test_plan_follows_a_re_view_at_another_offset_or_stride(backend, review):
    # Same storage, sizes and dtype: only where the tensor starts, or how it is laid out,
    # changed. The plan must copy into the tensor's new bytes, not its old ones.
    base = torch.zeros(20)
    dst = [torch.zeros(3), base[:9].view(3, 3)]
    src = [torch.randn(3), torch.randn(3, 3)]
    plan = CopyPlan(dst, src)
    plan.run()
    first = src[1].clone()
    if review == "offset":
        dst[1].data = base[4:13].view(3, 3)
    else:
        dst[1].data = dst[1].data.t()  # non-contiguous, same sizes
    src[1].add_(1)
    plan.run()
    # New strides alone need not rebuild every plan (the torch backend copies through the
    # tensors themselves), but the bytes must land where the tensor now says.
    assert plan.is_valid()
    assert torch.equal(dst[1], src[1]) and torch.equal(dst[0], src[0])
    if review == "offset":  # a new data pointer: every plan rebuilds; the old bytes stay
        assert plan.rebuilds == 1
        assert torch.equal(base[:4], first.flatten()[:4])


def test_plan_lands_after_a_storage_is_resized_in_place(backend):
    # FSDP-style: the storage is freed and reallocated under the same tensor. Its bytes may
    # come back elsewhere; the copy must land in the live allocation either way.
    dst, src = make_pairs(3)
    plan = CopyPlan(dst, src)
    plan.run()
    storage = dst[2].untyped_storage()
    nbytes = storage.nbytes()
    keep = torch.empty(nbytes // 4)  # makes reuse of the freed block less likely
    storage.resize_(0)
    storage.resize_(nbytes)
    src[2].add_(1)
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    del keep


@pytest.mark.parametrize("call", ["fastcall", "ctypes"])
def test_native_plan_runs_the_same_through_either_call(monkeypatch, call):
    # The native plan's C entry points are called through weightsync._entries' trampoline
    # when it is built, else through ctypes: copies, rebuilds and typed errors agree.
    from weightsync.engine import plan as plan_module
    from conftest import native_loaded, _skip_or_fail_native

    if not native_loaded():
        _skip_or_fail_native()
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")
    if call == "ctypes":
        monkeypatch.setattr(plan_module, "_fast_calls", lambda: None)
    dst, src = make_pairs()
    plan = CopyPlan(dst, src)
    assert plan.backend == "native"
    assert (plan._impl._fast_run is not None) == (call == "fastcall")
    plan.prepare()
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    params = [torch.nn.Parameter(d) for d in dst]
    plan = CopyPlan(params, src)
    params[0].data = torch.zeros(1, 3)
    src[0].fill_(3)
    plan.run()
    assert plan.rebuilds == 1 and torch.equal(params[0].detach(), src[0])
    params[1].data = torch.zeros(4, 3)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ShapeMismatchError, match=r"index 1: dst shape \[4, 3\] != src shape \[2, 3\]"):
        plan.run()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_copy_repeatedly_checks_once_then_copies_every_time(backend):
    # The benchmark-only path behind bench/engine_bench.py's "plan-copy" row: its first copy
    # is a checked run() (a reallocation is still noticed there), then it copies again
    # `times - 1` times. A non-contiguous destination goes through Tensor.copy_, which bumps
    # its version counter once per copy: that counts the copies, which bytes alone cannot
    # (every copy lands the same ones). Other backends refuse rather than time something else.
    dst, src = make_pairs()
    params = [torch.nn.Parameter(d) for d in dst]
    strided, strided_src = torch.zeros(4, 3).t(), torch.randn(3, 4)
    plan = CopyPlan([*params, strided], [*src, strided_src])
    if plan.backend != "native":
        with pytest.raises(BackendUnavailableError, match="only native plans .* torch backend"):
            plan._copy_repeatedly(3)
        return
    params[0].data = torch.zeros(1, 3)
    version = strided._version
    plan._copy_repeatedly(3)
    assert plan.rebuilds == 1
    assert strided._version - version == 3
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, src))
    assert torch.equal(strided, strided_src)
    with torch.no_grad():
        for t in (*params, strided):
            t.zero_()
    version = strided._version
    plan._copy_repeatedly(0)  # nothing at all
    assert strided._version == version
    assert all(not t.detach().any() for t in (*params, strided))
    plan._copy_repeatedly(2)
    assert plan.rebuilds == 1 and strided._version - version == 2
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, src))
    assert torch.equal(strided, strided_src)


def test_prepare_is_only_a_heads_up(backend):
    # Big enough for the native copier's helper threads, which prepare() wakes.
    dst = [torch.zeros(1 << 18) for _ in range(3)]
    src = [torch.randn(1 << 18) for _ in range(3)]
    plan = CopyPlan(dst, src)
    plan.prepare()
    assert all(torch.equal(d, torch.zeros_like(d)) for d in dst)  # nothing copied yet
    plan.prepare()
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert plan.rebuilds == 0


def test_a_plan_may_raise_its_threading_threshold(backend):
    # Above the process default (256 KiB), below the plan's own threshold: one thread; the
    # bytes are the same either way.
    dst = [torch.zeros(1 << 17) for _ in range(4)]
    src = [torch.randn(1 << 17) for _ in range(4)]
    for threshold in (0, 1 << 30):
        for d in dst:
            d.zero_()
        plan = CopyPlan(dst, src, parallel_min_bytes=threshold)
        plan.prepare()
        plan.run()
        assert all(torch.equal(d, s) for d, s in zip(dst, src))


# Conjugate and negative views share their base's bytes and only carry a flag that readers
# apply: a plan must give what copy_ gives, not move the stored bytes.
def _values(n: int, seed: int, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    return torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


MATH_BIT_PAIRS = {
    "src-conj": (lambda t: t, lambda t: t.conj()),
    "src-neg": (lambda t: t, lambda t: t._neg_view()),
    "dst-conj": (lambda t: t.conj(), lambda t: t),
    "dst-neg": (lambda t: t._neg_view(), lambda t: t),
    "both-conj": (lambda t: t.conj(), lambda t: t.conj()),
    "conj-to-neg": (lambda t: t._neg_view(), lambda t: t.conj()),
    "conj-neg-src": (lambda t: t, lambda t: t.conj()._neg_view()),
}


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32], ids=["complex", "real"])
@pytest.mark.parametrize("case", list(MATH_BIT_PAIRS))
def test_plan_gives_what_copy_gives_for_conj_and_neg_views(backend, case, dtype):
    as_dst, as_src = MATH_BIT_PAIRS[case]
    src_base = [_values(n, n, dtype) for n in (5, 300, 7)]
    src = [src_base[0], as_src(src_base[1]), src_base[2]]  # plain pairs on both sides
    dst = [torch.zeros(5, dtype=dtype), as_dst(torch.zeros(300, dtype=dtype)),
           torch.zeros(7, dtype=dtype)]
    expected = [torch.zeros(5, dtype=dtype), as_dst(torch.zeros(300, dtype=dtype)),
                torch.zeros(7, dtype=dtype)]
    for e, s in zip(expected, src):
        e.copy_(s)
    plan = CopyPlan(dst, src)
    for step in range(2):
        src_base[1].add_(step)  # values change in place between runs
        for e, s in zip(expected, src):
            e.copy_(s)
        plan.run()
        for d, e in zip(dst, expected):
            assert d.is_conj() == e.is_conj() and d.is_neg() == e.is_neg()
            assert torch.equal(d, e)
            # The stored bytes too, not only the values they show.
            assert torch.equal(d.resolve_conj().resolve_neg(), e.resolve_conj().resolve_neg())
    assert plan.rebuilds == 0


@pytest.mark.parametrize("side", ["dst", "src"])
@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_plan_notices_a_math_bit_set_on_the_same_storage(backend, side, bit):
    # `t.data = t.data.conj()` keeps the storage, offset, sizes and dtype: only the bit tells
    # the plan that a byte move no longer gives the right values.
    dst = [torch.zeros(6, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64)]
    src = [_values(6, 1), _values(3, 2)]
    plan = CopyPlan(dst, src)
    plan.run()
    changed = (dst if side == "dst" else src)[0]
    changed.data = changed.data.conj() if bit == "conj" else changed.data._neg_view()
    assert not plan.is_valid()  # every backend's plan notices the bit, as it would a re-view
    plan.run()
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1])
    assert plan.is_valid()
    assert plan.rebuilds == 1
