// Unit tests of the torch-free core (weightsync/core.h): the span copier, overlap detection,
// align_up and the futex waits. Plain C++ with a small check macro, so the core can be tested
// where neither torch nor a test framework is installed. Run through ctest; exits non-zero
// when any check fails and names each failing check with its file and line.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"

#include "weightsync/core.h"

namespace {

using weightsync::core::ByteRange;
using weightsync::core::CopyOptions;
using weightsync::core::CopySpan;

using weightsync_test::g_current;
using weightsync_test::g_failures;
using weightsync_test::report;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ---- copy_spans ------------------------------------------------------------------------------

CopyOptions single_thread() {
  CopyOptions o;
  o.max_threads = 1;
  return o;
}

// Forces the pool and the chunked split even for tiny payloads.
CopyOptions threaded(std::size_t chunk_bytes = 4096) {
  CopyOptions o;
  o.max_threads = 2;
  o.parallel_min_bytes = 0;
  o.chunk_bytes = chunk_bytes;
  return o;
}

// splitmix64: fast enough to refill megabytes per round of the concurrency test.
void fill_random(std::vector<std::uint8_t>& bytes, std::uint32_t seed) {
  std::uint64_t state = seed;
  for (std::size_t i = 0; i < bytes.size(); i += 8) {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::memcpy(bytes.data() + i, &z, std::min<std::size_t>(8, bytes.size() - i));
  }
}

// A source and a destination buffer holding different random bytes, and spans laid out in
// them with gaps between, at the given (possibly odd) start offsets. Checking the whole
// destination catches both wrong bytes inside a span and writes outside every span.
struct Payload {
  std::vector<std::uint8_t> src;
  std::vector<std::uint8_t> dst;
  std::vector<CopySpan> spans;
  std::vector<std::uint8_t> expected;

  Payload(const std::vector<std::size_t>& sizes, std::size_t src_shift, std::size_t dst_shift,
          std::uint32_t seed, std::size_t gap = 3) {
    std::size_t total = 0;
    for (std::size_t n : sizes) total += n + gap;
    src.resize(total + src_shift + 64);
    dst.resize(total + dst_shift + 64);
    fill_random(src, seed);
    fill_random(dst, seed ^ 0x9e3779b9u);
    expected = dst;
    std::size_t s = src_shift;
    std::size_t d = dst_shift;
    // Destinations in reverse order of sources, so a copier that pairs the wrong src with a
    // dst (or copies by position instead of by span) is caught.
    std::vector<std::size_t> dst_offsets(sizes.size());
    std::size_t back = d;
    for (std::size_t i = sizes.size(); i-- > 0;) {
      dst_offsets[i] = back;
      back += sizes[i] + gap;
    }
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      spans.push_back({src.data() + s, dst.data() + dst_offsets[i], sizes[i]});
      if (sizes[i] != 0) std::memcpy(expected.data() + dst_offsets[i], src.data() + s, sizes[i]);
      s += sizes[i] + gap;
    }
  }

  bool exact() const { return dst == expected; }

  std::string first_difference() const {
    for (std::size_t i = 0; i < dst.size(); ++i) {
      if (dst[i] != expected[i]) {
        return "dst byte " + std::to_string(i) + " is " + std::to_string(dst[i]) +
               ", expected " + std::to_string(expected[i]);
      }
    }
    return "no difference";
  }
};

void check_copy(const std::vector<std::size_t>& sizes, const CopyOptions& opts,
                std::size_t src_shift, std::size_t dst_shift, std::uint32_t seed,
                const std::string& what) {
  Payload p(sizes, src_shift, dst_shift, seed);
  weightsync::core::copy_spans(p.spans, opts);
  EXPECT_MSG(p.exact(), what + " (threads " + std::to_string(opts.max_threads) + ", chunk " +
                           std::to_string(opts.chunk_bytes) + "): " + p.first_difference());
}

// Every case runs single-threaded, through the pool with small chunks, and through the pool
// with a threshold above the payload (the caller copies alone).
void check_copy_all_modes(const std::vector<std::size_t>& sizes, std::size_t src_shift,
                          std::size_t dst_shift, std::uint32_t seed, const std::string& what) {
  check_copy(sizes, single_thread(), src_shift, dst_shift, seed, what);
  check_copy(sizes, threaded(), src_shift, dst_shift, seed + 1, what);
  check_copy(sizes, threaded(64), src_shift, dst_shift, seed + 2, what);
  CopyOptions below = threaded();
  below.parallel_min_bytes = std::size_t{1} << 40;
  check_copy(sizes, below, src_shift, dst_shift, seed + 3, what);
}

