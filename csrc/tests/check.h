// The small check harness of the C++ tests: EXPECT records a failure and goes on, and
// run_tests runs a file's tests, prints each outcome and returns non-zero on any failure
// (ctest reads the exit code).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace weightsync_test {

inline int g_failures = 0;
inline const char* g_current = "";

inline void report(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL %s (%s:%d): %s\n", g_current, file, line, what.c_str());
}

struct Test {
  const char* name;
  void (*run)();
};

// Runs every test, or only those named on the command line (ctest reruns some by name under
// other settings). A test that throws fails with the exception's message; the rest still run.
template <std::size_t N>
int run_tests(const Test (&tests)[N], int argc, char** argv) {
  int failed_tests = 0;
  int ran = 0;
  for (const Test& t : tests) {
    if (argc > 1 && std::none_of(argv + 1, argv + argc,
                                 [&](const char* a) { return std::strcmp(a, t.name) == 0; })) {
      continue;
    }
    ++ran;
    g_current = t.name;
    const int before = g_failures;
    const auto start = std::chrono::steady_clock::now();
    try {
      t.run();
    } catch (const std::exception& e) {
      report(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const bool ok = g_failures == before;
    failed_tests += ok ? 0 : 1;
    std::printf("%s %-40s %.3f s\n", ok ? "ok  " : "FAIL", t.name, seconds);
    std::fflush(stdout);
  }
  std::printf("%d tests, %d failed, %d failed checks\n", ran, failed_tests, g_failures);
  if (ran == 0) std::fprintf(stderr, "no test matches the names given\n");
  return g_failures == 0 && ran > 0 ? 0 : 1;
}

}  // namespace weightsync_test

#define EXPECT(cond)                                                                \
  do {                                                                              \
    if (!(cond)) weightsync_test::report(__FILE__, __LINE__, "EXPECT(" #cond ")"); \
  } while (0)

#define EXPECT_MSG(cond, msg)                                        \
  do {                                                              \
    if (!(cond)) weightsync_test::report(__FILE__, __LINE__, (msg)); \
  } while (0)
