// A validated (dst, src) pair list that runs many times.
//
// Built once: validation, byte counts and, for host-only lists, the span list for the copier.
// run() first checks that no tensor moved or changed shape (storage, offset, sizes, dtype and
// math bits per tensor, a few ns each) and rebuilds when one did: a model reallocated by .to()
// or load_state_dict(assign=True) is noticed, and one whose shapes changed raises the usual
// validation error.
#pragma once

#include <torch/custom_class.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "weightsync/core.h"

namespace weightsync {

class CopyPlan : public torch::CustomClassHolder {
 public:
  // parallel_min_bytes > 0 raises the copier's threading threshold for this plan: a caller
  // whose other cores are taken (a shared-memory sender beside its spinning workers) copies
  // small payloads on its own thread; 0 keeps the process default.
  CopyPlan(std::vector<at::Tensor> dst, std::vector<at::Tensor> src,
           std::int64_t parallel_min_bytes = 0);

  void run(bool non_blocking);
  // run() once, then the copy `times - 1` more times without the per-run check: what the bytes
  // alone cost, for benchmarks (bench/engine_bench.py's "plan-copy" row). The tensors must not
  // change during the call. Plans that dispatch (device tensors) run() every time.
  void copy_repeatedly(std::int64_t times);
  // A heads-up that run() follows shortly: wakes the copier's parked helpers when the copy
  // will use them, so their wake-up overlaps the caller's work until then.
  void prepare() const;
  bool is_valid() const;
  // is_valid() over impls_[begin, end) (dst and src impls, pairs in destination order).
  bool is_valid_range(std::size_t begin, std::size_t end) const;
  void rebuild();
  std::int64_t nbytes() const { return static_cast<std::int64_t>(nbytes_); }
  std::int64_t size() const { return static_cast<std::int64_t>(dst_.size()); }
  // "host-spans" (cached spans, no dispatch) or "dispatch" (the batched_copy_ op per run).
  std::string kernel() const { return host_only_ ? "host-spans" : "dispatch"; }
  std::int64_t rebuilds() const { return rebuilds_; }
  // This object's address, for the C entry point below (the Python object keeps it alive).
  std::int64_t address() const { return reinterpret_cast<std::int64_t>(this); }

 private:
  // The copier's options for this plan (torch's thread cap, this plan's threshold).
  core::CopyOptions copy_options() const;
  // The copy of a host-only plan, with no check (run() checks first).
  void copy_host(const core::CopyOptions& opts);
  // is_valid() with the copier options of this call (run() reads them once for both uses).
  bool fingerprints_match(const core::CopyOptions& opts) const;
  // What a reallocation or a new view changes: `param.data = x` and resize_ swap the storage
  // or its allocation under the same TensorImpl, `param.data = param.view(...)` changes its
  // sizes, and `param.data = param.conj()` (or _neg_view()) only its math bits, which decide
  // between a byte span and copy_ (engine.h). Read through the impl without the checks of
  // data_ptr() (which also materialises copy-on-write storage): this runs every sync. Every
  // field sits on the impl's own cache lines (sizes up to 5 dimensions are stored inline),
  // which the check prefetches anyway.
  // So a changed tensor is always seen, and the rebuild's validation names what differs
  // (its shape or dtype) or accepts the new storage.
  static constexpr std::size_t kInlineDims = 5;
  struct Fingerprint {
    const void* storage_data;
    std::int64_t storage_offset;
    std::int64_t numel;
    std::int64_t dim;
    caffe2::TypeMeta dtype;
    bool contiguous;
    // The Conjugate and Negative bits of the dispatch key set, which sits beside the dtype;
    // these two bools fill padding before `sizes`, so the fingerprint did not grow.
    bool conj;
    bool neg;
    std::array<std::int64_t, kInlineDims> sizes;  // the leading sizes, zero-padded
    std::uint64_t more_sizes;                     // a mix of any sizes beyond those, else 0
    bool operator==(const Fingerprint&) const = default;
  };
  static Fingerprint fingerprint(const c10::TensorImpl& impl);
  // fingerprint(impl) == f, without building the fingerprint: the per-run check is about
  // 2000 of these for a 1000-tensor list. Building and comparing the struct (a call, 13
  // stores, 13 loads) cost 10.4 ns a tensor with the impls in cache; comparing field by
  // field, inlined, stopping at the first difference, 5.7 ns (CopyPlan.is_valid() over
  // 1000 pairs of views, one thread, less its 2.5 us call).
  static bool matches(const c10::TensorImpl& impl, const Fingerprint& f);

  std::vector<at::Tensor> dst_;
  std::vector<at::Tensor> src_;
  // The impls of every (dst, src) pair above, in the order of the destinations' addresses (see
  // rebuild), and their fingerprints.
  std::vector<const c10::TensorImpl*> impls_;
  std::vector<Fingerprint> fingerprints_;
  std::vector<core::CopySpan> spans_;
  std::vector<std::size_t> strided_;  // host pairs that need at::Tensor::copy_
  std::size_t nbytes_ = 0;
  std::size_t parallel_min_bytes_ = 0;
  bool host_only_ = false;
  std::int64_t rebuilds_ = 0;
};

}  // namespace weightsync

// The hot-path entry point for Python: run a plan through ctypes. A TorchScript method call
// costs several microseconds (far more with cold caches), more than a small model's whole
// copy; a C call costs a fraction of one and releases the GIL while bytes move.
// Returns 0, or 1 with the error message (tag included) in `error`.
extern "C" int weightsync_plan_run(std::int64_t plan, int non_blocking, char* error,
                                   std::size_t error_len);

// CopyPlan::prepare through ctypes (never throws).
extern "C" void weightsync_plan_prepare(std::int64_t plan);