void test_copy_no_spans() {
  for (const CopyOptions& opts : {single_thread(), threaded()}) {
    weightsync::core::copy_spans(nullptr, 0, opts);
    weightsync::core::copy_spans(std::vector<CopySpan>{}, opts);
  }
  EXPECT(true);  // reaching here without touching memory is the test
}

void test_copy_zero_byte_spans() {
  // Zero-byte spans may carry null pointers (empty tensors have none): nothing is touched.
  std::vector<CopySpan> nulls(5, CopySpan{nullptr, nullptr, 0});
  weightsync::core::copy_spans(nulls, single_thread());
  weightsync::core::copy_spans(nulls, threaded());
  check_copy_all_modes({0, 0, 0}, 0, 0, 11, "only zero-byte spans");
  check_copy_all_modes({0, 5, 0, 4096, 0, 0, 9000, 0}, 1, 2, 12,
                       "zero-byte spans between real ones");
}

void test_copy_one_byte() {
  check_copy_all_modes({1}, 0, 0, 21, "one 1-byte span");
  check_copy_all_modes({1}, 7, 3, 22, "one 1-byte span, unaligned");
}

void test_copy_odd_sizes() {
  check_copy_all_modes({3, 7, 13, 31, 127, 4093, 4097, 8191, 65537, 5}, 0, 0, 31,
                       "odd sizes");
}

void test_copy_unaligned() {
  const std::vector<std::size_t> sizes = {17, 4096, 100003, 64, 1};
  for (std::size_t s = 0; s < 8; ++s) {
    for (std::size_t d : {std::size_t{1}, std::size_t{3}, std::size_t{6}}) {
      check_copy_all_modes(sizes, s, d, 40 + static_cast<std::uint32_t>(s * 8 + d),
                           "unaligned src+" + std::to_string(s) + " dst+" + std::to_string(d));
    }
  }
}

// Each span loop the CPU has, directly, on every size up to 700 bytes (each loop's short-copy,
// unrolled, single-vector and overlapping-tail cases) and on a few larger ones, at shifted
// starts: exact bytes inside, nothing written around.
void test_span_loops_every_size() {
  using weightsync::core::SpanLoop;
  std::vector<std::size_t> sizes;
  for (std::size_t n = 0; n <= 700; ++n) sizes.push_back(n);
  for (std::size_t n : {4093, 4096, 4097, 65535, 65536}) sizes.push_back(n);
  int loops_run = 0;
  for (SpanLoop loop : {SpanLoop::kMemcpy, SpanLoop::kAvx, SpanLoop::kAvx512}) {
    std::vector<std::uint8_t> probe(1);
    if (!weightsync::core::copy_bytes_with(loop, probe.data(), probe.data(), 0)) continue;
    ++loops_run;
    for (std::size_t n : sizes) {
      for (std::size_t shift : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{33}}) {
        std::vector<std::uint8_t> src(n + 128), dst(n + 128);
        fill_random(src, static_cast<std::uint32_t>(n * 4 + shift));
        fill_random(dst, static_cast<std::uint32_t>(n * 4 + shift) ^ 0x5bd1e995u);
        std::vector<std::uint8_t> expected = dst;
        std::memcpy(expected.data() + 64, src.data() + shift, n);
        EXPECT(weightsync::core::copy_bytes_with(loop, dst.data() + 64, src.data() + shift, n));
        EXPECT_MSG(dst == expected, std::string(weightsync::core::span_loop_name(loop)) +
                                        ": " + std::to_string(n) + " bytes from offset " +
                                        std::to_string(shift));
      }
    }
  }
  EXPECT(loops_run >= 1);  // memcpy always runs
  const SpanLoop active = weightsync::core::active_span_loop();
  EXPECT(weightsync::core::copy_bytes_with(active, nullptr, nullptr, 0));  // it runs here
}

void test_copy_many_small_spans() {
  std::mt19937 rng(51);
  std::vector<std::size_t> sizes(10000);
  for (auto& n : sizes) n = 1 + rng() % 64;
  check_copy_all_modes(sizes, 1, 0, 52, "10,000 small spans");
}

void test_copy_span_larger_than_chunk() {
  // One span hundreds of chunks long, ending mid-chunk.
  check_copy_all_modes({(std::size_t{1} << 20) + 13}, 0, 0, 61, "one 1 MiB + 13 span");
  check_copy_all_modes({5, (std::size_t{3} << 20) + 1, 7}, 3, 5, 62,
                       "small, huge, small spans");
}

