// Native benchmark loops (pure C++), used by benchmarks/bench_engine.py through the binding.
#pragma once
#include <cstdint>

namespace lifecycle {

struct BenchResult {
  std::uint64_t transitions = 0;
  double seconds = 0;
};

// n sessions driven advertise -> expose -> complete -> terminate (cancelled: advertise -> expose ->
// cancel -> complete -> terminate), records drained every 4096 sessions; single thread.
BenchResult bench_native(std::uint64_t n, bool cancelled);

}  // namespace lifecycle
