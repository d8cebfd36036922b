// ATen glue shared by the CPU and CUDA kernels: argument validation and host-side execution.
//
// Every validator only reads. Kernels call them before moving the first byte, so a call that
// throws leaves every destination exactly as it was.
//
// Error messages start with a tag, "weightsync[<kind>]: ", that the Python wrappers turn into
// the typed errors of weightsync.errors (kinds: length, dtype, shape, device, alias, bounds,
// argument).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "weightsync/core.h"

#define WS_CHECK(cond, kind, ...) \
  TORCH_CHECK_VALUE(cond, "weightsync[" kind "]: ", __VA_ARGS__)

namespace weightsync {

// Bytes of the elements of t (numel * element size).
std::size_t nbytes_of(const at::Tensor& t);

// [lowest, highest) byte addresses any element of t touches; empty for empty tensors.
std::pair<std::uintptr_t, std::uintptr_t> byte_extent(const at::Tensor& t);

// Tensor lists of batched_copy_: equal lengths, defined tensors, equal dtypes and shapes,
// CPU or CUDA devices, no internal overlap in a destination, no destination overlapping
// another destination or any source.
void check_copy_lists(const char* op, at::TensorList dst, at::TensorList src);

// pack_ (tensors are read, flat written) and unpack_ (flat read, tensors written): flat is a
// 1-D contiguous uint8 tensor, one non-negative offset per tensor, each tensor's bytes fit in
// flat, written regions overlap nothing.
void check_pack_lists(const char* op, at::TensorList tensors, const at::Tensor& flat,
                      at::IntArrayRef offsets, bool tensors_are_written);

// The host copier's options for this call: the process defaults (core::default_copy_options)
// with the thread count capped by torch's intra-op thread count. A process that limited
// torch's threads (collector workers usually call torch.set_num_threads(1), and several
// processes share the cores) gets a single-threaded copier too, instead of a helper thread
// that competes with its neighbours.
core::CopyOptions host_copy_options();

// The lazy math bits of a view: x.conj() on a complex tensor and x._neg_view() share x's
// bytes and only set a flag (the Conjugate / Negative dispatch keys) that readers apply. The
// ops take such tensors as they are (csrc/math_bits.cpp), so the kernels must honour them:
// - a pair whose two sides carry the same bits is a plain byte move (copy_ moves the stored
//   bytes then too), one whose bits differ goes through at::Tensor::copy_, which applies them;
// - pack_ writes, and unpack_ reads, the bytes of a tensor's values as its readers see them
//   (what x.resolve_conj().resolve_neg() holds), whatever its bits.
inline bool has_math_bits(const at::Tensor& t) { return t.is_conj() || t.is_neg(); }
inline bool same_math_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.is_conj() == b.is_conj() && a.is_neg() == b.is_neg();
}
// The values of t in a new contiguous tensor without math bits.
at::Tensor materialize(const at::Tensor& t);

// Host-only execution (all tensors on the CPU), after validation. Contiguous pairs become one
// span list for core::copy_spans; non-contiguous ones go through at::Tensor::copy_, which
// puts the bytes in the right strided places.
void copy_pairs_host(at::TensorList dst, at::TensorList src);
void pack_host(at::TensorList src, const at::Tensor& flat, at::IntArrayRef offsets);
void unpack_host(const at::Tensor& flat, at::TensorList dst, at::IntArrayRef offsets);

// Spans for host-resident contiguous pairs with the same math bits on both sides; the indices
// of the other pairs go to `rest`.
std::vector<core::CopySpan> host_spans(at::TensorList dst, at::TensorList src,
                                       std::vector<std::size_t>* rest);

// The spans that pack/unpack (flat on the host) move for contiguous tensors without math
// bits; the indices of the other tensors go to `rest`.
std::vector<core::CopySpan> flat_spans(at::TensorList tensors, std::uint8_t* flat,
                                       at::IntArrayRef offsets, bool into_flat,
                                       std::vector<std::size_t>* rest);

}  // namespace weightsync