void test_copy_straddling_chunks() {
  // With 4096-byte chunks: spans that together cross chunk boundaries, spans of exactly one
  // chunk and one byte either side, and a group filling up mid-span.
  check_copy_all_modes({3000, 3000, 3000, 3000, 3000}, 0, 0, 71, "3000-byte spans");
  check_copy_all_modes({4095, 4096, 4097, 1, 4095, 2, 8192, 8193}, 1, 1, 72,
                       "spans around the chunk size");
  check_copy_all_modes({100, 4000, 4000, 10000, 96, 4096 * 3 - 1}, 2, 5, 73,
                       "groups closing mid-span");
  // Chunks of 1 byte: every span is split down to single bytes.
  check_copy({1, 2, 3, 300}, threaded(1), 0, 0, 74, "1-byte chunks");
}

void test_copy_more_threads_than_pool() {
  // The pool is sized by the first threaded call; a later call asking for more threads must
  // still copy everything.
  CopyOptions wide = threaded();
  wide.max_threads = 16;
  check_copy({100000, 3, 50000}, wide, 1, 2, 81, "16 threads requested");
}

void test_copy_concurrent_callers() {
  // Two threads copy at once: one of them finds the pool busy (its try-lock fails) and copies
  // on its own; both results must be exact. Payloads are large enough that calls overlap.
  std::atomic<int> ready{0};
  std::atomic<int> failures{0};
  auto caller = [&](std::uint32_t seed) {
    std::vector<std::size_t> sizes = {(std::size_t{1} << 20) + 7, 4097, 1, 3000, 65536};
    ++ready;
    while (ready.load() < 2) {
    }
    for (int round = 0; round < 40; ++round) {
      Payload p(sizes, seed % 4, (seed + round) % 5, seed + static_cast<std::uint32_t>(round));
      weightsync::core::copy_spans(p.spans, threaded());
      if (!p.exact()) ++failures;
    }
  };
  std::thread a(caller, 1000u);
  std::thread b(caller, 2000u);
  a.join();
  b.join();
  EXPECT_MSG(failures.load() == 0,
            std::to_string(failures.load()) + " concurrent copies were not exact");
}

void test_copy_waits_for_helpers() {
  // Big chunks, so a helper still copies one when the caller runs out of chunks to claim:
  // copy_spans must not return before the helper is done. The last chunk (two spans of
  // chunk - 1 bytes, grouped) is twice as long as the others, so whoever claims it finishes
  // well after the other thread.
  const std::size_t chunk = std::size_t{2} << 20;
  std::vector<std::size_t> sizes(6, chunk);
  sizes.push_back(chunk - 1);
  sizes.push_back(chunk - 1);
  int inexact = 0;
  Payload p(sizes, 0, 0, 300, 0);
  const std::vector<std::uint8_t> original = p.dst;
  for (int round = 0; round < 50; ++round) {
    std::memcpy(p.dst.data(), original.data(), original.size());
    weightsync::core::copy_spans(p.spans, threaded(chunk));
    // memcpy writes forwards, so the last byte of each span is the last to land; looking at
    // those first catches a copy still in flight before a full comparison would.
    bool tails_ok = true;
    for (const CopySpan& sp : p.spans) {
      const auto* d = static_cast<const std::uint8_t*>(sp.dst);
      const auto* s = static_cast<const std::uint8_t*>(sp.src);
      tails_ok = tails_ok && d[sp.nbytes - 1] == s[sp.nbytes - 1];
    }
    if (!tails_ok || !p.exact()) ++inexact;
  }
  EXPECT_MSG(inexact == 0, std::to_string(inexact) + " of 50 copies were still incomplete when "
                                                     "copy_spans returned");
}

// wake_copy_helpers is only a heads-up: whether the helpers are parked, spinning or have no
// pool at all, the copies that follow are exact, and a single-thread caller starts no pool.
void test_wake_helpers_then_copy() {
  weightsync::core::wake_copy_helpers(single_thread());
  for (int round = 0; round < 3; ++round) {
    // Long enough for the helpers to park after the previous copy (they spin for spin_us).
    std::this_thread::sleep_for(std::chrono::milliseconds(round == 0 ? 0 : 5));
    weightsync::core::wake_copy_helpers(threaded());
    weightsync::core::wake_copy_helpers(threaded());  // twice: the second finds them awake
    check_copy_all_modes({300000, 5, 70000, 1 << 20}, 3, 1, 700 + round,
                         "copy after wake, round " + std::to_string(round));
  }
}

