// Tests of the operator library (libweightsync_ops.so) through the torch dispatcher, the way
// Python reaches it: bit-exact copies, pack/unpack, the tagged validation errors (and that a
// rejected call changes nothing), CopyPlan's reallocation check and the futex ops. Built by
// CMake when torch is found; host tensors only, so it runs on machines without a GPU.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "check.h"

#include "copy_plan.h"

namespace {

using weightsync_test::g_current;
using weightsync_test::g_failures;
using weightsync_test::report;

// Runs fn, which must throw a c10::ValueError whose message holds every one of `needles`.
#define EXPECT_VALUE_ERROR(fn, ...) check_value_error(__FILE__, __LINE__, (fn), {__VA_ARGS__})

void check_value_error(const char* file, int line, const std::function<void()>& fn,
                       std::initializer_list<const char*> needles) {
  try {
    fn();
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* needle : needles) {
      if (msg.find(needle) == std::string::npos) {
        report(file, line, "error message lacks \"" + std::string(needle) + "\": " + msg);
      }
    }
    return;
  } catch (const std::exception& e) {
    report(file, line, std::string("expected c10::ValueError, got another error: ") + e.what());
    return;
  }
  report(file, line, "expected c10::ValueError, nothing was thrown");
}

// ---- the ops, typed as their schemas ---------------------------------------------------------

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void batched_copy(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  static auto h = op("weightsync::batched_copy_")
                      .typed<void(at::TensorList, at::TensorList, bool)>();
  h.call(dst, src, false);
}

void pack(const std::vector<at::Tensor>& src, const at::Tensor& flat,
          const std::vector<std::int64_t>& offsets) {
  static auto h = op("weightsync::pack_")
                      .typed<void(at::TensorList, const at::Tensor&, at::IntArrayRef, bool)>();
  h.call(src, flat, offsets, false);
}

void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& dst,
            const std::vector<std::int64_t>& offsets) {
  static auto h = op("weightsync::unpack_")
                      .typed<void(const at::Tensor&, at::TensorList, at::IntArrayRef, bool)>();
  h.call(flat, dst, offsets, false);
}

// The C++ call passes every argument, defaulted ones (spin_s) included: the signature must
// match the schema exactly, or typed() throws at the call.
bool futex_wait(const at::Tensor& word, std::int64_t expected, double timeout_s,
                double spin_s = 0.0) {
  static auto h = op("weightsync::futex_wait")
                      .typed<bool(const at::Tensor&, std::int64_t, double, double)>();
  return h.call(word, expected, timeout_s, spin_s);
}

std::int64_t futex_wake(const at::Tensor& word, std::int64_t count) {
  static auto h = op("weightsync::futex_wake").typed<std::int64_t(const at::Tensor&, std::int64_t)>();
  return h.call(word, count);
}

// ---- helpers ---------------------------------------------------------------------------------

// Bytes of t in logical (row-major) order, so tensors with different strides compare.
at::Tensor bytes_of(const at::Tensor& t) {
  return t.contiguous().view({-1}).view(at::kByte);
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && at::equal(bytes_of(a), bytes_of(b));
}

at::Tensor random_bytes(std::int64_t n, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, 256, {n}, gen, at::kByte);
}

// A tensor of `sizes` and `dtype` whose bytes are random (any bit pattern, NaNs included).
at::Tensor random_tensor(at::IntArrayRef sizes, at::ScalarType dtype, std::uint64_t seed) {
  const auto numel = c10::multiply_integers(sizes);
  const auto item = static_cast<std::int64_t>(c10::elementSize(dtype));
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
  if (numel == 0) return t;
  at::Tensor src = random_bytes(numel * item, seed);
  if (dtype == at::kBool) src = src.remainder(2);  // only 0 and 1 are valid bools
  std::memcpy(t.data_ptr(), src.data_ptr(), static_cast<std::size_t>(numel * item));
  return t;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.clone());
  return out;
}

bool all_same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!same_bytes(a[i], b[i])) return false;
  }
  return true;
}

// ---- tests -----------------------------------------------------------------------------------

