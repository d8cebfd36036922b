"""Argument checks of the engine ops for the Python backends, and the mapping of the native
library's tagged errors to the typed ones.

The checks mirror csrc/engine.cpp one for one (same order, same wording), so every backend
raises the same error type with the same message for the same bad input, and all of them
run before the first byte moves.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence

import torch

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

__all__ = ["check_copy_lists", "check_pack_lists", "byte_extent", "nbytes_of", "offset_list",
           "translate_native_error"]

_KINDS: dict[str, type[WeightSyncError]] = {
    "length": LayoutMismatchError,
    "dtype": DTypeMismatchError,
    "shape": ShapeMismatchError,
    "device": DeviceMismatchError,
    "alias": AliasingError,
    "bounds": InvalidArgumentError,
    "argument": InvalidArgumentError,
    "backend": BackendUnavailableError,
}
_TAG = re.compile(r"weightsync\[(\w+)\]: (.*)", re.DOTALL)


def _fail(kind: str, message: str) -> None:
    raise _KINDS[kind](f"weightsync[{kind}]: {message}")


def translate_native_error(exc: Exception, recheck: Callable[[], None] | None = None) -> Exception:
    """The typed error for a tagged message from the native library; ``exc`` itself otherwise.

    ``recheck`` runs this module's checks of the same call. It is used only for an untagged
    error, which is how the dispatcher refuses an argument it cannot convert before any kernel
    runs (a None in a tensor list: "Expected a value of type 'List[Tensor]'", no index): the
    checks then name the offending index with the typed error the Python backends raise. So
    the happy path pays nothing per tensor.
    """
    match = _TAG.search(str(exc))
    if match is None:
        if recheck is not None:
            try:
                recheck()
            except WeightSyncError as found:
                return found
        return exc
    kind, message = match.groups()
    # Drop the C++ context lines torch may append (source location, backtrace).
    message = message.split("\nException raised from", 1)[0].strip()
    error_type = _KINDS.get(kind, WeightSyncError)
    return error_type(f"weightsync[{kind}]: {message}")


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """[lowest, highest) byte addresses any element of ``t`` touches; (0, 0) when empty."""
    if t.numel() == 0:
        return (0, 0)
    if t.is_contiguous():
        base = t.data_ptr()
        return (base, base + t.numel() * t.element_size())
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        if reach < 0:
            lo += reach
        else:
            hi += reach
    item = t.element_size()
    base = t.data_ptr()
    return (base + lo * item, base + hi * item + item)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{_shape(t)} on {t.device}"


def _supported(t: torch.Tensor) -> bool:
    return t.is_cpu or t.is_cuda


def _internal_overlap(t: torch.Tensor) -> bool:
    # A contiguous tensor cannot overlap itself; otherwise ask torch (1 == MemOverlap::Yes).
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1


def _find_overlap(ranges: list[tuple[int, int, int, int]], written: int):
    """First overlapping pair in which one side is written; ranges are (begin, end, index, group)."""
    # Plain tuple order: by begin, then end, then list position, as the native sweep.
    ranges = sorted(r for r in ranges if r[1] > r[0])
    furthest_any = furthest_written = None
    for r in ranges:
        rival = furthest_any if r[3] == written else furthest_written
        if rival is not None and rival[1] > r[0]:
            return rival, r
        if furthest_any is None or r[1] > furthest_any[1]:
            furthest_any = r
        if r[3] == written and (furthest_written is None or r[1] > furthest_written[1]):
            furthest_written = r
    return None


def check_copy_lists(op: str, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Checks of ``batched_copy_``; raises the typed error, changes nothing."""
    if len(dst) != len(src):
        _fail("length", f"{op}: dst has {len(dst)} tensors but src has {len(src)}")
    # This loop is the torch backend's whole per-call overhead (thousands of pairs per call):
    # attribute reads are hoisted and the common contiguous case computes its extent inline.
    ranges: list[tuple[int, int, int, int]] = []
    append = ranges.append
    tensor = torch.Tensor
    for i, (d, s) in enumerate(zip(dst, src)):
        if not isinstance(d, tensor) or not isinstance(s, tensor):
            _fail("argument", f"{op}: index {i}: expected tensors, got "
                              f"{type(d).__name__} and {type(s).__name__}")
        if d.dtype != s.dtype:
            _fail("dtype", f"{op}: index {i}: dst dtype {str(d.dtype).removeprefix('torch.')} "
                           f"!= src dtype {str(s.dtype).removeprefix('torch.')}")
        if d.shape != s.shape:
            _fail("shape", f"{op}: index {i}: dst shape {_shape(d)} != src shape {_shape(s)}")
        if not ((d.is_cpu or d.is_cuda) and (s.is_cpu or s.is_cuda)):
            _fail("device", f"{op}: index {i}: only CPU and CUDA tensors are supported, got dst "
                            f"on {d.device} and src on {s.device}")
        n = d.numel()
        if n == 0:
            continue  # no element: nothing to overlap, inside or outside
        if d.is_contiguous():
            base = d.data_ptr()
            append((base, base + n * d.element_size(), i, 0))
        else:
            if torch._debug_has_internal_overlap(d) == 1:
                _fail("alias", f"{op}: index {i}: dst {_describe(d)} has overlapping elements "
                               "(expanded or strided view)")
            append((*byte_extent(d), i, 0))
        if s.is_contiguous():
            base = s.data_ptr()
            append((base, base + n * s.element_size(), i, 1))
        else:
            append((*byte_extent(s), i, 1))
    hit = _find_overlap(ranges, written=0)
    if hit is not None:
        a, b = hit
        name = lambda r: "dst" if r[3] == 0 else "src"  # noqa: E731
        _fail("alias", f"{op}: {name(a)}[{a[2]}] and {name(b)}[{b[2]}] share memory; a "
                       "destination may not overlap another destination or a source")


