// Engine unit tests: table cells, deferred termination, pool/quarantine/recovery, timers, health.
#include <memory>
#include <new>
#include <vector>

#include "check.hpp"
#include "lifecycle/engine.hpp"

using namespace lifecycle;

static constexpr std::int64_t S = 1'000'000'000;

static Config cfg() {
  Config c;
  c.transfer_timeout_ns = 10 * S;
  c.cancel_grace_ns = 2 * S;
  c.progress_deadline_ns = 30 * S;
  c.quarantine_budget = 1;
  c.num_slots = 4;
  c.slot_size = 256;
  return c;
}

static void test_every_cell_matches_apply() {
  // For each state reachable by a short path, every event does what its cell says.
  const Event paths[][3] = {{}, {Event::expose}, {Event::expose, Event::cancel}, {Event::expose, Event::complete},
                            {Event::expose, Event::fail}, {Event::expose, Event::complete}};
  const int lens[] = {0, 1, 2, 2, 2, 2};
  for (int s = 0; s < kNumStates; ++s) {
    for (int e = 0; e < kNumEvents; ++e) {
      if (static_cast<Event>(e) == kCreateEvent) continue;
      auto clock = std::make_shared<ManualClock>(0);
      Engine eng(cfg(), clock);
      CHECK(eng.advertise(1, Role::sender, 10).status == Status::Moved);
      for (int i = 0; i < lens[s]; ++i) eng.apply(1, paths[s][i]);
      if (s == static_cast<int>(State::Terminated)) eng.apply(1, Event::terminate);
      CHECK(static_cast<int>(eng.info(1)->state) == s);
      const Cell& c = kTable[s][e];
      ApplyResult r = eng.apply(1, static_cast<Event>(e));
      switch (c.action) {
        case Action::Illegal: CHECK(r.status == Status::Illegal); CHECK(static_cast<int>(eng.info(1)->state) == s); break;
        case Action::Move: CHECK(r.status == Status::Moved); break;
        case Action::Stay: CHECK(r.status == Status::Stay); break;
        case Action::Late: CHECK(r.status == Status::Late); break;
        case Action::Defer: CHECK(r.status == Status::Deferred); break;
      }
    }
  }
}

static void test_deferred_termination_exactly_once() {
  auto clock = std::make_shared<ManualClock>(0);
  Engine eng(cfg(), clock);
  eng.advertise(5, Role::receiver, 100);
  eng.apply(5, Event::expose);
  CHECK(eng.terminate(5) == TerminateResult::Deferred);
  CHECK(eng.terminate(5) == TerminateResult::AlreadyDeferred);
  eng.apply(5, Event::complete);
  eng.apply(5, Event::complete);  // late duplicate
  CHECK(eng.info(5)->state == State::Terminated);
  CHECK(eng.terminate(5) == TerminateResult::AlreadyTerminated);
  std::vector<Record> recs;
  eng.drain(recs);
  int notices = 0;
  for (auto& r : recs) notices += r.kind == RecordKind::TerminateNow;
  CHECK(notices == 1);
  CHECK(eng.pool()->stats().free == 4);
}

static void test_poison_quarantine_and_recovery() {
  auto clock = std::make_shared<ManualClock>(0);
  Engine eng(cfg(), clock);
  eng.advertise(1, Role::sender, 1);
  eng.advertise(2, Role::sender, 1);
  eng.apply(1, Event::expose);
  eng.apply(2, Event::expose);
  eng.apply(1, Event::fail);
  eng.apply(2, Event::fail);
  CHECK(eng.terminate(1) == TerminateResult::Terminated);
  CHECK(eng.terminate(2) == TerminateResult::Terminated);
  PoolStats ps = eng.pool()->stats();
  CHECK(ps.quarantined == 2);
  CHECK(ps.free == 2);
  CHECK(!eng.health().healthy);  // budget 1 < 2 quarantined
  // a late DONE for request 1 is evidence tied to its lease: the slot comes back
  std::uint32_t slot1 = eng.info(1)->slot;
  CHECK(eng.apply(1, Event::complete).status == Status::Late);
  CHECK(eng.pool()->state(slot1) == SlotState::Free);
  CHECK(eng.pool()->stats().quarantined == 1);
  CHECK(eng.health().healthy);
  // recovery with a stale generation is refused
  std::uint32_t slot2 = eng.info(2)->slot;
  CHECK(!eng.pool()->recover(slot2, eng.info(2)->generation + 1));
  CHECK(eng.pool()->state(slot2) == SlotState::Quarantined);
}

