// Staging-buffer layout for host<->device moves. Torch-free and CUDA-free (plain C++), so the
// layout and bucket arithmetic is unit-testable on any machine.
//
// A host<->device move that cannot be one DMA in place is staged: its host bytes live at an
// offset of a pinned host buffer that mirrors a device buffer byte for byte. The pinned side
// is filled (or drained) on the CPU bucket by bucket, each bucket one DMA, so the CPU work on
// bucket k+1 overlaps the DMA of bucket k; the device side is scattered (or gathered) by one
// multi-tensor kernel launch.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "weightsync/core.h"

namespace weightsync::staging {

// The widest access of the copy kernel (uint4).
constexpr std::size_t kAlign = 16;

// The first offset at or after `cursor` that is congruent to `addr` modulo kAlign. Staging
// buffers are at least 256-byte aligned, so a segment placed this way shares the alignment of
// the tensor at the other end of the kernel's copy, which then runs on 16-byte words even for
// tensors at odd offsets.
constexpr std::size_t place(std::size_t cursor, std::uintptr_t addr) {
  return core::align_up(cursor, kAlign) + static_cast<std::size_t>(addr & (kAlign - 1));
}

// Host bytes [host, host + nbytes) staged at [offset, offset + nbytes).
struct Segment {
  std::uint8_t* host;
  std::size_t offset;
  std::size_t nbytes;
};

// Bucket size for CPU/DMA pipelining. Small enough that the part that cannot overlap (packing
// the first bucket, moving the last one: a few ms) is small against a large payload; at least
// twice the copier's threading threshold (when someone raises it), so each bucket's CPU copy
// still runs on all copier threads; 4 KiB-aligned so DMAs start on page boundaries of the
// pinned buffer.
inline std::size_t bucket_bytes(const core::CopyOptions& opts) {
  const std::size_t floor = std::size_t{16} << 20;
  return core::align_up(std::max(floor, 2 * opts.parallel_min_bytes), 4096);
}

// Number of buckets covering `nbytes`.
inline std::size_t bucket_count(std::size_t nbytes, std::size_t bucket) {
  return (nbytes + bucket - 1) / bucket;
}

// The spans that move the parts of `segments` inside staging bytes [begin, end) between the
// host and `staging` (to_staging: host -> staging). `segments` are sorted by offset and
// disjoint; call with consecutive windows, *next starting at 0: it is where the scan resumes,
// and a segment that crosses `end` is resumed in the next window.
inline void window_spans(const std::vector<Segment>& segments, std::size_t* next,
                         std::size_t begin, std::size_t end, std::uint8_t* staging,
                         bool to_staging, std::vector<core::CopySpan>* out) {
  out->clear();
  std::size_t i = *next;
  for (; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    if (s.offset >= end) break;
    const std::size_t stop = s.offset + s.nbytes;
    const std::size_t lo = std::max(s.offset, begin);
    const std::size_t hi = std::min(stop, end);
    if (hi > lo) {
      std::uint8_t* host = s.host + (lo - s.offset);
      std::uint8_t* stage = staging + lo;
      out->push_back(to_staging ? core::CopySpan{host, stage, hi - lo}
                                : core::CopySpan{stage, host, hi - lo});
    }
    if (stop > end) break;
  }
  *next = i;
}

// A host byte range [begin, end) of one move, `index` being the caller's move index.
struct Piece {
  std::uintptr_t begin;
  std::uintptr_t end;
  std::size_t index;
};

// Groups pieces (sorted by begin) into runs of host memory that one DMA can cover: a piece
// joins the current run when it starts at most `max_gap` bytes after the run's end
// (overlapping pieces always join). Returns [first, last) index ranges into `pieces`.
inline std::vector<std::pair<std::size_t, std::size_t>> group_runs(
    const std::vector<Piece>& pieces, std::size_t max_gap) {
  std::vector<std::pair<std::size_t, std::size_t>> runs;
  std::size_t first = 0;
  std::uintptr_t run_end = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    if (i > first && pieces[i].begin > run_end && pieces[i].begin - run_end > max_gap) {
      runs.emplace_back(first, i);
      first = i;
    }
    run_end = i == first ? pieces[i].end : std::max(run_end, pieces[i].end);
  }
  if (first < pieces.size()) runs.emplace_back(first, pieces.size());
  return runs;
}

}  // namespace weightsync::staging
