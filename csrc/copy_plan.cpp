#include "copy_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <cstdio>

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

CopyPlan::Fingerprint CopyPlan::fingerprint(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::Storage& storage = impl->unsafe_storage();
  return {storage ? storage.unsafeGetStorageImpl()->data() : nullptr, impl->storage_offset(),
          impl->numel(), impl->itemsize(), impl->is_contiguous()};
}

CopyPlan::CopyPlan(std::vector<at::Tensor> dst, std::vector<at::Tensor> src)
    : dst_(std::move(dst)), src_(std::move(src)) {
  rebuild();
  rebuilds_ = 0;
}

void CopyPlan::rebuild() {
  check_copy_lists("CopyPlan", dst_, src_);
  ++rebuilds_;
  host_only_ = true;
  nbytes_ = 0;
  fingerprints_.clear();
  fingerprints_.reserve(2 * dst_.size());
  for (std::size_t i = 0; i < dst_.size(); ++i) {
    host_only_ = host_only_ && dst_[i].is_cpu() && src_[i].is_cpu();
    nbytes_ += nbytes_of(dst_[i]);
    fingerprints_.push_back(fingerprint(dst_[i]));
    fingerprints_.push_back(fingerprint(src_[i]));
  }
  spans_.clear();
  strided_.clear();
  if (host_only_) spans_ = host_spans(dst_, src_, &strided_);
}

bool CopyPlan::is_valid() const {
  for (std::size_t i = 0; i < dst_.size(); ++i) {
    if (!(fingerprint(dst_[i]) == fingerprints_[2 * i])) return false;
    if (!(fingerprint(src_[i]) == fingerprints_[2 * i + 1])) return false;
  }
  return true;
}

void CopyPlan::run(bool non_blocking) {
  // Weight copies are never part of a graph; this also lets parameters that require grad
  // be written outside torch.no_grad().
  c10::AutoGradMode no_grad(false);
  if (!is_valid()) rebuild();
  if (!host_only_) {
    dispatch_batched_copy(dst_, src_, non_blocking);
    return;
  }
  core::copy_spans(spans_, core::default_copy_options());
  for (std::size_t i : strided_) dst_[i].copy_(src_[i]);
}

}  // namespace weightsync

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
