// A worker's receive loop in C++: wait for an offer, take it, ack, all without the GIL.
//
// Why: a worker's Python background thread needs the GIL for every update it applies. When the
// worker's main thread runs Python (an environment step), the receiver queues for the GIL for up
// to the interpreter's switch interval (5 ms) per update, and even an idle worker pays a few
// tens of microseconds of Python per take. This loop does the whole take natively: futex wait on
// the arena's publish word, shared lock on the slot, copy plan run (copy mode) or window re-point
// (view mode), ack and wake, release. It follows the protocol of transports/arena.py exactly
// (same words, same order); anything unusual (the window lost a tensor, a copy failed, the
// sender is gone, the offer kept moving) hands back to the Python path, which reports it.
//
// The Python side calls weightsync_receiver_run from its background thread through ctypes
// (which releases the GIL) and gets control back only for those cases or to stop.
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <vector>

#include "copy_plan.h"
#include "shm_words.h"
#include "weightsync/core.h"

namespace {

// Word addresses inside the mapped segment, in the order Python passes them.
enum Word { kPub, kOffer, kAcked, kAckFutex, kAckSleeping, kClosed, kMapped, kSlotRecords, kWords };
constexpr std::int64_t kSlotRecord = 64;  // arena.py _SLOT_RECORD: seq at +0, version at +8
constexpr off_t kLockSender = off_t{1} << 30;  // arena.py _LOCK_SENDER
constexpr int kModeCopy = 0;
constexpr int kModeWindow = 1;

enum Outcome { kStopped = 0, kSenderGone = 1, kHandBack = 2 };
enum Take { kTaken, kRetry, kPython };

using weightsync::shm::held_by_other;
using weightsync::shm::load;
using weightsync::shm::ofd_lock;
using weightsync::shm::store;

struct Receiver {
  std::int64_t words[kWords];
  int fd;
  int nslots;
  int mode;
  // Copy mode: a CopyPlan per slot (kept alive by the Python transport). View mode: the
  // window's StorageImpl and each slot's address.
  std::vector<std::int64_t> targets;
  c10::StorageImpl* window = nullptr;
  std::vector<const c10::TensorImpl*> bound;  // view mode: tensors that must view the window
  std::vector<std::int64_t> offsets;
  bool is_bound = false;

  // Held while a version is applied, by this loop or by Python (the scheme's guard).
  std::mutex guard;
  // Written under `guard`; atomic because Python may read them without it.
  std::atomic<std::int64_t> version{0};
  std::atomic<std::int64_t> mapped{-1};
  std::atomic<std::int64_t> applied{0};  // versions this loop applied
  std::atomic<bool> stop{false};
  // After a take, how long to keep looking for the next offer before sleeping.
  double spin_s = 0.0;

  std::int64_t slot_word(int slot, int field) const {
    return words[kSlotRecords] + kSlotRecord * slot + 8 * field;
  }

  bool window_viewed() const {
    if (!is_bound) return false;
    for (std::size_t i = 0; i < bound.size(); ++i) {
      if (bound[i]->unsafe_storage().unsafeGetStorageImpl() != window ||
          bound[i]->storage_offset() != offsets[i]) {
        return false;
      }
    }
    return true;
  }

  void ack(std::int64_t v) {
    store<std::int64_t>(words[kAcked], v);
    const std::int32_t next = (load<std::int32_t>(words[kAckFutex]) + 1) & 0x7FFFFFFF;
    store<std::int32_t>(words[kAckFutex], next);
    if (load<std::int64_t>(words[kAckSleeping]) != 0) {
      weightsync::core::futex_wake(reinterpret_cast<const std::int32_t*>(words[kAckFutex]), 0);
    }
  }