void test_copy_chunk_bytes_zero() {
  // A zero chunk size is meaningless; it must still copy (and not loop forever).
  check_copy({10, 5000}, threaded(0), 0, 0, 91, "chunk_bytes = 0");
}

// ---- all_of ----------------------------------------------------------------------------------

// Items are flags; the check also counts, per item, how often it was looked at.
struct Flags {
  std::vector<std::uint8_t> ok;
  std::vector<std::atomic<int>> seen;
  explicit Flags(std::size_t n) : ok(n, 1), seen(n) {}
  static bool check(const void* self, std::size_t begin, std::size_t end) {
    auto* f = static_cast<Flags*>(const_cast<void*>(self));
    bool all = true;
    for (std::size_t i = begin; i < end; ++i) {
      f->seen[i].fetch_add(1);
      all = all && f->ok[i] != 0;
    }
    return all;
  }
};

void test_all_of_empty_and_small() {
  Flags none(0);
  EXPECT(weightsync::core::all_of(0, 8, Flags::check, &none, true, threaded()));
  Flags few(5);
  EXPECT(weightsync::core::all_of(5, 8, Flags::check, &few, true, threaded()));
  few.ok[4] = 0;
  EXPECT(!weightsync::core::all_of(5, 8, Flags::check, &few, true, threaded()));
  EXPECT(!weightsync::core::all_of(5, 0, Flags::check, &few, false, single_thread()));  // grain 0
}

void test_all_of_visits_every_item_once_when_all_pass() {
  for (bool parallel : {false, true}) {
    for (std::size_t n : {std::size_t{1}, std::size_t{255}, std::size_t{256}, std::size_t{257},
                          std::size_t{10000}}) {
      Flags f(n);
      EXPECT(weightsync::core::all_of(n, 256, Flags::check, &f, parallel, threaded()));
      EXPECT(std::all_of(f.seen.begin(), f.seen.end(), [](const auto& c) { return c.load() == 1; }));
    }
  }
}

void test_all_of_finds_one_failure_anywhere() {
  const std::size_t n = 4096;
  for (std::size_t bad : {std::size_t{0}, std::size_t{1000}, n - 1}) {
    for (bool parallel : {false, true}) {
      Flags f(n);
      f.ok[bad] = 0;
      EXPECT(!weightsync::core::all_of(n, 64, Flags::check, &f, parallel, threaded()));
      EXPECT(f.seen[bad].load() == 1);
    }
  }
}

// ---- helpers: the copier's own pool or another team ------------------------------------------

void test_helper_choice_switches_and_backs_off() {
  using weightsync::core::HelperChoice;
  constexpr std::int64_t us = 1000;
  constexpr std::int64_t ms = 1000 * us;
  constexpr std::int64_t first = HelperChoice::kFirstBackoffNs;
  HelperChoice c;
  EXPECT(!c.use_team(0));  // the pool first
  c.after_pool(true);
  EXPECT(!c.use_team(0));  // the helpers kept up: stay
  c.after_pool(false);
  EXPECT(c.use_team(0));  // the helpers fell behind: the other team next
  // Short end-of-region waits keep the team: under 50 us, or under half the caller's work.
  c.after_team(1 * ms, 100 * us, 40 * us);
  c.after_team(1 * ms, 1000 * us, 400 * us);
  EXPECT(c.use_team(1 * ms));
  EXPECT(c.backoff_ns() == first);
  // One long wait is forgiven (a stray preemption); a short one resets the count.
  c.after_team(2 * ms, 100 * us, 60 * us);
  EXPECT(c.use_team(2 * ms));
  c.after_team(2 * ms, 100 * us, 10 * us);
  c.after_team(3 * ms, 100 * us, 60 * us);
  EXPECT(c.use_team(3 * ms));
  // Two in a row send the jobs back to the pool, and the team is not tried again before the
  // back-off ends, whatever the pool does meanwhile.
  const std::int64_t t = 10 * ms;
  c.after_team(t, 100 * us, 60 * us);
  EXPECT(!c.use_team(t));
  c.after_pool(false);
  EXPECT(!c.use_team(t + first - 1));
  EXPECT(c.use_team(t + first));
  EXPECT(c.backoff_ns() == 2 * first);
  // Only a run of good regions brings the back-off down again.
  for (int i = 1; i < HelperChoice::kGoodRegionsToReset; ++i) {
    c.after_team(t + first, 100 * us, 10 * us);
  }
  EXPECT(c.backoff_ns() == 2 * first);
  c.after_team(t + first, 100 * us, 10 * us);
  EXPECT(c.backoff_ns() == first);
  // Repeated pairs of long waits double the back-off up to its cap.
  std::int64_t now = t + first;
  for (int i = 0; i < 20; ++i) {
    c.after_pool(false);
    now += c.backoff_ns();
    EXPECT(c.use_team(now));
    c.after_team(now, 10 * us, 5 * ms);
    c.after_team(now, 10 * us, 5 * ms);
    EXPECT(!c.use_team(now));
  }
  EXPECT(c.backoff_ns() == HelperChoice::kMaxBackoffNs);
}

