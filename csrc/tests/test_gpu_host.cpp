// Host tests of the CUDA path's torch-free logic: the chunk table and entry search of the
// multi-tensor copy kernel, its copy loops (one thread's share, run for every thread of a
// simulated block), the word width it picks per alignment, and the staging layout (placement,
// buckets, windows, DMA runs). Compiled by the host compiler without the CUDA toolkit
// (multi_tensor_copy.cuh compiles as plain C++ outside nvcc), so CI covers this arithmetic on
// machines without a GPU; the kernel launch itself is tested by tests/test_ops_gpu.py.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "check.h"

#include "cuda/multi_tensor_copy.cuh"
#include "cuda/staging.h"

namespace {

using weightsync::gpu::ChunkTable;
using weightsync::gpu::CopyEntry;
using weightsync::gpu::kChunkBytes;
using weightsync::staging::Piece;
using weightsync::staging::Segment;

using weightsync_test::g_current;
using weightsync_test::g_failures;
using weightsync_test::report;

// A byte pattern that differs at every position within a run and between seeds.
std::uint8_t pattern(std::size_t i, unsigned seed) {
  return static_cast<std::uint8_t>((i * 131 + seed * 29 + (i >> 8)) & 0xFF);
}

// A buffer with its usable bytes 64-byte aligned, so tests choose every misalignment.
struct Buffer {
  explicit Buffer(std::size_t n, unsigned seed = 0) : storage(n + 128) {
    for (std::size_t i = 0; i < storage.size(); ++i) storage[i] = pattern(i, seed);
    const auto at = reinterpret_cast<std::uintptr_t>(storage.data());
    base = storage.data() + ((64 - at % 64) % 64);
  }
  std::vector<std::uint8_t> storage;
  std::uint8_t* base;
};

// Runs one block's worth of copy_range on the host: every thread's share, in turn. The shares
// of a block are disjoint, so their order does not matter.
void copy_range_block(const std::uint8_t* src, std::uint8_t* dst, std::size_t len,
                      unsigned nthreads) {
  for (unsigned tid = 0; tid < nthreads; ++tid) {
    weightsync::gpu::copy_range(src, dst, len, tid, nthreads);
  }
}

// The kernel's loop over a grid of `grid` blocks of `nthreads`, on the host; counts how many
// times each chunk was visited.
std::vector<int> run_grid(const ChunkTable& table, unsigned grid, unsigned nthreads) {
  std::vector<int> visits(table.total_chunks(), 0);
  const auto count = static_cast<std::uint32_t>(table.entries().size());
  for (unsigned block = 0; block < grid; ++block) {
    for (std::uint64_t chunk = block; chunk < table.total_chunks(); chunk += grid) {
      ++visits[chunk];
      for (unsigned tid = 0; tid < nthreads; ++tid) {
        weightsync::gpu::copy_chunk(table.entries().data(), count, chunk, tid, nthreads);
      }
    }
  }
  return visits;
}

// ---- chunk table ---------------------------------------------------------------------------

void test_table_counts_chunks_and_drops_empty_moves() {
  std::uint8_t a = 0;
  std::uint8_t b = 0;
  ChunkTable table;
  EXPECT(table.empty() && table.total_chunks() == 0);
  table.add(&a, &b, 0);  // empty moves own no chunk
  EXPECT(table.empty());
  const std::size_t sizes[] = {1, kChunkBytes - 1, kChunkBytes, kChunkBytes + 1, 0,
                               3 * kChunkBytes, 3 * kChunkBytes + 17};
  const std::uint64_t chunks[] = {1, 1, 1, 2, 3, 4};
  for (std::size_t n : sizes) table.add(&a, &b, n);
  EXPECT(table.entries().size() == 6);
  std::uint64_t first = 0;
  for (std::size_t i = 0; i < table.entries().size(); ++i) {
    EXPECT_MSG(table.entries()[i].first_chunk == first,
               "entry " + std::to_string(i) + " starts at chunk " +
                   std::to_string(table.entries()[i].first_chunk));
    first += chunks[i];
  }
  EXPECT(table.total_chunks() == first && first == 12);
  table.clear();
  EXPECT(table.empty() && table.total_chunks() == 0);
}

void test_grid_size_caps_blocks() {
  using weightsync::gpu::grid_size;
  using weightsync::gpu::kMaxBlocks;
  EXPECT(grid_size(1) == 1);
  EXPECT(grid_size(kMaxBlocks - 1) == kMaxBlocks - 1);
  EXPECT(grid_size(kMaxBlocks) == kMaxBlocks);
  EXPECT(grid_size(std::uint64_t{1} << 40) == kMaxBlocks);
}

void test_find_entry_at_every_chunk() {
  // Entries of 1, 3, 1, 2 and 5 chunks (tails included): every chunk, boundaries first and
  // last, maps to its owner; so does the single-entry table.
  const std::size_t sizes[] = {10, 2 * kChunkBytes + 1, kChunkBytes, 2 * kChunkBytes,
                               5 * kChunkBytes - 3};
  std::uint8_t byte = 0;
  ChunkTable table;
  std::vector<std::uint32_t> owner;
  for (std::size_t i = 0; i < std::size(sizes); ++i) {
    table.add(&byte, &byte, sizes[i]);
    const std::uint64_t n = (sizes[i] + kChunkBytes - 1) / kChunkBytes;
    owner.insert(owner.end(), n, static_cast<std::uint32_t>(i));
  }
  EXPECT(owner.size() == table.total_chunks());
  const auto count = static_cast<std::uint32_t>(table.entries().size());
  for (std::uint64_t c = 0; c < table.total_chunks(); ++c) {
    const std::uint32_t got = weightsync::gpu::find_entry(table.entries().data(), count, c);
    EXPECT_MSG(got == owner[c], "chunk " + std::to_string(c) + ": entry " +
                                    std::to_string(got) + ", expected " +
                                    std::to_string(owner[c]));
  }
  ChunkTable one;
  one.add(&byte, &byte, 4 * kChunkBytes);
  for (std::uint64_t c = 0; c < 4; ++c) {
    EXPECT(weightsync::gpu::find_entry(one.entries().data(), 1, c) == 0);
  }
}

void test_find_entry_many_entries() {
  // The binary search over 10,000 entries of one to three chunks, as a large call builds.
  std::uint8_t byte = 0;
  ChunkTable table;
  for (int i = 0; i < 10'000; ++i) table.add(&byte, &byte, 1 + (i % 7) * (kChunkBytes / 3));
  const auto count = static_cast<std::uint32_t>(table.entries().size());
  std::uint32_t expected = 0;
  for (std::uint64_t c = 0; c < table.total_chunks(); ++c) {
    while (expected + 1 < count && table.entries()[expected + 1].first_chunk <= c) ++expected;
    if (weightsync::gpu::find_entry(table.entries().data(), count, c) != expected) {
      report(__FILE__, __LINE__, "chunk " + std::to_string(c) + " maps to the wrong entry");
      return;
    }
  }
}

// ---- copy loops ----------------------------------------------------------------------------

void test_word_bytes_follows_relative_alignment() {
  using weightsync::gpu::word_bytes;
  Buffer buf(64);
  const std::uint8_t* p = buf.base;
  // Only the skew between the ends counts: both at the same odd offset still use 16 bytes.
  EXPECT(word_bytes(p, p + 32) == 16);
  EXPECT(word_bytes(p + 3, p + 35) == 16);
  EXPECT(word_bytes(p, p + 8) == 8);
  EXPECT(word_bytes(p + 1, p + 25) == 8);
  EXPECT(word_bytes(p, p + 4) == 4);
  EXPECT(word_bytes(p + 2, p + 14) == 4);
  EXPECT(word_bytes(p, p + 2) == 2);
  EXPECT(word_bytes(p + 5, p + 11) == 2);
  EXPECT(word_bytes(p, p + 1) == 1);
  EXPECT(word_bytes(p + 4, p + 19) == 1);
}

// Every pair of start offsets modulo 16 (every word width, with heads and tails) and lengths
// around the word and unroll sizes, for one thread, an odd count and a full block: exactly
// [0, len) is written, with the source's bytes.
void test_copy_range_every_alignment_and_length() {
  const std::size_t lengths[] = {0, 1, 2, 3, 7, 15, 16, 17, 31, 63, 64, 65, 255, 1000, 4099};
  const unsigned thread_counts[] = {1, 3, 256};
  Buffer src(4200, 1);
  for (unsigned nthreads : thread_counts) {
    for (std::size_t so = 0; so < 16; ++so) {
      for (std::size_t d_off = 0; d_off < 16; ++d_off) {
        for (std::size_t len : lengths) {
          Buffer dst(4200 + 32, 2);
          const std::vector<std::uint8_t> before = dst.storage;
          std::uint8_t* to = dst.base + 16 + d_off;
          copy_range_block(src.base + so, to, len, nthreads);
          const auto begin = static_cast<std::size_t>(to - dst.storage.data());
          bool ok = std::memcmp(to, src.base + so, len) == 0;
          for (std::size_t i = 0; ok && i < dst.storage.size(); ++i) {
            if ((i < begin || i >= begin + len) && dst.storage[i] != before[i]) ok = false;
          }
          if (!ok) {
            report(__FILE__, __LINE__,
                   "src offset " + std::to_string(so) + ", dst offset " + std::to_string(d_off) +
                       ", " + std::to_string(len) + " bytes, " + std::to_string(nthreads) +
                       " threads");
            return;
          }
        }
      }
    }
  }
}

void test_copy_words_head_and_tail() {
  // copy_words<Word16> on ends both 5 bytes past 16-byte alignment: an 11-byte head, whole
  // words, and a tail, for lengths that end inside the head, at a word edge and past it.
  Buffer src(256, 3);
  for (std::size_t len : {0, 5, 11, 12, 27, 43, 200}) {
    Buffer dst(256, 4);
    const std::vector<std::uint8_t> before = dst.storage;
    for (unsigned tid = 0; tid < 4; ++tid) {
      weightsync::gpu::copy_words<weightsync::gpu::Word16>(src.base + 5, dst.base + 5, len, tid,
                                                           4);
    }
    EXPECT_MSG(std::memcmp(dst.base + 5, src.base + 5, len) == 0,
               std::to_string(len) + " bytes differ");
    const auto begin = static_cast<std::size_t>(dst.base + 5 - dst.storage.data());
    for (std::size_t i = 0; i < dst.storage.size(); ++i) {
      if ((i < begin || i >= begin + len) && dst.storage[i] != before[i]) {
        report(__FILE__, __LINE__, std::to_string(len) + " bytes: byte outside written");
        break;
      }
    }
  }
}

void test_kernel_loop_covers_every_chunk_once() {
  // Entries with tails, one exactly a chunk, one byte, odd alignments; grids smaller than,
  // equal to and larger than the chunk count (the grid-stride loop).
  const std::size_t sizes[] = {3 * kChunkBytes + 5, 1, kChunkBytes, 2 * kChunkBytes - 7, 100};
  const std::size_t skews[] = {0, 1, 8, 3, 12};
  for (unsigned grid : {1u, 3u, 9u, 64u}) {
    std::vector<Buffer> srcs;
    std::vector<Buffer> dsts;
    ChunkTable table;
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      srcs.emplace_back(sizes[i] + 16, static_cast<unsigned>(10 + i));
      dsts.emplace_back(sizes[i] + 16, static_cast<unsigned>(20 + i));
    }
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      table.add(srcs[i].base + skews[i], dsts[i].base + (skews[i] * 5) % 16, sizes[i]);
    }
    const std::vector<int> visits = run_grid(table, grid, 32);
    EXPECT_MSG(std::all_of(visits.begin(), visits.end(), [](int v) { return v == 1; }),
               "grid " + std::to_string(grid) + ": a chunk was not copied exactly once");
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      EXPECT_MSG(std::memcmp(dsts[i].base + (skews[i] * 5) % 16, srcs[i].base + skews[i],
                             sizes[i]) == 0,
                 "grid " + std::to_string(grid) + ": entry " + std::to_string(i) + " differs");
    }
  }
}

