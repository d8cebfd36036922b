"""The compiled library itself: op registration, opcheck, torch.compile, build metadata."""

from __future__ import annotations

import pytest
import torch

from weightsync import _extension, ops


def test_every_op_has_a_cpu_kernel(native):
    for op in ("batched_copy_", "pack_", "unpack_", "futex_wait", "futex_wake", "host_register",
               "host_unregister"):
        assert _extension.has_kernel(op, "CPU"), op


def test_cuda_kernels_registered_when_built_with_cuda(native):
    """No GPU needed: the dispatcher knows the kernels as soon as the library is loaded."""
    built_with_cuda = _extension.load().build_info.get("with_cuda")
    for op in ("batched_copy_", "pack_", "unpack_"):
        assert _extension.has_kernel(op, "CUDA") == bool(built_with_cuda), op


@pytest.mark.parametrize(
    "op, args",
    [
        ("batched_copy_", lambda: ([torch.zeros(3), torch.zeros(2, 2)], [torch.randn(3), torch.randn(2, 2)], False)),
        ("pack_", lambda: ([torch.randn(3), torch.randn(2, 2)], torch.zeros(512, dtype=torch.uint8), [0, 256], False)),
        ("unpack_", lambda: (torch.randint(0, 255, (512,), dtype=torch.uint8), [torch.zeros(3), torch.zeros(2, 2)], [0, 256], False)),
    ],
)
def test_opcheck(native, op, args):
    result = torch.library.opcheck(getattr(torch.ops.weightsync, op).default, args())
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize(
    "op, args",
    [
        ("futex_wait", lambda: (torch.zeros(1, dtype=torch.int32), 1, 0.0)),
        ("futex_wake", lambda: (torch.zeros(1, dtype=torch.int32), 1)),
    ],
)
def test_opcheck_synchronisation_ops(native, op, args):
    # Schema (no undeclared mutation) and autograd registration. They have no fake kernel on
    # purpose: a wait or a wake is a side effect at run time that no graph should capture.
    result = torch.library.opcheck(getattr(torch.ops.weightsync, op).default, args(),
                                   test_utils=("test_schema", "test_autograd_registration"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_fullgraph(native):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(dst, src):
        torch.ops.weightsync.batched_copy_(dst, src, False)
        return dst[0] * 2

    dst = [torch.zeros(4), torch.zeros(3, 3)]
    src = [torch.arange(4.0), torch.randn(3, 3)]
    out = step(dst, src)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1])
    assert torch.equal(out, src[0] * 2)


def test_torch_compile_fullgraph_through_the_public_ops(native, monkeypatch):
    # The public ops trace through the native ops (their fakes); the torch fallback's Python
    # validation is not traceable, so this is a native-path feature.
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "native")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(dst, src, flat):
        ops.batched_copy_(dst, src)
        ops.pack_(src, flat, [0, 64])
        ops.unpack_(flat, [dst[1], dst[0]], [64, 0])
        return dst[0] * 2

    dst = [torch.zeros(4), torch.zeros(3, 3)]
    src = [torch.arange(4.0), torch.randn(3, 3)]
    flat = torch.zeros(128, dtype=torch.uint8)
    out = step(dst, src, flat)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[1])
    assert torch.equal(flat[:16].view(torch.float32), src[0])
    assert torch.equal(out, src[0] * 2)


def test_raw_op_errors_are_tagged_and_wrapper_types_them(native):
    from weightsync.errors import ShapeMismatchError

    with pytest.raises(ValueError, match=r"weightsync\[shape\]: batched_copy_: index 0"):
        torch.ops.weightsync.batched_copy_([torch.zeros(2)], [torch.zeros(3)], False)
    with pytest.raises(ShapeMismatchError, match=r"^weightsync\[shape\]: batched_copy_: index 0: "
                                                 r"dst shape \[2\] != src shape \[3\]$"):
        ops.batched_copy_([torch.zeros(2)], [torch.zeros(3)])


def test_engine_config_reports_host_copier(native):
    threads, min_bytes, chunk = torch.ops.weightsync.engine_config()
    assert threads >= 1 and min_bytes >= 0 and chunk >= 4096


def test_host_copier_follows_torch_thread_count(native):
    # Workers that limit torch's threads (torch.set_num_threads(1) in collector processes)
    # get a single-threaded copier; copies stay exact on both sides of the change.
    before = torch.get_num_threads()
    dst = [torch.zeros(300_000) for _ in range(4)]  # above the threading threshold
    src = [torch.randn(300_000) for _ in range(4)]
    try:
        torch.set_num_threads(1)
        assert torch.ops.weightsync.engine_config()[0] == 1
        ops.batched_copy_(dst, src)
        assert all(torch.equal(d, s) for d, s in zip(dst, src))
    finally:
        torch.set_num_threads(before)
    assert torch.ops.weightsync.engine_config()[0] >= 1
    for s in src:
        s.add_(1)
    ops.batched_copy_(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_c_functions_are_typed_and_all_or_nothing(native):
    import ctypes

    i64 = ctypes.c_int64
    calls = _extension.c_functions("weightsync_sender_", {"new": ([ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_int, i64], i64), "free": ([i64], None)})
    assert calls is not None
    assert calls.new.restype is i64 and calls.free.argtypes == [i64]
    # The library refuses an arena with no worker without touching the words.
    assert calls.new(None, -1, 2, 0, 0) == 0
    # A name the library lacks: nothing at all, never a partial set.
    assert _extension.c_functions("weightsync_sender_", {"new": ([], i64), "nope": ([], None)}) is None
