// The engine's default clock: CLOCK_MONOTONIC, read from the TSC where the kernel trusts it.
//
// A reading is a line through one anchor (tsc0, ns0, mult), published under a seqlock; the line's
// arithmetic and the re-anchoring rule are in lifecycle/tsc_line.hpp.  A reader at or past the
// anchor's `resync` tick re-anchors from a fresh (TSC, CLOCK_MONOTONIC) pair.  One reader re-anchors at
// a time (CAS on the sequence); the others read CLOCK_MONOTONIC meanwhile.
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "lifecycle/clock.hpp"
#include "lifecycle/errors.hpp"
#include "lifecycle/tsc_line.hpp"

#if defined(__x86_64__)
#include <cpuid.h>
#include <x86intrin.h>
#endif

namespace lifecycle {

std::int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

#if defined(__x86_64__)
namespace {

bool tsc_trusted() {
  const char* env = std::getenv("LIFECYCLE_CLOCK");
  if (env != nullptr && std::strcmp(env, "monotonic") == 0) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0x80000007, &a, &b, &c, &d) || !(d & (1u << 8))) return false;  // invariant TSC
  std::ifstream f("/sys/devices/system/clocksource/clocksource0/current_clocksource");
  std::string src;
  return static_cast<bool>(f >> src) && src == "tsc";
}

// A CLOCK_MONOTONIC reading and the TSC at its midpoint: the tightest of a few tries, so a
// preemption between the reads (a VM losing its CPU) cannot skew the pair.
tsc::Pair sample() {
  tsc::Pair best{0, 0};
  std::uint64_t width = UINT64_MAX;
  for (int i = 0; i < 5; ++i) {
    const std::uint64_t a = __rdtsc();
    const std::int64_t ns = monotonic_ns();
    const std::uint64_t b = __rdtsc();
    if (b - a < width) {
      width = b - a;
      best = {a + (b - a) / 2, ns};
    }
  }
  return best;
}

class TscClock {
 public:
  TscClock() : trusted_(tsc_trusted()) {
    if (!trusted_) return;
    const tsc::Pair first = sample();
    tsc::Pair p = first;
    while (p.ns - first.ns < tsc::kFirstBaseline) p = sample();  // once per process
    rate_ = tsc::first_rate(first, p);
    publish(tsc::first_anchor(rate_, p));
  }

  bool trusted() const { return trusted_; }

  std::int64_t now() {
    const std::uint64_t t = __rdtsc();
    const std::uint32_t s = seq_.load(std::memory_order_acquire);
    // acquire loads keep the re-check of seq_ after them (a seqlock without a fence, which TSan
    // cannot model); on x86 they are plain loads
    const std::uint64_t t0 = tsc0_.load(std::memory_order_acquire);
    const std::int64_t n0 = ns0_.load(std::memory_order_acquire);
    const std::uint64_t m = mult_.load(std::memory_order_acquire);
    const std::uint64_t rs = resync_.load(std::memory_order_acquire);
    if ((s & 1) || seq_.load(std::memory_order_relaxed) != s) return monotonic_ns();  // being re-anchored
    if (t >= rs) return reanchor(s);
    return tsc::line_at(t0, n0, m, t);
  }

 private:
  void publish(const tsc::Anchor& a) {
    interval_ = a.interval;
    // release stores: a reader whose acquire load sees one of them also sees seq_ odd on its re-check
    tsc0_.store(a.tsc0, std::memory_order_release);
    ns0_.store(a.ns0, std::memory_order_release);
    mult_.store(a.mult, std::memory_order_release);
    resync_.store(a.resync, std::memory_order_release);
  }

  std::int64_t reanchor(std::uint32_t s) {
    if (!seq_.compare_exchange_strong(s, s + 1, std::memory_order_acquire)) return monotonic_ns();
    const tsc::Pair p = sample();
    const tsc::Anchor cur{tsc0_.load(std::memory_order_relaxed), ns0_.load(std::memory_order_relaxed),
                          mult_.load(std::memory_order_relaxed), resync_.load(std::memory_order_relaxed), interval_};
    const tsc::Next next = tsc::reanchor(cur, rate_, p);
    publish(next.anchor);
    seq_.store(s + 2, std::memory_order_release);
    return next.reading;
  }

  const bool trusted_;
  tsc::Rate rate_{};                             // re-anchorer only
  std::int64_t interval_ = tsc::kFirstInterval;  // re-anchorer only
  std::atomic<std::uint32_t> seq_{0};
  std::atomic<std::uint64_t> tsc0_{0}, mult_{0}, resync_{0};
  std::atomic<std::int64_t> ns0_{0};
};

TscClock& tsc_clock() {
  static TscClock c;
  return c;
}

}  // namespace

std::int64_t steady_now_ns() {
  TscClock& c = tsc_clock();
  if (!c.trusted()) return monotonic_ns();
  // A read that meets a re-anchor in progress returns CLOCK_MONOTONIC, which can be a hair behind this
  // thread's last reading of a line that ran ahead; this thread's readings never go back for it.  (A step
  // back past kStepLimit, a suspend the TSC counted, is let through: freezing would stop timers for as long.)
  thread_local std::int64_t last = 0;
  std::int64_t r = c.now();
  if (r < last && last - r <= tsc::kStepLimit) r = last;
  last = r;
  return r;
}

const char* steady_source() { return tsc_clock().trusted() ? "tsc" : "monotonic"; }

#else

std::int64_t steady_now_ns() { return monotonic_ns(); }
const char* steady_source() { return "monotonic"; }

#endif

void ManualClock::throw_invalid(const char* arg, const std::string& msg) { throw InvalidArgumentError(arg, msg); }

}  // namespace lifecycle
