// SteadyClock against CLOCK_MONOTONIC: every reading falls between the CLOCK_MONOTONIC readings
// taken just before and just after it (within a small tolerance), and readings never go backwards
// in a thread, from several threads at once across many re-anchors.  Run under ThreadSanitizer.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "check.hpp"
#include "lifecycle/clock.hpp"

using namespace lifecycle;

namespace {

struct Stats {
  long samples = 0, bracket_violations = 0, backwards = 0;
  std::int64_t worst = 0;
};

// A reading off by more than `tol_ns` from its CLOCK_MONOTONIC bracket is a violation.  Brackets
// wider than 20 us (the thread lost its CPU between the reads) say nothing and are skipped.
Stats sweep(const Clock& clock, std::int64_t duration_ns, std::int64_t tol_ns) {
  Stats st;
  std::int64_t prev = INT64_MIN;
  const std::int64_t end = monotonic_ns() + duration_ns;
  for (;;) {
    const std::int64_t a = monotonic_ns();
    const std::int64_t e = clock.now_ns();
    const std::int64_t b = monotonic_ns();
    if (a > end) break;
    if (e < prev) ++st.backwards;
    prev = e;
    if (b - a > 20'000) continue;
    ++st.samples;
    const std::int64_t off = std::max(a - e, e - b);
    st.worst = std::max(st.worst, off);
    if (off > tol_ns) ++st.bracket_violations;
  }
  return st;
}

}  // namespace

int main() {
  std::printf("steady clock source: %s\n", steady_source());
  const SteadyClock steady;
  constexpr int kThreads = 3;
  constexpr std::int64_t kTol = 20'000;  // 20 us: the clock is specified to about 1 us
  std::vector<Stats> per(kThreads);
  std::vector<std::thread> th;
  // 300 ms: past the first re-anchors (1, 2, 4, ... ms) and several at the 64 ms cadence
  for (int t = 0; t < kThreads; ++t) th.emplace_back([&, t] { per[t] = sweep(steady, 300'000'000, kTol); });
  for (auto& x : th) x.join();
  for (const Stats& s : per) {
    std::printf("samples %ld, worst offset %lld ns, bracket violations %ld, backwards %ld\n", s.samples,
                static_cast<long long>(s.worst), s.bracket_violations, s.backwards);
    CHECK(s.samples > 1000);
    CHECK(s.bracket_violations == 0);
    CHECK(s.backwards == 0);
  }
  // Negative control: a clock that is 1 ms behind must be caught by the same sweep.
  struct Behind final : Clock {
    std::int64_t now_ns() const override { return monotonic_ns() - 1'000'000; }
  } behind;
  const Stats bad = sweep(behind, 20'000'000, kTol);
  CHECK(bad.samples > 0 && bad.bracket_violations == bad.samples);
  TEST_MAIN_END();
}
