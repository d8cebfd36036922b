#include "engine.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <sstream>

namespace weightsync {
namespace {

constexpr int kWritten = 0;
constexpr int kRead = 1;

// Python spellings ("float32", "[2, 3]"), so native and fallback messages read the same.
std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << dtype_name(t.scalar_type()) << shape_of(t) << " on " << t.device();
  return out.str();
}

bool supported_device(const at::Tensor& t) { return t.is_cpu() || t.is_cuda(); }

void push_range(std::vector<core::ByteRange>& ranges, const at::Tensor& t, std::size_t index,
                int group) {
  const auto [lo, hi] = byte_extent(t);
  ranges.push_back({lo, hi, index, group});
}

}  // namespace

std::size_t nbytes_of(const at::Tensor& t) {
  return static_cast<std::size_t>(t.numel()) * t.element_size();
}

std::pair<std::uintptr_t, std::uintptr_t> byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  const auto base = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  std::int64_t lo = 0;
  std::int64_t hi = 0;
  for (std::int64_t d = 0; d < t.dim(); ++d) {
    const std::int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const std::int64_t item = static_cast<std::int64_t>(t.element_size());
  return {static_cast<std::uintptr_t>(base + lo * item),
          static_cast<std::uintptr_t>(base + hi * item + item)};
}

void check_copy_lists(const char* op, at::TensorList dst, at::TensorList src) {
  WS_CHECK(dst.size() == src.size(), "length", op, ": dst has ", dst.size(),
           " tensors but src has ", src.size());
  std::vector<core::ByteRange> ranges;
  ranges.reserve(2 * dst.size());
  for (std::size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    WS_CHECK(d.defined() && s.defined(), "argument", op, ": index ", i,
             ": undefined tensor in ", d.defined() ? "src" : "dst");
    WS_CHECK(d.scalar_type() == s.scalar_type(), "dtype", op, ": index ", i, ": dst dtype ",
             dtype_name(d.scalar_type()), " != src dtype ", dtype_name(s.scalar_type()));
    WS_CHECK(d.sizes() == s.sizes(), "shape", op, ": index ", i, ": dst shape ", shape_of(d),
             " != src shape ", shape_of(s));
    WS_CHECK(supported_device(d) && supported_device(s), "device", op, ": index ", i,
             ": only CPU and CUDA tensors are supported, got dst on ", d.device(),
             " and src on ", s.device());
    WS_CHECK(at::has_internal_overlap(d) != at::MemOverlap::Yes, "alias", op, ": index ", i,
             ": dst ", describe(d), " has overlapping elements (expanded or strided view)");
    push_range(ranges, d, i, kWritten);
    push_range(ranges, s, i, kRead);
  }
  if (auto hit = core::find_overlap(std::move(ranges), kWritten)) {
    const auto& [a, b] = *hit;
    auto name = [](const core::ByteRange& r) { return r.group == kWritten ? "dst" : "src"; };
    WS_CHECK(false, "alias", op, ": ", name(a), "[", a.index, "] and ", name(b), "[", b.index,
             "] share memory; a destination may not overlap another destination or a source");
  }
}

void check_pack_lists(const char* op, at::TensorList tensors, const at::Tensor& flat,
                      at::IntArrayRef offsets, bool tensors_are_written) {
  WS_CHECK(flat.defined(), "argument", op, ": flat is undefined");
  WS_CHECK(flat.scalar_type() == at::kByte && flat.dim() == 1 && flat.is_contiguous(),
           "argument", op, ": flat must be a 1-D contiguous uint8 tensor, got ", describe(flat));
  WS_CHECK(supported_device(flat), "device", op, ": flat on ", flat.device(),
           "; only CPU and CUDA are supported");
  WS_CHECK(offsets.size() == tensors.size(), "length", op, ": ", tensors.size(),
           " tensors but ", offsets.size(), " offsets");
  const auto flat_bytes = static_cast<std::uint64_t>(flat.numel());
  const auto flat_base = reinterpret_cast<std::uintptr_t>(flat.numel() ? flat.data_ptr() : nullptr);
  // Written regions: the flat segments (pack_) or the tensors (unpack_).
  const int flat_group = tensors_are_written ? kRead : kWritten;
  const int tensor_group = tensors_are_written ? kWritten : kRead;
  std::vector<core::ByteRange> ranges;
  ranges.reserve(2 * tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    WS_CHECK(t.defined(), "argument", op, ": index ", i, ": undefined tensor");
    WS_CHECK(supported_device(t), "device", op, ": index ", i, ": tensor on ", t.device(),
             "; only CPU and CUDA are supported");
    WS_CHECK(offsets[i] >= 0, "bounds", op, ": index ", i, ": negative offset ", offsets[i]);
    const std::uint64_t begin = static_cast<std::uint64_t>(offsets[i]);
    const std::uint64_t n = nbytes_of(t);
    WS_CHECK(begin <= flat_bytes && n <= flat_bytes - begin, "bounds", op, ": index ", i,
             ": bytes [", begin, ", ", begin + n, ") of ", describe(t),
             " fall outside flat of ", flat_bytes, " bytes");
    if (tensors_are_written) {
      WS_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "alias", op, ": index ", i,
               ": dst ", describe(t), " has overlapping elements (expanded or strided view)");
    }
    push_range(ranges, t, i, tensor_group);
    if (n != 0) {
      ranges.push_back({static_cast<std::uintptr_t>(flat_base + begin),
                        static_cast<std::uintptr_t>(flat_base + begin + n), i, flat_group});
    }
  }
  if (auto hit = core::find_overlap(std::move(ranges), kWritten)) {
    const auto& [a, b] = *hit;
    auto name = [&](const core::ByteRange& r) {
      return r.group == flat_group ? "flat segment" : (tensors_are_written ? "dst" : "src");
    };
    WS_CHECK(false, "alias", op, ": ", name(a), "[", a.index, "] and ", name(b), "[", b.index,
             "] share memory; written regions may not overlap anything else");
  }
}

