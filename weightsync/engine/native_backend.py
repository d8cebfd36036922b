"""The native backend: the compiled library's ops, errors turned into the typed ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync.engine.validate import translate_native_error

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
            raise translate_native_error(exc) from None

    def pack_(self, src: Sequence[torch.Tensor], flat: torch.Tensor, offsets: Sequence[int],
              non_blocking: bool = False) -> None:
        try:
            with torch.no_grad():
                torch.ops.weightsync.pack_(list(src), flat, [int(o) for o in offsets], non_blocking)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(exc) from None

    def unpack_(self, flat: torch.Tensor, dst: Sequence[torch.Tensor], offsets: Sequence[int],
                non_blocking: bool = False) -> None:
        try:
            with torch.no_grad():
                torch.ops.weightsync.unpack_(flat, list(dst), [int(o) for o in offsets], non_blocking)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise translate_native_error(exc) from None
