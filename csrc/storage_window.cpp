// Re-pointing a host storage at other memory: how view-mode workers take a version in O(1).
//
// A view-mode worker's tensors are views into one "window" storage laid out like a slot.
// Taking the version in slot s points the window's storage at slot s: every tensor moves to
// the new version with one pointer store, however many tensors there are (re-pointing them one
// by one with `.data =` cost about 0.4 us each, 0.4 ms for 1000 tensors).
//
// The memory pointed at is not owned: the new DataPtr has no deleter, and the caller keeps the
// mapping alive for as long as the window points into it (the transport gives the tensors
// private copies before it unmaps). The storage's first allocation is freed by the first call.
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>

#include <cstdint>
#include <cstdio>

// Points the CPU StorageImpl at `storage` (its address, Python's `UntypedStorage._cdata`) at
// `data` instead of its current memory. Returns 0, or 1 with the reason in `error`.
extern "C" int weightsync_repoint_storage(std::int64_t storage, std::int64_t data, char* error,
                                          std::size_t error_len) {
  auto* impl = reinterpret_cast<c10::StorageImpl*>(storage);
  if (impl == nullptr || data == 0) {
    std::snprintf(error, error_len, "weightsync[argument]: repoint_storage: null storage or data");
    return 1;
  }
  if (impl->device_type() != c10::DeviceType::CPU) {
    std::snprintf(error, error_len,
                  "weightsync[device]: repoint_storage: only CPU storages can be re-pointed");
    return 1;
  }
  impl->set_data_ptr_noswap(
      c10::DataPtr(reinterpret_cast<void*>(data), c10::Device(c10::DeviceType::CPU)));
  return 0;
}

// Whether every TensorImpl in `impls` (addresses, Python's `Tensor._cdata`) still views the
// storage at `storage`, at its element offset in `offsets`: a tensor whose `.data` was
// replaced since it was bound would not follow the window and would keep an old version.
// Returns 1 when all do, 0 otherwise.
extern "C" int weightsync_window_viewed(std::int64_t storage, const std::int64_t* impls,
                                        const std::int64_t* offsets, std::size_t count) {
  const auto* window = reinterpret_cast<const c10::StorageImpl*>(storage);
  for (std::size_t i = 0; i < count; ++i) {
    const auto* impl = reinterpret_cast<const c10::TensorImpl*>(impls[i]);
    if (impl->unsafe_storage().unsafeGetStorageImpl() != window ||
        impl->storage_offset() != offsets[i]) {
      return 0;
    }
  }
  return 1;
}