// A pool's bookkeeping grows with the slots it has leased, not with num_slots (2**31 slots of one byte
// took about 18 GiB up front); the lease order stays LIFO over released slots, then the lowest untouched.
static void test_pool_bookkeeping_is_lazy() {
  const std::uint32_t n = 1u << 31;
  BufferPool pool(n, 1);
  CHECK(pool.touched() == 0);
  CHECK(pool.num_slots() == n);
  CHECK(pool.bytes() == std::size_t{n});
  PoolStats ps = pool.stats();
  CHECK(ps.slots == n && ps.free == n && ps.leased == 0 && ps.quarantined == 0);
  CHECK(pool.state(n - 1) == SlotState::Free);
  CHECK(pool.generation(n - 1) == 0);
  CHECK(pool.data(n - 1) == pool.base() + (n - 1));
  CHECK(pool.data(n) == nullptr);
  {
    Lease a = pool.lease(), b = pool.lease();
    CHECK(a.slot() == 0 && a.generation() == 1 && b.slot() == 1 && b.generation() == 1);
    CHECK(pool.touched() == 2);
    a.release();
    Lease c = pool.lease();  // the released slot first (LIFO), with a new generation
    CHECK(c.slot() == 0 && c.generation() == 2);
    Lease d = pool.lease();  // then the lowest untouched
    CHECK(d.slot() == 2 && d.generation() == 1);
    d.quarantine();
    ps = pool.stats();
    CHECK(ps.free == n - 3 && ps.leased == 2 && ps.quarantined == 1 && ps.leases == 4);
    CHECK(pool.state(2) == SlotState::Quarantined);
    CHECK(!pool.recover(3, 1));  // untouched: not quarantined
    CHECK(pool.recover(2, 1));
  }
  ps = pool.stats();
  CHECK(ps.free == n && ps.leased == 0 && pool.touched() == 3);
  // a small pool runs dry after num_slots leases
  BufferPool small(2, 8);
  Lease x = small.lease(), y = small.lease(), z = small.lease();
  CHECK(x.held() && y.held() && !z.held());
  CHECK(small.stats().free == 0);
}

static void test_timers_and_health() {
  auto clock = std::make_shared<ManualClock>(0);
  Engine eng(cfg(), clock);
  eng.advertise(1, Role::sender, 0);
  eng.apply(1, Event::expose);
  clock->advance(9 * S);
  CHECK(eng.tick() == 0);
  clock->advance(1 * S);
  CHECK(eng.tick() == 1);  // timeout -> CancelRequested
  CHECK(eng.info(1)->state == State::CancelRequested);
  clock->advance(2 * S);
  CHECK(eng.tick() == 1);  // grace_expired -> Poisoned
  CHECK(eng.info(1)->state == State::Poisoned);
  CHECK(eng.info(1)->outcome == Outcome::expired);
  // no ticking: a wedged InFlight session past timer + deadline makes health fail, even while another progresses
  Config c = cfg();
  Engine e2(c, clock);
  e2.advertise(10, Role::sender, 0);
  e2.apply(10, Event::expose);
  for (std::uint64_t i = 100; i < 125; ++i) {
    clock->advance(2 * S);
    e2.advertise(i, Role::sender, 0);
    e2.apply(i, Event::expose);
    e2.apply(i, Event::complete);
    e2.apply(i, Event::terminate);
  }
  Health h = e2.health();
  CHECK(!h.healthy);
  bool named = false;
  for (auto& r : h.reasons) named = named || r.find("request 10 ") != std::string::npos;
  CHECK(named);
}

static void test_slow_progress_stays_healthy() {
  auto clock = std::make_shared<ManualClock>(0);
  Engine eng(cfg(), clock);
  for (std::uint64_t i = 0; i < 50; ++i) {
    eng.advertise(i, Role::sender, 0);
    eng.apply(i, Event::expose);
  }
  for (std::uint64_t i = 0; i < 50; ++i) {
    clock->advance(S / 5);  // each finishes within its timer; the transport is slow but moving
    eng.apply(i, Event::complete);
    CHECK(eng.health().healthy);
  }
}

