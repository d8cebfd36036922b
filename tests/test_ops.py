"""weightsync.ops on the CPU, for every backend: bit-exact copies, pack/unpack, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsync import ops
from weightsync.errors import (
    AliasingError,
    BackendUnavailableError,
    DeviceMismatchError,
    DTypeMismatchError,
    InvalidArgumentError,
    LayoutMismatchError,
    ShapeMismatchError,
    WeightSyncError,
)

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16,
    torch.uint32, torch.uint64, torch.bool, torch.complex64, torch.complex128,
]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's element bytes in logical order (bit-exact comparison, NaNs included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every bit pattern, NaNs and denormals included."""
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def snapshot(tensors):
    return [t.clone() for t in tensors]


def unchanged(tensors, before) -> bool:
    return all(same_bytes(t, b) for t, b in zip(tensors, before))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_batched_copy_every_dtype_bit_exact(backend, dtype, gen):
    shapes = [(), (0,), (1,), (7,), (3, 5), (2, 3, 33)]
    src = [random_tensor(s, dtype, gen) for s in shapes]
    dst = [torch.zeros(s, dtype=dtype) for s in shapes]
    ops.batched_copy_(dst, src)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))


def test_batched_copy_unaligned_pointers_and_mixed_sizes(backend, gen):
    # Views that start 1 byte into a buffer defeat every alignment assumption.
    sizes = [1, 3, 15, 16, 17, 255, 4096, 65537, 1 << 20]
    src_buf = random_tensor((sum(sizes) + 1,), torch.uint8, gen)
    dst_buf = torch.zeros(sum(sizes) + 1, dtype=torch.uint8)
    src, dst, pos = [], [], 1
    for n in sizes:
        src.append(src_buf[pos:pos + n])
        dst.append(dst_buf[pos:pos + n])
        pos += n
    ops.batched_copy_(dst, src)
    assert torch.equal(dst_buf[1:], src_buf[1:])
    assert dst_buf[0] == 0


def test_batched_copy_large_tensor(backend, gen):
    n = (64 << 20) // 4 + 3  # just over 64 MB of float32, odd element count
    src = [torch.randn(n, generator=gen), torch.randn(5, generator=gen)]
    dst = [torch.empty(n), torch.empty(5)]
    ops.batched_copy_(dst, src)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))


def test_batched_copy_ten_thousand_tensors(backend, gen):
    src = [torch.randn(1 + i % 37, generator=gen) for i in range(10_000)]
    dst = [torch.empty_like(s) for s in src]
    ops.batched_copy_(dst, src)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))


def test_batched_copy_non_contiguous_lands_in_strided_places(backend, gen):
    base = torch.zeros(8, 6)
    dst = [base.t(), base[::2, ::3].clone().t().contiguous().t(), torch.zeros(4, 5)[:, 1:4]]
    src = [torch.randn(6, 8, generator=gen), torch.randn(2, 4, generator=gen),
           torch.randn(3, 4, generator=gen).t()]
    dst[1] = torch.zeros(4, 2).t()
    ops.batched_copy_(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(d, s)
    assert torch.equal(base.t(), src[0])


def _math_bit_views(gen):
    """Conjugate and negative views (their bytes are their base's; a flag tells readers to
    conjugate or negate), with a plain tensor between them."""
    base = [torch.randn(6, dtype=torch.complex64, generator=gen),
            torch.randn(5, generator=gen),
            torch.randn(3, 4, dtype=torch.complex128, generator=gen),
            torch.randn(4, dtype=torch.complex64, generator=gen)]
    return [base[0].conj(), base[1]._neg_view(), base[2].t().conj(), base[3],
            base[0].conj()._neg_view()]


def test_batched_copy_of_conj_and_neg_views_gives_what_copy_gives(backend, gen):
    src = _math_bit_views(gen)
    views = {"plain": lambda t: t, "conj": lambda t: t.conj(), "neg": lambda t: t._neg_view()}
    for name, view in views.items():
        dst = [view(torch.zeros_like(s.resolve_conj().resolve_neg())) for s in src]
        expected = [view(torch.zeros_like(s.resolve_conj().resolve_neg())) for s in src]
        for e, s in zip(expected, src):
            e.copy_(s)
        ops.batched_copy_(dst, src)
        for i, (d, e) in enumerate(zip(dst, expected)):
            assert torch.equal(d, e), f"{name} dst, index {i}"
            assert torch.equal(d.resolve_conj().resolve_neg(), e.resolve_conj().resolve_neg())


def test_pack_unpack_of_conj_and_neg_views_moves_their_values(backend, gen):
    # pack_ writes the values a view shows; unpack_ makes any destination show them again.
    src = _math_bit_views(gen)
    offsets, total = _layout(src, 1, start=1)
    flat = torch.zeros(total, dtype=torch.uint8)
    ops.pack_(src, flat, offsets)
    for t, off in zip(src, offsets):
        n = t.numel() * t.element_size()
        assert torch.equal(flat[off:off + n], as_bytes(t.resolve_conj().resolve_neg()))
    for view in (lambda t: t, lambda t: t.conj(), lambda t: t._neg_view()):
        dst = [view(torch.zeros_like(s.resolve_conj().resolve_neg())) for s in src]
        ops.unpack_(flat, dst, offsets)
        assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_batched_copy_does_not_need_no_grad(backend):
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))]
    src = [torch.arange(4.0), torch.ones(2, 2)]
    ops.batched_copy_(params, src)
    assert torch.equal(params[0].detach(), src[0])
    assert params[0].requires_grad and params[0].grad_fn is None


