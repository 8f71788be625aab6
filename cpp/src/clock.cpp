// The engine's default clock: CLOCK_MONOTONIC, read from the TSC where the kernel trusts it.
//
// Theory of operation
// -------------------
// A reading is ns0 + (tsc - tsc0) * mult / 2^32 from one anchor (tsc0, ns0, mult) published under a
// seqlock.  A reader past the anchor's `resync` tick re-anchors: it takes a (TSC, CLOCK_MONOTONIC)
// pair, keeps the new anchor on the old line at that tick (continuity, so no step backwards), and
// picks the slope that meets CLOCK_MONOTONIC at the next re-anchor, clamped near the measured
// rate.  The measured rate comes from the first anchor, so its error shrinks as the process ages.
// One reader re-anchors at a time (CAS on the sequence); the others read CLOCK_MONOTONIC meanwhile.
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "lifecycle/clock.hpp"
#include "lifecycle/errors.hpp"

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

constexpr std::int64_t kFirstInterval = 1'000'000;    // 1 ms: the first rate is rough
constexpr std::int64_t kMaxInterval = 64'000'000;     // then doubling up to 64 ms
constexpr std::int64_t kStepLimit = 1'000'000;        // further apart than 1 ms: re-anchor hard

bool tsc_trusted() {
  const char* env = std::getenv("LIFECYCLE_CLOCK");
  if (env != nullptr && std::strcmp(env, "monotonic") == 0) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0x80000007, &a, &b, &c, &d) || !(d & (1u << 8))) return false;  // invariant TSC
  std::ifstream f("/sys/devices/system/clocksource/clocksource0/current_clocksource");
  std::string src;
  return static_cast<bool>(f >> src) && src == "tsc";
}

struct Pair {
  std::uint64_t tsc;
  std::int64_t ns;
};

// A CLOCK_MONOTONIC reading and the TSC at its midpoint: the tightest of a few tries, so a
// preemption between the reads (a VM losing its CPU) cannot skew the pair.
Pair sample() {
  Pair best{0, 0};
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

std::uint64_t rate_q32(const Pair& p0, const Pair& p1) {  // ns per tick, 32.32 fixed point
  const auto dns = static_cast<unsigned __int128>(p1.ns - p0.ns);
  return static_cast<std::uint64_t>((dns << 32) / std::max<std::uint64_t>(p1.tsc - p0.tsc, 1));
}

class TscClock {
 public:
  TscClock() : trusted_(tsc_trusted()) {
    if (!trusted_) return;
    first_ = sample();
    Pair p = first_;
    while (p.ns - first_.ns < 200'000) p = sample();  // 200 us for a first rate (once per process)
    const std::uint64_t rate = rate_q32(first_, p);
    publish(p.tsc, p.ns, rate, kFirstInterval, rate);
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
    if (t <= t0) return n0;  // this core's TSC a few ticks behind the anchoring core's
    return n0 + static_cast<std::int64_t>((static_cast<unsigned __int128>(t - t0) * m) >> 32);
  }

 private:
  void publish(std::uint64_t t0, std::int64_t n0, std::uint64_t mult, std::int64_t interval, std::uint64_t rate) {
    interval_ = interval;
    // release stores: a reader whose acquire load sees one of them also sees seq_ odd on its re-check
    tsc0_.store(t0, std::memory_order_release);
    ns0_.store(n0, std::memory_order_release);
    mult_.store(mult, std::memory_order_release);
    const auto ticks = static_cast<std::uint64_t>((static_cast<unsigned __int128>(interval) << 32) / std::max<std::uint64_t>(rate, 1));
    resync_.store(t0 + ticks, std::memory_order_release);
  }

  std::int64_t reanchor(std::uint32_t s) {
    if (!seq_.compare_exchange_strong(s, s + 1, std::memory_order_acquire)) return monotonic_ns();
    const Pair p = sample();
    const std::uint64_t rate = rate_q32(first_, p);  // the longest baseline: the best rate we know
    const std::uint64_t t0 = tsc0_.load(std::memory_order_relaxed);
    const std::int64_t n0 = ns0_.load(std::memory_order_relaxed);
    const std::uint64_t m = mult_.load(std::memory_order_relaxed);
    const std::int64_t on_line = n0 + static_cast<std::int64_t>((static_cast<unsigned __int128>(p.tsc - t0) * m) >> 32);
    const std::int64_t interval = std::min(interval_ * 2, kMaxInterval);
    std::int64_t reading = on_line;
    if (on_line - p.ns > kStepLimit || p.ns - on_line > kStepLimit) {
      reading = p.ns;  // far off (suspend, migration): step to CLOCK_MONOTONIC
      publish(p.tsc, p.ns, rate, interval, rate);
    } else {
      // continue from the line and aim at CLOCK_MONOTONIC one interval from now
      const double want = static_cast<double>(p.ns + interval - on_line) / static_cast<double>(interval);
      const double slope = std::clamp(want, 0.5, 1.5) * static_cast<double>(rate);
      publish(p.tsc, on_line, static_cast<std::uint64_t>(slope), interval, rate);
    }
    seq_.store(s + 2, std::memory_order_release);
    return reading;
  }

  const bool trusted_;
  Pair first_{};
  std::int64_t interval_ = kFirstInterval;  // re-anchorer only
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
  return c.trusted() ? c.now() : monotonic_ns();
}

const char* steady_source() { return tsc_clock().trusted() ? "tsc" : "monotonic"; }

#else

std::int64_t steady_now_ns() { return monotonic_ns(); }
const char* steady_source() { return "monotonic"; }

#endif

void ManualClock::throw_invalid(const char* arg, const std::string& msg) { throw InvalidArgumentError(arg, msg); }

}  // namespace lifecycle
