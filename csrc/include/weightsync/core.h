// Torch-free core of the weightsync engine: byte spans, the threaded span copier, overlap
// detection and futex waits. Nothing here includes ATen, so CMake builds and unit-tests it
// alone (csrc/tests/test_core.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace weightsync::core {

// One contiguous byte move. Spans of one call never overlap each other (checked upstream).
struct CopySpan {
  const void* src;
  void* dst;
  std::size_t nbytes;
};

// How copy_spans spreads work. The defaults come from the environment (see
// default_copy_options) and are tuned for small machines: threads only pay for large payloads,
// and a busy neighbour core must not stall the caller, so work is handed out in chunks that
// the calling thread also takes; a descheduled helper delays at most the one chunk it holds.
struct CopyOptions {
  // Payloads below this many bytes are copied by the calling thread alone. Measured on a
  // 2-core VM (bench/engine_bench.py --threads-experiment and per-size runs): a second thread
  // pays from about 256 KiB when the other core is idle, and with a busy neighbour it costs
  // under 20% rather than collapsing, since the caller never waits for a helper that has not
  // started.
  std::size_t parallel_min_bytes = std::size_t{256} << 10;
  // Upper bound on threads (the caller included). 1 disables the pool.
  int max_threads = 1;
  // Granularity of the work split; big tensors are cut into chunks of this size. Payloads
  // under 4 chunks per thread use proportionally smaller chunks (down to 64 KiB) so that
  // every thread gets work.
  std::size_t chunk_bytes = std::size_t{1} << 20;
  // How long an idle helper spins (yielding) before it parks; see copy_spans.cpp.
  std::size_t spin_us = 50;
};

// Options from WEIGHTSYNC_NUM_THREADS (default: min(hardware threads, 4)),
// WEIGHTSYNC_PARALLEL_MIN_BYTES, WEIGHTSYNC_CHUNK_BYTES and WEIGHTSYNC_SPIN_US. Read once.
const CopyOptions& default_copy_options();

// Copies every span. Single-threaded below opts.parallel_min_bytes total, else split by bytes
// across at most opts.max_threads threads (the caller always works too).
void copy_spans(const CopySpan* spans, std::size_t count, const CopyOptions& opts);
inline void copy_spans(const std::vector<CopySpan>& spans, const CopyOptions& opts) {
  copy_spans(spans.data(), spans.size(), opts);
}

// How copy_spans moves a span of at most kSmallSpanBytes: a vector loop (64-byte AVX-512 or
// 32-byte AVX registers, unrolled four times) or libc's memcpy. Larger spans and chunks of
// spans always use memcpy. See copy_spans.cpp for why and the measurements.
enum class SpanLoop { kMemcpy = 0, kAvx = 1, kAvx512 = 2 };
inline constexpr std::size_t kSmallSpanBytes = std::size_t{64} << 10;
// The widest loop this CPU runs, or the one WEIGHTSYNC_SPAN_LOOP (memcpy, avx, avx512) names
// when the CPU has it. Decided once per process.
SpanLoop active_span_loop();
const char* span_loop_name(SpanLoop loop);
// Copies n bytes (non-overlapping) with `loop`, whatever the active one; false, having copied
// nothing, when this CPU lacks it. For tests and benchmarks.
bool copy_bytes_with(SpanLoop loop, void* dst, const void* src, std::size_t n);

// Whose threads help the caller in a threaded copy_spans or parallel all_of
// (WEIGHTSYNC_HELPERS=own|torch|auto, read once; default own).
//
// The copier's own pool ("own") never makes the caller wait for a helper that has not
// started, so a busy neighbour core cannot stall it. But torch's OpenMP workers, threads of the
// same process, keep spinning for milliseconds after each parallel region (libgomp's default),
// and while they do they hold the cores the pool's helpers need: a copy right after torch's
// own parallel work (a push after an optimizer step) runs on the caller alone. Torch's pool
// ("torch", through the runner the torch layer registers) has those very threads at hand
// then, but waits at the end of a region for every one of them, which collapses beside a
// busy neighbour. "auto" uses the pool and switches to torch's threads after a pool job whose
// helpers took less than half their fair share of the pieces; it switches back after two
// regions in a row whose end-of-region wait was long (torch's workers were asleep or
// descheduled), and then tries torch's threads again only after a back-off that doubles at
// each such switch (20 ms up to 2 s) and comes down again only after 64 good regions in a
// row. Measured on a 2-core VM, "auto" halves the copy right after torch's work but beside a
// busy neighbour its plans kept only 0.51-0.80x of one thread's speed (0.26x for the batched
// op on 1000 small tensors; the probes of torch's threads then wait), which is why it is not
// the default. Only the process's main thread uses torch's threads: a region
// started from another thread would make OpenMP start a team of threads for it.
enum class Helpers { kAuto = 0, kOwn = 1, kTorch = 2 };
Helpers active_helpers();  // from WEIGHTSYNC_HELPERS, read once
const char* helpers_name(Helpers helpers);

