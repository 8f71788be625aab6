// FaultyAgent: wraps any Agent and injects faults, seeded and reproducible.
//
// Theory of operation
// -------------------
// Every decision is a pure function of (seed, fault kind, request id, occurrence), never of thread
// timing, so a failing run replays with the same seed (a note's occurrences up to their bound of 65,536 keys:
// fetch_notifications).  A status fault's occurrence is the id's session on this agent (how many prepares of
// the id came before), a release failure's that session and the release attempt, so the sessions of a reused
// id decide independently (the first session of an id decides as before that key); released ids keep their
// count up to 65,536 of them, past which the smallest is forgotten (which ids are held then follows the order of
// releases across ids, so past that bound a reused id's session may count from 0 again in a replay).
// Faults, each with its own probability:
//   delay            the transfer reports InProgress for `delay_for` after post, then the truth
//   error            the transfer reports Failed (the inner transfer keeps running: not evidence)
//   disconnect       at post: the peer counts as gone.  Requests to it prepared after that are
//                    refused, and the request itself and every one posted after it to that peer are
//                    cut off: they report Failed, notifications about them from that peer vanish and
//                    notifications about them to it throw.  Requests posted before it, and notes
//                    about them, go on: which requests a disconnect catches is decided by the order
//                    of the caller's posts, not by when the progress thread polls or a note arrives,
//                    so a seed replays.  Fresh metadata for the peer (add_peer) ends it for new
//                    requests and notes; a cut request keeps reporting Failed.  Until then, notes
//                    about a cut id from that peer vanish whichever session of the id they are for.
//                    The inner transfer goes on (as after `error`): the inner agent's own done note,
//                    which goes with it, is not stopped: it reaches the peer once the bytes landed,
//                    unless the request was released before its copy ended (then it is never sent).
//   never_completes  the transfer reports InProgress forever
//   drop_notification / duplicate_notification   per incoming notification, by (request, kind,
//                    occurrence), the occurrence counted per sending peer; the peer's name is not
//                    rolled on (names in tests come from a run-order counter); a duplicate is
//                    delivered right after its original, or, with `duplicate_after` > 0, by the
//                    first fetch that long after it (when a new session
//                    of the id may be live: the stale-note case; the delivery time is the clock's)
//   release_failure  release reports failure and keeps the request (per session and attempt)
// A transfer that completes inside post() is reported InProgress when a status fault applies.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "lifecycle/transport/agent.hpp"

namespace lifecycle::transport {

// The longest injected delay (delay_for, duplicate_after): the bindings and FaultyAgent's own check take it.
inline constexpr std::chrono::seconds kMaxFaultDelay{3600};

// FaultyAgent's constructor refuses (InvalidArgumentError naming the field) a probability outside [0, 1] or NaN,
// a delay outside [0, kMaxFaultDelay], and status faults (delay, error, disconnect, never_completes: one roll
// picks at most one) adding up past 1 ("faults"): from C++ nothing else checked them (a NaN never fired, a
// microseconds::max() overflowed its conversion to the clock's nanoseconds, the later of two status faults of 1
// never fired).
struct FaultOptions {
  std::uint64_t seed = 0;
  double delay = 0;
  std::chrono::microseconds delay_for{2000};
  double error = 0;
  double disconnect = 0;
  double never_completes = 0;
  double drop_notification = 0;
  double duplicate_notification = 0;
  std::chrono::microseconds duplicate_after{0};  // 0: a duplicate comes right after its original
  double release_failure = 0;
};

struct FaultStats {
  std::uint64_t delays = 0, errors = 0, disconnects = 0, never_completes = 0, dropped = 0,
                duplicated = 0, release_failures = 0;
};

enum class Fault : std::uint8_t { None, Delay, Error, Disconnect, NeverCompletes };

class FaultyAgent final : public Agent {
 public:
  FaultyAgent(std::unique_ptr<Agent> inner, FaultOptions opts);
  ~FaultyAgent() override = default;

  const std::string& name() const noexcept override { return inner_->name(); }
  const char* backend_name() const noexcept override { return inner_->backend_name(); }
  RegionId register_region(const Region& r) override { return inner_->register_region(r); }
  void deregister_region(RegionId id) override { inner_->deregister_region(id); }
  std::size_t registered_regions() const override { return inner_->registered_regions(); }
  std::string local_metadata() override { return inner_->local_metadata(); }
  std::string load_remote_metadata(const std::string& md) override;
  void invalidate_remote(const std::string& peer) override { inner_->invalidate_remote(peer); }
  bool knows_peer(const std::string& peer) const override { return inner_->knows_peer(peer); }
  void prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
               const std::string& peer, std::optional<std::uint64_t> done_tag) override;
  XferState post(std::uint64_t req) override;
  XferStatus status(std::uint64_t req) override;
  ReleaseStatus release(std::uint64_t req) override;
  std::size_t live_requests() const override { return inner_->live_requests(); }
  void send_notification(const std::string& peer, const NotifMessage& m) override;
  std::vector<RawNotification> fetch_notifications(std::size_t& skipped) override;

  FaultStats fault_stats() const;
  const FaultOptions& options() const noexcept { return opts_; }
  // The fault (if any) chosen for `req` (for tests and replay reports).
  Fault fault_of(std::uint64_t req) const;

 private:
  double roll(std::uint64_t kind, std::uint64_t a, std::uint64_t b = 0, std::uint64_t c = 0) const noexcept;

  std::unique_ptr<Agent> inner_;
  FaultOptions opts_;
  mutable std::mutex mu_;
  struct Late {
    std::chrono::steady_clock::time_point due;
    RawNotification note;
  };
  std::deque<Late> late_;  // duplicates held back (duplicate_after), oldest first; guarded by mu_
  struct Xfer {
    std::string peer;
    Fault fault = Fault::None;
    std::chrono::steady_clock::time_point posted_at{};
    bool counted = false;
    bool cut = false;  // posted at or after a disconnect of its peer: reports Failed from then on
    std::uint64_t release_attempts = 0;
    std::uint64_t gen = 0;  // which prepare made it (next_gen_): release retires only the entry it was for
    std::uint64_t session = 0;  // which session of its id on this agent (0: the first): the rolls' occurrence
  };
  bool is_cut(const std::string& peer, std::uint64_t req) const;  // mu_ held

  std::map<std::uint64_t, Xfer> xfers_;  // guarded by mu_
  // Released ids' last entries (their session counts), up to kMaxRetired; an id is in xfers_ or here, never both.
  // guarded by mu_
  static constexpr std::size_t kMaxRetired = 65536;
  std::map<std::uint64_t, Xfer> retired_;
  std::uint64_t next_gen_ = 0;           // guarded by mu_
  std::set<std::string> disconnected_;   // guarded by mu_
  // peer -> the requests a disconnect of it cut off (posted at or after it); guarded by mu_
  std::map<std::string, std::set<std::uint64_t>> cut_;
  // (peer, req, kind) -> occurrences so far (kind 0: a note that does not decode); guarded by mu_
  std::map<std::tuple<std::string, std::uint64_t, std::uint8_t>, std::uint64_t> notif_seen_;
  FaultStats stats_;                     // guarded by mu_
};

}  // namespace lifecycle::transport
