"""The engine ops, typed: batched copies, pack/unpack to a flat buffer, host-memory pinning.

Each call validates everything before the first byte moves (a failed call changes nothing)
and raises the typed errors of :mod:`weightsync.errors`. The backend (native, cupy or torch)
is picked per call from the devices involved; see :func:`weightsync.backend_info`.

Non-contiguous tensors are supported: their bytes land in the right strided places (they
take a slower per-tensor path; contiguous ones move in one call or one launch). So are
conjugate and negative views (``x.conj()``, ``x._neg_view()``, whose stored bytes are not their
values): every op gives what ``copy_`` gives, pairs whose views differ taking the per-tensor
path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsync import _extension
from weightsync.engine.backends import backend_for, native_library_active
from weightsync.engine.validate import translate_native_error
from weightsync.errors import BackendUnavailableError, InvalidArgumentError

__all__ = ["batched_copy_", "pack_", "unpack_", "pin_memory_", "unpin_memory_"]


def _traced_natively() -> bool:
    """Under torch.compile with the library loaded: call the op itself, which the compiler
    traces through its registered fake (the backend choice takes a lock, which it cannot).
    The kernel still validates everything when the compiled code runs."""
    return torch.compiler.is_compiling() and native_library_active()


def batched_copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                  non_blocking: bool = False) -> None:
    """Copy ``src[i]`` into ``dst[i]`` for every ``i`` in one call.

    Args:
        dst: destinations, written in place. None may overlap another or any source.
            Overlap is judged by each tensor's span of memory, from its lowest to its
            highest byte: interleaved views of one buffer (``x[::2]`` and ``x[1::2]``)
            share no byte but their spans overlap, so they are rejected too. The check is
            one sort of the spans, whatever the number of tensors.
        src: sources; ``src[i]`` must have the dtype and shape of ``dst[i]``.
        non_blocking: as ``Tensor.copy_``: for device copies, do not wait for completion.

    Raises:
        LayoutMismatchError: the lists differ in length.
        DTypeMismatchError / ShapeMismatchError: a pair differs; the message names its index.
        DeviceMismatchError: a tensor is neither on the CPU nor on a CUDA device.
        AliasingError: a destination overlaps another destination or a source.
    """
    if len(dst) == 0 and len(src) == 0:
        return  # nothing to copy, and no tensor the dispatcher could pick a kernel from
    if _traced_natively():
        torch.ops.weightsync.batched_copy_(dst, src, non_blocking)
        return
    backend_for((*dst, *src)).batched_copy_(dst, src, non_blocking)


def pack_(src: Sequence[torch.Tensor], flat: torch.Tensor, offsets: Sequence[int],
          non_blocking: bool = False) -> None:
    """Write the bytes of ``src[i]`` at ``flat[offsets[i]:]`` for every ``i``.

    ``flat`` is a 1-D contiguous uint8 tensor (an arena). Any dtype; offsets need no alignment
    (256-byte aligned ones are fastest). Errors as :func:`batched_copy_`, plus
    InvalidArgumentError for a bad ``flat`` or an offset out of bounds.

    The bytes written are those of the values the tensor shows, in row-major order: a
    conjugate or negative view (``x.conj()``, ``x._neg_view()``) is packed as
    ``x.conj().resolve_conj()`` would be, not as the stored bytes it shares with ``x``.
    """
    if _traced_natively():
        torch.ops.weightsync.pack_(src, flat, offsets, non_blocking)
        return
    backend_for((*src, flat)).pack_(src, flat, offsets, non_blocking)


def unpack_(flat: torch.Tensor, dst: Sequence[torch.Tensor], offsets: Sequence[int],
            non_blocking: bool = False) -> None:
    """Inverse of :func:`pack_`: fill ``dst[i]`` from ``flat[offsets[i]:]``.

    Each ``dst[i]`` then shows the packed values, as after ``dst[i].copy_(values)``: a
    conjugate or negative view stores their conjugate or negation.
    """
    if _traced_natively():
        torch.ops.weightsync.unpack_(flat, dst, offsets, non_blocking)
        return
    backend_for((*dst, flat)).unpack_(flat, dst, offsets, non_blocking)


def _host_buffer(t: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
        raise InvalidArgumentError(
            f"weightsync[argument]: {op}: expected a contiguous CPU tensor, got {t!r:.80}")


def _require_pinning(op: str) -> None:
    status = _extension.load()
    if not status.loaded:
        raise BackendUnavailableError(f"{op} needs the native extension: {status.reason}")
    if not status.with_cuda:
        raise BackendUnavailableError(
            f"{op} needs the extension's CUDA part: "
            f"{status.build_info.get('cuda_skipped_because') or 'not built'}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"{op}: no CUDA device is visible to torch")


def pin_memory_(buffer: torch.Tensor) -> None:
    """Page-lock an existing host buffer (cudaHostRegister), e.g. a shared-memory arena.

    Afterwards host<->device copies from/to it are full-speed DMAs. Needs the extension's CUDA
    part; raises BackendUnavailableError saying why otherwise.
    """
    _host_buffer(buffer, "pin_memory_")
    _require_pinning("pin_memory_")
    try:
        torch.ops.weightsync.host_register(buffer)
    except (RuntimeError, ValueError) as exc:
        raise translate_native_error(exc) from None


def unpin_memory_(buffer: torch.Tensor) -> None:
    """Undo :func:`pin_memory_`."""
    _host_buffer(buffer, "unpin_memory_")
    _require_pinning("unpin_memory_")
    try:
        torch.ops.weightsync.host_unregister(buffer)
    except (RuntimeError, ValueError) as exc:
        raise translate_native_error(exc) from None
