// Minimal test harness: CHECK records failures and keeps going; main returns non-zero on any.
#pragma once
#include <cstdio>

namespace lctest {
inline int failures = 0;
inline int checks = 0;
}  // namespace lctest

#define CHECK(cond)                                                                  \
  do {                                                                               \
    ++lctest::checks;                                                                \
    if (!(cond)) {                                                                   \
      ++lctest::failures;                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
    }                                                                                \
  } while (0)

#define TEST_MAIN_END()                                                                          \
  std::printf("%d checks, %d passed, %d failed\n", lctest::checks, lctest::checks - lctest::failures, \
              lctest::failures);                                                                 \
  return lctest::failures == 0 ? 0 : 1
