// The small check harness of the C++ tests: EXPECT records a failure and goes on, each
// test file prints the failures and returns non-zero (ctest reads the exit code).
#pragma once

#include <cstdio>
#include <string>

namespace weightsync_test {

inline int g_failures = 0;
inline const char* g_current = "";

inline void report(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL %s (%s:%d): %s\n", g_current, file, line, what.c_str());
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
