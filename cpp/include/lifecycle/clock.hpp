// Injectable monotonic clock: the engine reads time only through this, so tests are deterministic.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
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
// CLOCK_MONOTONIC by re-anchoring at least every 64 ms: each re-anchor slews the slope so the two
// meet at the next one, so readings stay continuous and increasing in each thread and within
// about a microsecond of CLOCK_MONOTONIC (tests/test_clock.py measures it).  Used only where the
// kernel itself trusts the TSC (clocksource "tsc", invariant TSC flag); otherwise, or with
// LIFECYCLE_CLOCK=monotonic in the environment, every read is monotonic_ns().
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
  explicit ManualClock(std::int64_t start_ns = 0) : now_(start_ns) {}
  std::int64_t now_ns() const override { return now_.load(std::memory_order_acquire); }
  void advance(std::int64_t delta_ns) {
    if (delta_ns > 0) now_.fetch_add(delta_ns, std::memory_order_acq_rel);
  }
  void set(std::int64_t t_ns) {
    std::int64_t cur = now_.load(std::memory_order_acquire);
    while (t_ns > cur && !now_.compare_exchange_weak(cur, t_ns, std::memory_order_acq_rel)) {
    }
  }

 private:
  std::atomic<std::int64_t> now_;
};

}  // namespace lifecycle
