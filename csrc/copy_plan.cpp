#include "copy_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "engine.h"

namespace weightsync {
namespace {

void dispatch_batched_copy(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src,
                           bool non_blocking) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("weightsync::batched_copy_", "")
                       .typed<void(at::TensorList, at::TensorList, bool)>();
  op.call(dst, src, non_blocking);
}

}  // namespace

CopyPlan::Fingerprint CopyPlan::fingerprint(const c10::TensorImpl& impl) {
  const c10::Storage& storage = impl.unsafe_storage();
  Fingerprint f{storage ? storage.unsafeGetStorageImpl()->data() : nullptr,
                impl.storage_offset(),
                impl.numel(),
                impl.dim(),
                impl.dtype(),
                impl.is_contiguous(),
                impl.is_conj(),
                impl.is_neg(),
                {},
                0};
  const c10::IntArrayRef sizes = impl.sizes();
  const std::size_t inline_dims = std::min(sizes.size(), kInlineDims);
  std::copy_n(sizes.begin(), inline_dims, f.sizes.begin());
  for (std::size_t d = kInlineDims; d < sizes.size(); ++d) {
    // splitmix64 steps: distinct size lists beyond 5 dimensions collide with probability 2^-64.
    std::uint64_t z = f.more_sizes + 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(sizes[d]);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    f.more_sizes = z ^ (z >> 31);
  }
  return f;
}

__attribute__((always_inline)) inline bool CopyPlan::matches(const c10::TensorImpl& impl,
                                                             const Fingerprint& f) {
  const c10::Storage& storage = impl.unsafe_storage();
  if ((storage ? storage.unsafeGetStorageImpl()->data() : nullptr) != f.storage_data) return false;
  const c10::IntArrayRef sizes = impl.sizes();
  if (static_cast<std::int64_t>(sizes.size()) != f.dim || sizes.size() > kInlineDims) {
    return fingerprint(impl) == f;  // the rare tensor of more than 5 dimensions
  }
  for (std::size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != f.sizes[d]) return false;
  }
  // numel follows from the sizes; the rest is on the impl's last cache line.
  return impl.storage_offset() == f.storage_offset && impl.dtype() == f.dtype &&
         impl.is_contiguous() == f.contiguous && impl.is_conj() == f.conj &&
         impl.is_neg() == f.neg;
}

namespace {

// A fingerprint reads a TensorImpl (a few cache lines) and then its StorageImpl: two dependent
// misses per tensor once a large copy has flushed them from the cache, which made the check
// about a fifth of a 1000-tensor run. Prefetching the impls a few tensors ahead, and their
// storages a little less far ahead (their address is in the impl), overlaps those misses.
constexpr std::size_t kImplAhead = 16;
constexpr std::size_t kStorageAhead = 8;
// Lists at least this long check in parallel pieces of kCheckGrain tensors.
constexpr std::size_t kParallelCheckMin = 512;
constexpr std::size_t kCheckGrain = 256;

inline void prefetch_impl(const c10::TensorImpl* impl) {
  const char* begin = reinterpret_cast<const char*>(impl);
  for (std::size_t at = 0; at < sizeof(c10::TensorImpl); at += 64) __builtin_prefetch(begin + at);
  __builtin_prefetch(begin + sizeof(c10::TensorImpl) - 1);
}

inline void prefetch_storage(const c10::TensorImpl* impl) {
  const c10::Storage& storage = impl->unsafe_storage();
  if (storage) __builtin_prefetch(storage.unsafeGetStorageImpl());
}

}  // namespace

CopyPlan::CopyPlan(std::vector<at::Tensor> dst, std::vector<at::Tensor> src,
                   std::int64_t parallel_min_bytes)
    : dst_(std::move(dst)),
      src_(std::move(src)),
      parallel_min_bytes_(static_cast<std::size_t>(std::max<std::int64_t>(0, parallel_min_bytes))) {
  rebuild();
  rebuilds_ = 0;
}

core::CopyOptions CopyPlan::copy_options() const {
  core::CopyOptions opts = host_copy_options();  // one read of torch's thread count
  opts.parallel_min_bytes = std::max(opts.parallel_min_bytes, parallel_min_bytes_);
  return opts;
}