  // arena.open_offer + transport.poll, for an offer of version `v` in `slot`.
  Take take(std::int64_t v, int slot) {
    std::lock_guard<std::mutex> hold(guard);
    if (v <= version) return kTaken;  // Python took it meanwhile
    if (slot < 0 || slot >= nslots) return kPython;
    if (!ofd_lock(fd, slot, F_RDLCK)) return kRetry;  // being rewritten: the offer moved on
    const std::int64_t seq = load<std::int64_t>(slot_word(slot, 0));
    if ((seq & 1) != 0 || load<std::int64_t>(slot_word(slot, 1)) != v) {
      if (slot != mapped) ofd_lock(fd, slot, F_UNLCK);
      return kRetry;
    }
    std::int64_t done = slot;
    if (mode == kModeCopy) {
      try {
        reinterpret_cast<weightsync::CopyPlan*>(targets[slot])->run(false);
      } catch (const std::exception&) {
        ofd_lock(fd, slot, F_UNLCK);
        return kPython;  // the Python path redoes it and raises the typed error
      }
    } else {
      if (!window_viewed()) {
        if (slot != mapped) ofd_lock(fd, slot, F_UNLCK);
        return kPython;  // a tensor was given other storage: Python rebinds
      }
      window->set_data_ptr_noswap(c10::DataPtr(reinterpret_cast<void*>(targets[slot]),
                                               c10::Device(c10::DeviceType::CPU)));
      const std::int64_t old = mapped.load();
      done = old != slot ? old : -1;
      mapped.store(slot);
      store<std::int64_t>(words[kMapped], slot);
    }
    version = v;
    applied.fetch_add(1, std::memory_order_relaxed);
    ack(v);
    if (done >= 0) ofd_lock(fd, static_cast<off_t>(done), F_UNLCK);
    return kTaken;
  }

  Outcome run(double liveness_s) {
    using clock = std::chrono::steady_clock;
    auto moving_since = clock::time_point::min();
    const auto* pub = reinterpret_cast<const std::int32_t*>(words[kPub]);
    const auto spin_window = std::chrono::duration_cast<clock::duration>(
        std::chrono::duration<double>(spin_s));
    // Adaptive spinning: after a take, look for the next offer before sleeping only while
    // offers come back to back (the last one arrived within the spin window after the take
    // before it). Spaced updates (a training step between them) never spin: a worker busy
    // with its own work keeps its core, and nothing is burnt waiting for an offer that is
    // milliseconds away.
    bool took = false;
    bool bursty = true;
    auto took_at = clock::time_point::min();
    while (true) {
      if (stop.load(std::memory_order_acquire)) return kStopped;
      const std::int32_t seen = load<std::int32_t>(words[kPub]);
      const std::int64_t offer = load<std::int64_t>(words[kOffer]);
      const std::int64_t v = offer >> 8;
      if (v > version.load()) {
        const auto noticed = clock::now();
        if (took_at != clock::time_point::min()) bursty = noticed - took_at <= spin_window;
        const Take t = take(v, static_cast<int>(offer & 0xFF));
        if (t == kPython) return kHandBack;
        if (t == kRetry) {
          // The sender is rewriting the slot we were offered and will offer another: look
          // again. If that goes on, Python's path (with its timeout and messages) takes over.
          const auto now = clock::now();
          if (moving_since == clock::time_point::min()) moving_since = now;
          if (now - moving_since > std::chrono::milliseconds(5)) return kHandBack;
          sched_yield();
          continue;
        }
        moving_since = clock::time_point::min();
        took = true;
        took_at = clock::now();
        continue;
      }
      if (load<std::int64_t>(words[kClosed]) != 0) return kSenderGone;
      const double spin = took && bursty ? spin_s : 0.0;
      took = false;
      if (!weightsync::core::futex_wait(pub, seen, liveness_s, spin)) {
        if (load<std::int64_t>(words[kClosed]) != 0 || !held_by_other(fd, kLockSender)) {
          return kSenderGone;
        }
      }
    }
  }
};

Receiver* as_receiver(std::int64_t handle) { return reinterpret_cast<Receiver*>(handle); }

}  // namespace

