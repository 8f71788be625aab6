#include "lifecycle/transport/bench.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lifecycle/errors.hpp"
#include "lifecycle/transport/nixl_capi.hpp"  // TransportError

namespace lifecycle::transport {

namespace {
std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// One loop's state: a transport, with or without an engine, and what it measured so far.
struct Loop {
  Transport& t;
  const BenchSpec& spec;
  BenchResult& res;
  std::uint64_t req;
  std::uint64_t target;
  std::vector<Record> recs;
  std::vector<std::uint64_t> ids;  // batch_calls: the batch's ids, then each drain's terminal ones
  std::vector<std::uint8_t> events, out;
  std::vector<TransferItem> items;        // batch_calls: the batch's transfers
  std::vector<TransferOutcome> outcomes;

  Loop(Transport& tr, const BenchSpec& s, BenchResult& r, std::uint64_t first_req)
      : t(tr), spec(s), res(r), req(first_req), target(tr.completions()) {
    recs.reserve(4 * spec.batch);
    res.latency_ns.reserve(spec.count);
    res.batch_ns.reserve(spec.count / spec.batch + 1);
    items.reserve(spec.batch);
    outcomes.reserve(spec.batch);
    res.post_ns.reserve(spec.count / spec.batch + 1);
  }

  // batch_calls: every item of the batch call just made on `ids` moved (the per-call path's check).
  void all_moved(const char* call) const {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (out[i] != static_cast<std::uint8_t>(Status::Moved)) {
        throw TransportError(std::string("bench: ") + call + " refused for request " + std::to_string(ids[i]));
      }
    }
  }

  // Post `n` transfers, wait until every one is done (engine: terminal, then terminated).
  void batch(std::uint64_t n) {
    Engine* e = t.engine();
    const Role role = active_role(spec.op);
    const std::uint64_t first = req;
    const std::int64_t b0 = steady_ns();
    const bool batched = e != nullptr && spec.batch_calls;
    if (batched) {
      ids.resize(n);
      out.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) ids[i] = req + i;
      e->advertise_batch(ids.data(), n, role, 0, out.data());
      all_moved("advertise");
      ids.clear();  // from here: the terminal requests of each drain
    }
    if (spec.batch_calls) {  // both loops: the batch's transfers in one transfer_batch
      items.resize(n);
      outcomes.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) {
        items[i] = TransferItem{req + i, spec.op, {spec.local_addr + i * spec.size, spec.size, 0, MemKind::Dram},
                                {spec.remote_addr + i * spec.size, spec.size, 0, MemKind::Dram}, &spec.peer, 0};
      }
      t.transfer_batch(items.data(), n, outcomes.data());
      for (const TransferOutcome& o : outcomes) {
        if (o.error) std::rethrow_exception(o.error);
      }
      req += n;
    }
    for (std::uint64_t i = 0; i < n && !spec.batch_calls; ++i, ++req) {
      Region l{spec.local_addr + i * spec.size, spec.size, 0, MemKind::Dram};
      Region r{spec.remote_addr + i * spec.size, spec.size, 0, MemKind::Dram};
      if (e != nullptr && e->advertise(req, role, 0).status != Status::Moved) {
        throw TransportError("bench: advertise refused for request " + std::to_string(req));
      }
      (void)t.transfer(req, spec.op, l, r, spec.peer, /*tag=*/0);  // the peer is bare: no expect()
    }
    res.post_ns.push_back(steady_ns() - b0);
    if (e != nullptr) {
      std::uint64_t terminal = 0;
      int idle_s = 0;  // whole seconds without a record: 10 end the run (never a hang)
      while (terminal < n) {
        recs.clear();
        if (e->drain(recs) == 0) {
          idle_s = e->wait_ready(1'000'000'000) ? 0 : idle_s + 1;
          if (t.stopped() || idle_s == 10) throw TransportError("bench: transfers did not complete");
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
            // as an executor does: release each request once it is terminal, while the rest of
            // the batch is still moving (not all at the end, after the last completion)
            if (batched) {
              ids.push_back(rec.req);
            } else if (e->terminate(rec.req) != TerminateResult::Terminated) {
              throw TransportError("bench: terminate refused for request " + std::to_string(rec.req));
            }
          }
        }
        if (batched && !ids.empty()) {  // this drain's terminal requests, in one call
          events.assign(ids.size(), static_cast<std::uint8_t>(Event::terminate));
          out.resize(ids.size());
          e->apply_batch(ids.data(), events.data(), ids.size(), out.data());
          all_moved("terminate");
          ids.clear();
        }
      }
    } else {
      target += n;
      // The engine loop's waiting, like for like: wait for the next completion (spin, then sleep, as
      // wait_ready), then again, until the batch is done.  (Waiting for all n at once slept through the
      // completions after the first spin, each one waking the loop: the bare loop waited ~2 us a transfer
      // longer than the engine loop at 4 KiB x 64, which flattered the engine.)
      int idle_s = 0;  // whole seconds without a completion: 10 end the run (never a hang)
      for (std::uint64_t seen = t.completions(); seen < target; seen = t.completions()) {
        if (t.wait_completions(seen + 1, 1'000'000'000, Config{}.wait_spin_ns)) {
          idle_s = 0;
        } else if (t.stopped() || ++idle_s == 10) {
          throw TransportError("bench: transfers did not complete");
        }
      }
    }
    res.batch_ns.push_back(steady_ns() - b0);
    res.transfers += n;
  }

  void finish() {
    if (Engine* e = t.engine()) {  // drain what terminate queued so the next run starts clean
      recs.clear();
      e->drain(recs);
    }
  }
};

}  // namespace

std::pair<BenchResult, BenchResult> bench_paired(Transport& a, Transport& b, const BenchSpec& spec) {
  if (spec.size == 0 || spec.batch == 0) throw TransportError("bench: size and batch must be > 0");
  // Bounded: the loop runs with the GIL released and reserves per transfer (2**40 was a bare bad_alloc),
  // and the two loops' request ids must not wrap past 2**64 (they waited out a timeout on the wrapped ids).
  if (spec.count == 0 || spec.count > 100'000'000) {
    throw InvalidArgumentError("count", "expected 1 .. 100000000 transfers, got " + std::to_string(spec.count));
  }
  if (spec.batch > 65'536) {
    throw InvalidArgumentError("batch", "expected 1 .. 65536 in flight, got " + std::to_string(spec.batch));
  }
  if (spec.first_req > UINT64_MAX - 2 * spec.count) {
    throw InvalidArgumentError("first_request", std::to_string(spec.first_req) + " + 2 x " + std::to_string(spec.count) +
                                                    " request ids run past 2**64");
  }
  std::pair<BenchResult, BenchResult> res;
  Loop la(a, spec, res.first, spec.first_req);
  Loop lb(b, spec, res.second, spec.first_req + spec.count);
  for (std::uint64_t done = 0, k = 0; done < spec.count; ++k) {
    const std::uint64_t n = std::min(spec.batch, spec.count - done);
    if (k % 2 == 0) {  // a then b, then b then a: neither always runs first
      la.batch(n);
      lb.batch(n);
    } else {
      lb.batch(n);
      la.batch(n);
    }
    done += n;
  }
  la.finish();
  lb.finish();
  for (BenchResult* r : {&res.first, &res.second}) {
    double s = 0;
    for (std::int64_t x : r->batch_ns) s += static_cast<double>(x);
    r->seconds = s / 1e9;
  }
  return res;
}

}  // namespace lifecycle::transport
