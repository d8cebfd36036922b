// Every schema of the weightsync library, and nothing else: the kernels live in cpu/ and
// cuda/, registered per dispatch key, so the dispatcher picks one per device.
//
// Importing the compiled library (torch.ops.load_library) runs these registrars; there are
// no pybind entry points.
#include <torch/library.h>

#include "copy_plan.h"
#include "engine.h"
#include "weightsync/core.h"

namespace weightsync {
namespace {

std::vector<std::int64_t> engine_config() {
  const core::CopyOptions o = host_copy_options();  // as a copy made now would use
  return {o.max_threads, static_cast<std::int64_t>(o.parallel_min_bytes),
          static_cast<std::int64_t>(o.chunk_bytes)};
}

std::string span_loop() { return core::span_loop_name(core::active_span_loop()); }

std::string helpers() { return core::helpers_name(core::active_helpers()); }

}  // namespace

TORCH_LIBRARY(weightsync, m) {
  // Copies src[i] into dst[i] for every i, in one call (CPU) or one launch (CUDA).
  m.def("batched_copy_(Tensor(a!)[] dst, Tensor[] src, bool non_blocking=False) -> ()");
  // Writes the bytes of src[i] at flat[offsets[i]:], and the inverse.
  m.def("pack_(Tensor[] src, Tensor(a!) flat, int[] offsets, bool non_blocking=False) -> ()");
  m.def("unpack_(Tensor flat, Tensor(a!)[] dst, int[] offsets, bool non_blocking=False) -> ()");
  // Page-locks (cudaHostRegister) an existing host buffer, e.g. a shared-memory segment.
  m.def("host_register(Tensor buffer) -> ()");
  m.def("host_unregister(Tensor buffer) -> ()");
  // futex(2) on a 1-element int32 tensor, usually inside a shared-memory segment.
  m.def("futex_wait(Tensor word, int expected, float timeout_s, float spin_s=0.0) -> bool");
  m.def("futex_wake(Tensor word, int count) -> int");
  // [max threads, parallel threshold in bytes, chunk bytes] of the host copier.
  m.def("engine_config() -> int[]", &engine_config);
  // How the host copier moves small spans: "avx512", "avx" or "memcpy" (see core.h).
  m.def("span_loop() -> str", &span_loop);
  // Whose threads help the host copier: "auto", "own" or "torch" (see core.h).
  m.def("helpers() -> str", &helpers);

  m.class_<CopyPlan>("CopyPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::int64_t>(), "",
           {torch::arg("dst"), torch::arg("src"), torch::arg("parallel_min_bytes") = 0})
      .def("run", &CopyPlan::run, "", {torch::arg("non_blocking") = false})
      .def("copy_repeatedly", &CopyPlan::copy_repeatedly)
      .def("is_valid", &CopyPlan::is_valid)
      .def("rebuild", &CopyPlan::rebuild)
      .def("nbytes", &CopyPlan::nbytes)
      .def("size", &CopyPlan::size)
      .def("kernel", &CopyPlan::kernel)
      .def("rebuilds", &CopyPlan::rebuilds)
      .def("address", &CopyPlan::address);
}

}  // namespace weightsync