// ---- staging layout ------------------------------------------------------------------------

void test_place_mirrors_alignment() {
  using weightsync::staging::kAlign;
  using weightsync::staging::place;
  for (std::size_t cursor : {0, 1, 15, 16, 17, 1000}) {
    for (std::uintptr_t addr : {0x1000u, 0x1001u, 0x100Fu, 0x1010u, 0x2007u}) {
      const std::size_t at = place(cursor, addr);
      EXPECT(at >= cursor);
      EXPECT(at < cursor + 2 * kAlign);
      EXPECT(at % kAlign == addr % kAlign);
    }
  }
  EXPECT(place(0, 0x1000) == 0);
  EXPECT(place(0, 0x1003) == 3);
  EXPECT(place(5, 0x1003) == 19);  // 5 rounds up to 16
  EXPECT(place(16, 0x100F) == 31);
}

void test_bucket_bytes_and_count() {
  using weightsync::staging::bucket_bytes;
  using weightsync::staging::bucket_count;
  weightsync::core::CopyOptions opts;
  opts.parallel_min_bytes = 256 << 10;
  EXPECT(bucket_bytes(opts) == std::size_t{16} << 20);  // the floor
  opts.parallel_min_bytes = std::size_t{20} << 20;
  EXPECT(bucket_bytes(opts) == std::size_t{40} << 20);  // twice the threading threshold
  opts.parallel_min_bytes = (std::size_t{10} << 20) + 1;
  EXPECT(bucket_bytes(opts) % 4096 == 0);
  EXPECT(bucket_bytes(opts) >= 2 * opts.parallel_min_bytes);
  EXPECT(bucket_bytes(opts) < 2 * opts.parallel_min_bytes + 4096);
  EXPECT(bucket_count(0, 4096) == 0);
  EXPECT(bucket_count(1, 4096) == 1);
  EXPECT(bucket_count(4096, 4096) == 1);
  EXPECT(bucket_count(4097, 4096) == 2);
  EXPECT(bucket_count(3 * 4096, 4096) == 3);
}

