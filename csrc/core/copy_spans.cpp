// The threaded span copier. One persistent pool per process, created on first use.
//
// Why chunks handed out one at a time instead of a static split: on a 2-core machine the
// other core is often busy (a collector, the trainer). A static half/half split makes the
// caller wait for a descheduled thread's whole half (measured 3-50x slowdowns); with chunks
// taken one at a time the caller keeps working and waits at most for one chunk.
//
// Why each thread still has a share of its own: a sync copies the same bytes again and again,
// and a payload that fits the cores' private caches together (each core's L2 holding its
// half) stays there only when every core copies the same part each time. Measured on a 2-core
// Xeon VM with 2 MiB of L2 per core: a 0.9 MB weight set copied by two threads taking chunks
// from one counter ran at 40 GB/s, a static half each (torch's OpenMP copy) at 60 GB/s. So
// the chunks are cut into one contiguous share per participant (the caller first, then each
// helper by its fixed index); a participant takes chunks from its own share, then from the
// others' (a late or descheduled helper's share is taken over chunk by chunk).
#include "weightsync/core.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include <sys/syscall.h>
#include <unistd.h>

namespace weightsync::core {
namespace {

std::size_t env_size(const char* name, std::size_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(value, &end, 10);
  if (end == value || *end != '\0') return fallback;
  return static_cast<std::size_t>(parsed);
}

// A piece of work: either whole spans [first, last) or, when one span is larger than a chunk,
// the bytes [offset, offset + length) of span `first`. `length` is the piece's byte count in
// both cases (the shares are balanced by it).
struct Chunk {
  std::size_t first;
  std::size_t last;
  std::size_t offset;
  std::size_t length;
  bool partial;
};

std::vector<Chunk> make_chunks(const CopySpan* spans, std::size_t count, std::size_t chunk_bytes) {
  chunk_bytes = std::max<std::size_t>(chunk_bytes, 1);  // 0 would never advance past a span
  std::vector<Chunk> chunks;
  std::size_t group_start = 0;
  std::size_t group_bytes = 0;
  auto flush = [&](std::size_t end) {
    if (end > group_start) chunks.push_back({group_start, end, 0, group_bytes, false});
    group_start = end;
    group_bytes = 0;
  };
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t n = spans[i].nbytes;
    if (n >= chunk_bytes) {
      flush(i);
      for (std::size_t off = 0; off < n; off += chunk_bytes) {
        chunks.push_back({i, i + 1, off, std::min(chunk_bytes, n - off), true});
      }
      group_start = i + 1;
      continue;
    }
    group_bytes += n;
    if (group_bytes >= chunk_bytes) flush(i + 1);
  }
  flush(count);
  return chunks;
}

// Small spans through a vector loop rather than memcpy. A weight list of many small tensors is
// many separate memcpy calls, and glibc's memcpy pays a start-up cost per call that a 4 KB copy
// does not amortise (on CPUs with fast `rep movsb` it uses that string instruction from a few
// KB up). Measured on a 2-core AMD EPYC (Zen 4) VM, this copier in a C harness, 1000 separately
// allocated 4 KB spans: 53-59 us with memcpy, 50-55 us with the 32-byte loop, 49-52 us with the
// 64-byte one (three alternating runs of 4000 calls each), where a single 4 MB span takes
// 46-53 us; 8 spans of 115 KB showed no difference, so large spans keep memcpy. Through
// CopyPlan (bench/engine_bench.py, many-small): 85.4 us with memcpy, 75.8 us with the 64-byte
// loop (means of five alternating runs).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WEIGHTSYNC_X86_SPAN_LOOPS 1

// A W-byte vector at any address (GCC/Clang vector extension): the compiler emits the widest
// unaligned load and store the enclosing function's target allows, without intrinsics.
template <std::size_t W>
struct Vector {
  typedef char type __attribute__((vector_size(W), aligned(1), may_alias));
};

// Copies n bytes in W-byte vectors, four per step. Inlined into each target-specific function
// below, so it is compiled with that function's instruction set. It ends with one vector copy
// of the last W bytes, which rewrites some bytes already copied with the same values (source
// and destination never overlap), so there is no scalar tail.
template <std::size_t W>
__attribute__((always_inline)) inline void copy_in_vectors(char* d, const char* s, std::size_t n) {
  using V = typename Vector<W>::type;
  if (n < W) {
    std::memcpy(d, s, n);
    return;
  }
  std::size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const V a = *reinterpret_cast<const V*>(s + i);
    const V b = *reinterpret_cast<const V*>(s + i + W);
    const V c = *reinterpret_cast<const V*>(s + i + 2 * W);
    const V e = *reinterpret_cast<const V*>(s + i + 3 * W);
    *reinterpret_cast<V*>(d + i) = a;
    *reinterpret_cast<V*>(d + i + W) = b;
    *reinterpret_cast<V*>(d + i + 2 * W) = c;
    *reinterpret_cast<V*>(d + i + 3 * W) = e;
  }
  for (; i + W <= n; i += W) *reinterpret_cast<V*>(d + i) = *reinterpret_cast<const V*>(s + i);
  if (i < n) *reinterpret_cast<V*>(d + n - W) = *reinterpret_cast<const V*>(s + n - W);
}