void CopyPlan::rebuild() {
  check_copy_lists("CopyPlan", dst_, src_);
  ++rebuilds_;
  host_only_ = true;
  nbytes_ = 0;
  impls_.clear();
  impls_.reserve(2 * dst_.size());
  fingerprints_.clear();
  fingerprints_.reserve(2 * dst_.size());
  for (std::size_t i = 0; i < dst_.size(); ++i) {
    host_only_ = host_only_ && dst_[i].is_cpu() && src_[i].is_cpu();
    nbytes_ += nbytes_of(dst_[i]);
  }
  // Checked pair by pair in destination-address order, the order the copier walks the spans
  // below: the check's shares then line up with the copy's (the first thread checks the
  // tensors of the spans it copies first), so each thread's check pulls in the pages and
  // page-table entries of its own copy. Measured on a 2-core VM with 1000 separately
  // allocated 4 KB tensors, against the impls in address order (all destinations, then all
  // sources): the check took 24 us instead of 28 and the run 179 us instead of 185 (means of
  // four alternating runs of 5000); bench/engine_bench.py, five alternating runs: 21.9 GB/s
  // instead of 20.9.
  std::vector<std::size_t> order(dst_.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [this](std::size_t a, std::size_t b) {
    return dst_[a].const_data_ptr() < dst_[b].const_data_ptr();
  });
  for (const std::size_t i : order) {
    impls_.push_back(dst_[i].unsafeGetTensorImpl());
    impls_.push_back(src_[i].unsafeGetTensorImpl());
  }
  for (const c10::TensorImpl* impl : impls_) fingerprints_.push_back(fingerprint(*impl));
  spans_.clear();
  strided_.clear();
  if (host_only_) {
    spans_ = host_spans(dst_, src_, &strided_);
    // Destination-address order, with touching spans merged: scattered parameters are then
    // written as a few forward streams, which the TLB and the prefetchers handle far better
    // than parameter order; views of one buffer become a single memcpy.
    std::sort(spans_.begin(), spans_.end(),
              [](const core::CopySpan& a, const core::CopySpan& b) { return a.dst < b.dst; });
    std::size_t kept = 0;
    for (std::size_t i = 0; i < spans_.size(); ++i) {
      if (kept > 0) {
        core::CopySpan& last = spans_[kept - 1];
        if (static_cast<char*>(last.dst) + last.nbytes == spans_[i].dst &&
            static_cast<const char*>(last.src) + last.nbytes == spans_[i].src) {
          last.nbytes += spans_[i].nbytes;
          continue;
        }
      }
      spans_[kept++] = spans_[i];
    }
    spans_.resize(kept);
  }
}

bool CopyPlan::is_valid_range(std::size_t begin, std::size_t end) const {
  for (std::size_t i = begin; i < std::min(end, begin + kImplAhead); ++i) prefetch_impl(impls_[i]);
  for (std::size_t i = begin; i < end; ++i) {
    if (i + kImplAhead < end) prefetch_impl(impls_[i + kImplAhead]);
    if (i + kStorageAhead < end) prefetch_storage(impls_[i + kStorageAhead]);
    if (!matches(*impls_[i], fingerprints_[i])) return false;
  }
  return true;
}

bool CopyPlan::is_valid() const { return fingerprints_match(copy_options()); }

bool CopyPlan::fingerprints_match(const core::CopyOptions& opts) const {
  // Long lists share the check with the copier's helper threads when the copy will use them
  // anyway (the check reads a few scattered cache lines per tensor: about a fifth of a
  // 1000-tensor run on one thread).
  const bool parallel = host_only_ && impls_.size() >= kParallelCheckMin &&
                        nbytes_ >= opts.parallel_min_bytes;
  return core::all_of(
      impls_.size(), kCheckGrain,
      [](const void* self, std::size_t begin, std::size_t end) {
        return static_cast<const CopyPlan*>(self)->is_valid_range(begin, end);
      },
      this, parallel, opts);
}

void CopyPlan::prepare() const {
  if (!host_only_) return;
  const core::CopyOptions opts = copy_options();
  if (nbytes_ >= opts.parallel_min_bytes) core::wake_copy_helpers(opts);  // see run()
}

void CopyPlan::run(bool non_blocking) {
  // Weight copies are never part of a graph; this also lets parameters that require grad
  // be written outside torch.no_grad().
  c10::AutoGradMode no_grad(false);
  const core::CopyOptions opts = copy_options();
  if (!fingerprints_match(opts)) rebuild();
  if (!host_only_) {
    dispatch_batched_copy(dst_, src_, non_blocking);
    return;
  }
  copy_host(opts);
}

void CopyPlan::copy_host(const core::CopyOptions& opts) {
  core::copy_spans(spans_, opts);
  for (std::size_t i : strided_) dst_[i].copy_(src_[i]);
}

void CopyPlan::copy_repeatedly(std::int64_t times) {
  if (times <= 0) return;
  run(false);
  if (!host_only_) {
    for (std::int64_t i = 1; i < times; ++i) run(false);
    return;
  }
  c10::AutoGradMode no_grad(false);
  const core::CopyOptions opts = copy_options();
  for (std::int64_t i = 1; i < times; ++i) copy_host(opts);
}

}  // namespace weightsync

extern "C" void weightsync_plan_prepare(std::int64_t plan) {
  reinterpret_cast<const weightsync::CopyPlan*>(plan)->prepare();
}

extern "C" int weightsync_plan_run(std::int64_t plan, int non_blocking, char* error,
                                   std::size_t error_len) {
  try {
    reinterpret_cast<weightsync::CopyPlan*>(plan)->run(non_blocking != 0);
    return 0;
  } catch (const c10::Error& e) {
    std::snprintf(error, error_len, "%s", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
  }
  return 1;
}