def test_empty_lists(backend):
    ops.batched_copy_([], [])
    ops.pack_([], torch.zeros(0, dtype=torch.uint8), [])
    ops.unpack_(torch.zeros(0, dtype=torch.uint8), [], [])


# ---------------------------------------------------------------------------------- errors


def _expect_unchanged(error, match, dst, src):
    before = snapshot(dst)
    with pytest.raises(error, match=match):
        ops.batched_copy_(dst, src)
    assert unchanged(dst, before)


def test_length_mismatch(backend):
    dst = [torch.zeros(2), torch.zeros(3)]
    _expect_unchanged(LayoutMismatchError, r"dst has 2 tensors but src has 1", dst, [torch.ones(2)])


def test_dtype_mismatch_names_index_and_both_dtypes(backend):
    dst = [torch.zeros(2), torch.zeros(3), torch.zeros(4)]
    src = [torch.ones(2), torch.ones(3), torch.ones(4, dtype=torch.float64)]
    _expect_unchanged(DTypeMismatchError, r"index 2: dst dtype float32 != src dtype float64", dst, src)


def test_shape_mismatch_names_index_and_both_shapes(backend):
    dst = [torch.zeros(2), torch.zeros(3, 2)]
    src = [torch.ones(2), torch.ones(2, 3)]
    _expect_unchanged(ShapeMismatchError, r"index 1: dst shape \[3, 2\] != src shape \[2, 3\]", dst, src)


def test_dst_aliasing_another_dst(backend):
    buf = torch.zeros(10)
    dst = [torch.zeros(3), buf[:6], buf[4:10]]
    src = [torch.ones(3), torch.ones(6), torch.ones(6)]
    _expect_unchanged(AliasingError, r"dst\[1\] and dst\[2\] share memory", dst, src)


def test_dst_aliasing_a_src(backend):
    buf = torch.zeros(10)
    dst = [buf[:5], torch.zeros(2)]
    src = [torch.ones(5), buf[4:6]]
    _expect_unchanged(AliasingError, r"dst\[0\] and src\[1\] share memory", dst, src)


def test_aliasing_through_strided_views_and_past_empty_pairs(backend):
    # A strided source reaching into a destination, with empty pairs between: the extent of a
    # strided view is its lowest to highest element, and empty tensors never overlap anything.
    buf = torch.zeros(4, 6)
    dst = [buf[:2].reshape(-1), torch.zeros(0), buf[1:, :0], torch.zeros(3)]
    src = [torch.ones(12), torch.ones(0), torch.ones(3, 0), buf[1:, 1:3].t()[0]]
    _expect_unchanged(AliasingError, r"dst\[0\] and src\[3\] share memory", dst, src)
    # An empty destination inside another destination's bytes is not an overlap.
    ops.batched_copy_([buf.view(-1), buf[0, :0]], [torch.ones(24), torch.ones(0)])
    assert torch.equal(buf, torch.ones(4, 6))


def test_sources_may_overlap_each_other(backend):
    buf = torch.arange(10.0)
    dst = [torch.zeros(6), torch.zeros(6)]
    ops.batched_copy_(dst, [buf[:6], buf[4:]])
    assert torch.equal(dst[0], buf[:6]) and torch.equal(dst[1], buf[4:])