// Stages host segments through windows of `bucket` bytes and back; checks that each window's
// spans stay inside it and that every byte lands once, in both directions.
void check_windows(const std::vector<std::size_t>& sizes, std::size_t bucket) {
  std::vector<Buffer> hosts;
  std::vector<Segment> segments;
  std::size_t cursor = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) hosts.emplace_back(sizes[i] + 16, 40 + i);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::uint8_t* host = hosts[i].base + i % 16;
    const std::size_t at = weightsync::staging::place(cursor, reinterpret_cast<std::uintptr_t>(host));
    segments.push_back({host, at, sizes[i]});
    cursor = at + sizes[i];
  }
  std::vector<std::uint8_t> staging(cursor + 1, 0xEE);
  std::vector<int> written(cursor, 0);
  std::vector<weightsync::core::CopySpan> spans;
  std::size_t next = 0;
  for (std::size_t begin = 0; begin < cursor; begin += bucket) {
    const std::size_t end = std::min(begin + bucket, cursor);
    weightsync::staging::window_spans(segments, &next, begin, end, staging.data(), true, &spans);
    for (const auto& s : spans) {
      const auto lo = static_cast<std::size_t>(static_cast<std::uint8_t*>(s.dst) - staging.data());
      EXPECT_MSG(lo >= begin && lo + s.nbytes <= end, "a span leaves its window");
      std::memcpy(s.dst, s.src, s.nbytes);
      for (std::size_t k = lo; k < lo + s.nbytes && k < written.size(); ++k) ++written[k];
    }
  }
  EXPECT_MSG(next == segments.size(), "the scan did not reach the last segment");
  for (const Segment& s : segments) {
    EXPECT(std::memcmp(staging.data() + s.offset, s.host, s.nbytes) == 0);
    for (std::size_t k = s.offset; k < s.offset + s.nbytes; ++k) {
      if (written[k] != 1) {
        report(__FILE__, __LINE__, "staging byte " + std::to_string(k) + " written " +
                                       std::to_string(written[k]) + " times");
        return;
      }
    }
  }
  EXPECT(staging.back() == 0xEE);
  // Back to fresh host buffers (device -> host): the same windows, the other direction.
  std::vector<Buffer> outs;
  std::vector<Segment> back = segments;
  for (std::size_t i = 0; i < sizes.size(); ++i) outs.emplace_back(sizes[i] + 16, 90 + i);
  for (std::size_t i = 0; i < sizes.size(); ++i) back[i].host = outs[i].base + i % 16;
  next = 0;
  for (std::size_t begin = 0; begin < cursor; begin += bucket) {
    weightsync::staging::window_spans(back, &next, begin, std::min(begin + bucket, cursor),
                                      staging.data(), false, &spans);
    for (const auto& s : spans) std::memcpy(s.dst, s.src, s.nbytes);
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_MSG(std::memcmp(back[i].host, segments[i].host, sizes[i]) == 0,
               "segment " + std::to_string(i) + " did not come back");
  }
}