void test_batched_copy_exact() {
  const std::vector<std::pair<std::vector<std::int64_t>, at::ScalarType>> cases = {
      {{17, 3}, at::kFloat},  {{5}, at::kHalf},    {{2, 3, 4}, at::kLong}, {{33}, at::kBool},
      {{0, 4}, at::kFloat},   {{}, at::kDouble},   {{4097}, at::kByte},    {{7, 1}, at::kBFloat16},
  };
  std::vector<at::Tensor> src;
  std::vector<at::Tensor> dst;
  std::uint64_t seed = 1;
  for (const auto& [sizes, dtype] : cases) {
    src.push_back(random_tensor(sizes, dtype, seed++));
    dst.push_back(random_tensor(sizes, dtype, seed++));
  }
  batched_copy(dst, src);
  for (std::size_t i = 0; i < src.size(); ++i) {
    EXPECT_MSG(same_bytes(dst[i], src[i]), "index " + std::to_string(i) + " differs");
  }
}

void test_batched_copy_large_threaded() {
  // Above the default 8 MiB threshold, so the host copier's pool takes part.
  at::Tensor src = random_tensor({(std::int64_t{20} << 20) + 3}, at::kByte, 11);
  at::Tensor dst = at::zeros_like(src);
  at::Tensor small_src = random_tensor({5}, at::kFloat, 12);
  at::Tensor small_dst = at::zeros_like(small_src);
  batched_copy({dst, small_dst}, {src, small_src});
  EXPECT(same_bytes(dst, src));
  EXPECT(same_bytes(small_dst, small_src));
}

void test_batched_copy_non_contiguous() {
  at::Tensor base_src = random_tensor({8, 6}, at::kFloat, 21);
  at::Tensor base_dst = random_tensor({6, 8}, at::kFloat, 22);
  at::Tensor src = base_src.t();                       // transposed source
  at::Tensor dst = base_dst;                           // contiguous destination
  at::Tensor stepped_src = random_tensor({20}, at::kLong, 23);
  at::Tensor stepped_dst_base = random_tensor({20}, at::kLong, 24);
  at::Tensor stepped_dst = stepped_dst_base.slice(0, 1, 20, 2);  // every other element
  at::Tensor untouched = stepped_dst_base.slice(0, 0, 20, 2).clone();
  batched_copy({dst, stepped_dst}, {src, stepped_src.slice(0, 0, 10)});
  EXPECT(same_bytes(dst, src));
  EXPECT(same_bytes(stepped_dst, stepped_src.slice(0, 0, 10)));
  EXPECT_MSG(same_bytes(stepped_dst_base.slice(0, 0, 20, 2), untouched),
            "elements between the strided destination's were written");
}

void test_batched_copy_rejects_and_changes_nothing() {
  std::vector<at::Tensor> src = {random_tensor({4}, at::kFloat, 31),
                                 random_tensor({4}, at::kFloat, 32)};
  std::vector<at::Tensor> dst = {random_tensor({4}, at::kFloat, 33),
                                 random_tensor({4}, at::kDouble, 34)};
  auto before = clones(dst);
  EXPECT_VALUE_ERROR([&] { batched_copy(dst, src); }, "weightsync[dtype]", "index 1", "float64",
                    "float32");
  EXPECT_MSG(all_same(dst, before), "a rejected call (dtype) changed a destination");

  dst = {random_tensor({4}, at::kFloat, 35), random_tensor({2, 2}, at::kFloat, 36)};
  before = clones(dst);
  EXPECT_VALUE_ERROR([&] { batched_copy(dst, src); }, "weightsync[shape]", "index 1", "[2, 2]",
                    "[4]");
  EXPECT_MSG(all_same(dst, before), "a rejected call (shape) changed a destination");

  EXPECT_VALUE_ERROR([&] { batched_copy({dst[0]}, src); }, "weightsync[length]", "1", "2");
}

