// CUDA kernels of batched_copy_, pack_ and unpack_.
//
// The dispatcher sends here every call whose lists hold at least one CUDA tensor, so one call
// may mix host<->host, host->device, device->host, same-device and cross-device pairs. Each op
// validates (engine.h), then splits its contiguous byte moves into a Plan: per CUDA device one
// DeviceWork, plus a PeerStaging per device pair without peer access. Plan::prepare allocates
// every buffer before Plan::run moves the first byte, so a call that fails on allocation
// changes nothing. Non-contiguous tensors, and pairs whose math bits differ (engine.h), go
// last through at::Tensor::copy_, as on the host.
//
// One launch per device: a device's same-device copies, its copies to peers it can access,
// the scatter of its staged host->device bytes and the gather of its device->host bytes are
// one chunk table, hence one kernel launch per device per call, whatever the tensor count.
// Per device and call the stream sees: the host->device DMAs (one per bucket of pinned
// staging, one per page-locked run), the launch, then the device->host DMAs.
//
// Streams and waits (what torch's copy_ does, pair by pair):
// - Work on a device runs on that device's current stream, under a device guard.
// - Device to device: ordered on the current streams, never waits on the host.
// - Host to device: pageable host bytes are copied into pinned staging during the call, so the
//   caller may reuse them as soon as it returns. non_blocking=False then also waits for each
//   destination device's current stream (copy_ does); non_blocking=True does not. Page-locked
//   host memory (a large pinned source, a registered flat) is DMA'd in place and, as with
//   copy_(non_blocking=True), must not be overwritten before the stream has passed the copy.
// - Device to host: complete when the call returns, whatever non_blocking says, because staged
//   bytes are scattered on the host. The wait is on events recorded after this call's own
//   DMAs, never a device synchronize.

// torch's allocator and event headers align members to
// std::hardware_destructive_interference_size, which GCC >= 12 flags in every includer.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Winterference-size"
#endif

#include <ATen/ATen.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/PeerToPeerAccess.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "../engine.h"
#include "multi_tensor_copy.cuh"
#include "staging.h"

