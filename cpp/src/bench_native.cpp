#include "lifecycle/bench.hpp"

#include <chrono>
#include <vector>

#include "lifecycle/engine.hpp"

namespace lifecycle {

BenchResult bench_native(std::uint64_t n, bool cancelled) {
  Config cfg;
  Engine e(cfg);
  std::vector<Record> sink;
  sink.reserve(4096 * 6);
  auto t0 = std::chrono::steady_clock::now();
  for (std::uint64_t i = 0; i < n; ++i) {
    e.advertise(i, Role::sender, 0);
    e.apply(i, Event::expose);
    if (cancelled) e.apply(i, Event::cancel);
    e.apply(i, Event::complete);
    e.apply(i, Event::terminate);
    if ((i & 4095) == 4095) {
      sink.clear();
      e.drain(sink);
    }
  }
  auto t1 = std::chrono::steady_clock::now();
  BenchResult r;
  r.transitions = e.counters().transitions;
  r.seconds = std::chrono::duration<double>(t1 - t0).count();
  return r;
}

}  // namespace lifecycle