static void test_tombstones_are_bounded() {
  Config c = cfg();
  c.tombstones = 32;
  c.shards = 4;
  Engine eng(c);
  for (std::uint64_t i = 0; i < 10000; ++i) {
    eng.advertise(i, Role::sender, 0);
    eng.apply(i, Event::cancel);
    eng.apply(i, Event::terminate);
  }
  Health h = eng.health();
  CHECK(h.counts[static_cast<int>(State::Terminated)] <= 32);
  CHECK(eng.live_sessions() == 0);
}

// A batch keeps each request's events in order, whatever shard order it runs in, and agrees with
// one call per event; ids that collide in the map (many sessions, few shards) still resolve.
static void test_batch_matches_single_calls() {
  Config c = cfg();
  c.num_slots = 0;
  c.shards = 2;
  Engine batch(c), single(c);
  std::vector<std::uint64_t> ids;
  std::vector<std::uint8_t> evs;
  const Event script[] = {Event::expose, Event::cancel, Event::complete, Event::terminate};
  for (std::uint64_t i = 0; i < 3000; ++i) {
    CHECK(batch.advertise(i * 7919, Role::sender, 0).status == Status::Moved);
    single.advertise(i * 7919, Role::sender, 0);
  }
  for (const Event ev : script)  // every request's whole script in one batch, interleaved
    for (std::uint64_t i = 0; i < 3000; ++i) {
      ids.push_back(i * 7919);
      evs.push_back(static_cast<std::uint8_t>(ev));
    }
  ids.push_back(123456789);  // unknown
  evs.push_back(static_cast<std::uint8_t>(Event::complete));
  std::vector<std::uint8_t> out(ids.size());
  batch.apply_batch(ids.data(), evs.data(), ids.size(), out.data());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const ApplyResult r = single.apply(ids[i], static_cast<Event>(evs[i]));
    CHECK(out[i] == static_cast<std::uint8_t>(r.status));
  }
  CHECK(out.back() == static_cast<std::uint8_t>(Status::Unknown));
  for (std::uint64_t i = 0; i < 3000; ++i) CHECK(batch.info(i * 7919)->state == State::Terminated);
  // per request, the records come out in the order the events were applied
  std::vector<Record> recs;
  batch.drain(recs);
  std::vector<int> last_event(3000, -1);
  bool ordered = true;
  for (const Record& r : recs) {
    if (r.kind != RecordKind::Transition) continue;
    int& prev = last_event[r.req / 7919];
    ordered = ordered && static_cast<int>(r.event) != prev;  // never the same event twice
    prev = r.event;
    if (r.event == static_cast<std::uint8_t>(Event::terminate)) CHECK(r.to == static_cast<std::uint8_t>(State::Terminated));
  }
  CHECK(ordered);
}

// drain_to is lossless when the destination cannot be allocated: the records stay queued, in order.
static void test_drain_to_failure_keeps_records() {
  Engine eng(cfg());
  for (std::uint64_t i = 0; i < 100; ++i) eng.advertise(i, Role::sender, 0);
  bool threw = false;
  try {
    eng.drain_to([](std::size_t) -> Record* { throw std::bad_alloc(); });
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  CHECK(threw);
  eng.advertise(100, Role::sender, 0);  // queued after the failed drain
  std::vector<Record> recs;
  CHECK(eng.drain(recs) == 101);
  bool in_order = recs.size() == 101;
  for (std::size_t i = 1; i < recs.size(); ++i) in_order = in_order && recs[i - 1].seq < recs[i].seq;
  CHECK(in_order);
  CHECK(recs.size() == 101 && recs.back().req == 100);
}

int main() {
  test_batch_matches_single_calls();
  test_drain_to_failure_keeps_records();
  test_every_cell_matches_apply();
  test_deferred_termination_exactly_once();
  test_poison_quarantine_and_recovery();
  test_pool_bookkeeping_is_lazy();
  test_timers_and_health();
  test_slow_progress_stays_healthy();
  test_tombstones_are_bounded();
  TEST_MAIN_END();
}
