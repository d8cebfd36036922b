// CPU kernels: every tensor is in host memory, so each op is one span list for the copier.
#include <torch/library.h>

#include "../engine.h"

namespace weightsync {
namespace {

void batched_copy_cpu(at::TensorList dst, at::TensorList src, bool /*non_blocking*/) {
  check_copy_lists("batched_copy_", dst, src);
  copy_pairs_host(dst, src);
}

void pack_cpu(at::TensorList src, const at::Tensor& flat, at::IntArrayRef offsets,
              bool /*non_blocking*/) {
  check_pack_lists("pack_", src, flat, offsets, /*tensors_are_written=*/false);
  pack_host(src, flat, offsets);
}

void unpack_cpu(const at::Tensor& flat, at::TensorList dst, at::IntArrayRef offsets,
                bool /*non_blocking*/) {
  check_pack_lists("unpack_", dst, flat, offsets, /*tensors_are_written=*/true);
  unpack_host(flat, dst, offsets);
}

const std::int32_t* futex_word(const at::Tensor& word, const char* op) {
  WS_CHECK(word.scalar_type() == at::kInt && word.numel() == 1, "argument", op,
           ": word must be a 1-element int32 tensor, got ",
           c10::getDtypeNames(word.scalar_type()).first, word.sizes());
  WS_CHECK(reinterpret_cast<std::uintptr_t>(word.data_ptr()) % 4 == 0, "argument", op,
           ": word must be 4-byte aligned");
  return static_cast<const std::int32_t*>(word.data_ptr());
}

bool futex_wait_cpu(const at::Tensor& word, std::int64_t expected, double timeout_s,
                    double spin_s) {
  const std::int32_t* w = futex_word(word, "futex_wait");
  return core::futex_wait(w, static_cast<std::int32_t>(expected), timeout_s, spin_s);
}

std::int64_t futex_wake_cpu(const at::Tensor& word, std::int64_t count) {
  const std::int64_t n = count > INT32_MAX ? INT32_MAX : count;
  return core::futex_wake(futex_word(word, "futex_wake"), static_cast<int>(n));
}

#ifndef WEIGHTSYNC_WITH_CUDA
void host_register_unavailable(const at::Tensor&) {
  WS_CHECK(false, "backend",
           "host_register: this weightsync build has no CUDA part (built without nvcc or "
           "against a CPU-only torch), so host memory cannot be page-locked");
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(weightsync, CPU, m) {
  m.impl("batched_copy_", &batched_copy_cpu);
  m.impl("pack_", &pack_cpu);
  m.impl("unpack_", &unpack_cpu);
  m.impl("futex_wait", &futex_wait_cpu);
  m.impl("futex_wake", &futex_wake_cpu);
#ifndef WEIGHTSYNC_WITH_CUDA
  m.impl("host_register", &host_register_unavailable);
  m.impl("host_unregister", &host_register_unavailable);
#endif
}

}  // namespace weightsync