// Runs body(context, p) for every participant p in [0, participants) on a team of threads
// the caller belongs to, returning once every call returned.
using TeamBody = void (*)(void* context, std::size_t participant);
using TeamRunner = void (*)(std::size_t participants, TeamBody body, void* context);
// Registers torch's pool as the team (the torch layer does, when the library loads).
void set_team_runner(TeamRunner runner);

// The "auto" decision, one per process, kept apart from the threads so that it can be tested.
class HelperChoice {
 public:
  static constexpr std::int64_t kFirstBackoffNs = 20'000'000;     // 20 ms
  static constexpr std::int64_t kMaxBackoffNs = 2'000'000'000;    // 2 s
  // A wait is long above this and above half the caller's own work.
  static constexpr std::int64_t kMinLongWaitNs = 50'000;          // 50 us
  // Long waits in a row that send the job back to the pool.
  static constexpr int kLongWaitsToLeave = 2;
  // Good regions in a row that bring the back-off down to its first value.
  static constexpr int kGoodRegionsToReset = 64;

  // Whether the next parallel job runs on torch's threads.
  bool use_team(std::int64_t now_ns) const;
  // After a job on the pool: `helpers_worked` tells whether the helpers kept up (took at least
  // half their fair share of its pieces).
  void after_pool(bool helpers_worked);
  // After a job on torch's threads: the caller's own work took `work_ns`, then it waited
  // `wait_ns` for the others to leave the region.
  void after_team(std::int64_t now_ns, std::int64_t work_ns, std::int64_t wait_ns);
  std::int64_t backoff_ns() const { return backoff_ns_; }

 private:
  bool prefer_team_ = false;
  int long_waits_ = 0;
  int good_regions_ = 0;
  std::int64_t banned_until_ns_ = 0;
  std::int64_t backoff_ns_ = kFirstBackoffNs;
};

// A heads-up that a threaded copy_spans (or parallel all_of) follows shortly: helper threads
// still spinning after their last job keep spinning for opts.spin_us from now, and parked ones
// wake now and look for work that long before they park again. Waking a parked thread takes
// tens of microseconds on a VM, as long as a small threaded copy; a caller with other work to
// do first (Python checks of its inputs) lets that wake-up overlap it. Costs a clock read and
// an atomic store when no helper is parked.
void wake_copy_helpers(const CopyOptions& opts);

// A read-only test of the items [begin, end) of some list; true when they all pass.
using RangeCheck = bool (*)(const void* context, std::size_t begin, std::size_t end);

// Whether `check` passes on every item of [0, count), tested in pieces of `grain` items. With
// `parallel` (the caller is about to copy on the pool anyway) the pieces are shared with the
// copier's helper threads, which are then awake for the copy that follows; a failing piece
// stops further pieces from starting. Used for the reallocation check of large copy plans,
// which reads a few scattered cache lines per tensor.
bool all_of(std::size_t count, std::size_t grain, RangeCheck check, const void* context,
            bool parallel, const CopyOptions& opts);

// A half-open byte range [begin, end) tagged with who owns it.
struct ByteRange {
  std::uintptr_t begin;
  std::uintptr_t end;
  std::size_t index;  // position in the caller's list
  int group;          // e.g. 0 = destination, 1 = source
};

// The first pair of overlapping ranges where at least one side is in `written_group`
// (two read-only ranges may overlap). Empty ranges never overlap. O(n log n).
std::optional<std::pair<ByteRange, ByteRange>> find_overlap(std::vector<ByteRange> ranges,
                                                           int written_group);

// Rounds n up to a multiple of `alignment` (a power of two).
constexpr std::size_t align_up(std::size_t n, std::size_t alignment) {
  return (n + alignment - 1) & ~(alignment - 1);
}

// futex(2) on a 32-bit word that may live in memory shared between processes (so the
// non-private variant). Returns true when the word no longer held `expected` or a wake
// arrived, false when `timeout_s` elapsed first. timeout_s < 0 waits forever (callers in
// weightsync always pass a finite timeout). With spin_s > 0 it first polls the word for that
// long, yielding the core between looks, and only then sleeps: an answer expected within tens
// of microseconds then costs no sleep and wake-up (on a VM, waking a halted vCPU alone takes
// that long).
bool futex_wait(const std::int32_t* word, std::int32_t expected, double timeout_s,
                double spin_s = 0.0);
// Wakes up to `count` waiters on `word`; returns how many were woken.
int futex_wake(const std::int32_t* word, int count);

}  // namespace weightsync::core