void test_batched_copy_aliasing() {
  at::Tensor storage = random_tensor({10}, at::kFloat, 41);
  at::Tensor before = storage.clone();
  at::Tensor a = storage.slice(0, 0, 6);
  at::Tensor b = storage.slice(0, 4, 10);
  at::Tensor s1 = random_tensor({6}, at::kFloat, 42);
  at::Tensor s2 = random_tensor({6}, at::kFloat, 43);
  EXPECT_VALUE_ERROR([&] { batched_copy({a, b}, {s1, s2}); }, "weightsync[alias]", "dst[0]",
                    "dst[1]");
  EXPECT_VALUE_ERROR([&] { batched_copy({a}, {storage.slice(0, 3, 9)}); }, "weightsync[alias]",
                    "src[0]");
  EXPECT_MSG(same_bytes(storage, before), "a rejected call (alias) changed a destination");
  // Touching views are fine, and so is one source read twice.
  at::Tensor left = storage.slice(0, 0, 5);
  at::Tensor right = storage.slice(0, 5, 10);
  at::Tensor shared = random_tensor({5}, at::kFloat, 44);
  batched_copy({left, right}, {shared, shared});
  EXPECT(same_bytes(left, shared));
  EXPECT(same_bytes(right, shared));
  // An expanded destination writes one element many times.
  at::Tensor expanded = at::zeros({1}, at::kFloat).expand({4});
  EXPECT_VALUE_ERROR([&] { batched_copy({expanded}, {at::ones({4}, at::kFloat)}); },
                    "weightsync[alias]", "index 0");
}

void test_pack_unpack_roundtrip() {
  std::vector<at::Tensor> src = {random_tensor({3, 5}, at::kFloat, 51),
                                 random_tensor({7}, at::kHalf, 52),
                                 random_tensor({0}, at::kLong, 53),
                                 random_tensor({4, 6}, at::kDouble, 54).t(),  // non-contiguous
                                 random_tensor({1}, at::kByte, 55)};
  // Odd offsets on purpose: segments need no alignment.
  std::vector<std::int64_t> offsets;
  std::int64_t at_byte = 1;
  for (const auto& t : src) {
    offsets.push_back(at_byte);
    at_byte += t.numel() * static_cast<std::int64_t>(t.element_size()) + 3;
  }
  at::Tensor flat = random_bytes(at_byte + 5, 56);
  at::Tensor flat_before = flat.clone();
  pack(src, flat, offsets);
  std::vector<bool> covered(static_cast<std::size_t>(flat.numel()), false);
  for (std::size_t i = 0; i < src.size(); ++i) {
    const std::int64_t n = src[i].numel() * static_cast<std::int64_t>(src[i].element_size());
    EXPECT_MSG(at::equal(flat.slice(0, offsets[i], offsets[i] + n), bytes_of(src[i])),
              "packed bytes of index " + std::to_string(i) + " differ");
    for (std::int64_t k = 0; k < n; ++k) covered[static_cast<std::size_t>(offsets[i] + k)] = true;
  }
  for (std::size_t k = 0; k < covered.size(); ++k) {
    if (!covered[k] && flat[k].item<std::uint8_t>() != flat_before[k].item<std::uint8_t>()) {
      report(__FILE__, __LINE__, "pack_ wrote flat byte " + std::to_string(k) +
                                     " outside every segment");
      break;
    }
  }
  std::vector<at::Tensor> dst;
  for (std::size_t i = 0; i < src.size(); ++i) {
    dst.push_back(random_tensor(src[i].sizes(), src[i].scalar_type(), 60 + i));
  }
  dst[3] = random_tensor({4, 6}, at::kDouble, 70).t();  // unpack into a strided view too
  unpack(flat, dst, offsets);
  for (std::size_t i = 0; i < src.size(); ++i) {
    EXPECT_MSG(same_bytes(dst[i], src[i]), "unpacked index " + std::to_string(i) + " differs");
  }
}

