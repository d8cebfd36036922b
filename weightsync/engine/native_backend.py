"""The native backend: the compiled library's ops, errors turned into the typed ones.

The dispatcher refuses a list holding a non-tensor (None, say) before our kernels see it,
with a message that names no index; the Python checks then run on the failed call only and
raise the typed error the other backends raise (see translate_native_error).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.engine.validate import (
    check_copy_lists,
    check_pack_lists,
    offset_list,
    translate_native_error,
)

__all__ = ["NativeBackend"]


class NativeBackend:
    """Calls ``torch.ops.weightsync.*``; the dispatcher picks the CPU or CUDA kernel."""

    name = "native"

    def batched_copy_(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                      non_blocking: bool = False) -> None:
        try:
            with torch.no_grad():
                torch.ops.weightsync.batched_copy_(list(dst), list(src), non_blocking)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(
                exc, lambda: check_copy_lists("batched_copy_", dst, src)) from None

    def pack_(self, src: Sequence[torch.Tensor], flat: torch.Tensor, offsets: Sequence[int],
              non_blocking: bool = False) -> None:
        ints = offset_list("pack_", offsets)
        try:
            with torch.no_grad():
                torch.ops.weightsync.pack_(list(src), flat, ints, non_blocking)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(exc, lambda: check_pack_lists(
                "pack_", src, flat, offsets, tensors_are_written=False)) from None

    def unpack_(self, flat: torch.Tensor, dst: Sequence[torch.Tensor], offsets: Sequence[int],
                non_blocking: bool = False) -> None:
        ints = offset_list("unpack_", offsets)
        try:
            with torch.no_grad():
                torch.ops.weightsync.unpack_(flat, list(dst), ints, non_blocking)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(exc, lambda: check_pack_lists(
                "unpack_", dst, flat, offsets, tensors_are_written=True)) from None