def test_dst_with_internal_overlap(backend):
    dst = [torch.zeros(3), torch.zeros(1).expand(4)]
    _expect_unchanged(AliasingError, r"index 1: dst float32\[4\] on cpu has overlapping elements",
                      dst, [torch.ones(3), torch.arange(4.0)])


def test_unsupported_device(backend):
    # A meta argument makes the dispatcher pick the Meta kernel over the CPU one: the native
    # path must still refuse it (meta tensors hold no bytes) rather than copy nothing.
    dst = [torch.zeros(2), torch.empty(2, device="meta")]
    with pytest.raises(DeviceMismatchError, match=r"index 1: only CPU and CUDA"):
        ops.batched_copy_(dst, [torch.ones(2), torch.empty(2, device="meta")])
    assert torch.equal(dst[0], torch.zeros(2))
    with pytest.raises(DeviceMismatchError, match=r"index 0: only CPU and CUDA"):
        ops.batched_copy_([torch.empty(2, device="meta")], [torch.empty(2, device="meta")])
    flat = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(DeviceMismatchError, match=r"pack_: index 1: tensor on meta"):
        ops.pack_([torch.ones(2), torch.empty(2, device="meta")], flat, [0, 8])
    with pytest.raises(DeviceMismatchError, match=r"unpack_: index 0: tensor on meta"):
        ops.unpack_(flat, [torch.empty(2, device="meta")], [0])
    with pytest.raises(DeviceMismatchError, match=r"flat on meta"):
        ops.unpack_(torch.zeros(16, dtype=torch.uint8, device="meta"), [torch.zeros(2)], [0])
    assert torch.equal(flat, torch.zeros(16, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [None, 3, "w"], ids=["None", "int", "str"])
def test_a_non_tensor_in_a_list_is_named_by_index(backend, bad):
    # The native path learns of it from the dispatcher (no index in its message); every
    # backend must still raise the typed error naming the index, and change nothing.
    name = type(bad).__name__
    dst = [torch.zeros(2), torch.zeros(3), torch.zeros(4)]
    src = [torch.ones(2), torch.ones(3), torch.ones(4)]
    before = snapshot(dst)
    with pytest.raises(InvalidArgumentError,
                       match=rf"batched_copy_: index 1: expected tensors, got {name} and Tensor"):
        ops.batched_copy_([dst[0], bad, dst[2]], src)
    with pytest.raises(InvalidArgumentError,
                       match=rf"batched_copy_: index 2: expected tensors, got Tensor and {name}"):
        ops.batched_copy_(dst, [src[0], src[1], bad])
    assert unchanged(dst, before)
    flat = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=rf"pack_: index 1: expected a tensor, got {name}"):
        ops.pack_([src[0], bad, src[2]], flat, [0, 16, 32])
    assert not flat.any()
    flat.fill_(7)
    with pytest.raises(InvalidArgumentError, match=rf"unpack_: index 2: expected a tensor, got {name}"):
        ops.unpack_(flat, [dst[0], dst[1], bad], [0, 16, 32])
    assert unchanged(dst, before)


def test_errors_share_one_base(backend):
    with pytest.raises(WeightSyncError):
        ops.batched_copy_([torch.zeros(1)], [torch.zeros(2)])


def test_backends_give_identical_messages(native, monkeypatch):
    cases = [
        ([torch.zeros(2)], [torch.zeros(2, dtype=torch.int32)]),
        ([torch.zeros(2)], [torch.zeros(3)]),
        ([torch.zeros(2), torch.zeros(1)], [torch.zeros(2)]),
        ([torch.zeros(2), None], [torch.zeros(2), torch.zeros(1)]),
    ]
    for dst, src in cases:
        messages = []
        for name in ("native", "torch"):
            monkeypatch.setenv("WEIGHTSYNC_BACKEND", name)
            with pytest.raises(WeightSyncError) as info:
                ops.batched_copy_(dst, src)
            messages.append((type(info.value), str(info.value)))
        assert messages[0] == messages[1]


# --------------------------------------------------------------------------- pack / unpack


def _layout(tensors, align: int, start: int = 0):
    offsets, pos = [], start
    for t in tensors:
        pos = (pos + align - 1) // align * align
        offsets.append(pos)
        pos += t.numel() * t.element_size()
    return offsets, pos