at::Tensor materialize(const at::Tensor& t) {
  // contiguous() alone keeps the bits (a conj view of a contiguous tensor is contiguous);
  // copy_ into a plain tensor applies them.
  if (t.is_contiguous() && !has_math_bits(t)) return t;
  at::Tensor out = at::empty(t.sizes(), t.options());
  out.copy_(t);
  return out;
}

namespace {

// Torch's intra-op pool as the host copier's other team (see core::Helpers): one participant
// per index, the calling thread being one of the pool's threads.
void torch_team(std::size_t participants, core::TeamBody body, void* context) {
  at::parallel_for(0, static_cast<std::int64_t>(participants), 1,
                   [&](std::int64_t begin, std::int64_t end) {
                     for (std::int64_t p = begin; p < end; ++p) {
                       body(context, static_cast<std::size_t>(p));
                     }
                   });
}

// Registered when the library loads, before any copy can run.
const bool torch_team_registered = (core::set_team_runner(&torch_team), true);

}  // namespace

core::CopyOptions host_copy_options() {
  core::CopyOptions options = core::default_copy_options();
  options.max_threads = std::max(1, std::min(options.max_threads, at::get_num_threads()));
  return options;
}

std::vector<core::CopySpan> host_spans(at::TensorList dst, at::TensorList src,
                                       std::vector<std::size_t>* rest) {
  std::vector<core::CopySpan> spans;
  spans.reserve(dst.size());
  for (std::size_t i = 0; i < dst.size(); ++i) {
    const std::size_t n = nbytes_of(dst[i]);
    if (n == 0) continue;
    if (dst[i].is_contiguous() && src[i].is_contiguous() && same_math_bits(dst[i], src[i])) {
      spans.push_back({src[i].data_ptr(), dst[i].data_ptr(), n});
    } else {
      rest->push_back(i);
    }
  }
  return spans;
}

std::vector<core::CopySpan> flat_spans(at::TensorList tensors, std::uint8_t* flat,
                                       at::IntArrayRef offsets, bool into_flat,
                                       std::vector<std::size_t>* rest) {
  std::vector<core::CopySpan> spans;
  spans.reserve(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::size_t n = nbytes_of(tensors[i]);
    if (n == 0) continue;
    if (!tensors[i].is_contiguous() || has_math_bits(tensors[i])) {
      rest->push_back(i);
      continue;
    }
    std::uint8_t* segment = flat + offsets[i];
    if (into_flat) {
      spans.push_back({tensors[i].data_ptr(), segment, n});
    } else {
      spans.push_back({segment, tensors[i].data_ptr(), n});
    }
  }
  return spans;
}

void copy_pairs_host(at::TensorList dst, at::TensorList src) {
  std::vector<std::size_t> rest;
  const auto spans = host_spans(dst, src, &rest);
  core::copy_spans(spans, host_copy_options());
  for (std::size_t i : rest) {
    at::Tensor d = dst[i];
    d.copy_(src[i]);
  }
}

void pack_host(at::TensorList src, const at::Tensor& flat, at::IntArrayRef offsets) {
  std::vector<std::size_t> rest;
  auto* base = static_cast<std::uint8_t*>(flat.numel() ? flat.data_ptr() : nullptr);
  const auto spans = flat_spans(src, base, offsets, /*into_flat=*/true, &rest);
  core::copy_spans(spans, host_copy_options());
  for (std::size_t i : rest) {
    // A contiguous temporary keeps any offset valid (a typed view of flat would need the
    // offset aligned to the element size).
    const at::Tensor tmp = materialize(src[i]);
    std::memcpy(base + offsets[i], tmp.data_ptr(), nbytes_of(tmp));
  }
}

void unpack_host(const at::Tensor& flat, at::TensorList dst, at::IntArrayRef offsets) {
  std::vector<std::size_t> rest;
  auto* base = static_cast<std::uint8_t*>(flat.numel() ? flat.data_ptr() : nullptr);
  const auto spans = flat_spans(dst, base, offsets, /*into_flat=*/false, &rest);
  core::copy_spans(spans, host_copy_options());
  for (std::size_t i : rest) {
    // Plain values in a temporary; copy_ then lays them out (strides) and applies the
    // destination's math bits.
    at::Tensor tmp = at::empty(dst[i].sizes(), dst[i].options());
    std::memcpy(tmp.data_ptr(), base + offsets[i], nbytes_of(tmp));
    at::Tensor d = dst[i];
    d.copy_(tmp);
  }
}

}  // namespace weightsync
