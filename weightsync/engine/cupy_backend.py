"""The cupy backend: CUDA copies without the compiled extension, through one RawKernel.

Used for lists holding CUDA tensors when the extension has no CUDA part but cupy is installed.
Device-to-device pairs of one device run as one launch of a multi-tensor copy kernel (a table
of pointers and byte counts, one block per 64 KB chunk); host<->device pairs go through a
pinned flat buffer and one DMA, then the same kernel. Host-only lists and cross-device pairs
are left to the torch backend. Work is queued on torch's current stream, so ordering with
torch kernels is the usual one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache

import torch

from weightsync.engine.torch_backend import (
    TorchBackend,
    _bytes_view,
    _has_math_bits,
    _value_bytes,
    run_groups,
)
from weightsync.engine.validate import check_copy_lists, check_pack_lists, nbytes_of

__all__ = ["CupyBackend", "cupy_unavailable_reason"]

_CHUNK_BYTES = 64 * 1024
_ALIGN = 16
_THREADS = 256

_KERNEL_SOURCE = r"""
extern "C" __global__ void weightsync_multi_copy(
    const unsigned long long* src, const unsigned long long* dst,
    const unsigned long long* nbytes, const unsigned long long* chunk_prefix,
    int count, unsigned long long chunk_bytes) {
  const unsigned long long block = blockIdx.x;
  int lo = 0, hi = count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (chunk_prefix[mid] <= block) lo = mid; else hi = mid;
  }
  const unsigned long long begin = (block - chunk_prefix[lo]) * chunk_bytes;
  const unsigned long long total = nbytes[lo];
  const unsigned long long end = begin + chunk_bytes < total ? begin + chunk_bytes : total;
  const unsigned char* s = reinterpret_cast<const unsigned char*>(src[lo]);
  unsigned char* d = reinterpret_cast<unsigned char*>(dst[lo]);
  unsigned long long i = begin;
  if (((src[lo] | dst[lo]) & 15ull) == 0) {
    const unsigned long long vec_end = begin + ((end - begin) & ~15ull);
    for (unsigned long long v = begin + 16ull * threadIdx.x; v < vec_end; v += 16ull * blockDim.x) {
      *reinterpret_cast<uint4*>(d + v) = *reinterpret_cast<const uint4*>(s + v);
    }
    i = vec_end;
  }
  for (unsigned long long b = i + threadIdx.x; b < end; b += blockDim.x) d[b] = s[b];
}
"""


def cupy_unavailable_reason() -> str | None:
    """Why the cupy backend cannot run here, or None when it can."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    return None


@cache
def _kernel(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawKernel(_KERNEL_SOURCE, "weightsync_multi_copy")


def _launch(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
    """One kernel launch copying every (dst, src) contiguous pair, all on ``device``."""
    import cupy

    if not pairs:
        return
    chunks = [max(1, -(-nbytes_of(d) // _CHUNK_BYTES)) for d, _ in pairs]
    prefix = [0]
    for c in chunks:
        prefix.append(prefix[-1] + c)
    table = torch.tensor(
        [[s.data_ptr() for _, s in pairs], [d.data_ptr() for d, _ in pairs],
         [nbytes_of(d) for d, _ in pairs], prefix[:-1]],
        dtype=torch.int64,
    ).to(device, non_blocking=False)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        rows = [cupy.asarray(table[r]) for r in range(4)]
        _kernel(device.index)((prefix[-1],), (_THREADS,),
                              (*rows, len(pairs), _CHUNK_BYTES))
    # The table must outlive the launch: tie its memory to the stream.
    table.record_stream(stream)


class CupyBackend:
    """Multi-tensor copies on CUDA tensors through a cupy RawKernel."""

    name = "cupy"

    def __init__(self) -> None:
        self._torch = TorchBackend()

    def batched_copy_(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                      non_blocking: bool = False) -> None:
        check_copy_lists("batched_copy_", dst, src)
        by_device: dict[torch.device, list] = {}
        h2d: dict[torch.device, list] = {}
        rest_dst, rest_src = [], []
        for d, s in zip(dst, src):
            if d.numel() == 0:
                continue
            # Conjugate/negative views hold bytes that are not their values: copy_ applies
            # their bits (the torch backend's grouped copy, below).
            contiguous = (d.is_contiguous() and s.is_contiguous()
                          and not _has_math_bits(d) and not _has_math_bits(s))
            if contiguous and d.is_cuda and s.device == d.device:
                by_device.setdefault(d.device, []).append((d, s))
            elif contiguous and d.is_cuda and s.device.type == "cpu":
                h2d.setdefault(d.device, []).append((d, s))
            else:
                rest_dst.append(d)
                rest_src.append(s)
        with torch.no_grad():
            for device, pairs in by_device.items():
                _launch(pairs, device)
            for device, pairs in h2d.items():
                self._h2d(pairs, device, non_blocking)
            if rest_dst:
                run_groups([(rest_dst, rest_src)], non_blocking)

    def _h2d(self, pairs: list, device: torch.device, non_blocking: bool) -> None:
        """Host sources packed into one pinned buffer, one DMA, one unpack launch."""
        offsets, total = [], 0
        for d, _ in pairs:
            offsets.append(total)
            total += -(-nbytes_of(d) // _ALIGN) * _ALIGN
        pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        for (_, s), off in zip(pairs, offsets):
            pinned.narrow(0, off, nbytes_of(s)).copy_(_bytes_view(s))
        staged = pinned.to(device, non_blocking=True)
        _launch([(_bytes_view(d), staged.narrow(0, off, nbytes_of(d)))
                 for (d, _), off in zip(pairs, offsets)], device)
        if not non_blocking:
            torch.cuda.current_stream(device).synchronize()

    def pack_(self, src: Sequence[torch.Tensor], flat: torch.Tensor, offsets: Sequence[int],
              non_blocking: bool = False) -> None:
        check_pack_lists("pack_", src, flat, offsets, tensors_are_written=False)
        if not flat.is_cuda:
            self._torch.pack_(src, flat, offsets, non_blocking)
            return
        pairs = [(flat.narrow(0, int(off), nbytes_of(t)), _value_bytes(t))
                 for t, off in zip(src, offsets) if nbytes_of(t)]
        self.batched_copy_([d for d, _ in pairs], [s for _, s in pairs], non_blocking)

    def unpack_(self, flat: torch.Tensor, dst: Sequence[torch.Tensor], offsets: Sequence[int],
                non_blocking: bool = False) -> None:
        check_pack_lists("unpack_", dst, flat, offsets, tensors_are_written=True)
        if not flat.is_cuda or not all(t.is_contiguous() and not _has_math_bits(t) for t in dst):
            self._torch.unpack_(flat, dst, offsets, non_blocking)
            return
        pairs = [(_bytes_view(t), flat.narrow(0, int(off), nbytes_of(t)))
                 for t, off in zip(dst, offsets) if nbytes_of(t)]
        self.batched_copy_([d for d, _ in pairs], [s for _, s in pairs], non_blocking)
