// A sender's common send in C++: take a free slot, write it, commit, publish, wait for acks.
//
// Why: on a small model these protocol steps cost more than the bytes. Measured on a 2-core VM
// (mlp-small, 0.9 MB, 2 view-mode workers): the slot write took ~60 us and the steps around it
// ~45 us in Python (a fcntl call per slot tried, a futex op through the dispatcher, a Python
// loop over the workers' words), which kept a send near 110 us. Here they run as one call
// without the GIL.
//
// The protocol is transports/arena.py's (acquire_slot, commit_slot, publish, wait_acks): same
// words, same order, same locks. Python keeps every case that needs waiting or a message: no
// slot free at the first look, a slot without a copy plan for these sources, a failed write,
// acks that did not come in time. Each is reported by a return code, with nothing published
// unless the code says so, and Python carries on from there with its own path.
#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

#include <c10/util/Exception.h>

#include "copy_plan.h"
#include "shm_words.h"
#include "weightsync/core.h"

namespace {

enum Code {
  kSent = 0,         // published (and acked by every target when sync)
  kNoSlot = 1,       // every slot busy at the first look: nothing changed
  kNeedWrite = 2,    // *slot is taken for writing (odd sequence) and has no plan: Python
                     // writes it, then calls weightsync_sender_finish (or aborts it)
  kWriteFailed = 3,  // the plan raised (message in `error`); the slot was given back
  kAckTimeout = 4,   // published; some target did not ack within the timeout
};

using clock_type = std::chrono::steady_clock;

using weightsync::shm::held_by_other;
using weightsync::shm::load;
using weightsync::shm::ofd_lock;
using weightsync::shm::store;

clock_type::duration seconds(double s) {
  return std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(s));
}

struct Sender {
  // Addresses, as Python computes them from arena.py's offsets (see Arena.native_sender_words).
  std::int64_t pub = 0;           // publish futex (int32)
  std::int64_t ack_sleeping = 0;  // int64 flag
  struct SlotWords {
    std::int64_t seq, version;
  };
  struct WorkerWords {
    std::int64_t offer, acked, ack_futex, joined;
  };
  std::vector<SlotWords> slots;
  std::vector<WorkerWords> workers;
  int fd = -1;
  off_t lock_worker = 0;  // the presence lock of worker w is byte lock_worker + w
  int cursor = 0;         // slots are tried round-robin from here, as in Python
  bool acks_quick = true;  // the last sync send's acks all came within the spin window

  // acquire_slot's first pass: a slot no worker holds (OFD lock) and none was offered and not
  // taken yet. Returns -1 when there is none.
  int acquire() {
    const int n = static_cast<int>(slots.size());
    std::vector<char> busy(n, 0);
    for (const WorkerWords& w : workers) {
      const std::int64_t offer = load<std::int64_t>(w.offer);
      const std::int64_t version = offer >> 8;
      if (version > 0 && load<std::int64_t>(w.acked) < version) {
        const int slot = static_cast<int>(offer & 0xFF);
        if (slot < n) busy[slot] = 1;
      }
    }
    for (int i = 0; i < n; ++i) {
      const int s = (cursor + i) % n;
      if (busy[s] || !ofd_lock(fd, s, F_WRLCK)) continue;
      cursor = s + 1;
      store<std::int64_t>(slots[s].seq, (load<std::int64_t>(slots[s].seq) + 1) | 1);
      return s;
    }
    return -1;
  }

  void close_slot(int s, std::int64_t version) {  // commit_slot (version > 0) / abort_slot (0)
    store<std::int64_t>(slots[s].version, version);
    store<std::int64_t>(slots[s].seq, load<std::int64_t>(slots[s].seq) + 1);
    ofd_lock(fd, s, F_UNLCK);
  }

  void publish(int s, std::int64_t version, const std::int64_t* targets, int ntargets) {
    const std::int64_t word = version << 8 | s;
    for (int i = 0; i < ntargets; ++i) store<std::int64_t>(workers[targets[i]].offer, word);
    const std::int32_t next = (load<std::int32_t>(pub) + 1) & 0x7FFFFFFF;
    store<std::int32_t>(pub, next);
    weightsync::core::futex_wake(reinterpret_cast<const std::int32_t*>(pub), 0);
  }

  bool acked(int w, std::int64_t version) const {
    return load<std::int64_t>(workers[w].acked) >= version;
  }