// A team like torch's pool: participant 0 on the calling thread, the others on threads of
// their own, returning when all are done.
std::atomic<int> g_team_calls{0};

void fake_team(std::size_t participants, weightsync::core::TeamBody body, void* context) {
  ++g_team_calls;
  std::vector<std::thread> others;
  for (std::size_t p = 1; p < participants; ++p) others.emplace_back(body, context, p);
  body(context, 0);
  for (auto& t : others) t.join();
}

void test_team_copies_exactly() {
  // Exact copies and checks whoever the helpers are. Run again by ctest with
  // WEIGHTSYNC_HELPERS=torch, where every threaded job must go to the registered team, and
  // with WEIGHTSYNC_HELPERS=own, where none may.
  using weightsync::core::Helpers;
  weightsync::core::set_team_runner(&fake_team);
  g_team_calls = 0;
  check_copy({100000, 3, 50000, 4096 * 5 + 1}, threaded(), 1, 2, 91, "team copy");
  check_copy_all_modes({3000, 4095, 4096, 4097, 1, 8193}, 1, 1, 92, "team copy, all modes");
  Flags f(10000);
  EXPECT(weightsync::core::all_of(10000, 256, Flags::check, &f, true, threaded()));
  EXPECT(std::all_of(f.seen.begin(), f.seen.end(), [](const auto& c) { return c.load() == 1; }));
  Flags g(4096);
  g.ok[4000] = 0;
  EXPECT(!weightsync::core::all_of(4096, 64, Flags::check, &g, true, threaded()));
  if (weightsync::core::active_helpers() == Helpers::kTorch) EXPECT(g_team_calls.load() >= 4);
  if (weightsync::core::active_helpers() == Helpers::kOwn) EXPECT(g_team_calls.load() == 0);
  // A thread other than the main one never uses the team.
  const int before = g_team_calls.load();
  std::thread([] { check_copy({100000, 50000}, threaded(), 0, 0, 93, "off the main thread"); })
      .join();
  EXPECT(g_team_calls.load() == before);
  weightsync::core::set_team_runner(nullptr);
}

// ---- find_overlap ----------------------------------------------------------------------------

constexpr int kDst = 0;
constexpr int kSrc = 1;

ByteRange dst(std::uintptr_t b, std::uintptr_t e, std::size_t i) { return {b, e, i, kDst}; }
ByteRange src(std::uintptr_t b, std::uintptr_t e, std::size_t i) { return {b, e, i, kSrc}; }

