#include "lifecycle/transport/bench.hpp"

#include <chrono>

#include "lifecycle/transport/nixl_capi.hpp"  // TransportError

namespace lifecycle::transport {

namespace {
std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

BenchResult bench_transfers(Transport& t, const BenchSpec& spec) {
  BenchResult res;
  if (spec.size == 0 || spec.batch == 0) throw TransportError("bench: size and batch must be > 0");
  Engine* e = t.engine();
  const Role role = spec.op == XferOp::Read ? Role::receiver : Role::sender;
  std::vector<Record> recs;
  recs.reserve(4 * spec.batch);
  std::uint64_t req = spec.first_req;
  std::uint64_t target = t.completions();
  res.latency_ns.reserve(spec.count);
  res.batch_ns.reserve(spec.count / spec.batch + 1);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::uint64_t done = 0; done < spec.count;) {
    const std::uint64_t n = std::min(spec.batch, spec.count - done);
    const std::uint64_t first = req;
    const std::int64_t b0 = steady_ns();
    for (std::uint64_t i = 0; i < n; ++i, ++req) {
      Region l{spec.local_addr + i * spec.size, spec.size, 0, MemKind::Dram};
      Region r{spec.remote_addr + i * spec.size, spec.size, 0, MemKind::Dram};
      if (e != nullptr && e->advertise(req, role, 0).status != Status::Moved) {
        throw TransportError("bench: advertise refused for request " + std::to_string(req));
      }
      (void)t.transfer(req, spec.op, l, r, spec.peer);
    }
    if (e != nullptr) {
      std::uint64_t terminal = 0;
      while (terminal < n) {
        recs.clear();
        if (e->drain(recs) == 0) {
          (void)e->wait_ready(1'000'000'000);
          if (t.stopped()) throw TransportError("bench: transport stopped");
          continue;
        }
        const std::int64_t now = steady_ns();
        for (const Record& rec : recs) {
          if (rec.kind != RecordKind::Transition || rec.req < first || rec.req >= first + n) continue;
          const auto to = static_cast<State>(rec.to);
          if (to == State::Quiesced || to == State::Poisoned) {
            ++terminal;
            if (to == State::Poisoned) ++res.failed;
            res.latency_ns.push_back(now - rec.t_ns);
          }
        }
      }
      for (std::uint64_t r = first; r < first + n; ++r) (void)e->terminate(r);
    } else {
      target += n;
      // same waiting as the engine loop's wait_ready (spin, then sleep): like for like
      if (!t.wait_completions(target, 10'000'000'000, Config{}.wait_spin_ns)) throw TransportError("bench: transfers did not complete");
    }
    res.batch_ns.push_back(steady_ns() - b0);
    done += n;
    res.transfers += n;
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (e != nullptr) {  // drain what terminate queued so the next run starts clean
    recs.clear();
    e->drain(recs);
  }
  return res;
}

}  // namespace lifecycle::transport
