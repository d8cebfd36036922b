// The one-launch multi-tensor copy kernel and its chunk table. Torch-free: only the CUDA
// runtime headers, so it builds and is tested alone.
//
// A call's contiguous byte moves become one table of entries (src, dst, nbytes, first chunk).
// Every entry is cut into chunks of kChunkBytes; block b of the grid copies chunks b,
// b + gridDim.x, ... and finds the entry of a chunk by binary search over the exclusive
// prefix sums of chunk counts. One launch therefore covers any number of tensors of any sizes.
//
// Everything but the kernel also compiles as plain C++ (a host compiler, no CUDA toolkit):
// the table, the entry search and one thread's share of a chunk copy then run on the CPU,
// which is how csrc/tests/test_gpu_host.cpp tests them. Under nvcc the code is unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define WEIGHTSYNC_HOST_DEVICE __host__ __device__
#else
#define WEIGHTSYNC_HOST_DEVICE
#endif

// `#pragma unroll` only means something to the device compiler; the host pass of these
// __host__ __device__ functions would warn about it.
#if defined(__CUDA_ARCH__)
#define WEIGHTSYNC_UNROLL _Pragma("unroll")
#else
#define WEIGHTSYNC_UNROLL
#endif

namespace weightsync::gpu {

// The 16- and 8-byte words of the widest copies: CUDA's vector types, or same-sized
// stand-ins for a host compiler.
#if defined(__CUDACC__)
using Word16 = uint4;
using Word8 = uint2;
#else
struct alignas(16) Word16 {
  std::uint32_t x, y, z, w;
};
struct alignas(8) Word8 {
  std::uint32_t x, y;
};
#endif
static_assert(sizeof(Word16) == 16 && alignof(Word16) == 16, "16-byte copy word");
static_assert(sizeof(Word8) == 8 && alignof(Word8) == 8, "8-byte copy word");

// 256 threads x 16 bytes = 4 KiB per block-wide step: the smallest common weight tensors
// (biases, layer norms) take one step, and 8 blocks of this size fill an SM's threads.
constexpr unsigned kThreads = 256;

// 64 KiB per chunk is 16 steps per thread: enough work per block that the binary search and
// block start-up are noise, while a 100 MB tensor still yields ~1600 blocks, about 12 per SM
// on an H100, so one big tensor alone saturates memory bandwidth.
constexpr std::size_t kChunkBytes = std::size_t{64} << 10;

// Loads in flight per thread before the matching stores: a copy is latency-bound, and four
// outstanding 16-byte loads per thread cover the memory latency at full occupancy.
constexpr int kUnroll = 4;

// Grid-stride beyond this many blocks; the grid size is then independent of the payload.
constexpr std::uint64_t kMaxBlocks = 65535;

// Tables up to this many entries travel as the kernel parameter itself (no upload, no extra
// stream operation); 96 entries keep the parameter under the 4 KiB limit every architecture
// and driver accepts.
constexpr std::size_t kInlineEntries = 96;

struct CopyEntry {
  const std::uint8_t* src;
  std::uint8_t* dst;
  std::uint64_t nbytes;
  std::uint64_t first_chunk;  // chunks of all earlier entries
};
static_assert(sizeof(CopyEntry) == 32, "CopyEntry is uploaded as raw bytes");

// A table in device memory.
struct TableRef {
  const CopyEntry* entries;
  std::uint64_t total_chunks;
  std::uint32_t count;
  WEIGHTSYNC_HOST_DEVICE const CopyEntry* data() const { return entries; }
};

// A table small enough to be the kernel parameter.
struct InlineTable {
  CopyEntry entries[kInlineEntries];
  std::uint64_t total_chunks;
  std::uint32_t count;
  WEIGHTSYNC_HOST_DEVICE const CopyEntry* data() const { return entries; }
};
static_assert(sizeof(InlineTable) <= 4096, "kernel parameters must stay within 4 KiB");

// Host-side builder. Empty moves are dropped: they own no chunk.
class ChunkTable {
 public:
  void add(const void* src, void* dst, std::size_t nbytes) {
    if (nbytes == 0) return;
    entries_.push_back({static_cast<const std::uint8_t*>(src), static_cast<std::uint8_t*>(dst),
                        static_cast<std::uint64_t>(nbytes), total_chunks_});
    total_chunks_ += (nbytes + kChunkBytes - 1) / kChunkBytes;
  }
  void clear() {
    entries_.clear();
    total_chunks_ = 0;
  }
  bool empty() const { return entries_.empty(); }
  const std::vector<CopyEntry>& entries() const { return entries_; }
  std::uint64_t total_chunks() const { return total_chunks_; }

