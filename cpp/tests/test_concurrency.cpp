// N transport threads post completions/failures while the executor thread cancels and terminates the
// same sessions and a poller drains.  Afterwards every invariant holds.  Run under ThreadSanitizer in CI.
#include <atomic>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "check.hpp"
#include "lifecycle/engine.hpp"

using namespace lifecycle;

int main() {
  constexpr std::uint64_t kSessions = 4000;
  constexpr int kThreads = 4;
  Config c;
  c.num_slots = kSessions;
  c.slot_size = 64;
  c.transfer_timeout_ns = 0;
  c.cancel_grace_ns = 0;
  c.quarantine_budget = kSessions;
  Engine eng(c);
  std::atomic<int> aborts{0};
  eng.add_abort_hook([&](const Engine::Abort&) { aborts.fetch_add(1, std::memory_order_relaxed); });
  for (std::uint64_t i = 0; i < kSessions; ++i) {
    CHECK(eng.advertise(i, i % 2 ? Role::sender : Role::receiver, 64).status == Status::Moved);
    if (i % 5 != 0) eng.apply(i, Event::expose);
  }
  std::atomic<bool> go{false};
  std::vector<std::thread> transport;
  for (int t = 0; t < kThreads; ++t) {
    transport.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) * 7919u + 1);
      while (!go.load()) std::this_thread::yield();
      for (int round = 0; round < 3; ++round)
        for (std::uint64_t i = static_cast<std::uint64_t>(t); i < kSessions; i += kThreads) {
          Event ev = (rng() % 7 == 0) ? Event::fail : Event::complete;
          eng.apply(i, ev);  // first lands, later ones are late: never an error
        }
    });
  }
  std::vector<Record> recs;
  std::atomic<bool> done{false};
  std::thread poller([&] {
    std::vector<Record> local;
    while (!done.load()) {
      eng.tick();
      eng.drain(local);
      eng.wait_ready(1'000'000);
    }
    eng.drain(local);
    recs = std::move(local);
  });
  go.store(true);
  std::mt19937_64 rng(42);
  for (std::uint64_t i = 0; i < kSessions; ++i) {
    std::uint64_t r = rng() % kSessions;
    eng.cancel(r);
    eng.terminate(r);
    if (i % 3 == 0) eng.terminate(i);
  }
  for (auto& th : transport) th.join();
  // every session that was exposed got a transport event; terminate the rest from the executor
  for (std::uint64_t i = 0; i < kSessions; ++i) {
    if (eng.info(i)->state == State::Advertised) eng.cancel(i);
    eng.terminate(i);
  }
  done.store(true);
  poller.join();
  std::vector<Record> tail;
  eng.drain(tail);
  recs.insert(recs.end(), tail.begin(), tail.end());

  std::map<std::uint64_t, int> tnow;
  std::map<std::uint64_t, int> terminated;
  for (const Record& r : recs) {
    if (r.kind == RecordKind::TerminateNow) ++tnow[r.req];
    if (r.kind == RecordKind::Transition && r.to == static_cast<std::uint8_t>(State::Terminated)) {
      ++terminated[r.req];
      // Invariant: Terminated only from a terminal state
      CHECK(kTerminal[r.from]);
    }
  }
  std::uint64_t poisoned = 0;
  for (std::uint64_t i = 0; i < kSessions; ++i) {
    auto info = eng.info(i);
    CHECK(info && info->state == State::Terminated);
    CHECK(terminated[i] == 1);
    CHECK(tnow[i] <= 1);
    if (info->outcome == Outcome::failed) ++poisoned;
  }
  PoolStats ps = eng.pool()->stats();
  // no slot leased twice / lost: every slot is free or quarantined, quarantined == poisoned sessions with slots
  CHECK(ps.leased == 0);
  CHECK(ps.free + ps.quarantined == kSessions);
  Counters ct = eng.counters();
  // a late DONE after fail is evidence: those slots were recovered, the rest stay quarantined
  CHECK(ps.quarantined + ct.recovered == poisoned);
  CHECK(ps.recovered == ct.recovered);
  CHECK(ct.terminate_now == ct.deferred);  // every deferral delivered exactly once
  CHECK(eng.live_sessions() == 0);
  CHECK(aborts.load() >= 0);
  std::printf("records=%zu deferred=%llu late=%llu poisoned=%llu aborts=%d\n", recs.size(),
              static_cast<unsigned long long>(ct.deferred), static_cast<unsigned long long>(ct.late),
              static_cast<unsigned long long>(poisoned), aborts.load());
  TEST_MAIN_END();
}
