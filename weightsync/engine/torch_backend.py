"""The pure-torch backend: always available, same signatures and errors as the native one.

Pairs are grouped by (dst device, src device) and moved with one ``torch._foreach_copy_``
per group; pack/unpack go through byte views of the tensors, so any dtype moves bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.engine.validate import check_copy_lists, check_pack_lists, nbytes_of

__all__ = ["TorchBackend", "group_pairs", "run_groups"]


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, 0-d included)."""
    return t.reshape(-1).view(torch.uint8)


def group_pairs(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> list[tuple[list, list]]:
    """Non-empty pairs grouped by (dst device, src device): one ``_foreach_copy_`` each."""
    # get_device() (-1 for the CPU, else the CUDA index) is an int read; .device builds a
    # torch.device per tensor, which cost more than the copy on lists of small tensors.
    groups: dict[tuple[int, int], tuple[list, list]] = {}
    for d, s in zip(dst, src):
        if d.numel() == 0:
            continue
        ds, ss = groups.setdefault((d.get_device(), s.get_device()), ([], []))
        ds.append(d)
        ss.append(s)
    return list(groups.values())


def run_groups(groups: list[tuple[list, list]], non_blocking: bool) -> None:
    with torch.no_grad():
        for ds, ss in groups:
            torch._foreach_copy_(ds, ss, non_blocking=non_blocking)


def _grouped_copy(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], non_blocking: bool) -> None:
    run_groups(group_pairs(dst, src), non_blocking)


class TorchBackend:
    """``_foreach_copy_`` grouped by device pair; ``copy_`` where it must."""

    name = "torch"

    def batched_copy_(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                      non_blocking: bool = False) -> None:
        check_copy_lists("batched_copy_", dst, src)
        _grouped_copy(dst, src, non_blocking)

    def pack_(self, src: Sequence[torch.Tensor], flat: torch.Tensor, offsets: Sequence[int],
              non_blocking: bool = False) -> None:
        check_pack_lists("pack_", src, flat, offsets, tensors_are_written=False)
        segments, sources = [], []
        for t, off in zip(src, offsets):
            n = nbytes_of(t)
            if n:
                segments.append(flat.narrow(0, int(off), n))
                sources.append(_bytes_view(t.contiguous()))
        _grouped_copy(segments, sources, non_blocking)

    def unpack_(self, flat: torch.Tensor, dst: Sequence[torch.Tensor], offsets: Sequence[int],
                non_blocking: bool = False) -> None:
        check_pack_lists("unpack_", dst, flat, offsets, tensors_are_written=True)
        views, segments, strided = [], [], []
        for t, off in zip(dst, offsets):
            n = nbytes_of(t)
            if not n:
                continue
            segment = flat.narrow(0, int(off), n)
            if t.is_contiguous():
                views.append(_bytes_view(t))
                segments.append(segment)
            else:
                strided.append((t, segment))
        _grouped_copy(views, segments, non_blocking)
        with torch.no_grad():
            for t, segment in strided:
                tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                _bytes_view(tmp).copy_(segment)
                t.copy_(tmp)