  // wait_acks: every target acked `version`, stopping early for workers found dead.
  bool wait_acks(const std::int64_t* targets, int ntargets, std::int64_t version,
                 double timeout_s, double spin_s, double liveness_s) {
    std::vector<int> pending;
    for (int i = 0; i < ntargets; ++i) {
      if (!acked(static_cast<int>(targets[i]), version)) pending.push_back(static_cast<int>(targets[i]));
    }
    if (pending.empty()) return true;
    const auto started = clock_type::now();
    const auto deadline = started + seconds(timeout_s);
    const double spin = acks_quick ? spin_s : 0.0;
    auto next_check = started + seconds(liveness_s);
    std::size_t at = 0;
    while (at < pending.size()) {
      const int w = pending[at];
      const auto* futex_word = reinterpret_cast<const std::int32_t*>(workers[w].ack_futex);
      const std::int32_t seen = load<std::int32_t>(workers[w].ack_futex);
      if (acked(w, version)) {
        ++at;
        continue;
      }
      const auto now = clock_type::now();
      if (now >= next_check) {
        // A worker that connected and is gone never acks; one that never connected may
        // still be starting and gets the whole timeout (as in Python).
        next_check = now + seconds(liveness_s);
        pending.erase(std::remove_if(pending.begin() + static_cast<std::ptrdiff_t>(at), pending.end(),
                                     [&](int p) {
                                       return load<std::int64_t>(workers[p].joined) > 0 &&
                                              !held_by_other(fd, lock_worker + p);
                                     }),
                      pending.end());
        continue;
      }
      if (now >= deadline) break;
      const double left = std::chrono::duration<double>(deadline - now).count();
      store<std::int64_t>(ack_sleeping, 1);
      if (!acked(w, version)) {
        weightsync::core::futex_wait(futex_word, seen, std::min(left, liveness_s), spin);
      }
      store<std::int64_t>(ack_sleeping, 0);
    }
    for (int i = 0; i < ntargets; ++i) {
      if (!acked(static_cast<int>(targets[i]), version)) {
        acks_quick = false;
        return false;  // dead workers too: Python's message names them
      }
    }
    acks_quick = clock_type::now() - started <= seconds(2 * spin_s);
    return true;
  }

  int finish(int s, const std::int64_t* targets, int ntargets, std::int64_t version, bool sync,
             double timeout_s, double spin_s, double liveness_s) {
    close_slot(s, version);
    publish(s, version, targets, ntargets);
    if (sync && !wait_acks(targets, ntargets, version, timeout_s, spin_s, liveness_s)) {
      return kAckTimeout;
    }
    return kSent;
  }
};

Sender* as_sender(std::int64_t handle) { return reinterpret_cast<Sender*>(handle); }

bool valid_targets(const Sender& s, const std::int64_t* targets, int ntargets) {
  for (int i = 0; i < ntargets; ++i) {
    if (targets[i] < 0 || targets[i] >= static_cast<std::int64_t>(s.workers.size())) return false;
  }
  return true;
}

}  // namespace

// `words`: publish futex, ack-sleeping flag, then (seq, version) per slot, then (offer, acked,
// ack futex, joined) per worker. Slot s is locked on byte s of `fd`, worker w's presence on
// byte `lock_worker + w`.
extern "C" std::int64_t weightsync_sender_new(const std::int64_t* words, int fd, int nslots,
                                              int nworkers, std::int64_t lock_worker) {
  if (nslots < 1 || nslots > 255 || nworkers < 1) return 0;
  auto* s = new Sender();
  s->pub = words[0];
  s->ack_sleeping = words[1];
  const std::int64_t* at = words + 2;
  for (int i = 0; i < nslots; ++i, at += 2) s->slots.push_back({at[0], at[1]});
  for (int i = 0; i < nworkers; ++i, at += 4) s->workers.push_back({at[0], at[1], at[2], at[3]});
  s->fd = fd;
  s->lock_worker = static_cast<off_t>(lock_worker);
  return reinterpret_cast<std::int64_t>(s);
}

extern "C" void weightsync_sender_free(std::int64_t handle) { delete as_sender(handle); }

// One send of `version` to the workers `targets` (indices in the arena). `plans[s]`: the
// CopyPlan that writes these sources into slot s, or 0 when Python must write it. Returns a
// Code; *slot is the slot taken (kNeedWrite) or published (kSent, kAckTimeout).
extern "C" int weightsync_sender_send(std::int64_t handle, const std::int64_t* plans,
                                      const std::int64_t* targets, int ntargets,
                                      std::int64_t version, int sync, double timeout_s,
                                      double spin_s, double liveness_s, std::int64_t* slot,
                                      char* error, std::size_t error_len) {
  Sender& s = *as_sender(handle);
  if (!valid_targets(s, targets, ntargets)) {
    std::snprintf(error, error_len, "weightsync_sender_send: a target is not a worker index");
    return kWriteFailed;
  }
  const int taken = s.acquire();
  if (taken < 0) return kNoSlot;
  *slot = taken;
  if (plans[taken] == 0) return kNeedWrite;
  try {
    reinterpret_cast<weightsync::CopyPlan*>(plans[taken])->run(false);
  } catch (const c10::Error& e) {
    std::snprintf(error, error_len, "%s", e.what_without_backtrace());
    s.close_slot(taken, 0);
    return kWriteFailed;
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    s.close_slot(taken, 0);
    return kWriteFailed;
  }
  return s.finish(taken, targets, ntargets, version, sync != 0, timeout_s, spin_s, liveness_s);
}

// After kNeedWrite and Python's write into `slot`: commit, publish, wait as above.
extern "C" int weightsync_sender_finish(std::int64_t handle, std::int64_t slot,
                                        const std::int64_t* targets, int ntargets,
                                        std::int64_t version, int sync, double timeout_s,
                                        double spin_s, double liveness_s) {
  Sender& s = *as_sender(handle);
  if (!valid_targets(s, targets, ntargets)) {
    s.close_slot(static_cast<int>(slot), 0);
    return kWriteFailed;
  }
  return s.finish(static_cast<int>(slot), targets, ntargets, version, sync != 0, timeout_s,
                  spin_s, liveness_s);
}

// After kNeedWrite and a failed Python write: give the slot back holding no version.
extern "C" void weightsync_sender_abort(std::int64_t handle, std::int64_t slot) {
  as_sender(handle)->close_slot(static_cast<int>(slot), 0);
}
