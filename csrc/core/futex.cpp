// futex(2) waits on words in shared memory. Non-private futexes, because the waiter and the
// waker are different processes mapping the same segment.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <ctime>
#include <algorithm>
#include <sched.h>

#include "weightsync/core.h"

namespace weightsync::core {
namespace {

long futex(const std::int32_t* word, int op, std::int32_t value, const timespec* timeout) {
  return syscall(SYS_futex, const_cast<std::int32_t*>(word), op, value, timeout, nullptr, 0);
}

std::int32_t load(const std::int32_t* word) {
  return reinterpret_cast<const std::atomic<std::int32_t>*>(word)->load(std::memory_order_acquire);
}

}  // namespace

bool futex_wait(const std::int32_t* word, std::int32_t expected, double timeout_s,
                double spin_s) {
  using clock = std::chrono::steady_clock;
  const bool forever = timeout_s < 0;
  const auto deadline =
      clock::now() + std::chrono::duration_cast<clock::duration>(
                         std::chrono::duration<double>(forever ? 0.0 : timeout_s));
  if (spin_s > 0) {
    const double spin = forever ? spin_s : std::min(spin_s, timeout_s);
    const auto until = clock::now() + std::chrono::duration_cast<clock::duration>(
                                          std::chrono::duration<double>(spin));
    while (clock::now() < until) {
      if (load(word) != expected) return true;
      sched_yield();  // a busy neighbour (or the peer we wait for) gets the core
    }
  }
  while (true) {
    if (load(word) != expected) return true;
    timespec ts{};
    const timespec* tsp = nullptr;
    if (!forever) {
      const auto left = deadline - clock::now();
      if (left <= clock::duration::zero()) return false;
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      ts.tv_sec = static_cast<time_t>(ns / 1000000000);
      ts.tv_nsec = static_cast<long>(ns % 1000000000);
      tsp = &ts;
    }
    if (futex(word, FUTEX_WAIT, expected, tsp) == 0) return true;
    if (errno == EAGAIN) return true;  // the word changed before we slept
    if (errno == ETIMEDOUT) return false;
    // EINTR (a signal): go round again with the time that is left.
  }
}

int futex_wake(const std::int32_t* word, int count) {
  const long woken = futex(word, FUTEX_WAKE, count <= 0 ? INT_MAX : count, nullptr);
  return woken < 0 ? 0 : static_cast<int>(woken);
}

}  // namespace weightsync::core