bool overlaps(const ByteRange& a, const ByteRange& b) {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

bool conflicts(const ByteRange& a, const ByteRange& b) {
  return overlaps(a, b) && (a.group == kDst || b.group == kDst);
}

// The reported pair must be two of the inputs that really conflict.
bool pair_is(const std::optional<std::pair<ByteRange, ByteRange>>& hit, int group_a,
             std::size_t index_a, int group_b, std::size_t index_b) {
  if (!hit) return false;
  const auto& [x, y] = *hit;
  const bool same = x.group == group_a && x.index == index_a && y.group == group_b &&
                    y.index == index_b;
  const bool swapped = x.group == group_b && x.index == index_b && y.group == group_a &&
                       y.index == index_a;
  return (same || swapped) && conflicts(x, y);
}

void test_overlap_disjoint() {
  using weightsync::core::find_overlap;
  EXPECT(!find_overlap({}, kDst));
  EXPECT(!find_overlap({dst(100, 200, 0)}, kDst));
  EXPECT(!find_overlap({dst(100, 200, 0), src(300, 400, 0), dst(500, 600, 1), src(0, 50, 1)},
                      kDst));
}

void test_overlap_touching() {
  using weightsync::core::find_overlap;
  // end == begin is adjacency, not overlap.
  EXPECT(!find_overlap({dst(100, 200, 0), src(200, 300, 0)}, kDst));
  EXPECT(!find_overlap({src(100, 200, 0), dst(200, 300, 0)}, kDst));
  EXPECT(!find_overlap({dst(100, 200, 0), dst(200, 300, 1), dst(300, 301, 2)}, kDst));
  // One byte of overlap is found.
  EXPECT(pair_is(find_overlap({dst(100, 201, 0), dst(200, 300, 1)}, kDst), kDst, 0, kDst, 1));
}

void test_overlap_dst_dst() {
  using weightsync::core::find_overlap;
  EXPECT(pair_is(find_overlap({dst(100, 200, 0), src(1000, 1100, 0), dst(150, 250, 1),
                              src(2000, 2100, 1)},
                             kDst),
                kDst, 0, kDst, 1));
  // Identical ranges.
  EXPECT(pair_is(find_overlap({dst(100, 200, 3), dst(100, 200, 7)}, kDst), kDst, 3, kDst, 7));
}

void test_overlap_dst_src() {
  using weightsync::core::find_overlap;
  // Source after the destination in address order, and before it.
  EXPECT(pair_is(find_overlap({dst(100, 200, 0), src(199, 300, 3)}, kDst), kDst, 0, kSrc, 3));
  EXPECT(pair_is(find_overlap({dst(100, 200, 2), src(50, 101, 5)}, kDst), kDst, 2, kSrc, 5));
  // A copy onto itself.
  EXPECT(pair_is(find_overlap({dst(100, 200, 4), src(100, 200, 4)}, kDst), kDst, 4, kSrc, 4));
}

void test_overlap_src_src_ignored() {
  using weightsync::core::find_overlap;
  EXPECT(!find_overlap({src(100, 200, 0), src(100, 200, 1), src(150, 250, 2), dst(0, 100, 0),
                       dst(250, 300, 1), dst(300, 310, 2)},
                      kDst));
  // A source nested in another source after a destination: reads compare against the
  // furthest-reaching destination only.
  EXPECT(!find_overlap({dst(0, 100, 0), src(200, 5000, 1), src(300, 400, 2)}, kDst));
  // The group argument decides which side is written.
  EXPECT(!find_overlap({dst(100, 200, 0), dst(150, 250, 1)}, kSrc));
  EXPECT(find_overlap({src(100, 200, 0), src(150, 250, 1)}, kSrc).has_value());
}

void test_overlap_empty_ignored() {
  using weightsync::core::find_overlap;
  EXPECT(!find_overlap({src(100, 200, 0), dst(150, 150, 1)}, kDst));
  EXPECT(!find_overlap({dst(100, 200, 0), dst(100, 100, 1), dst(150, 150, 2)}, kDst));
  EXPECT(!find_overlap({dst(0, 0, 0), dst(0, 0, 1), src(0, 0, 0)}, kDst));
}

void test_overlap_nested() {
  using weightsync::core::find_overlap;
  EXPECT(pair_is(find_overlap({src(100, 1000, 0), dst(500, 600, 1)}, kDst), kSrc, 0, kDst, 1));
  EXPECT(pair_is(find_overlap({dst(100, 1000, 0), src(500, 600, 1)}, kDst), kDst, 0, kSrc, 1));
  // The outer range is not the neighbour of the inner one in address order: a sweep that
  // only compares neighbours misses this.
  EXPECT(pair_is(find_overlap({src(0, 1000, 0), src(10, 20, 1), dst(500, 600, 2)}, kDst), kSrc,
                0, kDst, 2));
  EXPECT(pair_is(find_overlap({dst(0, 1000, 0), dst(10, 20, 1)}, kDst), kDst, 0, kDst, 1));
}

void test_overlap_matches_brute_force() {
  // Random inputs against the quadratic definition; input order must not matter.
  std::mt19937 rng(101);
  int mismatches = 0;
  int wrong_pairs = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const std::size_t n = 1 + rng() % 12;
    std::vector<ByteRange> ranges;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uintptr_t b = rng() % 400;
      const std::uintptr_t len = rng() % 4 == 0 ? 0 : 1 + rng() % 60;
      ranges.push_back({b, b + len, i, static_cast<int>(rng() % 2)});
    }
    bool expected = false;
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t j = i + 1; j < n; ++j) expected = expected || conflicts(ranges[i], ranges[j]);
    }
    const auto hit = weightsync::core::find_overlap(ranges, kDst);
    if (hit.has_value() != expected) ++mismatches;
    if (hit && !conflicts(hit->first, hit->second)) ++wrong_pairs;
  }
  EXPECT_MSG(mismatches == 0, std::to_string(mismatches) + " of 2000 random inputs disagree "
                                                          "with the brute-force answer");
  EXPECT_MSG(wrong_pairs == 0, std::to_string(wrong_pairs) + " reported pairs do not conflict");
}