__attribute__((target("avx512f"))) void copy_avx512(char* d, const char* s, std::size_t n) {
  copy_in_vectors<64>(d, s, n);
}

__attribute__((target("avx"))) void copy_avx(char* d, const char* s, std::size_t n) {
  copy_in_vectors<32>(d, s, n);
}
#endif

bool cpu_has(SpanLoop loop) {
#ifdef WEIGHTSYNC_X86_SPAN_LOOPS
  switch (loop) {
    case SpanLoop::kAvx512: return __builtin_cpu_supports("avx512f");
    case SpanLoop::kAvx: return __builtin_cpu_supports("avx");
    case SpanLoop::kMemcpy: return true;
  }
  return false;
#else
  return loop == SpanLoop::kMemcpy;
#endif
}

SpanLoop choose_span_loop() {
  const char* forced = std::getenv("WEIGHTSYNC_SPAN_LOOP");
  if (forced != nullptr && *forced != '\0') {
    for (SpanLoop loop : {SpanLoop::kMemcpy, SpanLoop::kAvx, SpanLoop::kAvx512}) {
      if (std::strcmp(forced, span_loop_name(loop)) == 0 && cpu_has(loop)) return loop;
    }
  }
  for (SpanLoop loop : {SpanLoop::kAvx512, SpanLoop::kAvx}) {
    if (cpu_has(loop)) return loop;
  }
  return SpanLoop::kMemcpy;
}

inline void copy_with(SpanLoop loop, void* dst, const void* src, std::size_t n) {
#ifdef WEIGHTSYNC_X86_SPAN_LOOPS
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  if (loop == SpanLoop::kAvx512) return copy_avx512(d, s, n);
  if (loop == SpanLoop::kAvx) return copy_avx(d, s, n);
#endif
  std::memcpy(dst, src, n);
}

// One whole span: small ones through the active loop, the rest through memcpy.
inline void copy_span(const CopySpan& s) {
  if (s.nbytes == 0) return;
  if (s.nbytes <= kSmallSpanBytes) {
    copy_with(active_span_loop(), s.dst, s.src, s.nbytes);
  } else {
    std::memcpy(s.dst, s.src, s.nbytes);
  }
}

void run_chunk(const CopySpan* spans, const Chunk& c) {
  if (c.partial) {
    const CopySpan& s = spans[c.first];
    std::memcpy(static_cast<char*>(s.dst) + c.offset, static_cast<const char*>(s.src) + c.offset,
                c.length);
    return;
  }
  for (std::size_t i = c.first; i < c.last; ++i) copy_span(spans[i]);
}

// Work the pool runs: pieces [0, n) cut into contiguous shares, one per participant (the
// caller is participant 0, helper i is participant i + 1). Each share hands out its pieces one
// at a time from its own counter: a participant drains its own share, then the others'.
struct Job {
  static constexpr std::size_t kMaxShares = 16;
  struct alignas(64) Share {  // one cache line each: the counters are written concurrently
    std::atomic<std::size_t> next{0};
    std::size_t end = 0;
  };
  std::array<Share, kMaxShares> shares;
  std::size_t share_count = 0;

  virtual ~Job() = default;
  virtual void piece(std::size_t index) = 0;

