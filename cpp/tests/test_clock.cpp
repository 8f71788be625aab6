// SteadyClock against CLOCK_MONOTONIC: every reading falls between the CLOCK_MONOTONIC readings
// taken just before and just after it (within a small tolerance), and readings never go backwards
// in a thread, from several threads at once across many re-anchors.  Run under ThreadSanitizer.
//
// Then the re-anchoring rule itself (lifecycle/tsc_line.hpp), on a simulated machine whose
// CLOCK_MONOTONIC changes rate (an NTP slew), steps, or is not read for minutes: things this host
// does not do on demand.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "check.hpp"
#include "lifecycle/clock.hpp"
#include "lifecycle/tsc_line.hpp"

using namespace lifecycle;

namespace {

struct Stats {
  long samples = 0, bracket_violations = 0, backwards = 0;
  std::int64_t worst = 0;
};

// A reading off by more than `tol_ns` from its CLOCK_MONOTONIC bracket is a violation.  Brackets
// wider than 20 us (the thread lost its CPU between the reads) say nothing and are skipped.
Stats sweep(const Clock& clock, std::int64_t duration_ns, std::int64_t tol_ns) {
  Stats st;
  std::int64_t prev = INT64_MIN;
  const std::int64_t end = monotonic_ns() + duration_ns;
  for (;;) {
    const std::int64_t a = monotonic_ns();
    const std::int64_t e = clock.now_ns();
    const std::int64_t b = monotonic_ns();
    if (a > end) break;
    if (e < prev) ++st.backwards;
    prev = e;
    if (b - a > 20'000) continue;
    ++st.samples;
    const std::int64_t off = std::max(a - e, e - b);
    st.worst = std::max(st.worst, off);
    if (off > tol_ns) ++st.bracket_violations;
  }
  return st;
}

// A simulated TSC at 2.5 GHz and a CLOCK_MONOTONIC that is a piecewise-linear function of it.  From
// each change on (at a tick), CLOCK_MONOTONIC runs at `ns_per_tick` after a step of `step_ns`.
struct Change {
  std::uint64_t at;
  double ns_per_tick;
  double step_ns;
};

class SimMachine {
 public:
  static constexpr double kNsPerTick = 0.4;
  static constexpr std::uint64_t kStart = 1'000'000'000'000ull;  // the TSC at "boot + 400 s"

  explicit SimMachine(std::vector<Change> changes) : changes_(std::move(changes)) {}

  double truth(std::uint64_t t) const {  // CLOCK_MONOTONIC at tick t
    double ns = 400e9, rate = kNsPerTick;
    std::uint64_t from = kStart;
    for (const Change& c : changes_) {
      if (c.at > t) break;
      ns += static_cast<double>(c.at - from) * rate + c.step_ns;
      rate = c.ns_per_tick;
      from = c.at;
    }
    return ns + static_cast<double>(t - from) * rate;
  }

  // A (TSC, CLOCK_MONOTONIC) pair as sample() takes it: up to 40 ns of jitter (deterministic).
  tsc::Pair sample(std::uint64_t t) {
    jitter_ = jitter_ * 6364136223846793005ull + 1442695040888963407ull;
    const double j = static_cast<double>(jitter_ >> 40) / static_cast<double>(1ull << 24) * 80.0 - 40.0;
    return {t, static_cast<std::int64_t>(std::llround(truth(t) + j))};
  }

 private:
  std::vector<Change> changes_;
  std::uint64_t jitter_ = 42;
};

using Rule = tsc::Next (*)(const tsc::Anchor&, tsc::Rate&, const tsc::Pair&);

// The negative control's rule (the one before session 15): every re-anchor goes on from the line,
// slewed to meet CLOCK_MONOTONIC one interval later, so an error found late is spread over the next
// interval instead of dropped; steps only past kStepLimit; the rate always from the first pair.
tsc::Next continue_from_line(const tsc::Anchor& cur, tsc::Rate& rate, const tsc::Pair& p) {
  rate = {rate.base, tsc::rate_q32(rate.base, p), p.ns - rate.base.ns};
  const std::int64_t on_line = tsc::line_at(cur, p.tsc);
  const std::int64_t interval = std::min(cur.interval * 2, tsc::kMaxInterval);
  if (std::abs(on_line - p.ns) > tsc::kStepLimit) return {tsc::make_anchor(p.tsc, p.ns, rate.q32, interval, rate.q32), p.ns};
  const double want = static_cast<double>(p.ns + interval - on_line) / static_cast<double>(interval);
  const auto slope = static_cast<std::uint64_t>(std::clamp(want, 0.5, 1.5) * static_cast<double>(rate.q32));
  return {tsc::make_anchor(p.tsc, on_line, slope, interval, rate.q32), on_line};
}

// The clock's reads as clock.cpp makes them, one thread: the first anchor, then a line until a read at
// or past `resync` re-anchors by `rule` (clock.cpp's: tsc::reanchor).
class SimClock {
 public:
  SimClock(SimMachine& m, Rule rule) : m_(m), rule_(rule) {
    const tsc::Pair first = m_.sample(SimMachine::kStart);
    tsc::Pair p = first;
    for (std::uint64_t t = SimMachine::kStart; p.ns - first.ns < tsc::kFirstBaseline;) p = m_.sample(t += 2'500);
    rate_ = tsc::first_rate(first, p);
    a_ = tsc::first_anchor(rate_, p);
  }
  std::int64_t read(std::uint64_t t) {
    if (t < a_.resync) return tsc::line_at(a_, t);
    const tsc::Pair p = m_.sample(t);
    const tsc::Next next = rule_(a_, rate_, p);
    ++reanchors_;
    a_ = next.anchor;
    return next.reading;
  }
  long reanchors() const { return reanchors_; }

 private:
  SimMachine& m_;
  const Rule rule_;
  tsc::Rate rate_{};
  tsc::Anchor a_{};
  long reanchors_ = 0;
};

struct SimResult {
  double worst = 0;          // |reading - CLOCK_MONOTONIC|, ns, over every read
  double worst_settled = 0;  // the same, leaving out `settle_ns` after each change
  long backwards = 0, reads = 0, reanchors = 0;
};

// Reads every `every_ns` of simulated time over the spans [from_ns, to_ns) (ns after the start; the
// first anchor is 200 us in, so the first span starts after it).
SimResult simulate(const std::vector<Change>& changes, const std::vector<std::pair<double, double>>& spans,
                   double every_ns, double settle_ns, Rule rule = tsc::reanchor) {
  SimMachine m(changes);
  SimClock clock(m, rule);
  SimResult r;
  std::int64_t prev = INT64_MIN;
  for (const auto& [from, to] : spans) {
    for (double at = from; at < to; at += every_ns) {
      const auto t = SimMachine::kStart + static_cast<std::uint64_t>(at / SimMachine::kNsPerTick);
      const std::int64_t e = clock.read(t);
      const double off = std::fabs(static_cast<double>(e) - m.truth(t));
      r.worst = std::max(r.worst, off);
      bool settling = false;
      for (const Change& c : changes) settling |= t >= c.at && static_cast<double>(t - c.at) * SimMachine::kNsPerTick < settle_ns;
      if (!settling) r.worst_settled = std::max(r.worst_settled, off);
      r.backwards += e < prev;
      prev = e;
      ++r.reads;
    }
  }
  r.reanchors = clock.reanchors();
  return r;
}

std::uint64_t tick_at(double ns) { return SimMachine::kStart + static_cast<std::uint64_t>(ns / SimMachine::kNsPerTick); }

void print(const char* name, const SimResult& r) {
  std::printf("sim %-34s reads %ld, re-anchors %ld, worst %.0f ns, worst settled %.0f ns, backwards %ld\n", name,
              r.reads, r.reanchors, r.worst, r.worst_settled, r.backwards);
}

void simulated_rules() {
  constexpr double kS = 1e9, kMs = 1e6;
  const double rate = SimMachine::kNsPerTick;
  // Read every 7 us for 2 s, not at all for 100 s, then again for 200 ms.  The line's error comes from
  // sample jitter only; extrapolating it over 100 s must not leave the clock off.
  const SimResult idle = simulate({}, {{kMs, 2 * kS}, {102 * kS, 102.2 * kS}}, 7'000, 0);
  print("steady, 100 s idle", idle);
  CHECK(idle.worst <= 1'000 && idle.backwards == 0 && idle.reanchors > 20);
  // An NTP slew: CLOCK_MONOTONIC 200 ppm fast from 1 s, 200 ppm slow from 3 s, back at 5 s.  The interval
  // running when the rate changes misses by up to 200 ppm of it; after that the line holds to ~2 kQuiet.
  const std::vector<Change> slew{{tick_at(1 * kS), rate * 1.0002, 0},
                                 {tick_at(3 * kS), rate * 0.9998, 0},
                                 {tick_at(5 * kS), rate, 0}};
  const SimResult slewed = simulate(slew, {{kMs, 6 * kS}}, 7'000, 200 * kMs);
  print("200 ppm slews", slewed);
  CHECK(slewed.worst <= 20'000 && slewed.worst_settled <= 2.5 * tsc::kQuiet && slewed.backwards == 0);
  // ... and the same slews read only every 3 s: every read re-anchors late, after a whole slewed stretch.
  std::vector<std::pair<double, double>> sparse;
  for (double at = kMs; at < 30 * kS; at += 3 * kS) sparse.push_back({at, at + 1});
  const SimResult sparse_slewed = simulate(slew, sparse, 7'000, 0);
  print("200 ppm slews, a read every 3 s", sparse_slewed);
  CHECK(sparse_slewed.worst <= 1'000 && sparse_slewed.backwards == 0);
  // CLOCK_MONOTONIC steps 300 us ahead of the line (the line is behind): the next re-anchor takes it.
  const SimResult behind = simulate({{tick_at(1 * kS), rate, 300'000}}, {{kMs, 2 * kS}}, 7'000, 65 * kMs);
  print("line 300 us behind", behind);
  CHECK(behind.worst_settled <= 1'000 && behind.backwards == 0);
  // CLOCK_MONOTONIC steps 300 us back (the line is ahead): no reading goes back; the line is slowed
  // and meets CLOCK_MONOTONIC within a few ms of the next re-anchor.
  const SimResult ahead = simulate({{tick_at(1 * kS), rate, -300'000}}, {{kMs, 2 * kS}}, 7'000, 70 * kMs);
  print("line 300 us ahead", ahead);
  CHECK(ahead.worst_settled <= 1'000 && ahead.backwards == 0);
  // 5 ms back (past kStepLimit: a suspend the TSC counted): the clock steps back once, then holds.
  const SimResult far = simulate({{tick_at(1 * kS), rate, -5'000'000}}, {{kMs, 2 * kS}}, 7'000, 65 * kMs);
  print("line 5 ms ahead", far);
  CHECK(far.worst_settled <= 1'000 && far.backwards == 1);
  // Negative control: the rule before session 15 fails the same checks (a clean-clone run once saw
  // 19,930 of 20,000 readings outside tests/test_clock.py's 20 us bracket; a late re-anchor's error
  // carried for up to 64 ms fits that).
  const SimResult old_idle = simulate({}, {{kMs, 2 * kS}, {102 * kS, 102.2 * kS}}, 7'000, 0, continue_from_line);
  const SimResult old_slewed = simulate(slew, {{kMs, 6 * kS}}, 7'000, 200 * kMs, continue_from_line);
  const SimResult old_sparse = simulate(slew, sparse, 7'000, 0, continue_from_line);
  print("control: steady, 100 s idle", old_idle);
  print("control: 200 ppm slews", old_slewed);
  print("control: a read every 3 s", old_sparse);
  CHECK(old_idle.worst > 1'000 && old_slewed.worst_settled > 2.5 * tsc::kQuiet && old_sparse.worst > 1'000);
}

}  // namespace

int main() {
  simulated_rules();
  std::printf("steady clock source: %s\n", steady_source());
  const SteadyClock steady;
  constexpr int kThreads = 3;
  constexpr std::int64_t kTol = 20'000;  // 20 us: the clock is specified to about 1 us
  std::vector<Stats> per(kThreads);
  std::vector<std::thread> th;
  // 300 ms: past the first re-anchors (1, 2, 4, ... ms) and several at the 64 ms cadence
  for (int t = 0; t < kThreads; ++t) th.emplace_back([&, t] { per[t] = sweep(steady, 300'000'000, kTol); });
  for (auto& x : th) x.join();
  for (const Stats& s : per) {
    std::printf("samples %ld, worst offset %lld ns, bracket violations %ld, backwards %ld\n", s.samples,
                static_cast<long long>(s.worst), s.bracket_violations, s.backwards);
    CHECK(s.samples > 1000);
    CHECK(s.bracket_violations == 0);
    CHECK(s.backwards == 0);
  }
  // Negative control: a clock that is 1 ms behind must be caught by the same sweep.
  struct Behind final : Clock {
    std::int64_t now_ns() const override { return monotonic_ns() - 1'000'000; }
  } behind;
  const Stats bad = sweep(behind, 20'000'000, kTol);
  CHECK(bad.samples > 0 && bad.bracket_violations == bad.samples);
  TEST_MAIN_END();
}