@pytest.mark.parametrize("align", [256, 1], ids=["aligned", "unaligned"])
def test_pack_unpack_round_trip_every_dtype(backend, align, gen):
    src = [random_tensor(s, d, gen) for d in DTYPES for s in [(), (5,), (3, 7)]]
    offsets, total = _layout(src, align, start=3 if align == 1 else 0)
    flat = torch.zeros(total, dtype=torch.uint8)
    ops.pack_(src, flat, offsets)
    for t, off in zip(src, offsets):
        n = t.numel() * t.element_size()
        assert torch.equal(flat[off:off + n], as_bytes(t))
    dst = [torch.zeros_like(t) for t in src]
    ops.unpack_(flat, dst, offsets)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))


def test_pack_unpack_non_contiguous(backend, gen):
    src = [torch.randn(4, 6, generator=gen).t(), torch.randn(10, generator=gen)[::3]]
    offsets, total = _layout(src, 256)
    flat = torch.zeros(total, dtype=torch.uint8)
    ops.pack_(src, flat, offsets)
    dst = [torch.zeros(4, 6).t(), torch.zeros(8)[::2]]
    ops.unpack_(flat, dst, offsets)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_pack_unpack_round_trip_zero_element_tensors(backend, gen):
    # Empty tensors take no bytes: at the same offset as a neighbour, at the very end of flat,
    # as views of another tensor, strided or 0-d neighbours around them, or everything empty.
    src = [torch.zeros(0), random_tensor((3,), torch.float32, gen), torch.zeros(2, 0, 5),
           random_tensor((), torch.int64, gen), torch.zeros(0, dtype=torch.complex64),
           random_tensor((4, 3), torch.float16, gen).t(), torch.zeros(7)[3:3]]
    offsets = [0, 0, 12, 12, 20, 20, 44]  # the last one sits exactly at the end of flat
    flat = random_tensor((44,), torch.uint8, gen)
    ops.pack_(src, flat, offsets)
    dst = [torch.empty_like(t) for t in src]
    ops.unpack_(flat, dst, offsets)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))
    empty = [torch.zeros(0), torch.zeros(0, 3, dtype=torch.float64)]
    for flat in (torch.zeros(0, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)):
        ops.pack_(empty, flat, [flat.numel(), 0])
        ops.unpack_(flat, empty, [0, flat.numel()])
        assert not flat.any()


