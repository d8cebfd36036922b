// host_register / host_unregister: page-lock an existing host buffer (typically a
// shared-memory arena) so host<->device copies from and to it are single full-speed DMAs.
//
// Registered under the CPU key, since the buffer is a CPU tensor; the CUDA key gets a kernel
// that only explains the mistake (otherwise the dispatcher's "no kernel for CUDA" message).
//
// A .cu file although it launches nothing: nvcc supplies the CUDA runtime headers itself, so
// this builds even where the host compiler is given no CUDA include directory.
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../engine.h"

namespace weightsync {
namespace {

void check_buffer(const at::Tensor& buffer, const char* op) {
  WS_CHECK(buffer.defined(), "argument", op, ": buffer is undefined");
  WS_CHECK(buffer.is_cpu(), "device", op, ": buffer must be a CPU tensor, got one on ",
           buffer.device());
  WS_CHECK(buffer.is_contiguous(), "argument", op, ": buffer must be contiguous, got shape ",
           buffer.sizes(), " with strides ", buffer.strides());
  WS_CHECK(c10::cuda::device_count() > 0, "backend", op,
           ": no CUDA device is visible, so host memory cannot be page-locked");
}

void host_register(const at::Tensor& buffer) {
  check_buffer(buffer, "host_register");
  const std::size_t n = nbytes_of(buffer);
  if (n == 0) return;
  void* p = buffer.data_ptr();
  // Portable: pinned for every device's context, not only the current one, so a worker
  // whose model lives on another GPU also gets full-speed DMAs.
  const cudaError_t err =
      cudaHostRegister(p, n, cudaHostRegisterDefault | cudaHostRegisterPortable);
  // Failed runtime calls also set the thread's last error; clear it so that an unrelated later
  // launch check does not report it.
  if (err != cudaSuccess) (void)cudaGetLastError();
  // Registering twice (two schemes sharing an arena, a retry) is not a mistake: the range is
  // page-locked either way.
  if (err == cudaErrorHostMemoryAlreadyRegistered) return;
  WS_CHECK(err == cudaSuccess, "device", "host_register: cudaHostRegister of ", n,
           " bytes at ", p, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
           ")");
}

void host_unregister(const at::Tensor& buffer) {
  check_buffer(buffer, "host_unregister");
  const std::size_t n = nbytes_of(buffer);
  if (n == 0) return;
  void* p = buffer.data_ptr();
  const cudaError_t err = cudaHostUnregister(p);
  if (err != cudaSuccess) (void)cudaGetLastError();
  WS_CHECK(err != cudaErrorHostMemoryNotRegistered, "argument",
           "host_unregister: the ", n, " bytes at ", p,
           " were not page-locked by host_register (unregister the same buffer, starting at the "
           "same byte, that was registered)");
  WS_CHECK(err == cudaSuccess, "device", "host_unregister: cudaHostUnregister of ", n,
           " bytes at ", p, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
           ")");
}

void register_on_device(const at::Tensor& buffer) {
  WS_CHECK(false, "device", "host_register: buffer must be a CPU tensor, got one on ",
           buffer.device());
}

void unregister_on_device(const at::Tensor& buffer) {
  WS_CHECK(false, "device", "host_unregister: buffer must be a CPU tensor, got one on ",
           buffer.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(weightsync, CPU, m) {
  m.impl("host_register", &host_register);
  m.impl("host_unregister", &host_unregister);
}

TORCH_LIBRARY_IMPL(weightsync, CUDA, m) {
  m.impl("host_register", &register_on_device);
  m.impl("host_unregister", &unregister_on_device);
}

}  // namespace weightsync