void test_window_spans_split_segments_at_bucket_edges() {
  check_windows({100, 5000, 1, 4096, 37, 9000}, 4096);  // segments straddle one or more edges
  check_windows({4096 - 7, 4096, 4096 + 7}, 4096);       // near-exact fits
  check_windows({3, 3, 3}, 4096);                        // one window holds everything
  check_windows({20000}, 1024);                          // one segment over many windows
}

void test_window_spans_empty_windows() {
  // A window with no segment in it (a gap of alignment padding) gives no spans.
  std::uint8_t host[64] = {};
  const std::vector<Segment> segments = {{host, 0, 8}, {host + 8, 40, 8}};
  std::uint8_t staging[64] = {};
  std::vector<weightsync::core::CopySpan> spans;
  std::size_t next = 0;
  weightsync::staging::window_spans(segments, &next, 0, 16, staging, true, &spans);
  EXPECT(spans.size() == 1 && spans[0].nbytes == 8);
  weightsync::staging::window_spans(segments, &next, 16, 32, staging, true, &spans);
  EXPECT(spans.empty());
  weightsync::staging::window_spans(segments, &next, 32, 48, staging, true, &spans);
  EXPECT(spans.size() == 1 && spans[0].dst == staging + 40);
  EXPECT(next == 2);
}