def offset_list(op: str, offsets: Sequence[int]) -> list[int]:
    """``offsets`` as a list of ints, or InvalidArgumentError naming the first that is not an
    integer: ``int()`` would truncate 1.5 to 1 and move the bytes to the wrong place. Anything
    with ``__index__`` counts (numpy integers, 0-d integer tensors); bools do not."""
    if isinstance(offsets, (str, bytes, torch.Tensor)) or not isinstance(offsets, Sequence):
        _fail("argument", f"{op}: offsets must be a sequence of integers, got "
                          f"{type(offsets).__name__}")
    out = []
    for i, off in enumerate(offsets):
        try:
            if isinstance(off, bool):
                raise TypeError
            out.append(operator.index(off))
        except TypeError:
            _fail("argument", f"{op}: offsets[{i}] must be an integer, got "
                              f"{type(off).__name__} {off!r}")
    return out


def check_pack_lists(op: str, tensors: Sequence[torch.Tensor], flat: torch.Tensor,
                     offsets: Sequence[int], tensors_are_written: bool) -> None:
    """Checks of ``pack_`` / ``unpack_``; raises the typed error, changes nothing."""
    if not isinstance(flat, torch.Tensor):
        _fail("argument", f"{op}: flat is undefined")
    if flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
        _fail("argument", f"{op}: flat must be a 1-D contiguous uint8 tensor, got {_describe(flat)}")
    if not _supported(flat):
        _fail("device", f"{op}: flat on {flat.device}; only CPU and CUDA are supported")
    offsets = offset_list(op, offsets)
    if len(offsets) != len(tensors):
        _fail("length", f"{op}: {len(tensors)} tensors but {len(offsets)} offsets")
    flat_bytes = flat.numel()
    flat_base = flat.data_ptr() if flat_bytes else 0
    flat_group, tensor_group = (1, 0) if tensors_are_written else (0, 1)
    ranges = []
    for i, (t, off) in enumerate(zip(tensors, offsets)):
        if not isinstance(t, torch.Tensor):
            _fail("argument", f"{op}: index {i}: expected a tensor, got {type(t).__name__}")
        if not _supported(t):
            _fail("device", f"{op}: index {i}: tensor on {t.device}; only CPU and CUDA are supported")
        if off < 0:
            _fail("bounds", f"{op}: index {i}: negative offset {off}")
        n = nbytes_of(t)
        if off > flat_bytes or n > flat_bytes - off:
            _fail("bounds", f"{op}: index {i}: bytes [{off}, {off + n}) of {_describe(t)} fall "
                            f"outside flat of {flat_bytes} bytes")
        if tensors_are_written and _internal_overlap(t):
            _fail("alias", f"{op}: index {i}: dst {_describe(t)} has overlapping elements "
                           "(expanded or strided view)")
        ranges.append((*byte_extent(t), i, tensor_group))
        if n:
            ranges.append((flat_base + off, flat_base + off + n, i, flat_group))
    hit = _find_overlap(ranges, written=0)
    if hit is not None:
        a, b = hit
        tensor_name = "dst" if tensors_are_written else "src"
        name: Callable[[tuple], str] = lambda r: "flat segment" if r[3] == flat_group else tensor_name  # noqa: E731
        _fail("alias", f"{op}: {name(a)}[{a[2]}] and {name(b)}[{b[2]}] share memory; written "
                       "regions may not overlap anything else")