  // Shares of `n` pieces for `parts` participants; `cost(i)` (non-decreasing prefix sums of
  // the pieces' sizes, cost(n) the total) balances them by size rather than count.
  template <typename PrefixCost>
  void split(std::size_t n, std::size_t parts, PrefixCost cost) {
    share_count = std::clamp<std::size_t>(parts, 1, kMaxShares);
    pieces = n;
    const double total = static_cast<double>(cost(n));
    std::size_t begin = 0;
    for (std::size_t s = 0; s < share_count; ++s) {
      std::size_t end = n;
      if (s + 1 < share_count) {
        const double target = total * static_cast<double>(s + 1) / static_cast<double>(share_count);
        end = begin;
        while (end < n && static_cast<double>(cost(end + 1)) <= target) ++end;
      }
      shares[s].next.store(begin, std::memory_order_relaxed);
      shares[s].end = end;
      begin = end;
    }
  }

  std::size_t pieces = 0;
  // Pieces taken by participants other than the caller (0): whether the helpers got to work.
  std::atomic<std::size_t> helper_pieces{0};

  // Whether the helpers took at least half their fair share of the pieces. A helper that only
  // gets the core now and then (torch's OpenMP workers spin on it) takes one late piece or
  // none, and the caller copies the rest alone.
  bool helpers_kept_up() const {
    if (share_count < 2 || pieces < 2) return true;  // nothing to share: no evidence
    const std::size_t fair = pieces * (share_count - 1) / share_count;
    return 2 * helper_pieces.load(std::memory_order_relaxed) >= fair;
  }

  void work(std::size_t participant) {
    std::size_t taken = 0;
    for (std::size_t k = 0; k < share_count; ++k) {
      Share& share = shares[(participant + k) % share_count];
      for (std::size_t i = share.next.fetch_add(1, std::memory_order_relaxed); i < share.end;
           i = share.next.fetch_add(1, std::memory_order_relaxed)) {
        piece(i);
        ++taken;
      }
    }
    if (participant != 0 && taken != 0) helper_pieces.fetch_add(taken, std::memory_order_relaxed);
  }
};

struct CopyJob final : Job {
  const CopySpan* spans = nullptr;
  const std::vector<Chunk>* chunks = nullptr;
  void piece(std::size_t index) override { run_chunk(spans, (*chunks)[index]); }
};

struct CheckJob final : Job {
  std::size_t items = 0;
  std::size_t grain = 1;
  RangeCheck check = nullptr;
  const void* context = nullptr;
  std::atomic<bool> failed{false};
  void piece(std::size_t index) override {
    if (failed.load(std::memory_order_relaxed)) return;  // the answer is known: skip the rest
    const std::size_t begin = index * grain;
    if (!check(context, begin, std::min(items, begin + grain))) {
      failed.store(true, std::memory_order_relaxed);
    }
  }
};

class Pool {
 public:
  Pool(int helpers, std::chrono::microseconds spin) : spin_(spin) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this, i] { loop(i + 1); });
  }

  // The caller and every helper.
  std::size_t participants() const { return threads_.size() + 1; }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Returns false (having done nothing) when another caller is using the pool right now; the
  // caller then copies on its own thread.
  bool run(Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    // Spinning helpers see the new generation by themselves; the futex wake is only paid
    // when one is parked.
    if (parked_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    job.work(0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = nullptr;  // helpers arriving from now on skip this job
    }
    // Helpers still inside the job hold at most one chunk each: wait by yielding rather than
    // sleeping, since a sleeping caller would pay a wake-up longer than the chunk itself.
    while (joined_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    return true;
  }

  // A job is coming: helpers still spinning keep spinning for spin_ from now, and parked
  // ones wake without a job, to look for one for spin_ before they park again.
  void wake() {
    const auto until = std::chrono::steady_clock::now() + spin_;
    spin_until_.store(until.time_since_epoch().count(), std::memory_order_relaxed);
    if (parked_.load(std::memory_order_acquire) == 0) return;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return;  // a job is running: its helpers are awake
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);  // current_ is null: no job yet
    }
    wake_.notify_all();
  }

 private:
  // Spin, then park. Syncs tend to come in bursts (one per tensor group, one per worker), and
  // a parked thread takes tens of microseconds to wake: longer than a whole small copy
  // (measured on a 2-core KVM guest: 30 us after 10 us parked, 55-60 us after 50 us or more,
  // as the idle vCPU sleeps deeper). A helper therefore spins (yielding the core, so a busy
  // neighbour loses nothing) for a short while after each job, or after a wake(), before it
  // parks. A helper that arrives late costs nothing: the caller never waits for a chunk
  // nobody took.
  void loop(std::size_t participant) {
    std::uint64_t seen = generation_.load(std::memory_order_acquire);
    while (true) {
      const auto deadline = std::chrono::steady_clock::now() + spin_;
      while (generation_.load(std::memory_order_acquire) == seen) {
        const auto now = std::chrono::steady_clock::now();
        if (now >= deadline &&
            now.time_since_epoch().count() >= spin_until_.load(std::memory_order_relaxed)) {
          break;
        }
        std::this_thread::yield();
      }
      std::unique_lock<std::mutex> lock(mutex_);
      if (generation_.load(std::memory_order_relaxed) == seen) {
        parked_.fetch_add(1, std::memory_order_release);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        parked_.fetch_sub(1, std::memory_order_release);
      }
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
      Job* job = current_;
      if (job == nullptr) continue;
      joined_.fetch_add(1, std::memory_order_relaxed);  // under mutex_: ordered with current_
      lock.unlock();
      job->work(participant);
      joined_.fetch_sub(1, std::memory_order_release);
    }
  }

  const std::chrono::microseconds spin_;
  std::vector<std::thread> threads_;
  std::mutex busy_;
  std::mutex mutex_;
  std::condition_variable wake_;
  Job* current_ = nullptr;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> parked_{0};
  std::atomic<int> joined_{0};
  std::atomic<std::chrono::steady_clock::rep> spin_until_{0};  // see wake()
  bool stop_ = false;
};

