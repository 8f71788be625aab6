// The arithmetic of the TSC-backed steady clock (cpp/src/clock.cpp), kept apart from its atomics so a
// test can drive it with a simulated TSC and CLOCK_MONOTONIC (cpp/tests/test_clock.cpp).
//
// A reading is ns0 + (tsc - tsc0) * mult / 2^32 from one anchor.  A read at or past the anchor's
// `resync` tick re-anchors from a fresh (TSC, CLOCK_MONOTONIC) pair `p`:
//  * The floor is the anchor's line at `resync`: no reading of the old anchor was above it.
//  * CLOCK_MONOTONIC at or above the floor: the clock takes it (`reading = p.ns`).  This is every
//    re-anchor that finds the line behind, and every late one (the clock was not read for a while), so
//    an extrapolation error never outlives the read that finds it.
//  * CLOCK_MONOTONIC below the floor by at most kStepLimit: the clock goes on from the floor with a
//    slope that meets CLOCK_MONOTONIC at the next re-anchor (clamped to 0.5x..1.5x the rate), so no
//    reading goes backwards.  Further below (a suspend, a migration): it steps back to CLOCK_MONOTONIC.
//  * The next interval doubles (1 ms up to 64 ms) while the line was within kQuiet of CLOCK_MONOTONIC;
//    otherwise it shrinks so the error seen, spread over the new interval, is about kQuiet.  A change in
//    CLOCK_MONOTONIC's rate (an NTP slew) so shortens the intervals instead of drifting for 64 ms.
// The rate (ns per tick) is measured from a base pair, first the process's first one: the longer the
// baseline, the better the rate.  A re-anchor that finds the line off by more than kRebase (CLOCK_MONOTONIC
// stepped, or changed rate sharply) moves the base to its own pair but keeps the rate it had, until
// the new baseline is as long as the old one was (up to kTrustBaseline): so a step is never read as
// a rate, and a new rate is measured only after it.
#pragma once
#include <algorithm>
#include <cstdint>

namespace lifecycle::tsc {

constexpr std::int64_t kFirstInterval = 1'000'000;  // 1 ms: the first rate is rough
constexpr std::int64_t kMaxInterval = 64'000'000;   // doubling up to 64 ms while the line holds
constexpr std::int64_t kStepLimit = 1'000'000;      // ahead by more than 1 ms: step back
constexpr std::int64_t kQuiet = 2'000;              // within 2 us at a re-anchor: the rate holds
constexpr std::int64_t kFirstBaseline = 200'000;    // the first rate: two pairs 200 us apart
constexpr std::int64_t kRebase = 50'000;            // off by more than 50 us: measure the rate anew
constexpr std::int64_t kTrustBaseline = 1'000'000'000;  // a rate over 1 s is as good as any

struct Pair {
  std::uint64_t tsc;
  std::int64_t ns;
};

struct Anchor {
  std::uint64_t tsc0 = 0;
  std::int64_t ns0 = 0;
  std::uint64_t mult = 0;    // ns per tick, 32.32 fixed point
  std::uint64_t resync = 0;  // the tick at which a reader re-anchors
  std::int64_t interval = kFirstInterval;
};

// The anchor's reading at tick t (a tick before tsc0, from a core a few ticks behind, reads ns0).
inline std::int64_t line_at(std::uint64_t tsc0, std::int64_t ns0, std::uint64_t mult, std::uint64_t t) {
  if (t <= tsc0) return ns0;
  return ns0 + static_cast<std::int64_t>((static_cast<unsigned __int128>(t - tsc0) * mult) >> 32);
}
inline std::int64_t line_at(const Anchor& a, std::uint64_t t) { return line_at(a.tsc0, a.ns0, a.mult, t); }

inline std::uint64_t rate_q32(const Pair& p0, const Pair& p1) {  // ns per tick from p0 to p1
  const auto dns = static_cast<unsigned __int128>(std::max<std::int64_t>(p1.ns - p0.ns, 0));
  return static_cast<std::uint64_t>((dns << 32) / std::max<std::uint64_t>(p1.tsc - p0.tsc, 1));
}

struct Rate {
  Pair base{};             // measured from this pair
  std::uint64_t q32 = 0;   // ns per tick, 32.32 fixed point
  std::int64_t over = 0;   // the baseline q32 was measured over, ns
};

// The rate at a fresh pair p: measured from the base once that baseline is as long as the one of the
// rate in use (or kTrustBaseline); until then the rate in use.
inline Rate rate_at(const Rate& r, const Pair& p) {
  const std::int64_t over = p.ns - r.base.ns;
  if (over < std::min(r.over, kTrustBaseline)) return r;
  return {r.base, rate_q32(r.base, p), over};
}

inline Anchor make_anchor(std::uint64_t tsc0, std::int64_t ns0, std::uint64_t mult, std::int64_t interval,
                          std::uint64_t rate) {
  const auto ticks = static_cast<std::uint64_t>((static_cast<unsigned __int128>(interval) << 32) /
                                                std::max<std::uint64_t>(rate, 1));
  return Anchor{tsc0, ns0, mult, tsc0 + ticks, interval};
}

// The first rate, from the process's first pair and one at least kFirstBaseline after it.
inline Rate first_rate(const Pair& first, const Pair& p) { return {first, rate_q32(first, p), p.ns - first.ns}; }
inline Anchor first_anchor(const Rate& r, const Pair& p) { return make_anchor(p.tsc, p.ns, r.q32, kFirstInterval, r.q32); }

struct Next {
  Anchor anchor;
  std::int64_t reading;  // what the re-anchoring read returns
};

// The anchor after `cur`, from a fresh pair p taken at or after cur.resync; `rate` moves on with it.
inline Next reanchor(const Anchor& cur, Rate& rate, const Pair& p) {
  const std::int64_t on_line = line_at(cur, p.tsc);
  const std::int64_t floor = std::min(line_at(cur, cur.resync), on_line);
  const std::int64_t err = on_line > p.ns ? on_line - p.ns : p.ns - on_line;
  if (err > kRebase) {
    rate.base = p;  // a step is not a rate: keep the rate in use until the new baseline is as long
  } else {
    rate = rate_at(rate, p);
  }
  const std::uint64_t r = rate.q32;
  std::int64_t interval;
  if (err <= kQuiet) {
    interval = std::min(cur.interval * 2, kMaxInterval);
  } else {  // the error seen, spread over the next interval, about kQuiet
    const double elapsed = static_cast<double>(std::max<std::int64_t>(p.ns - cur.ns0, 1));
    const auto scaled = static_cast<std::int64_t>(static_cast<double>(kQuiet) * elapsed / static_cast<double>(err));
    interval = std::clamp(scaled, kFirstInterval, kMaxInterval);
  }
  if (p.ns >= floor || floor - p.ns > kStepLimit) return {make_anchor(p.tsc, p.ns, r, interval, r), p.ns};
  // ahead of CLOCK_MONOTONIC: go on from the floor, slowed to meet it one interval from now
  const double want = static_cast<double>(p.ns + interval - floor) / static_cast<double>(interval);
  const double slope = std::clamp(want, 0.5, 1.5) * static_cast<double>(r);
  return {make_anchor(p.tsc, floor, static_cast<std::uint64_t>(slope), interval, r), floor};
}

}  // namespace lifecycle::tsc
