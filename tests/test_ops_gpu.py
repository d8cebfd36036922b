"""weightsync.ops on a GPU: D2D, H2D, D2H, mixed lists, streams, pinning (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from weightsync import ops
from weightsync.engine import CopyPlan
from weightsync.errors import AliasingError, DTypeMismatchError

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64,
          torch.bool, torch.complex64, torch.uint8]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def random_tensor(numel: int, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).to(device)


SIZES = [0, 1, 3, 17, 4096, 65537, (1 << 20) + 5]


def _lists(gen, src_device, dst_device, dtype=torch.float32):
    src = [random_tensor(n, dtype, gen, src_device) for n in SIZES]
    dst = [torch.zeros(n, dtype=dtype, device=dst_device) for n in SIZES]
    return dst, src


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["d2d", "h2d", "d2h"])
def test_copy_directions_bit_exact(backend, gen, dtype, direction):
    src_dev, dst_dev = {"d2d": ("cuda", "cuda"), "h2d": ("cpu", "cuda"), "d2h": ("cuda", "cpu")}[direction]
    dst, src = _lists(gen, src_dev, dst_dev, dtype)
    ops.batched_copy_(dst, src)
    torch.cuda.synchronize()
    assert all(torch.equal(as_bytes(d), as_bytes(s)) for d, s in zip(dst, src))


def test_mixed_list(backend, gen):
    pairs = [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")] * 3
    src = [random_tensor(1000 + 37 * i, torch.float32, gen, s) for i, (s, _) in enumerate(pairs)]
    dst = [torch.zeros(1000 + 37 * i, device=d) for i, (_, d) in enumerate(pairs)]
    ops.batched_copy_(dst, src)
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dst, src))


def test_unaligned_and_non_contiguous(backend, gen):
    buf = torch.zeros(10_000, dtype=torch.uint8, device="cuda")
    src = random_tensor(9_990, torch.uint8, gen, "cuda")
    dst = [buf[1:4001], buf[4001:9991], torch.zeros(40, 30, device="cuda").t()]
    srcs = [src[:4000], src[4000:], torch.randn(30, 40, device="cuda")]
    ops.batched_copy_(dst, srcs)
    torch.cuda.synchronize()
    assert all(torch.equal(d, s) for d, s in zip(dst, srcs))
    assert buf[0] == 0


def test_ten_thousand_tensors(backend, gen):
    src = [torch.randn(1 + i % 61, device="cuda") for i in range(10_000)]
    dst = [torch.empty_like(s) for s in src]
    ops.batched_copy_(dst, src)
    torch.cuda.synchronize()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_non_blocking_on_a_side_stream(backend, gen):
    stream = torch.cuda.Stream()
    src_host = [random_tensor(1 << 16, torch.float32, gen).pin_memory() for _ in range(4)]
    with torch.cuda.stream(stream):
        dst = [torch.empty(1 << 16, device="cuda") for _ in range(4)]
        ops.batched_copy_(dst, src_host, non_blocking=True)
        back = [torch.empty(1 << 16).pin_memory() for _ in range(4)]
        ops.batched_copy_(back, dst, non_blocking=True)
    stream.synchronize()
    assert all(torch.equal(b, s) for b, s in zip(back, src_host))


def test_errors_change_nothing_on_gpu(backend):
    dst = [torch.zeros(4, device="cuda"), torch.zeros(3, device="cuda")]
    with pytest.raises(DTypeMismatchError, match="index 1"):
        ops.batched_copy_(dst, [torch.ones(4, device="cuda"), torch.ones(3, dtype=torch.int32)])
    buf = torch.zeros(8, device="cuda")
    with pytest.raises(AliasingError):
        ops.batched_copy_([buf[:5], buf[3:]], [torch.ones(5), torch.ones(5, device="cuda")])
    assert not dst[0].any() and not buf.any()


@pytest.mark.parametrize("flat_device", ["cpu", "cuda"])
@pytest.mark.parametrize("tensor_device", ["cpu", "cuda"])
def test_pack_unpack_across_devices(backend, gen, flat_device, tensor_device):
    src = [random_tensor(n, torch.float32, gen, tensor_device) for n in SIZES]
    offsets, pos = [], 0
    for t in src:
        offsets.append(pos)
        pos += (t.numel() * 4 + 255) // 256 * 256
    flat = torch.zeros(pos, dtype=torch.uint8, device=flat_device)
    ops.pack_(src, flat, offsets)
    dst = [torch.zeros_like(t) for t in src]
    ops.unpack_(flat, dst, offsets)
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dst, src))


@pytest.mark.parametrize("direction", ["d2d", "h2d", "d2h"])
def test_conj_and_neg_views_give_what_copy_gives(backend, direction):
    # The CUDA kernel moves bytes; views whose stored bytes are not their values must take
    # copy_ (batched_copy_, plans) or be materialised (pack_ / unpack_).
    src_dev, dst_dev = {"d2d": ("cuda", "cuda"), "h2d": ("cpu", "cuda"), "d2h": ("cuda", "cpu")}[direction]
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(n, dtype=torch.complex64, generator=g).to(src_dev) for n in (5, 70_000)]
    src = [base[0].conj(), base[1]._neg_view(), base[1].conj()]
    for view in (lambda t: t, lambda t: t.conj(), lambda t: t._neg_view()):
        for run in ("ops", "plan"):
            dst = [view(torch.zeros(s.shape, dtype=s.dtype, device=dst_dev)) for s in src]
            if run == "ops":
                ops.batched_copy_(dst, src)
            else:
                CopyPlan(dst, src).run()
            torch.cuda.synchronize()
            assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dst, src))
    offsets = [0, 256, 256 + 70_000 * 8 + 64]
    flat = torch.zeros(offsets[-1] + 70_000 * 8, dtype=torch.uint8, device=dst_dev)
    ops.pack_(src, flat, offsets)
    dst = [torch.zeros(s.shape, dtype=s.dtype, device=src_dev).conj() for s in src]
    ops.unpack_(flat, dst, offsets)
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dst, src))


def test_plan_on_gpu(backend, gen):
    dst, src = _lists(gen, "cpu", "cuda")
    plan = CopyPlan(dst, src)
    plan.run()
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s) for d, s in zip(dst, src))


def test_pin_and_unpin_shared_buffer(native):
    buf = torch.zeros(1 << 20, dtype=torch.uint8).share_memory_()
    ops.pin_memory_(buf)
    try:
        dev = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
        buf.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(buf, dev.cpu())
    finally:
        ops.unpin_memory_(buf)


def test_opcheck_host_register(native):
    # The schema check runs the op once (a buffer can be registered only once at a time);
    # autograd registration is vacuous for a uint8 buffer.
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    for op in (torch.ops.weightsync.host_register.default, torch.ops.weightsync.host_unregister.default):
        result = torch.library.opcheck(op, (buf,), test_utils=("test_schema",))
        assert all(v == "SUCCESS" for v in result.values()), result


def test_one_launch_for_many_tensors(native):
    src = [torch.randn(100, device="cuda") for _ in range(1000)]
    dst = [torch.empty_like(s) for s in src]
    ops.batched_copy_(dst, src)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.batched_copy_(dst, src)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == 1, [e.name for e in kernels]


def test_cupy_and_torch_backends_agree(monkeypatch, gen):
    pytest.importorskip("cupy")
    results = {}
    for name in ("cupy", "torch"):
        monkeypatch.setenv("WEIGHTSYNC_BACKEND", name)
        dst, src = _lists(torch.Generator().manual_seed(3), "cuda", "cuda")
        h_dst, h_src = _lists(torch.Generator().manual_seed(4), "cpu", "cuda")
        ops.batched_copy_(dst + h_dst, src + h_src)
        torch.cuda.synchronize()
        results[name] = [d.cpu() for d in dst + h_dst]
    assert all(torch.equal(a, b) for a, b in zip(results["cupy"], results["torch"]))