std::atomic<TeamRunner> g_team_runner{nullptr};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool on_main_thread() {
  static thread_local const bool main = static_cast<pid_t>(syscall(SYS_gettid)) == getpid();
  return main;
}

Helpers choose_helpers() {
  const char* forced = std::getenv("WEIGHTSYNC_HELPERS");
  if (forced != nullptr) {
    for (Helpers h : {Helpers::kAuto, Helpers::kOwn, Helpers::kTorch}) {
      if (std::strcmp(forced, helpers_name(h)) == 0) return h;
    }
  }
  return Helpers::kOwn;
}

struct TeamContext {
  Job* job;
  std::thread::id caller;
  std::int64_t caller_done_ns = 0;
};

Pool* pool_for(const CopyOptions& opts);

// Runs a split job on the pool or on torch's threads (see Helpers in core.h).
void run_job(const CopyOptions& opts, Job& job) {
  const Helpers mode = active_helpers();
  const TeamRunner runner = g_team_runner.load(std::memory_order_acquire);
  const bool main = runner != nullptr && mode != Helpers::kOwn && on_main_thread();
  static HelperChoice choice;  // read and written by the main thread only
  if (main && (mode == Helpers::kTorch || choice.use_team(now_ns()))) {
    TeamContext ctx{&job, std::this_thread::get_id()};
    const std::int64_t start = now_ns();
    runner(
        job.share_count,
        [](void* context, std::size_t participant) {
          auto* team = static_cast<TeamContext*>(context);
          team->job->work(participant);
          if (std::this_thread::get_id() == team->caller) team->caller_done_ns = now_ns();
        },
        &ctx);
    const std::int64_t end = now_ns();
    const std::int64_t done = ctx.caller_done_ns != 0 ? ctx.caller_done_ns : end;
    if (mode == Helpers::kAuto) choice.after_team(end, done - start, end - done);
    return;
  }
  if (!pool_for(opts)->run(job)) {
    job.work(0);  // another thread holds the pool: this says nothing about the helpers
    return;
  }
  if (main && mode == Helpers::kAuto) {
    choice.after_pool(job.helpers_kept_up());
  }
}

Pool* pool_for(const CopyOptions& opts) {
  // Leaked on purpose: joining threads from a static destructor at exit can deadlock when the
  // process exits from a forked child or while another thread still copies.
  static Pool* pool =
      new Pool(std::max(0, opts.max_threads - 1), std::chrono::microseconds(opts.spin_us));
  return pool;
}

}  // namespace

Helpers active_helpers() {
  static const Helpers helpers = choose_helpers();
  return helpers;
}

const char* helpers_name(Helpers helpers) {
  switch (helpers) {
    case Helpers::kAuto: return "auto";
    case Helpers::kOwn: return "own";
    case Helpers::kTorch: return "torch";
  }
  return "own";
}

void set_team_runner(TeamRunner runner) { g_team_runner.store(runner, std::memory_order_release); }

bool HelperChoice::use_team(std::int64_t now_ns) const {
  return prefer_team_ && now_ns >= banned_until_ns_;
}

void HelperChoice::after_pool(bool helpers_worked) { prefer_team_ = !helpers_worked; }

