// The words and locks of a shared-memory arena (transports/arena.py), as the native sender
// (send_path.cpp) and the native receive loop (receive_loop.cpp) touch them.
//
// Words are given as addresses inside the mapping, read with acquire and written with release
// ordering. Locks are OFD byte locks on the segment's file: one byte per slot (readers share,
// the writer excludes) and one per process presence (held while it lives).
#pragma once

#include <fcntl.h>

#include <atomic>
#include <cstdint>

namespace weightsync::shm {

template <typename T>
T load(std::int64_t address) {
  return reinterpret_cast<const std::atomic<T>*>(address)->load(std::memory_order_acquire);
}

template <typename T>
void store(std::int64_t address, T value) {
  reinterpret_cast<std::atomic<T>*>(address)->store(value, std::memory_order_release);
}

// Non-blocking lock (F_RDLCK, F_WRLCK) or unlock (F_UNLCK) of byte `start`; false if another
// open file description holds a conflicting lock.
inline bool ofd_lock(int fd, off_t start, short kind) {
  struct flock fl {};
  fl.l_type = kind;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

// Whether another open file description holds any lock on byte `start` (a peer's presence).
inline bool held_by_other(int fd, off_t start) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: assume alive
  return fl.l_type != F_UNLCK;
}

}  // namespace weightsync::shm