void test_pack_rejects_and_changes_nothing() {
  std::vector<at::Tensor> src = {random_tensor({4}, at::kFloat, 81),
                                 random_tensor({4}, at::kFloat, 82)};
  at::Tensor flat = random_bytes(32, 83);
  at::Tensor before = flat.clone();
  EXPECT_VALUE_ERROR([&] { pack(src, flat, {0, 17}); }, "weightsync[bounds]", "index 1", "33",
                    "32");
  EXPECT_VALUE_ERROR([&] { pack(src, flat, {0, 8}); }, "weightsync[alias]", "flat segment[0]",
                    "flat segment[1]");
  EXPECT_VALUE_ERROR([&] { pack(src, flat, {0, -1}); }, "weightsync[bounds]", "negative");
  EXPECT_VALUE_ERROR([&] { pack(src, flat, {0}); }, "weightsync[length]");
  EXPECT_VALUE_ERROR([&] { pack(src, flat.view(at::kChar), {0, 16}); }, "weightsync[argument]",
                    "uint8");
  EXPECT_MSG(at::equal(flat, before), "a rejected pack_ changed flat");

  std::vector<at::Tensor> dst = {random_tensor({4}, at::kFloat, 84),
                                 random_tensor({4}, at::kFloat, 85)};
  auto dst_before = clones(dst);
  EXPECT_VALUE_ERROR([&] { unpack(flat, dst, {0, 20}); }, "weightsync[bounds]", "index 1");
  EXPECT_MSG(all_same(dst, dst_before), "a rejected unpack_ changed a destination");
  // Two destinations may read the same flat bytes.
  unpack(flat, dst, {4, 4});
  EXPECT(same_bytes(dst[0], dst[1]));
}

void test_copy_plan() {
  std::vector<at::Tensor> src = {random_tensor({100}, at::kFloat, 91),
                                 random_tensor({3, 3}, at::kHalf, 92).t()};
  std::vector<at::Tensor> dst = {at::zeros({100}, at::kFloat), at::zeros({3, 3}, at::kHalf)};
  auto plan = c10::make_intrusive<weightsync::CopyPlan>(dst, src);
  EXPECT(plan->size() == 2);
  EXPECT(plan->nbytes() == 100 * 4 + 9 * 2);
  EXPECT(plan->kernel() == "host-spans");
  plan->run(false);
  EXPECT(all_same(dst, src));

  // New values in the same memory: no rebuild needed.
  src[0].copy_(random_tensor({100}, at::kFloat, 93));
  plan->run(false);
  EXPECT(same_bytes(dst[0], src[0]));
  EXPECT(plan->rebuilds() == 0);

  // The destination moves to new memory (what .to() or load_state_dict(assign=True) do to a
  // parameter): the plan notices, rebuilds and writes the new memory.
  dst[0].set_(at::zeros({100}, at::kFloat));
  EXPECT(!plan->is_valid());
  plan->run(false);
  EXPECT(plan->rebuilds() == 1);
  EXPECT(same_bytes(dst[0], src[0]));

  // A reallocation that changes the shape is a validation error.
  dst[0].set_(at::zeros({50}, at::kFloat));
  EXPECT_VALUE_ERROR([&] { plan->run(false); }, "weightsync[shape]", "index 0");

  EXPECT_VALUE_ERROR([&] { weightsync::CopyPlan({dst[1]}, {src[0]}); }, "weightsync[dtype]");
}

