#include "copy_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>

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

const void* ptr_of(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

}  // namespace

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
    fingerprints_.push_back({ptr_of(dst_[i]), nbytes_of(dst_[i])});
    fingerprints_.push_back({ptr_of(src_[i]), nbytes_of(src_[i])});
  }
  spans_.clear();
  strided_.clear();
  if (host_only_) spans_ = host_spans(dst_, src_, &strided_);
}

bool CopyPlan::is_valid() const {
  for (std::size_t i = 0; i < dst_.size(); ++i) {
    const Fingerprint& d = fingerprints_[2 * i];
    const Fingerprint& s = fingerprints_[2 * i + 1];
    if (ptr_of(dst_[i]) != d.ptr || nbytes_of(dst_[i]) != d.nbytes) return false;
    if (ptr_of(src_[i]) != s.ptr || nbytes_of(src_[i]) != s.nbytes) return false;
  }
  return true;
}

void CopyPlan::run(bool non_blocking) {
  if (!is_valid()) rebuild();
  if (!host_only_) {
    dispatch_batched_copy(dst_, src_, non_blocking);
    return;
  }
  core::copy_spans(spans_, core::default_copy_options());
  for (std::size_t i : strided_) dst_[i].copy_(src_[i]);
}

}  // namespace weightsync