 private:
  std::vector<CopyEntry> entries_;
  std::uint64_t total_chunks_ = 0;
};

inline unsigned grid_size(std::uint64_t total_chunks) {
  return static_cast<unsigned>(total_chunks < kMaxBlocks ? total_chunks : kMaxBlocks);
}

// Index of the entry owning `chunk`: the last entry whose first_chunk <= chunk.
WEIGHTSYNC_HOST_DEVICE inline std::uint32_t find_entry(const CopyEntry* entries,
                                                       std::uint32_t count, std::uint64_t chunk) {
  std::uint32_t lo = 0;
  std::uint32_t hi = count - 1;
  while (lo < hi) {
    const std::uint32_t mid = lo + (hi - lo + 1) / 2;
    if (entries[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Copies `len` bytes with words of type T; src and dst must be congruent modulo sizeof(T).
// Bytes before the first aligned word and after the last one go one by one.
template <typename T>
WEIGHTSYNC_HOST_DEVICE inline void copy_words(const std::uint8_t* __restrict__ src,
                                              std::uint8_t* __restrict__ dst, std::size_t len,
                                              unsigned tid, unsigned nthreads) {
  constexpr std::size_t kMask = sizeof(T) - 1;
  std::size_t head = (sizeof(T) - (reinterpret_cast<std::uintptr_t>(src) & kMask)) & kMask;
  if (head > len) head = len;
  for (std::size_t i = tid; i < head; i += nthreads) dst[i] = src[i];

  const std::size_t words = (len - head) / sizeof(T);
  const T* __restrict__ s = reinterpret_cast<const T*>(src + head);
  T* __restrict__ d = reinterpret_cast<T*>(dst + head);
  std::size_t w = tid;
  for (; w + (kUnroll - 1) * std::size_t{nthreads} < words; w += kUnroll * std::size_t{nthreads}) {
    T v[kUnroll];
WEIGHTSYNC_UNROLL
    for (int k = 0; k < kUnroll; ++k) v[k] = s[w + k * std::size_t{nthreads}];
WEIGHTSYNC_UNROLL
    for (int k = 0; k < kUnroll; ++k) d[w + k * std::size_t{nthreads}] = v[k];
  }
  for (; w < words; w += nthreads) d[w] = s[w];

  for (std::size_t i = head + words * sizeof(T) + tid; i < len; i += nthreads) dst[i] = src[i];
}

// The widest word both ends can share: 16, 8, 4, 2 or 1 bytes, the largest power of two up to
// 16 that src and dst are congruent modulo. Chunk starts are multiples of kChunkBytes into
// their entry, so a chunk's alignment is its tensor's; torch allocations are 512-byte aligned
// and the staging layouts (staging.h) mirror the other end's alignment, so almost every chunk
// takes the 16-byte path. Views at odd offsets still copy correctly, only narrower.
WEIGHTSYNC_HOST_DEVICE inline unsigned word_bytes(const void* src, const void* dst) {
  const std::uintptr_t skew =
      reinterpret_cast<std::uintptr_t>(src) ^ reinterpret_cast<std::uintptr_t>(dst);
  if ((skew & 15) == 0) return 16;
  if ((skew & 7) == 0) return 8;
  if ((skew & 3) == 0) return 4;
  if ((skew & 1) == 0) return 2;
  return 1;
}

WEIGHTSYNC_HOST_DEVICE inline void copy_range(const std::uint8_t* src, std::uint8_t* dst,
                                              std::size_t len, unsigned tid, unsigned nthreads) {
  switch (word_bytes(src, dst)) {
    case 16:
      copy_words<Word16>(src, dst, len, tid, nthreads);
      break;
    case 8:
      copy_words<Word8>(src, dst, len, tid, nthreads);
      break;
    case 4:
      copy_words<std::uint32_t>(src, dst, len, tid, nthreads);
      break;
    case 2:
      copy_words<std::uint16_t>(src, dst, len, tid, nthreads);
      break;
    default:
      copy_words<std::uint8_t>(src, dst, len, tid, nthreads);
  }
}

// The share of thread `tid` (of `nthreads`) in copying chunk `chunk` of the table.
WEIGHTSYNC_HOST_DEVICE inline void copy_chunk(const CopyEntry* entries, std::uint32_t count,
                                              std::uint64_t chunk, unsigned tid,
                                              unsigned nthreads) {
  const CopyEntry& e = entries[find_entry(entries, count, chunk)];
  const std::uint64_t offset = (chunk - e.first_chunk) * kChunkBytes;
  const std::uint64_t rest = e.nbytes - offset;
  const std::size_t len = static_cast<std::size_t>(rest < kChunkBytes ? rest : kChunkBytes);
  copy_range(e.src + offset, e.dst + offset, len, tid, nthreads);
}

#if defined(__CUDACC__)
// __grid_constant__ lets every thread index the table in parameter space without a private
// copy, for both the inline table and the device-memory reference.
template <typename Table>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_copy_kernel(const __grid_constant__ Table table) {
  const CopyEntry* entries = table.data();
  for (std::uint64_t chunk = blockIdx.x; chunk < table.total_chunks; chunk += gridDim.x) {
    copy_chunk(entries, table.count, chunk, threadIdx.x, blockDim.x);
  }
}
#endif  // __CUDACC__

}  // namespace weightsync::gpu