// Conjugate and negative views share their base's bytes: every op must give what copy_ gives
// (csrc/math_bits.cpp lets them through the dispatcher; engine.h says how they are moved).
void test_math_bit_views() {
  // Values compared with at::equal: normal numbers, no NaN patterns.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(95);
  const at::Tensor base = at::randn({6}, gen, at::TensorOptions().dtype(at::kComplexFloat));
  const at::Tensor reals = at::randn({5}, gen, at::TensorOptions().dtype(at::kFloat));
  const std::vector<at::Tensor> src = {base.conj(), reals._neg_view(), base.conj()._neg_view()};
  for (const char* dst_view : {"plain", "conj", "neg"}) {
    std::vector<at::Tensor> dst;
    for (const auto& s : src) {
      at::Tensor d = at::zeros(s.sizes(), s.options());
      if (std::strcmp(dst_view, "conj") == 0) d = d.conj();
      if (std::strcmp(dst_view, "neg") == 0) d = d._neg_view();
      dst.push_back(d);
    }
    batched_copy(dst, src);
    for (std::size_t i = 0; i < src.size(); ++i) {
      EXPECT_MSG(at::equal(dst[i], src[i]), std::string(dst_view) + " dst, index " +
                                                std::to_string(i) + " differs");
    }
  }

  // pack_ writes the values a view shows, unpack_ makes a view show them again.
  at::Tensor flat = at::zeros({64}, at::kByte);
  pack({src[0]}, flat, {3});
  EXPECT(at::equal(flat.slice(0, 3, 3 + 48), bytes_of(src[0].resolve_conj())));
  at::Tensor back = at::zeros({6}, at::kComplexFloat)._neg_view();
  unpack(flat, {back}, {3});
  EXPECT(at::equal(back, src[0]));

  // A plan notices a bit set on the same storage (its spans would move the wrong values).
  std::vector<at::Tensor> plan_dst = {at::zeros({6}, at::kComplexFloat)};
  auto plan = c10::make_intrusive<weightsync::CopyPlan>(plan_dst, std::vector<at::Tensor>{base});
  plan->run(false);
  EXPECT(at::equal(plan_dst[0], base));
  plan_dst[0]._set_conj(true);
  EXPECT(!plan->is_valid());
  plan->run(false);
  EXPECT(plan->rebuilds() == 1);
  EXPECT(at::equal(plan_dst[0], base));
}

void test_futex_ops() {
  at::Tensor word = at::zeros({1}, at::kInt);
  const auto start = std::chrono::steady_clock::now();
  EXPECT(!futex_wait(word, 0, 0.05));
  EXPECT(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(45));
  EXPECT(futex_wait(word, 3, 5.0));
  // Spinning first changes nothing about the answers: a timeout still times out.
  const auto spun = std::chrono::steady_clock::now();
  EXPECT(!futex_wait(word, 0, 0.02, 0.01));
  EXPECT(std::chrono::steady_clock::now() - spun >= std::chrono::milliseconds(15));
  EXPECT(futex_wait(word, 3, 5.0, 0.01));
  EXPECT(futex_wake(word, 1) == 0);
  EXPECT(futex_wake(word, std::int64_t{1} << 40) == 0);  // counts above INT32_MAX are clamped
  EXPECT_VALUE_ERROR([&] { futex_wait(at::zeros({1}, at::kLong), 0, 0.0); },
                    "weightsync[argument]", "int32");
  EXPECT_VALUE_ERROR([&] { futex_wake(at::zeros({2}, at::kInt), 1); }, "weightsync[argument]",
                    "1-element");
}

void test_engine_config() {
  static auto h = op("weightsync::engine_config").typed<std::vector<std::int64_t>()>();
  const auto config = h.call();
  EXPECT(config.size() == 3);
  if (config.size() == 3) {
    EXPECT(config[0] >= 1);
    EXPECT(config[2] >= 4096);
  }
}

void test_host_register_without_cuda() {
#ifndef WEIGHTSYNC_WITH_CUDA
  static auto h = op("weightsync::host_register").typed<void(const at::Tensor&)>();
  EXPECT_VALUE_ERROR([&] { h.call(at::zeros({16}, at::kByte)); }, "weightsync[backend]",
                    "no CUDA part");
#endif
}

}  // namespace

// Runs every test, or only those named on the command line.
int main(int argc, char** argv) {
  const weightsync_test::Test tests[] = {
      {"batched_copy_exact", test_batched_copy_exact},
      {"batched_copy_large_threaded", test_batched_copy_large_threaded},
      {"batched_copy_non_contiguous", test_batched_copy_non_contiguous},
      {"batched_copy_rejects_and_changes_nothing", test_batched_copy_rejects_and_changes_nothing},
      {"batched_copy_aliasing", test_batched_copy_aliasing},
      {"pack_unpack_roundtrip", test_pack_unpack_roundtrip},
      {"pack_rejects_and_changes_nothing", test_pack_rejects_and_changes_nothing},
      {"copy_plan", test_copy_plan},
      {"math_bit_views", test_math_bit_views},
      {"futex_ops", test_futex_ops},
      {"engine_config", test_engine_config},
      {"host_register_without_cuda", test_host_register_without_cuda},
  };
  return weightsync_test::run_tests(tests, argc, argv);
}
