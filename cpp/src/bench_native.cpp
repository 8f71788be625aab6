#include "lifecycle/bench.hpp"

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include "lifecycle/clock.hpp"
#include "lifecycle/engine.hpp"
#include "lifecycle/errors.hpp"

namespace lifecycle {

namespace {
// Write and read back `buf` (a transfer's worth of bytes through this core's caches, as the
// transport's copy does between two engine calls); returns a value the compiler must keep.
std::uint64_t churn(std::vector<std::uint64_t>& buf, std::uint64_t i) {
  std::uint64_t acc = 0;
  for (std::size_t k = 0; k < buf.size(); k += 8) buf[k] = i + k;
  for (std::size_t k = 0; k < buf.size(); k += 8) acc += buf[k];
  return acc;
}
}  // namespace

BenchResult bench_native(std::uint64_t n, bool cancelled, std::uint64_t churn_bytes) {
  if (churn_bytes > kMaxChurnBytes) {
    throw InvalidArgumentError("churn_bytes", std::to_string(churn_bytes) + " is over " +
                                                  std::to_string(kMaxChurnBytes));
  }
  // The loop runs with the GIL released and cannot be interrupted: a bound keeps a typo from running for
  // hours (1e8 sessions: ~1 min warm; the churn moves n * churn_bytes through the caches).
  if (n == 0 || n > 100'000'000) {
    throw InvalidArgumentError("n", "expected 1 .. 100000000 sessions, got " + std::to_string(n));
  }
  if (churn_bytes > 0 && n > (std::uint64_t{1} << 40) / churn_bytes) {
    throw InvalidArgumentError("n", std::to_string(n) + " sessions x " + std::to_string(churn_bytes) +
                                        " churn bytes is over 2**40 bytes through the caches");
  }
  Config cfg;
  if (churn_bytes > 0) cfg.tombstones = 1u << 12;  // as bench_nixl's engine: steady state within 4096 sessions
  Engine e(cfg);
  std::vector<Record> sink;
  sink.reserve(4096 * 6);
  std::vector<std::uint64_t> buf(churn_bytes / 8);
  volatile std::uint64_t keep = 0;
  using Clock = std::chrono::steady_clock;
  std::int64_t engine_ns = 0;  // timed with the engine's own clock: its lines are the engine's anyway
  const auto t0 = Clock::now();
  // With churn: churn before every engine call (the transport's work comes between them: prepare and
  // post between advertise and expose, the copy before complete, the executor's own work before
  // terminate), and time the call alone.
  auto call = [&](auto&& fn) {
    if (buf.empty()) return (void)fn();
    keep = keep + churn(buf, keep);
    const std::int64_t s0 = steady_now_ns();
    (void)fn();
    engine_ns += steady_now_ns() - s0;
  };
  for (std::uint64_t i = 0; i < n; ++i) {
    call([&] { return e.advertise(i, Role::sender, 0); });
    call([&] { return e.apply(i, Event::expose); });
    if (cancelled) call([&] { return e.apply(i, Event::cancel); });
    call([&] { return e.apply(i, Event::complete); });
    call([&] { return e.apply(i, Event::terminate); });
    if ((i & 4095) == 4095) {
      sink.clear();
      call([&] { return e.drain(sink); });
    }
  }
  const auto t1 = Clock::now();
  BenchResult r;
  r.transitions = e.counters().transitions;
  // With churn, only the engine calls are timed (two clock reads per call included).
  r.seconds = buf.empty() ? std::chrono::duration<double>(t1 - t0).count() : static_cast<double>(engine_ns) / 1e9;
  return r;
}

}  // namespace lifecycle
