// A C++ transfer loop for benchmarks: the same transfers with and without the engine, no Python in
// the loop (benchmarks/bench_nixl.py prints the numbers side by side).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lifecycle/transport/transport.hpp"

namespace lifecycle::transport {

struct BenchSpec {
  std::string peer;
  XferOp op = XferOp::Write;
  std::uintptr_t local_addr = 0;   // batch slot i uses local_addr + i * size
  std::uintptr_t remote_addr = 0;  // and remote_addr + i * size
  std::uint64_t size = 0;
  std::uint64_t batch = 1;
  std::uint64_t count = 0;
  std::uint64_t first_req = 1;
  // Each batch posted by one transfer_batch() (with or without an engine: like for like); with an engine
  // also advertised in one advertise_batch(), and what each drain brought terminated in one apply_batch(),
  // as an executor with a batch in hand would.
  bool batch_calls = false;
};

struct BenchResult {
  double seconds = 0;
  std::uint64_t transfers = 0;
  std::uint64_t failed = 0;
  // Engine mode: for each completed transfer, steady time from the engine's `complete` transition
  // (its record timestamp) to the moment this loop drained it.
  std::vector<std::int64_t> latency_ns;
  // Wall time of each batch (post the batch .. every transfer of it done): a median over these is
  // robust to the millisecond preemptions a shared VM deals out, which the mean (seconds) is not.
  std::vector<std::int64_t> batch_ns;
  // Of each batch, the part spent posting it (advertise + transfer() for every transfer of it): the rest
  // of batch_ns is waiting for (and, with an engine, draining and terminating) its completions.
  std::vector<std::int64_t> post_ns;
};

// The same `spec` through `a` and `b`, batch by batch in alternation (a b, b a, a b, ...), so both see
// the same machine state at batch granularity; batch_ns[i] of the two results are a pair. `a` uses
// request ids first_req.., `b` first_req + count.. ; `seconds` is the sum of the batch times.
// Per batch, through a transport with an engine: advertise (role by op), transfer, then wait
// (wait_ready + drain) until every session of the batch is terminal, terminating each as soon as its
// terminal transition is drained (as an executor releases a request's blocks; with batch_calls, the
// batch's advertisements, its transfers and each drain's terminations in one call each); without one:
// transfer (batch_calls: transfer_batch), wait_completions. Throws on errors.
std::pair<BenchResult, BenchResult> bench_paired(Transport& a, Transport& b, const BenchSpec& spec);

}  // namespace lifecycle::transport
