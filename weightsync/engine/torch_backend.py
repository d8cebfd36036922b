"""The pure-torch backend: always available, same signatures and errors as the native one.

Pairs are grouped by (dst device, src device) and moved with one ``torch._foreach_copy_``
per group; pack/unpack go through byte views of the tensors, so any dtype moves bit for bit.

Conjugate and negative views (``x.conj()``, ``x._neg_view()``) get what ``copy_`` gives them,
as on the native backend: pack_ writes the bytes of their values as readers see them, and
unpack_ makes a destination read back the packed values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.engine.validate import check_copy_lists, check_pack_lists, nbytes_of

__all__ = ["TorchBackend", "group_pairs", "run_groups"]


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor without math bits (any dtype, 0-d included)."""
    return t.reshape(-1).view(torch.uint8)


def _has_math_bits(t: torch.Tensor) -> bool:
    """A lazy conjugate or negative view: its bytes are not its values (torch refuses a
    byte view of it, and ``_foreach_copy_`` refuses it as a destination)."""
    return t.is_conj() or t.is_neg()


def _value_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values in logical order (a copy for strided or math-bit views)."""
    if _has_math_bits(t):
        t = t.resolve_conj().resolve_neg()
    return _bytes_view(t.contiguous())


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
            try:
                torch._foreach_copy_(ds, ss, non_blocking=non_blocking)
            except RuntimeError:
                # torch's fallback for conjugate/negative views refuses a written list that
                # holds one, before copying anything. Looked for only then, so the common
                # case pays nothing per tensor; copy_ applies the bits pair by pair.
                if not any(_has_math_bits(d) for d in ds):
                    raise
                for d, s in zip(ds, ss):
                    d.copy_(s, non_blocking=non_blocking)


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
                sources.append(_value_bytes(t))
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
            if t.is_contiguous() and not _has_math_bits(t):
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
