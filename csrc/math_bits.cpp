// The copy ops take conjugate and negative views (x.conj(), x._neg_view()) as they are.
//
// Without these registrations torch's fallback for the Conjugate and Negative dispatch keys
// runs first: it materialises such read-only arguments (a clone per tensor) and refuses a
// written list that holds one ("fallback doesn't currently support mutable TensorLists"), an
// untyped error before our validation. Falling through hands the tensors to the kernels with
// their bits, and the kernels apply them (see has_math_bits in engine.h), as aten's own copy_
// does (it falls through these keys the same way).
#include <torch/library.h>

namespace weightsync {

TORCH_LIBRARY_IMPL(weightsync, Conjugate, m) {
  m.impl("batched_copy_", torch::CppFunction::makeFallthrough());
  m.impl("pack_", torch::CppFunction::makeFallthrough());
  m.impl("unpack_", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(weightsync, Negative, m) {
  m.impl("batched_copy_", torch::CppFunction::makeFallthrough());
  m.impl("pack_", torch::CppFunction::makeFallthrough());
  m.impl("unpack_", torch::CppFunction::makeFallthrough());
}

}  // namespace weightsync