// Creates the loop's state. `words`: the kWords addresses above; `targets`: per slot, the
// CopyPlan address (mode 0) or the slot's address (mode 1, with `window` the StorageImpl);
// `spin_s`: how long to look for the next offer after a take before sleeping.
extern "C" std::int64_t weightsync_receiver_new(const std::int64_t* words, int fd, int nslots,
                                                int mode, const std::int64_t* targets,
                                                std::int64_t window, std::int64_t version,
                                                std::int64_t mapped, double spin_s) {
  if (mode != kModeCopy && mode != kModeWindow) return 0;
  auto* r = new Receiver();
  for (int i = 0; i < kWords; ++i) r->words[i] = words[i];
  r->fd = fd;
  r->nslots = nslots;
  r->mode = mode;
  r->targets.assign(targets, targets + nslots);
  r->window = reinterpret_cast<c10::StorageImpl*>(window);
  r->version = version;
  r->mapped = mapped;
  r->spin_s = spin_s;
  return reinterpret_cast<std::int64_t>(r);
}

extern "C" void weightsync_receiver_free(std::int64_t handle) { delete as_receiver(handle); }

// The scheme's guard: Python holds it (with the GIL released while it blocks) around its own
// applies and around inference; the loop holds it around each take.
extern "C" void weightsync_receiver_lock(std::int64_t handle) { as_receiver(handle)->guard.lock(); }
// Python tries this first, keeping the GIL: a thread that entered and left the guard in a tight
// loop and dropped the GIL at every entry would starve the process's other Python threads
// (CPython only forces a GIL hand-over when no one took the GIL for a whole switch interval).
extern "C" int weightsync_receiver_try_lock(std::int64_t handle) {
  return as_receiver(handle)->guard.try_lock() ? 1 : 0;
}
extern "C" void weightsync_receiver_unlock(std::int64_t handle) {
  as_receiver(handle)->guard.unlock();
}

// Python's view of the state; read and written while Python holds the guard.
extern "C" std::int64_t weightsync_receiver_version(std::int64_t handle) {
  return as_receiver(handle)->version;
}
extern "C" void weightsync_receiver_set_version(std::int64_t handle, std::int64_t v) {
  as_receiver(handle)->version = v;
}
extern "C" std::int64_t weightsync_receiver_mapped(std::int64_t handle) {
  return as_receiver(handle)->mapped;
}
extern "C" void weightsync_receiver_set_mapped(std::int64_t handle, std::int64_t slot) {
  as_receiver(handle)->mapped = slot;
}
extern "C" std::int64_t weightsync_receiver_applied(std::int64_t handle) {
  return as_receiver(handle)->applied.load(std::memory_order_relaxed);
}

// View mode: the tensors (TensorImpl addresses) that view the window and their element
// offsets, after Python (re)bound them; `count` < 0 means unbound.
extern "C" void weightsync_receiver_bind(std::int64_t handle, const std::int64_t* impls,
                                         const std::int64_t* offsets, std::int64_t count) {
  Receiver* r = as_receiver(handle);
  r->is_bound = count >= 0;
  r->bound.clear();
  r->offsets.clear();
  for (std::int64_t i = 0; i < count; ++i) {
    r->bound.push_back(reinterpret_cast<const c10::TensorImpl*>(impls[i]));
    r->offsets.push_back(offsets[i]);
  }
}

// Makes a running loop return kStopped promptly (it may sleep on the publish word: wake it).
extern "C" void weightsync_receiver_stop(std::int64_t handle) {
  Receiver* r = as_receiver(handle);
  r->stop.store(true, std::memory_order_release);
  weightsync::core::futex_wake(reinterpret_cast<const std::int32_t*>(r->words[kPub]), 0);
}

// Runs until stopped (0), the sender is gone or closed (1), or a case for Python (2). Checks
// the sender's presence every `liveness_s` seconds of quiet.
extern "C" int weightsync_receiver_run(std::int64_t handle, double liveness_s) {
  return as_receiver(handle)->run(liveness_s);
}