void HelperChoice::after_team(std::int64_t now_ns, std::int64_t work_ns, std::int64_t wait_ns) {
  if (wait_ns <= std::max(kMinLongWaitNs, work_ns / 2)) {
    long_waits_ = 0;
    // Only a run of good regions earns the short back-off again: beside a busy neighbour the
    // team is on time now and then, and must not be retried often for that.
    if (++good_regions_ >= kGoodRegionsToReset) backoff_ns_ = kFirstBackoffNs;
    return;
  }
  // Torch's workers came late: asleep (spaced copies) or descheduled (a busy neighbour). One
  // late region can be a stray preemption; several in a row mean the team is not at hand.
  good_regions_ = 0;
  if (++long_waits_ < kLongWaitsToLeave) return;
  long_waits_ = 0;
  prefer_team_ = false;
  banned_until_ns_ = now_ns + backoff_ns_;
  backoff_ns_ = std::min(2 * backoff_ns_, kMaxBackoffNs);
}

SpanLoop active_span_loop() {
  static const SpanLoop loop = choose_span_loop();
  return loop;
}

const char* span_loop_name(SpanLoop loop) {
  switch (loop) {
    case SpanLoop::kAvx512: return "avx512";
    case SpanLoop::kAvx: return "avx";
    case SpanLoop::kMemcpy: return "memcpy";
  }
  return "memcpy";
}

bool copy_bytes_with(SpanLoop loop, void* dst, const void* src, std::size_t n) {
  if (!cpu_has(loop)) return false;
  if (n != 0) copy_with(loop, dst, src, n);
  return true;
}

const CopyOptions& default_copy_options() {
  static const CopyOptions options = [] {
    CopyOptions o;
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    o.max_threads = static_cast<int>(env_size("WEIGHTSYNC_NUM_THREADS", std::min(hw, 4u)));
    o.max_threads = std::max(1, o.max_threads);
    o.parallel_min_bytes = env_size("WEIGHTSYNC_PARALLEL_MIN_BYTES", o.parallel_min_bytes);
    o.chunk_bytes = std::max<std::size_t>(4096, env_size("WEIGHTSYNC_CHUNK_BYTES", o.chunk_bytes));
    o.spin_us = env_size("WEIGHTSYNC_SPIN_US", o.spin_us);
    return o;
  }();
  return options;
}

void copy_spans(const CopySpan* spans, std::size_t count, const CopyOptions& opts) {
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) total += spans[i].nbytes;
  if (opts.max_threads <= 1 || total < opts.parallel_min_bytes) {
    for (std::size_t i = 0; i < count; ++i) copy_span(spans[i]);
    return;
  }
  constexpr std::size_t kMinChunk = std::size_t{64} << 10;
  const std::size_t per_thread = total / (4 * static_cast<std::size_t>(opts.max_threads));
  const std::size_t chunk = std::min(opts.chunk_bytes, std::max(kMinChunk, per_thread));
  const std::vector<Chunk> chunks = make_chunks(spans, count, chunk);
  std::vector<std::size_t> prefix(chunks.size() + 1, 0);
  for (std::size_t i = 0; i < chunks.size(); ++i) prefix[i + 1] = prefix[i] + chunks[i].length;
  // The pool is sized by the first caller's options; later callers asking for fewer threads
  // still share it, which only matters for tests that vary the count.
  CopyJob job;
  job.spans = spans;
  job.chunks = &chunks;
  job.split(chunks.size(), pool_for(opts)->participants(),
            [&](std::size_t i) { return prefix[i]; });
  run_job(opts, job);
}

void wake_copy_helpers(const CopyOptions& opts) {
  if (opts.max_threads > 1) pool_for(opts)->wake();
}

bool all_of(std::size_t count, std::size_t grain, RangeCheck check, const void* context,
            bool parallel, const CopyOptions& opts) {
  grain = std::max<std::size_t>(grain, 1);
  if (!parallel || opts.max_threads <= 1 || count <= grain) {
    return count == 0 || check(context, 0, count);
  }
  CheckJob job;
  job.items = count;
  job.grain = grain;
  job.check = check;
  job.context = context;
  job.split((count + grain - 1) / grain, pool_for(opts)->participants(),
            [](std::size_t i) { return i; });
  run_job(opts, job);
  // run() returns once every helper left the job: all pieces ran or were skipped after a failure.
  return !job.failed.load(std::memory_order_relaxed);
}

}  // namespace weightsync::core