namespace weightsync {
namespace {

using c10::DeviceIndex;
using c10::cuda::CUDAEvent;
using c10::cuda::CUDAStream;

constexpr DeviceIndex kHost = -1;

// A page-locked host tensor at least this large is DMA'd in place instead of through pinned
// staging: the host memcpy it saves (tens of us) outweighs one more DMA call (a few us), and
// smaller tensors are not worth the page-lock query.
constexpr std::size_t kDirectMinBytes = std::size_t{256} << 10;

// unpack_ from a page-locked flat: segments at most this far apart share one DMA, the gap
// included. Reading 64 KiB more costs about what a separate DMA call does, and reads of the
// gap change nothing.
constexpr std::size_t kReadGapBytes = std::size_t{64} << 10;

// pack_ into a page-locked flat: only exactly adjacent segments share a DMA, because a gap may
// hold bytes this call must not touch. Runs below this size go through staging instead: for
// them one DMA call costs more than the host copy of their bytes.
constexpr std::size_t kDirectMinRunBytes = std::size_t{16} << 10;

// One contiguous byte move between two places, each host memory (kHost) or a CUDA device.
struct Move {
  const std::uint8_t* src;
  std::uint8_t* dst;
  std::size_t nbytes;
  DeviceIndex src_dev;
  DeviceIndex dst_dev;
};

DeviceIndex location_of(const at::Tensor& t) { return t.is_cuda() ? t.device().index() : kHost; }

std::uint8_t* bytes_of(const at::Tensor& t) { return static_cast<std::uint8_t*>(t.data_ptr()); }

std::uintptr_t address(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The allocation behind some host bytes. When torch's caching host allocator handed it out,
// record_event keeps the block from being reused before the DMAs of this call have run;
// for any other allocation the call is a no-op.
struct HostOwner {
  void* base = nullptr;
  void* ctx = nullptr;
};

HostOwner owner_of(const at::Tensor& t) {
  const c10::DataPtr& p = t.storage().data_ptr();
  return {p.get(), p.get_context()};
}

void keep_until_done(const HostOwner& owner, const CUDAStream& stream) {
  if (owner.base == nullptr) return;
  at::getHostAllocator(at::kCUDA)->record_event(owner.base, owner.ctx, stream.unwrap());
}

at::Tensor pinned_bytes(std::size_t n) {
  return at::empty({static_cast<std::int64_t>(n)},
                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
}

at::Tensor device_bytes(std::size_t n, DeviceIndex device) {
  return at::empty({static_cast<std::int64_t>(n)},
                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
}

bool is_page_locked(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    // Not an error for our purpose (old drivers report plain host memory this way); clear
    // it so a later launch check does not pick it up.
    (void)cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}

// Both ends, so a flat only partly inside a registered range is not taken for pinned. (A
// wrong guess would only cost speed: cudaMemcpyAsync is correct on pageable memory too.)
bool flat_is_page_locked(const at::Tensor& flat) {
  if (!flat.is_cpu() || flat.numel() == 0) return false;
  const std::uint8_t* p = bytes_of(flat);
  return is_page_locked(p) && is_page_locked(p + flat.numel() - 1);
}

// One multi-tensor copy kernel on one device. prepare() allocates (and fills the pinned copy
// of a table too large to be the kernel parameter); enqueue() uploads it and launches.
class Launch {
 public:
  void prepare(const gpu::ChunkTable& table, DeviceIndex device) {
    count_ = static_cast<std::uint32_t>(table.entries().size());
    total_chunks_ = table.total_chunks();
    if (count_ == 0) return;
    if (count_ <= gpu::kInlineEntries) {
      inline_ = std::make_unique<gpu::InlineTable>();
      std::copy(table.entries().begin(), table.entries().end(), inline_->entries);
      inline_->total_chunks = total_chunks_;
      inline_->count = count_;
      return;
    }
    const std::size_t bytes = table.entries().size() * sizeof(gpu::CopyEntry);
    host_table_ = pinned_bytes(bytes);
    std::memcpy(host_table_.data_ptr(), table.entries().data(), bytes);
    c10::cuda::CUDAGuard guard(device);
    device_table_ = device_bytes(bytes, device);
  }

  // The caller holds a guard for the stream's device.
  void enqueue(const CUDAStream& stream) {
    if (count_ == 0) return;
    const unsigned grid = gpu::grid_size(total_chunks_);
    if (inline_) {
      gpu::multi_tensor_copy_kernel<gpu::InlineTable>
          <<<grid, gpu::kThreads, 0, stream.stream()>>>(*inline_);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(device_table_.data_ptr(), host_table_.data_ptr(),
                                   static_cast<std::size_t>(host_table_.numel()),
                                   cudaMemcpyHostToDevice, stream.stream()));
    keep_until_done(owner_of(host_table_), stream);
    const gpu::TableRef ref{static_cast<const gpu::CopyEntry*>(device_table_.data_ptr()),
                            total_chunks_, count_};
    gpu::multi_tensor_copy_kernel<gpu::TableRef>
        <<<grid, gpu::kThreads, 0, stream.stream()>>>(ref);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  std::uint32_t count_ = 0;
  std::uint64_t total_chunks_ = 0;
  std::unique_ptr<gpu::InlineTable> inline_;
  at::Tensor host_table_;
  at::Tensor device_table_;
};

// A page-locked host range moved by one DMA: straight to or from its only tensor (direct), or
// to or from a region of the device staging buffer that the kernel scatters or gathers.
struct HostRun {
  std::uint8_t* host = nullptr;
  std::size_t nbytes = 0;
  HostOwner owner;
  std::vector<Move> members;  // their host side lies in [host, host + nbytes)
  bool direct = false;
  std::size_t offset = 0;  // in the device staging buffer when not direct
};

HostRun single_run(const Move& m, std::uint8_t* host, const HostOwner& owner) {
  HostRun run;
  run.host = host;
  run.nbytes = m.nbytes;
  run.owner = owner;
  run.members.push_back(m);
  run.direct = true;
  return run;
}

// Groups moves whose host side lies in one page-locked allocation into DMA runs; runs under
// min_run_bytes go to `staged` instead.
void add_runs(const std::vector<Move>& moves, bool host_is_src, std::size_t max_gap,
              std::size_t min_run_bytes, const HostOwner& owner, std::vector<HostRun>* runs,
              std::vector<Move>* staged) {
  std::vector<staging::Piece> pieces;
  pieces.reserve(moves.size());
  for (std::size_t k = 0; k < moves.size(); ++k) {
    const std::uintptr_t begin = address(host_is_src ? moves[k].src : moves[k].dst);
    pieces.push_back({begin, begin + moves[k].nbytes, k});
  }
  std::sort(pieces.begin(), pieces.end(), [](const staging::Piece& a, const staging::Piece& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (const auto& [first, last] : staging::group_runs(pieces, max_gap)) {
    const std::uintptr_t begin = pieces[first].begin;
    std::uintptr_t end = begin;
    for (std::size_t j = first; j < last; ++j) end = std::max(end, pieces[j].end);
    const std::size_t bytes = static_cast<std::size_t>(end - begin);
    if (bytes < min_run_bytes) {
      for (std::size_t j = first; j < last; ++j) staged->push_back(moves[pieces[j].index]);
      continue;
    }
    HostRun run;
    run.host = reinterpret_cast<std::uint8_t*>(begin);
    run.nbytes = bytes;
    run.owner = owner;
    for (std::size_t j = first; j < last; ++j) run.members.push_back(moves[pieces[j].index]);
    run.direct = last - first == 1;  // a lone piece spans its whole run
    runs->push_back(std::move(run));
  }
}

// Everything one call does on one device.
//
// Device staging layout: [staged H2D | staged D2H | H2D runs | D2H runs]. The pinned buffer
// mirrors the first two regions at the same offsets, so each bucket is one DMA between equal
// offsets.
class DeviceWork {
 public:
  explicit DeviceWork(DeviceIndex device) : device_(device) {}

  std::vector<Move> local;      // source here; destination here or on a peer in `peers`
  std::set<DeviceIndex> peers;  // other devices written by `local` (peer access enabled)
  std::vector<Move> h2d;        // staged host -> device
  std::vector<HostRun> h2d_runs;
  std::vector<Move> d2h;  // staged device -> host
  std::vector<HostRun> d2h_runs;

  void prepare(const core::CopyOptions& opts) {
    bucket_ = staging::bucket_bytes(opts);
    std::size_t cursor = 0;
    in_.reserve(h2d.size());
    for (const Move& m : h2d) {
      const std::size_t at = staging::place(cursor, address(m.dst));
      in_.push_back({const_cast<std::uint8_t*>(m.src), at, m.nbytes});
      cursor = at + m.nbytes;
    }
    in_end_ = cursor;
    out_.reserve(d2h.size());
    for (const Move& m : d2h) {
      const std::size_t at = staging::place(cursor, address(m.src));
      out_.push_back({m.dst, at, m.nbytes});
      cursor = at + m.nbytes;
    }
    out_end_ = cursor;
    for (std::vector<HostRun>* runs : {&h2d_runs, &d2h_runs}) {
      for (HostRun& run : *runs) {
        if (run.direct) continue;
        run.offset = staging::place(cursor, address(run.host));
        cursor = run.offset + run.nbytes;
      }
    }

    c10::cuda::CUDAGuard guard(device_);
    std::uint8_t* dev = nullptr;
    if (cursor != 0) {
      staging_ = device_bytes(cursor, device_);
      dev = bytes_of(staging_);
    }
    if (out_end_ != 0) pinned_ = pinned_bytes(out_end_);

    gpu::ChunkTable table;
    for (std::size_t i = 0; i < h2d.size(); ++i) {
      table.add(dev + in_[i].offset, h2d[i].dst, h2d[i].nbytes);
    }
    for (const HostRun& run : h2d_runs) {
      if (run.direct) continue;
      for (const Move& m : run.members) {
        table.add(dev + run.offset + (m.src - run.host), m.dst, m.nbytes);
      }
    }
    for (const Move& m : local) table.add(m.src, m.dst, m.nbytes);
    for (std::size_t i = 0; i < d2h.size(); ++i) {
      table.add(d2h[i].src, dev + out_[i].offset, d2h[i].nbytes);
    }
    for (const HostRun& run : d2h_runs) {
      if (run.direct) continue;
      for (const Move& m : run.members) {
        table.add(m.src, dev + run.offset + (m.dst - run.host), m.nbytes);
      }
    }
    launch_.prepare(table, device_);
    drained_.resize(staging::bucket_count(out_end_ - in_end_, bucket_));
  }

  void enqueue(const core::CopyOptions& opts) {
    c10::cuda::CUDAGuard guard(device_);
    stream_ = at::cuda::getCurrentCUDAStream(device_);
    const CUDAStream& stream = *stream_;
    std::uint8_t* dev = staging_.defined() ? bytes_of(staging_) : nullptr;
    std::uint8_t* pin = pinned_.defined() ? bytes_of(pinned_) : nullptr;

    // In-place DMAs first: they need no CPU work and proceed while the buckets are packed.
    for (const HostRun& run : h2d_runs) {
      void* to = run.direct ? static_cast<void*>(run.members.front().dst) : dev + run.offset;
      C10_CUDA_CHECK(
          cudaMemcpyAsync(to, run.host, run.nbytes, cudaMemcpyHostToDevice, stream.stream()));
      keep_until_done(run.owner, stream);
    }
    std::vector<core::CopySpan> spans;
    std::size_t next = 0;
    for (std::size_t begin = 0; begin < in_end_; begin += bucket_) {
      const std::size_t end = std::min(begin + bucket_, in_end_);
      staging::window_spans(in_, &next, begin, end, pin, /*to_staging=*/true, &spans);
      core::copy_spans(spans, opts);
      C10_CUDA_CHECK(cudaMemcpyAsync(dev + begin, pin + begin, end - begin,
                                     cudaMemcpyHostToDevice, stream.stream()));
    }

    // Writes to a peer wait for the work already queued there, and the peer's later work
    // waits for them (copy_ orders cross-device copies the same way).
    for (DeviceIndex peer : peers) {
      CUDAEvent ready;
      ready.record(at::cuda::getCurrentCUDAStream(peer));
      ready.block(stream);
    }
    launch_.enqueue(stream);
    for (DeviceIndex peer : peers) {
      CUDAEvent written;
      written.record(stream);
      written.block(at::cuda::getCurrentCUDAStream(peer));
    }

    std::size_t k = 0;
    for (std::size_t begin = in_end_; begin < out_end_; begin += bucket_, ++k) {
      const std::size_t end = std::min(begin + bucket_, out_end_);
      C10_CUDA_CHECK(cudaMemcpyAsync(pin + begin, dev + begin, end - begin,
                                     cudaMemcpyDeviceToHost, stream.stream()));
      drained_[k].record(stream);
    }
    for (const HostRun& run : d2h_runs) {
      const void* from = run.direct ? static_cast<const void*>(run.members.front().src)
                                    : dev + run.offset;
      C10_CUDA_CHECK(
          cudaMemcpyAsync(run.host, from, run.nbytes, cudaMemcpyDeviceToHost, stream.stream()));
      keep_until_done(run.owner, stream);
    }
    if (pinned_.defined()) keep_until_done(owner_of(pinned_), stream);
    if (has_d2h()) done_.record(stream);
  }

  // Device -> host: scatters each bucket as soon as its DMA has landed, so the host copy of
  // bucket k overlaps the DMA of bucket k+1; returns when every byte is on the host.
  void finish(const core::CopyOptions& opts) {
    if (!has_d2h()) return;
    std::uint8_t* pin = pinned_.defined() ? bytes_of(pinned_) : nullptr;
    std::vector<core::CopySpan> spans;
    std::size_t next = 0;
    std::size_t k = 0;
    for (std::size_t begin = in_end_; begin < out_end_; begin += bucket_, ++k) {
      const std::size_t end = std::min(begin + bucket_, out_end_);
      drained_[k].synchronize();
      staging::window_spans(out_, &next, begin, end, pin, /*to_staging=*/false, &spans);
      core::copy_spans(spans, opts);
    }
    done_.synchronize();
  }

  // non_blocking=False: host -> device bytes have landed, as after copy_.
  void wait_for_h2d() const {
    if (h2d.empty() && h2d_runs.empty()) return;
    c10::cuda::stream_synchronize(stream_->stream());
  }

 private:
  bool has_d2h() const { return !d2h.empty() || !d2h_runs.empty(); }

  DeviceIndex device_;
  std::size_t bucket_ = 0;
  std::vector<staging::Segment> in_;   // staged H2D, offsets in [0, in_end_)
  std::vector<staging::Segment> out_;  // staged D2H, offsets in [in_end_, out_end_)
  std::size_t in_end_ = 0;
  std::size_t out_end_ = 0;
  at::Tensor staging_;  // device
  at::Tensor pinned_;   // host, bytes [0, out_end_)
  Launch launch_;
  std::vector<CUDAEvent> drained_;  // one per D2H bucket
  CUDAEvent done_;
  std::optional<CUDAStream> stream_;
};

// Copies between two devices without peer access. cudaMemcpyPeerAsync per tensor would cost
// one driver call (and, without peer access, one trip through host memory) per tensor, so the
// sources are gathered into one buffer on the source device, moved by one cudaMemcpyPeerAsync
// and scattered on the destination: two launches and one copy per device pair.
class PeerStaging {
 public:
  PeerStaging(DeviceIndex src, DeviceIndex dst) : src_(src), dst_(dst) {}

  std::vector<Move> moves;

  void prepare() {
    std::vector<std::size_t> offsets;
    offsets.reserve(moves.size());
    std::size_t cursor = 0;
    for (const Move& m : moves) {
      offsets.push_back(staging::place(cursor, address(m.src)));
      cursor = offsets.back() + m.nbytes;
    }
    total_ = cursor;
    {
      c10::cuda::CUDAGuard guard(src_);
      src_staging_ = device_bytes(total_, src_);
    }
    {
      c10::cuda::CUDAGuard guard(dst_);
      dst_staging_ = device_bytes(total_, dst_);
    }
    gpu::ChunkTable gather;
    gpu::ChunkTable scatter;
    for (std::size_t i = 0; i < moves.size(); ++i) {
      gather.add(moves[i].src, bytes_of(src_staging_) + offsets[i], moves[i].nbytes);
      scatter.add(bytes_of(dst_staging_) + offsets[i], moves[i].dst, moves[i].nbytes);
    }
    gather_.prepare(gather, src_);
    scatter_.prepare(scatter, dst_);
  }

  void enqueue() {
    const CUDAStream src_stream = at::cuda::getCurrentCUDAStream(src_);
    const CUDAStream dst_stream = at::cuda::getCurrentCUDAStream(dst_);
    // The destination buffer came from the destination stream's pool: its earlier users
    // there must be done before the source stream writes it.
    CUDAEvent ready;
    ready.record(dst_stream);
    ready.block(src_stream);
    {
      c10::cuda::CUDAGuard guard(src_);
      gather_.enqueue(src_stream);
      C10_CUDA_CHECK(cudaMemcpyPeerAsync(bytes_of(dst_staging_), dst_, bytes_of(src_staging_),
                                         src_, total_, src_stream.stream()));
    }
    CUDAEvent moved;
    moved.record(src_stream);
    moved.block(dst_stream);
    c10::cuda::CUDAGuard guard(dst_);
    scatter_.enqueue(dst_stream);
  }

 private:
  DeviceIndex src_;
  DeviceIndex dst_;
  std::size_t total_ = 0;
  at::Tensor src_staging_;
  at::Tensor dst_staging_;
  Launch gather_;
  Launch scatter_;
};

class Plan {
 public:
  // Routes one contiguous move to the work that executes it.
  void add(const Move& m) {
    if (m.nbytes == 0) return;
    if (m.src_dev == kHost && m.dst_dev == kHost) {
      host_.push_back({m.src, m.dst, m.nbytes});
    } else if (m.src_dev == kHost) {
      device(m.dst_dev).h2d.push_back(m);
    } else if (m.dst_dev == kHost) {
      device(m.src_dev).d2h.push_back(m);
    } else if (m.src_dev == m.dst_dev) {
      device(m.src_dev).local.push_back(m);
    } else if (at::cuda::get_p2p_access(m.src_dev, m.dst_dev)) {
      // The source device's kernel writes the peer's memory directly (one launch, no staging).
      DeviceWork& work = device(m.src_dev);
      work.local.push_back(m);
      work.peers.insert(m.dst_dev);
    } else {
      peers_.try_emplace(std::make_pair(m.src_dev, m.dst_dev), m.src_dev, m.dst_dev)
          .first->second.moves.push_back(m);
    }
  }

  DeviceWork& device(DeviceIndex d) { return devices_.try_emplace(d, d).first->second; }

  // Allocates every buffer; moves nothing.
  void prepare() {
    for (auto& [d, work] : devices_) work.prepare(opts_);
    for (auto& [pair, peer] : peers_) peer.prepare();
  }

  void run(bool non_blocking) {
    for (auto& [d, work] : devices_) work.enqueue(opts_);
    for (auto& [pair, peer] : peers_) peer.enqueue();
    // Host-only pairs run on the CPU while the DMAs and kernels are in flight.
    core::copy_spans(host_, opts_);
    for (auto& [d, work] : devices_) work.finish(opts_);
    if (!non_blocking) {
      for (auto& [d, work] : devices_) work.wait_for_h2d();
    }
  }

 private:
  const core::CopyOptions opts_ = host_copy_options();
  std::vector<core::CopySpan> host_;
  std::map<DeviceIndex, DeviceWork> devices_;
  std::map<std::pair<DeviceIndex, DeviceIndex>, PeerStaging> peers_;
};

// Adds a move whose host side, if any, belongs to `src` or `dst`: a large page-locked host
// tensor is DMA'd in place, anything else goes through Plan::add.
void route(Plan& plan, const Move& m, const at::Tensor& src, const at::Tensor& dst) {
  const bool large = m.nbytes >= kDirectMinBytes;
  if (large && m.src_dev == kHost && m.dst_dev != kHost && is_page_locked(m.src)) {
    plan.device(m.dst_dev).h2d_runs.push_back(
        single_run(m, const_cast<std::uint8_t*>(m.src), owner_of(src)));
  } else if (large && m.dst_dev == kHost && m.src_dev != kHost && is_page_locked(m.dst)) {
    plan.device(m.src_dev).d2h_runs.push_back(single_run(m, m.dst, owner_of(dst)));
  } else {
    plan.add(m);
  }
}

void batched_copy_cuda(at::TensorList dst, at::TensorList src, bool non_blocking) {
  check_copy_lists("batched_copy_", dst, src);
  Plan plan;
  std::vector<std::size_t> strided;
  for (std::size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    const std::size_t n = nbytes_of(d);
    if (n == 0) continue;
    if (!d.is_contiguous() || !s.is_contiguous() || !same_math_bits(d, s)) {
      strided.push_back(i);
      continue;
    }
    route(plan, {bytes_of(s), bytes_of(d), n, location_of(s), location_of(d)}, s, d);
  }
  plan.prepare();
  plan.run(non_blocking);
  for (std::size_t i : strided) {
    at::Tensor d = dst[i];
    // Device -> host stays blocking, as the batched part is.
    d.copy_(src[i], non_blocking && !d.is_cpu());
  }
}

void pack_cuda(at::TensorList src, const at::Tensor& flat, at::IntArrayRef offsets,
               bool non_blocking) {
  check_pack_lists("pack_", src, flat, offsets, /*tensors_are_written=*/false);
  std::uint8_t* base = flat.numel() ? bytes_of(flat) : nullptr;
  const DeviceIndex flat_dev = location_of(flat);
  const bool in_place = flat_is_page_locked(flat);
  Plan plan;
  // Contiguous copies of strided sources and of sources with math bits (engine.h). A device
  // one is used only on the stream it was made on, so freeing it at the end of the call is
  // stream-ordered; a host one is read during the call.
  std::vector<at::Tensor> temporaries;
  std::map<DeviceIndex, std::vector<Move>> into_flat;
  for (std::size_t i = 0; i < src.size(); ++i) {
    const std::size_t n = nbytes_of(src[i]);
    if (n == 0) continue;
    at::Tensor s = src[i];
    if (!s.is_contiguous() || has_math_bits(s)) {
      s = materialize(s);
      temporaries.push_back(s);
    }
    const Move m{bytes_of(s), base + offsets[i], n, location_of(s), flat_dev};
    if (in_place && m.src_dev != kHost) {
      into_flat[m.src_dev].push_back(m);
    } else {
      route(plan, m, s, flat);
    }
  }
  for (const auto& [d, moves] : into_flat) {
    DeviceWork& work = plan.device(d);
    add_runs(moves, /*host_is_src=*/false, /*max_gap=*/0, kDirectMinRunBytes, owner_of(flat),
             &work.d2h_runs, &work.d2h);
  }
  plan.prepare();
  plan.run(non_blocking);
}

void unpack_cuda(const at::Tensor& flat, at::TensorList dst, at::IntArrayRef offsets,
                 bool non_blocking) {
  check_pack_lists("unpack_", dst, flat, offsets, /*tensors_are_written=*/true);
  const std::uint8_t* base = flat.numel() ? bytes_of(flat) : nullptr;
  const DeviceIndex flat_dev = location_of(flat);
  const bool in_place = flat_is_page_locked(flat);
  Plan plan;
  // Strided destinations, and those with math bits, receive their bytes in a contiguous
  // temporary on their own device, then copy_ puts them in place (and applies the bits) on
  // that device's current stream, after the batched part.
  std::vector<std::pair<std::size_t, at::Tensor>> strided;
  std::map<DeviceIndex, std::vector<Move>> from_flat;
  for (std::size_t i = 0; i < dst.size(); ++i) {
    const std::size_t n = nbytes_of(dst[i]);
    if (n == 0) continue;
    at::Tensor target = dst[i];
    if (!target.is_contiguous() || has_math_bits(target)) {
      target = at::empty(target.sizes(), target.options());
      strided.emplace_back(i, target);
    }
    const Move m{base + offsets[i], bytes_of(target), n, flat_dev, location_of(target)};
    if (in_place && m.dst_dev != kHost) {
      from_flat[m.dst_dev].push_back(m);
    } else {
      route(plan, m, flat, target);
    }
  }
  for (const auto& [d, moves] : from_flat) {
    DeviceWork& work = plan.device(d);
    add_runs(moves, /*host_is_src=*/true, kReadGapBytes, /*min_run_bytes=*/0, owner_of(flat),
             &work.h2d_runs, &work.h2d);
  }
  plan.prepare();
  plan.run(non_blocking);
  for (const auto& [i, tmp] : strided) {
    at::Tensor d = dst[i];
    d.copy_(tmp, non_blocking && !d.is_cpu());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(weightsync, CUDA, m) {
  m.impl("batched_copy_", &batched_copy_cuda);
  m.impl("pack_", &pack_cuda);
  m.impl("unpack_", &unpack_cuda);
}

}  // namespace weightsync
