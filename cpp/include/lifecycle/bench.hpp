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
// churn_bytes > 0: before each engine call, write and read that many bytes (a cache line every 64 B)
// on the same core, as the transport's work does between a transfer's engine calls, so every call
// runs with cold caches; then `seconds` times only the engine calls, and the engine keeps 4096
// tombstones (as bench_nixl's engine), so it reaches its steady state within a few thousand sessions.
// churn_bytes over kMaxChurnBytes: InvalidArgumentError.
inline constexpr std::uint64_t kMaxChurnBytes = 1ull << 30;
BenchResult bench_native(std::uint64_t n, bool cancelled, std::uint64_t churn_bytes = 0);

}  // namespace lifecycle