def test_pack_unpack_round_trip_large(backend, gen):
    # Over 64 MB in one tensor (the host copier splits it across threads, and in chunks),
    # beside small ones and at an offset that is not a multiple of anything.
    big = torch.randn((64 << 20) // 4 + 5, generator=gen)
    src = [random_tensor((3,), torch.uint8, gen), big, random_tensor((7,), torch.float64, gen)]
    offsets, total = _layout(src, 1, start=3)
    flat = torch.zeros(total + 1, dtype=torch.uint8)
    ops.pack_(src, flat, offsets)
    assert torch.equal(flat[offsets[1]:offsets[1] + big.numel() * 4], as_bytes(big))
    dst = [torch.empty_like(t) for t in src]
    ops.unpack_(flat, dst, offsets)
    assert all(same_bytes(d, s) for d, s in zip(dst, src))
    assert flat[:3].eq(0).all() and flat[-1] == 0


def test_pack_out_of_bounds_changes_nothing(backend):
    src = [torch.ones(4), torch.ones(4)]
    flat = torch.zeros(40, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=r"index 1: bytes \[32, 48\) of float32\[4\] on cpu "
                                                   r"fall outside flat of 40 bytes"):
        ops.pack_(src, flat, [0, 32])
    assert not flat.any()


def test_pack_takes_integer_offsets_only(backend):
    # int() would truncate 1.5 to 1 and write the bytes one place off: refused, flat untouched.
    src = [torch.ones(2), torch.full((2,), 2.0)]
    flat = torch.zeros(64, dtype=torch.uint8)
    for bad, message in ([0, 8.5], r"offsets\[1\] must be an integer, got float 8.5"), \
                        ([0, "8"], r"offsets\[1\] must be an integer, got str '8'"), \
                        (8, r"offsets must be a sequence of integers, got int"):
        with pytest.raises(InvalidArgumentError, match=r"pack_: " + message):
            ops.pack_(src, flat, bad)
        assert not flat.any()
    # What has __index__ is an integer: numpy integers, 0-d integer tensors.
    ops.pack_(src, flat, [np.int64(0), torch.tensor(8)])
    assert torch.equal(flat[:16].view(torch.float32), torch.tensor([1.0, 1.0, 2.0, 2.0]))


def test_pack_overlapping_segments_changes_nothing(backend):
    flat = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(AliasingError, match=r"flat segment\[0\] and flat segment\[1\] share memory"):
        ops.pack_([torch.ones(4), torch.ones(4)], flat, [0, 8])
    assert not flat.any()


def test_unpack_dst_inside_flat_changes_nothing(backend):
    flat = torch.zeros(64, dtype=torch.uint8)
    flat[30:40] = torch.arange(10, dtype=torch.uint8)
    before = flat.clone()
    dst = [flat[32:40].view(torch.float32)]
    with pytest.raises(AliasingError, match=r"flat segment\[0\] and dst\[0\] share memory"):
        ops.unpack_(flat, dst, [30])
    assert torch.equal(flat, before)
    ops.unpack_(flat, dst, [0])  # reading elsewhere in the same buffer is fine
    assert not flat[32:40].any()


def test_flat_must_be_contiguous_uint8(backend):
    with pytest.raises(InvalidArgumentError, match=r"flat must be a 1-D contiguous uint8 tensor, got float32"):
        ops.pack_([torch.ones(2)], torch.zeros(16), [0])
    with pytest.raises(LayoutMismatchError, match=r"2 tensors but 1 offsets"):
        ops.pack_([torch.ones(2), torch.ones(2)], torch.zeros(64, dtype=torch.uint8), [0])


def _unpack_targets(gen):
    """Several destinations (dtypes, a strided view) and a flat that holds other bytes."""
    dst = [random_tensor((4,), torch.float32, gen), random_tensor((3, 5), torch.int16, gen),
           random_tensor((6, 4), torch.float64, gen).t(), random_tensor((0,), torch.int64, gen),
           random_tensor((9,), torch.uint8, gen)]
    offsets, total = _layout(dst, 16)
    return dst, offsets, random_tensor((total,), torch.uint8, gen)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda o: o.__setitem__(2, o[2] + 1), InvalidArgumentError,
         r"unpack_: index 2: bytes \[\d+, \d+\) of float64\[4, 6\] on cpu fall outside flat"),
        (lambda o: o.__setitem__(4, 10_000), InvalidArgumentError,
         r"unpack_: index 4: bytes \[10000, 10009\) of uint8\[9\] on cpu fall outside flat"),
        (lambda o: o.__setitem__(1, -8), InvalidArgumentError, r"unpack_: index 1: negative offset -8"),
        (lambda o: o.pop(), LayoutMismatchError, r"unpack_: 5 tensors but 4 offsets"),
        (lambda o: o.__setitem__(3, o[3] + 0.5), InvalidArgumentError,
         r"unpack_: offsets\[3\] must be an integer, got float \d+\.5"),
        (lambda o: o.__setitem__(4, None), InvalidArgumentError,
         r"unpack_: offsets\[4\] must be an integer, got NoneType None"),
        (lambda o: o.__setitem__(0, True), InvalidArgumentError,
         r"unpack_: offsets\[0\] must be an integer, got bool True"),
    ],
    ids=["out-of-bounds-by-one", "far-out-of-bounds", "negative-offset", "length", "float",
         "none", "bool"],
)
def test_unpack_errors_change_no_destination_byte(backend, gen, change, error, message):
    # The bad entry comes after good ones: a backend that copied pairs as it checked them
    # would already have written the first destinations.
    dst, offsets, flat = _unpack_targets(gen)
    offsets[2] = flat.numel() - 8 * 24  # the strided destination ends flat exactly
    before, flat_before = snapshot(dst), flat.clone()
    bad = list(offsets)
    change(bad)
    with pytest.raises(error, match=message):
        ops.unpack_(flat, dst, bad)
    assert unchanged(dst, before)
    assert torch.equal(flat, flat_before)
    # The same call with the offsets unchanged is valid: only the change was refused.
    ops.unpack_(flat, dst, offsets)
    for t, off in zip(dst, offsets):
        assert torch.equal(as_bytes(t), flat[off:off + t.numel() * t.element_size()])


def test_pin_memory_rejects_non_contiguous():
    with pytest.raises(InvalidArgumentError, match=r"contiguous CPU tensor"):
        ops.pin_memory_(torch.zeros(4, 4).t())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_pin_memory_without_a_gpu_says_why():
    with pytest.raises(BackendUnavailableError, match=r"pin_memory_"):
        ops.pin_memory_(torch.zeros(16, dtype=torch.uint8))