std::vector<std::pair<std::size_t, std::size_t>> runs_of(
    const std::vector<std::pair<std::uintptr_t, std::uintptr_t>>& ranges, std::size_t max_gap) {
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < ranges.size(); ++i) {
    pieces.push_back({ranges[i].first, ranges[i].second, i});
  }
  return weightsync::staging::group_runs(pieces, max_gap);
}

using Runs = std::vector<std::pair<std::size_t, std::size_t>>;

void test_group_runs_gaps_and_overlaps() {
  EXPECT(runs_of({}, 0).empty());
  EXPECT((runs_of({{100, 200}}, 0) == Runs{{0, 1}}));
  // Adjacent pieces join with no gap allowed; one byte apart splits them.
  EXPECT((runs_of({{0, 10}, {10, 20}, {21, 30}}, 0) == Runs{{0, 2}, {2, 3}}));
  // A gap of exactly max_gap joins; one more splits.
  EXPECT((runs_of({{0, 10}, {74, 80}}, 64) == Runs{{0, 2}}));
  EXPECT((runs_of({{0, 10}, {75, 80}}, 64) == Runs{{0, 1}, {1, 2}}));
  // Overlapping pieces always join, and a piece inside a longer one keeps the run's end.
  EXPECT((runs_of({{0, 100}, {50, 60}, {90, 120}}, 0) == Runs{{0, 3}}));
  EXPECT((runs_of({{0, 100}, {10, 20}, {100, 110}, {111, 112}}, 0) == Runs{{0, 3}, {3, 4}}));
  // Runs cover every piece, in order, without empty runs.
  const Runs many = runs_of({{0, 4}, {4, 8}, {100, 104}, {1000, 1004}, {1004, 1008}}, 16);
  EXPECT((many == Runs{{0, 2}, {2, 3}, {3, 5}}));
}

}  // namespace

// Runs every test, or only those named on the command line.
int main(int argc, char** argv) {
  const weightsync_test::Test tests[] = {
      {"table_counts_chunks_and_drops_empty_moves", test_table_counts_chunks_and_drops_empty_moves},
      {"grid_size_caps_blocks", test_grid_size_caps_blocks},
      {"find_entry_at_every_chunk", test_find_entry_at_every_chunk},
      {"find_entry_many_entries", test_find_entry_many_entries},
      {"word_bytes_follows_relative_alignment", test_word_bytes_follows_relative_alignment},
      {"copy_range_every_alignment_and_length", test_copy_range_every_alignment_and_length},
      {"copy_words_head_and_tail", test_copy_words_head_and_tail},
      {"kernel_loop_covers_every_chunk_once", test_kernel_loop_covers_every_chunk_once},
      {"place_mirrors_alignment", test_place_mirrors_alignment},
      {"bucket_bytes_and_count", test_bucket_bytes_and_count},
      {"window_spans_split_segments_at_bucket_edges",
       test_window_spans_split_segments_at_bucket_edges},
      {"window_spans_empty_windows", test_window_spans_empty_windows},
      {"group_runs_gaps_and_overlaps", test_group_runs_gaps_and_overlaps},
  };
  return weightsync_test::run_tests(tests, argc, argv);
}