// ---- align_up --------------------------------------------------------------------------------

void test_align_up() {
  using weightsync::core::align_up;
  static_assert(align_up(13, 8) == 16, "align_up must be usable in constant expressions");
  EXPECT(align_up(0, 8) == 0);
  EXPECT(align_up(1, 8) == 8);
  EXPECT(align_up(8, 8) == 8);
  EXPECT(align_up(9, 8) == 16);
  EXPECT(align_up(7, 1) == 7);
  EXPECT(align_up(4095, 4096) == 4096);
  EXPECT(align_up(4097, 4096) == 8192);
  EXPECT(align_up(std::size_t{1} << 40, 64) == std::size_t{1} << 40);
  EXPECT(align_up((std::size_t{1} << 40) + 1, 64) == (std::size_t{1} << 40) + 64);
}

// ---- futex -----------------------------------------------------------------------------------

void test_futex_timeout() {
  alignas(4) std::int32_t word = 0;
  const auto start = Clock::now();
  const bool woke = weightsync::core::futex_wait(&word, 0, 0.2);
  const double elapsed = seconds_since(start);
  EXPECT_MSG(!woke, "futex_wait returned true with nobody writing");
  EXPECT_MSG(elapsed >= 0.19, "futex_wait(0.2 s) returned after " + std::to_string(elapsed) + " s");
  EXPECT_MSG(elapsed < 5.0, "futex_wait(0.2 s) returned after " + std::to_string(elapsed) + " s");

  const auto zero = Clock::now();
  EXPECT(!weightsync::core::futex_wait(&word, 0, 0.0));
  EXPECT(seconds_since(zero) < 1.0);
}

