// Injectable monotonic clock: the engine reads time only through this, so tests are deterministic.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

namespace lifecycle {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::int64_t now_ns() const = 0;
};

// CLOCK_MONOTONIC through the vDSO: ~20 ns a read, most of it the serialising fence before RDTSC.
std::int64_t monotonic_ns();

// CLOCK_MONOTONIC nanoseconds read from the invariant TSC (a plain RDTSC and a multiply), kept on
// CLOCK_MONOTONIC by re-anchoring at least every 64 ms (sooner while the two disagree): a re-anchor
// takes CLOCK_MONOTONIC whenever no earlier reading was above it, and otherwise slows the line until
// they meet; a thread's readings never go backwards (each thread holds its last one against a read that
// met a re-anchor in progress; only a step back past 1 ms, a suspend, gets through) and
// stay within about a microsecond of CLOCK_MONOTONIC (tests/test_clock.py measures it; the rule is in
// lifecycle/tsc_line.hpp, simulated in cpp/tests/test_clock.cpp).  Used only where the kernel itself
// trusts the TSC (clocksource "tsc", invariant TSC flag); otherwise, or with LIFECYCLE_CLOCK=monotonic
// in the environment, every read is monotonic_ns().
std::int64_t steady_now_ns();
// Which source steady_now_ns() uses in this process: "tsc" or "monotonic".
const char* steady_source();

// Spin (yielding to runnable threads) until done() holds or spin_ns have passed; returns done().
// The waits that must notice a completion fast (Engine::wait_ready, Transport::wait_completions) spin
// with this before they sleep on their condition variables.
template <class Done>
bool spin_for(std::int64_t spin_ns, Done&& done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(std::max<std::int64_t>(spin_ns, 0));
  while (!done()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::yield();
  }
  return true;
}

class SteadyClock final : public Clock {
 public:
  std::int64_t now_ns() const override { return steady_now_ns(); }
};

// A clock that moves only when told to (tests, model checking).  Never goes backwards.
class ManualClock final : public Clock {
 public:
  // The latest reading a ManualClock may hold (2**62 ns, about 146 years): a reading plus two of the engine's
  // longest durations (kMaxDurationNs each) stays inside int64.  SteadyClock readings (since boot) are far below.
  static constexpr std::int64_t kMaxNs = std::int64_t{1} << 62;
  explicit ManualClock(std::int64_t start_ns = 0) : now_(checked("start_ns", start_ns)) {}
  std::int64_t now_ns() const override { return now_.load(std::memory_order_acquire); }
  // Moves the clock on by delta_ns >= 0 (InvalidArgumentError past kMaxNs or for a negative delta: a clock
  // never goes back).
  void advance(std::int64_t delta_ns) {
    if (delta_ns < 0) throw_invalid("delta_ns", "a clock never goes back, got " + std::to_string(delta_ns));
    std::int64_t cur = now_.load(std::memory_order_acquire);
    do {
      if (delta_ns > kMaxNs - cur) {
        throw_invalid("delta_ns", "the clock would pass 2**62 ns (" + std::to_string(cur) + " + " +
                                      std::to_string(delta_ns) + ")");
      }
    } while (!now_.compare_exchange_weak(cur, cur + delta_ns, std::memory_order_acq_rel));
  }
  // Sets the clock to t_ns in [0, 2**62] if that is later than now (an earlier t_ns is ignored).
  void set(std::int64_t t_ns) {
    checked("t_ns", t_ns);
    std::int64_t cur = now_.load(std::memory_order_acquire);
    while (t_ns > cur && !now_.compare_exchange_weak(cur, t_ns, std::memory_order_acq_rel)) {
    }
  }

 private:
  [[noreturn]] static void throw_invalid(const char* arg, const std::string& msg);  // InvalidArgumentError
  static std::int64_t checked(const char* arg, std::int64_t t) {
    if (t < 0 || t > kMaxNs) throw_invalid(arg, "expected ns in [0, 2**62], got " + std::to_string(t));
    return t;
  }
  std::atomic<std::int64_t> now_;
};

}  // namespace lifecycle
