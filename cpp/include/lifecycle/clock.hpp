// Injectable monotonic clock: the engine reads time only through this, so tests are deterministic.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>

namespace lifecycle {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::int64_t now_ns() const = 0;
};

class SteadyClock final : public Clock {
 public:
  std::int64_t now_ns() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
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