void test_futex_value_change_and_wake() {
  alignas(4) std::int32_t word = 0;
  auto* atomic_word = reinterpret_cast<std::atomic<std::int32_t>*>(&word);
  bool woke = false;
  double waited = 0.0;
  std::thread waiter([&] {
    const auto start = Clock::now();
    woke = weightsync::core::futex_wait(&word, 0, 10.0);
    waited = seconds_since(start);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  atomic_word->store(1, std::memory_order_release);
  const int woken = weightsync::core::futex_wake(&word, 1);
  waiter.join();
  EXPECT_MSG(woke, "futex_wait did not report the change");
  EXPECT_MSG(waited < 5.0, "futex_wait took " + std::to_string(waited) + " s to notice a wake");
  EXPECT(woken == 0 || woken == 1);
}

void test_futex_wake_without_change() {
  // A wake alone (the word still holds the expected value) ends the wait too.
  alignas(4) std::int32_t word = 7;
  std::atomic<bool> done{false};
  bool woke = false;
  std::thread waiter([&] {
    woke = weightsync::core::futex_wait(&word, 7, 10.0);
    done = true;
  });
  const auto start = Clock::now();
  int woken = 0;
  // The waiter may not be asleep yet; wake until it has been.
  while (woken == 0 && seconds_since(start) < 5.0) {
    woken = weightsync::core::futex_wake(&word, 1);
    if (woken == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  waiter.join();
  EXPECT_MSG(woken == 1, "futex_wake never found the waiter");
  EXPECT_MSG(woke, "futex_wait returned false after a wake");
  EXPECT(done.load());
}

void test_futex_spin_then_sleep() {
  // A spin shorter than the timeout: a change during the spin is seen; none, and the wait
  // still ends at the timeout (the spin never extends it).
  alignas(4) std::int32_t word = 0;
  auto* atomic_word = reinterpret_cast<std::atomic<std::int32_t>*>(&word);
  bool woke = false;
  std::thread waiter([&] { woke = weightsync::core::futex_wait(&word, 0, 10.0, 2.0); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  atomic_word->store(1, std::memory_order_release);  // no wake: only the spin can see it
  waiter.join();
  EXPECT_MSG(woke, "futex_wait did not see a change during its spin");

  word = 0;
  const auto start = Clock::now();
  EXPECT(!weightsync::core::futex_wait(&word, 0, 0.1, 5.0));
  const double elapsed = seconds_since(start);
  EXPECT_MSG(elapsed >= 0.09 && elapsed < 2.0,
             "futex_wait(0.1 s, spin 5 s) returned after " + std::to_string(elapsed) + " s");
}

void test_futex_already_different() {
  alignas(4) std::int32_t word = 5;
  const auto start = Clock::now();
  EXPECT(weightsync::core::futex_wait(&word, 4, 10.0));
  EXPECT(seconds_since(start) < 1.0);
}

void test_futex_no_waiters() {
  alignas(4) std::int32_t word = 0;
  EXPECT(weightsync::core::futex_wake(&word, 1) == 0);
  EXPECT(weightsync::core::futex_wake(&word, 0) == 0);
}

void test_futex_across_processes() {
  // The word lives in a shared mapping and the waiter is another process: only a non-private
  // futex reaches it.
  void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  EXPECT(mem != MAP_FAILED);
  if (mem == MAP_FAILED) return;
  auto* word = static_cast<std::int32_t*>(mem);
  auto* atomic_word = reinterpret_cast<std::atomic<std::int32_t>*>(word);
  atomic_word->store(0);
  const pid_t child = fork();
  if (child == 0) {
    // Exit status: 0 woken by the change, 1 timed out.
    const bool woke = weightsync::core::futex_wait(word, 0, 10.0);
    _exit(woke && atomic_word->load() == 1 ? 0 : 1);
  }
  EXPECT(child > 0);
  if (child > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto start = Clock::now();
    atomic_word->store(1, std::memory_order_release);
    weightsync::core::futex_wake(word, 1);
    int status = 0;
    waitpid(child, &status, 0);
    EXPECT_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the child process was not woken through the shared word");
    EXPECT_MSG(seconds_since(start) < 5.0, "the child took more than 5 s to wake");
  }
  munmap(mem, 4096);
}

}  // namespace

// Runs every test, or only those named on the command line.
int main(int argc, char** argv) {
  const weightsync_test::Test tests[] = {
      {"copy_no_spans", test_copy_no_spans},
      {"copy_zero_byte_spans", test_copy_zero_byte_spans},
      {"copy_one_byte", test_copy_one_byte},
      {"copy_odd_sizes", test_copy_odd_sizes},
      {"copy_unaligned", test_copy_unaligned},
      {"span_loops_every_size", test_span_loops_every_size},
      {"copy_many_small_spans", test_copy_many_small_spans},
      {"copy_span_larger_than_chunk", test_copy_span_larger_than_chunk},
      {"copy_straddling_chunks", test_copy_straddling_chunks},
      {"copy_more_threads_than_pool", test_copy_more_threads_than_pool},
      {"copy_concurrent_callers", test_copy_concurrent_callers},
      {"copy_waits_for_helpers", test_copy_waits_for_helpers},
      {"copy_chunk_bytes_zero", test_copy_chunk_bytes_zero},
      {"wake_helpers_then_copy", test_wake_helpers_then_copy},
      {"all_of_empty_and_small", test_all_of_empty_and_small},
      {"all_of_visits_every_item_once_when_all_pass", test_all_of_visits_every_item_once_when_all_pass},
      {"all_of_finds_one_failure_anywhere", test_all_of_finds_one_failure_anywhere},
      {"helper_choice_switches_and_backs_off", test_helper_choice_switches_and_backs_off},
      {"team_copies_exactly", test_team_copies_exactly},
      {"overlap_disjoint", test_overlap_disjoint},
      {"overlap_touching", test_overlap_touching},
      {"overlap_dst_dst", test_overlap_dst_dst},
      {"overlap_dst_src", test_overlap_dst_src},
      {"overlap_src_src_ignored", test_overlap_src_src_ignored},
      {"overlap_empty_ignored", test_overlap_empty_ignored},
      {"overlap_nested", test_overlap_nested},
      {"overlap_matches_brute_force", test_overlap_matches_brute_force},
      {"align_up", test_align_up},
      {"futex_timeout", test_futex_timeout},
      {"futex_value_change_and_wake", test_futex_value_change_and_wake},
      {"futex_wake_without_change", test_futex_wake_without_change},
      {"futex_already_different", test_futex_already_different},
      {"futex_spin_then_sleep", test_futex_spin_then_sleep},
      {"futex_no_waiters", test_futex_no_waiters},
      {"futex_across_processes", test_futex_across_processes},
  };
  return weightsync_test::run_tests(tests, argc, argv);
}
