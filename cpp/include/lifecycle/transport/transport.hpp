// Transport: drives the lifecycle engine from any Agent (NIXL, loopback, fault injector).
//
// Theory of operation
// -------------------
// One Transport owns one Agent and one progress thread (NixlProgress), and is attached to one
// Engine (it adds an abort hook to the engine; several transports may share one). It knows each request it
// handles as an entry:
//   active   this side posted the transfer (READ from the peer, or WRITE to it);
//   passive  this side handed descriptors to the peer, which posts (expect()).
// Executor calls:
//   expect(req, peer, local) check `local` (registered, inside the session's pool slot), apply
//                           `expose`, return a fresh tag (and the session's role); the caller ships
//                           them with the descriptor.  The peer's "done" carrying that tag -> `complete`.
//   transfer(req, op, ..., tag, role)  prepare the request (a bad descriptor, or an op that the
//                           offer's role refuses, throws, session untouched), apply `expose`, post;
//                           its Done note carries the passive side's tag.  Done inside post ->
//                           `complete` at once.
// Tags: every note names (request, tag), so a note of an earlier transfer of a reused id, or a
// duplicate, is never taken for the live transfer's: a "done" or "quiesced" completes a passive
// entry only with its tag, a "stop" stops an active one only with its tag (a stop naming another
// offer of the id from the same peer is remembered, so a later post of that offer is skipped, and
// answered once the live transfer is Done; from another peer, answered at once).  transfer() and
// expect() refuse an id with no session (UnknownRequestError, nothing built).  Every engine event of
// an entry goes to the session found when the entry was made (Engine::apply with its serial), never
// to a later session of the same id.
// Progress thread (never touches Python, never logs, holds no transport lock while calling the
// engine or the agent):
//   status Done             -> `complete` (InFlight: completed; CancelRequested: cancelled), release
//   status Failed           -> `fail` (Poisoned), release
//   "done"/"quiesced" note  -> `complete` on the passive entry with that tag
//   "stop" note             -> cancel the active session here; once its request is Done, reply
//                              "quiesced" (never after an error: an error is not evidence, and
//                              a request that ended in error or was abandoned never gets a reply)
//   every tick              -> engine.tick() (timeout / grace_expired), sweep finished entries; resend the
//                              stop of a passive session cancelled, or Poisoned without evidence (its answer
//                              may be lost)
// Cancel (the engine's abort hook, on whichever thread moved the session to CancelRequested):
//   active   nothing is released: the request keeps being polled until Done (-> Quiesced) or an
//            error (-> Poisoned); grace_expired -> Poisoned while polling goes on, and a late Done is
//            the evidence that recovers the quarantined slot. A cancel before the post skips the
//            post and completes (never posted = evidence).
//   passive  send "stop" to the peer and wait for its "quiesced" (or "done").
// `unsafe_release_on_cancel` (TEST ONLY, the negative control): the active side releases the
// in-flight request and treats that as evidence. DESIGN §3 says it is not; tests prove they notice.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "lifecycle/engine.hpp"
#include "lifecycle/transport/agent.hpp"
#include "lifecycle/transport/nixl_progress.hpp"

namespace lifecycle::transport {

struct TransportOptions {
  bool unsafe_release_on_cancel = false;  // TEST ONLY: treats release as evidence (unsafe)
  bool unsafe_ack_stop_at_once = false;   // TEST ONLY: answers a peer's stop before its own Done (unsafe)
  NixlProgressOptions progress{std::chrono::microseconds{20}, std::chrono::microseconds{1000},
                               std::chrono::microseconds{50}, std::chrono::microseconds{1000}};
  std::chrono::milliseconds sweep_interval{20};
  // (request, tag) pairs a peer stopped before we posted them, remembered (each answered "quiesced", so
  // the post must be skipped) until a transfer() with that pair consumes it, or the one session of ours
  // that could post it has ended (transport.cpp, Stop memory).  Never evicted otherwise: when this many
  // wait, a further early stop goes unanswered (its peer ends Poisoned: safe), counted.
  std::size_t remember_stopped = 65536;
  // (request, tag, peer) offers forgo() dropped, remembered oldest-out up to this many: a peer's stop for
  // one is answered at once, at any time (not remembered, and bound to no session), and a transfer() of it
  // is refused.  One pushed out by later ones whose stop was answered goes to the stop memory above (its
  // post stays skipped); a later stop for one pushed out falls back to that memory too.
  std::size_t remember_forgone = 65536;
  // A cancelled passive session whose stop, or the peer's answer, was lost (a dropped note, a failed send) is
  // asked again: the sweep resends its stop, same request and tag, so that the answer is matched as the first
  // stop's is: while the session is still CancelRequested (within cancel_grace: the answer ends it Quiesced, not
  // Poisoned), and once it ended Poisoned without evidence (its Ended record: evidence for that very offer and
  // session, DESIGN §6).  Up to `stop_resends` times per session, both together (0: never), the first
  // `stop_resend_delay` after the sweep found it cancelled (or ended, if it never did), each later one twice the
  // gap before it (at most `stop_resend_max_delay`).  Only while the engine's session (that serial) is
  // CancelRequested with its passive entry live, or Poisoned without evidence with its Ended record standing,
  // and the peer is loaded (remove_peer() ends them).  At most `stop_resend_limit` sessions wait to be asked
  // again (a further one is not: counted).
  std::uint32_t stop_resends = 8;
  std::chrono::milliseconds stop_resend_delay{100};
  std::chrono::milliseconds stop_resend_max_delay{10000};
  std::size_t stop_resend_limit = 4096;
};

enum class PostResult : std::uint8_t {
  Posted,               // in flight; the progress thread reports the outcome
  CompletedInPost,      // the backend finished inside post: the session is Quiesced
  CancelledBeforePost,  // a cancel (or the peer's stop) arrived before the post: nothing posted
};

// One transfer of a batch (Transport::transfer_batch): transfer()'s arguments.
// The role whose session posts `op` (DESIGN §9): the receiver READs (from a sender's offer), the sender WRITEs
// (to a receiver's offer).
constexpr Role active_role(XferOp op) { return op == XferOp::Read ? Role::receiver : Role::sender; }

struct TransferItem {
  std::uint64_t req = 0;
  XferOp op = XferOp::Read;
  Region local{};
  Region remote{};
  const std::string* peer = nullptr;  // not null; lives until the call returns
  std::uint64_t tag = 0;
  // The role of the session that offered `remote` (expect()'s, shipped with the tag): a READ must take a
  // sender's offer, a WRITE a receiver's (DESIGN §9), else the item is refused.  None: not known (a bare
  // peer, an older release's offer), not checked.
  std::optional<Role> remote_role{};
};
// What became of one item: `error` set = what transfer() would have thrown for it (then `result` means
// nothing); otherwise transfer()'s return value.
struct TransferOutcome {
  PostResult result = PostResult::Posted;
  std::exception_ptr error;
};

struct TransportStats {
  std::uint64_t registered_regions = 0;  // regions registered with the agent now
  std::uint64_t live_xfers = 0;          // backend transfer requests held now
  std::uint64_t active = 0;              // active entries now
  std::uint64_t passive = 0;             // passive entries now
  std::uint64_t watched = 0;             // requests the progress thread polls now
  std::uint64_t held_offers = 0;         // offered ranges whose transfer ended without evidence, now
  std::uint64_t posted = 0, completed_in_post = 0, completed = 0, failed = 0, post_errors = 0;
  std::uint64_t cancelled_before_post = 0, peer_stops = 0, stops_sent = 0, quiesced_sent = 0;
  std::uint64_t done_received = 0, quiesced_received = 0, orphan_notifications = 0;
  std::uint64_t bad_notifications = 0, send_errors = 0, release_failures = 0, unsafe_releases = 0;
  std::uint64_t late_evidence = 0, abandoned = 0, passive_swept = 0, stops_unanswered = 0;
  std::uint64_t unreleased = 0;  // finished requests whose release failed, retried by the sweep
  std::uint64_t unsafe_acks = 0;  // TEST ONLY: "quiesced" sent before our own request was Done
  std::uint64_t stale_notifications = 0;  // notes whose tag is not the live transfer's (ignored)
  std::uint64_t remembered_stops = 0;     // early stops answered whose post is still to be skipped, now
  std::uint64_t posted_records = 0;       // offers our transfers took, kept while the engine knows the session, now
                                          // (the last sweep's worth not merged yet: an id posted twice counts twice)
  std::uint64_t forgone_offers = 0;       // offers forgo() dropped, remembered (at most remember_forgone), now
  std::uint64_t stops_resent = 0;         // stops sent again for passive sessions Poisoned without evidence
  std::uint64_t resends_pending = 0;      // such sessions whose stop is to be sent again, now
  std::uint64_t resends_skipped = 0;      // such sessions not asked again: stop_resend_limit were waiting
};

class Transport final : public EventSink {
 public:
  // `engine` may be null: a bare transport (benchmarks) that only counts completions.
  Transport(std::shared_ptr<Engine> engine, std::unique_ptr<Agent> agent, TransportOptions opts = {});
  ~Transport() override;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  Agent& agent() noexcept { return *agent_; }
  const std::string& name() const noexcept { return agent_->name(); }
  Engine* engine() const noexcept { return engine_.get(); }

  Agent::RegionId register_region(const Region& r);
  // Refused (TransportError, nothing changed; it names the first use found: request, state, range) while
  // the backend may still touch the region: a request over it not yet released (being built, in flight, or
  // its release failed and awaits the retry), one released without evidence that it stopped (for good), a
  // passive session that offered memory of it (the peer holds that descriptor), or such an offer held past
  // its session.  Uses of other memory do not block it.  The memory must stay alive until then.  Transfers
  // and expects over its memory that race it are refused while it runs, as is a second deregistration of it
  // (TransportError naming the region; only the call that marked it clears the mark).
  void deregister_region(Agent::RegionId id);
  // This agent's metadata in an envelope: kMetadataMagic, the CRC-32 (zlib's) of the agent's own bytes as 4
  // bytes little-endian, then those bytes.  add_peer checks the checksum before the backend sees anything: one
  // changed byte in UCX's worker address made UCX abort the process from an assertion inside NIXL's load.
  // Metadata without the magic (an agent outside this library) goes to the backend as it is, trusted.
  static constexpr char kMetadataMagic[] = "kvlmd/1:";
  std::string metadata();
  std::string add_peer(const std::string& metadata);  // returns the peer's name
  // Forget a peer: its in-flight requests are released (no evidence: their sessions fail).
  void remove_peer(const std::string& peer);

  // `tag`, `remote_role`: what the passive side's expect() returned (shipped with its descriptor); see
  // TransferItem::remote_role.
  PostResult transfer(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                      const std::string& peer, std::uint64_t tag, std::optional<Role> remote_role = std::nullopt);
  // n transfers in one call, each exactly as transfer() would do it alone (transfer() is this with one
  // item), in phases across the batch: one lock hold per phase, one engine lookup call, one `expose`
  // call, the n posts back to back, then one `complete` call for those Done inside their post and one
  // watch.  Items are independent: one's refusal or error (out[i].error) changes nothing for the others;
  // a second item of a request in the batch is refused like a second transfer().  A remove_peer(), stop(),
  // cancel or peer's stop that marks a later item while earlier ones are posted keeps that item unposted,
  // as before its own transfer().  Never throws for an item's sake (allocation failure aside).
  void transfer_batch(const TransferItem* items, std::size_t n, TransferOutcome* out);
  // The session of ours for `req` will never post the offer (`tag`) that `peer` made: an executor that
  // drops an offer it got (its session cancelled first) says so, and a stop the peer sent for it, or
  // sends later, needs no memory here (it is answered at once, whether or not a session of the id lives
  // then; see remember_forgone).  A later transfer() of that offer is refused.  Idempotent.
  void forgo(std::uint64_t req, const std::string& peer, std::uint64_t tag);
  // `local`: the range whose descriptor the caller ships (checked like an active local range). Returns
  // the tag to ship with it: never 0, never the same twice on this transport.  `role` (when not null) gets
  // the role of the session exposed (none on a bare transport), to ship with it too: the peer's transfer()
  // checks its op against it (TransferItem::remote_role).
  std::uint64_t expect(std::uint64_t req, const std::string& peer, const Region& local,
                       std::optional<Role>* role = nullptr);

  // Stop the progress thread; every non-terminal session of this transport fails (no more
  // evidence can arrive). Idempotent; the destructor calls it.
  void stop();
  bool stopped() const noexcept { return stopped_.load(); }
  TransportStats stats() const;
  NixlProgressStats progress_stats() const;
  // The last kFailureLog transfers the backend failed, oldest first: the request id, the serial of the session
  // whose transfer it was (an entry outlives its session: a later session of the id has another serial; 0 on a
  // bare transport, or where remove_peer()/stop() had ended the transfer first) and the backend's reason, cut at
  // 512 bytes.  The engine's `fail` event carries no text; this is where the reason stays.
  static constexpr std::size_t kFailureLog = 64;
  struct Failure {
    std::uint64_t req = 0;
    std::uint64_t serial = 0;
    std::string reason;
  };
  std::vector<Failure> recent_failures() const;

  // Bare mode (no engine): completions seen so far; wait until at least `n` (steady ns timeout).
  // Waits like Engine::wait_ready (spin up to spin_ns, yielding, then the condition variable), so a
  // bare loop and an engine loop compare like for like.
  std::uint64_t completions() const noexcept { return bare_done_.load(); }
  bool wait_completions(std::uint64_t n, std::int64_t timeout_ns, std::int64_t spin_ns = 0);

  // EventSink (progress thread)
  void on_complete(std::uint64_t req) override;
  void on_complete_batch(const std::uint64_t* reqs, std::size_t n) override;  // finish_actives: one engine call
  void on_fail(std::uint64_t req, const char* why) override;
  void on_notification(const std::string& peer, const NotifMessage& m) override;
  void on_bad_notification(const std::string& peer, const std::string& bytes) override;
  void on_tick() override;

  struct Relay;  // the engine's abort hook reaches the transport through this (transport.cpp)
  friend struct TransportTestPeer;  // TEST ONLY: lifecycle/transport/test_peer.hpp

 private:
  enum class Side : std::uint8_t { Active, Passive };
  struct Entry {
    Side side = Side::Active;
    std::string peer;
    std::uint64_t tag = 0;          // this transfer's, in every note about it
    std::uint64_t serial = 0;       // the engine session it drives (found at entry creation): only it gets events
    Region local{};                 // passive: the range offered to the peer
    bool posting = false;           // active: post() was called (the backend may touch buffers)
    bool cancel_requested = false;  // active: the engine asked to abort
    bool peer_stop = false;         // active: the peer asked to stop; reply "quiesced" when Done
    bool offered = false;           // passive: expect() returned its tag (the peer may have it)
    // active: stops that named another tag of this id (an earlier offer, or a later one not posted yet:
    // remembered, its post will be skipped); answered "quiesced" once this request is Done, never after
    // an error (the stop may even be for this very transfer, posted under a wrong tag by the caller)
    std::vector<std::uint64_t> other_stops;
    bool in_post = false;           // active: transfer() is inside post(): it alone may end the entry
    bool abandon = false;           // active: remove_peer()/stop() came meanwhile (transfer() fails it)
    bool resend_queued = false;     // passive: schedule_resend() took it (once per session: one queue item)
  };
  // The "quiesced" replies an active entry owes once its request is proven stopped.
  static std::vector<std::uint64_t> owed_acks(const Entry& e);
  // A passive entry removed without a note (the sweep: its session ended, grace expired...; expect()
  // retiring an ended session's entry; remove_peer): a late note with its tag is still evidence, for that
  // very session only (its serial).  Also what an active entry posted (posted_).
  struct Ended {
    std::string peer;
    std::uint64_t tag = 0;
    std::uint64_t serial = 0;  // the session it drove
    bool forgone = false;      // (posted_) noted by forgo(): that session took no offer here
  };
  // A passive entry ended without evidence (swept Poisoned, remove_peer, stop): the peer may still
  // write into its range, which keeps blocking deregister_region until a late note with its tag.
  struct HeldOffer {
    std::uint64_t req = 0;
    std::string peer;
    Region local{};
  };
  void hold_offer(std::uint64_t req, const Entry& e);  // caller holds mu_

  void on_abort(std::uint64_t req, std::uint64_t serial);
  bool on_pass() override;  // sends the queued stops (outbox_)
  void finish_active(std::uint64_t req, bool done);
  // into recent_failures (cut at 512 bytes); `serial`: the session the failed entry drove
  void note_failure(std::uint64_t req, std::uint64_t serial, const char* why) noexcept;
  struct Work;  // transfer_batch's state of one item between its phases (transport.cpp)
  void finish_actives(const std::uint64_t* reqs, std::size_t n, bool done);  // finish_active of each, batched
  // Release; a failure is counted and retried by the sweep.  `proven`: never posted, or Done (DESIGN
  // §3); without proof the local range keeps blocking deregister_region for good.
  void release_xfer(std::uint64_t req, bool proven);
  void forget_held(std::uint64_t req, bool proven);  // caller holds mu_
  void send(const std::string& peer, const NotifMessage& m);
  // "quiesced" for each of `tags`, unless some transfer for req may still move bytes (transport.cpp)
  void send_acks(const std::string& peer, std::uint64_t req, const std::vector<std::uint64_t>& tags);
  // The event for the session `serial` names (0: whichever session holds req).
  ApplyResult apply(std::uint64_t req, Event ev, std::uint64_t serial);
  // A passive entry whose session ended without our note, or is gone: hold its offer if no evidence is
  // known, keep an Ended record for a late note, erase it.  Caller holds mu_.
  void retire_passive(std::unordered_map<std::uint64_t, Entry>::iterator it, const std::optional<SessionInfo>& info);
  struct StopMemo {
    std::uint64_t session = 0;  // the session of ours that may post the pair (0: none known yet)
    std::uint64_t after = 0;    // unbound: the first session of req with a serial >= this one
  };
  bool remember_stopped(std::uint64_t req, std::uint64_t tag, StopMemo memo);  // false: full; caller holds mu_
  // An early stop this transport answers ("never posted") promises for the whole engine: the executor may post
  // an offer through another transport of it than the one the peer made it for.  Every other transport of
  // the engine (a stopped one too, until destroyed) remembers the pair too (its transfer() of it is skipped).
  // False when one cannot promise (it holds or builds a transfer of req, one of req ended there without
  // evidence, or its memory is full): then the stop stays unanswered (the peer ends Poisoned: safe).  Caller
  // holds no transport lock.
  bool share_stop(std::uint64_t req, std::uint64_t tag, StopMemo memo);
  void sweep_stopped();
  // Drops the records of `m` whose session the engine no longer holds (forgotten, or another serial).
  using EndedMap = std::unordered_map<std::uint64_t, Ended>;
  void forget_gone(EndedMap& m, std::size_t& cursor);  // a budget per sweep
  // posted_'s record for req (caller holds mu_): queued in posted_pending_, in order
  void note_posted(std::uint64_t req, const std::string& peer, std::uint64_t tag, std::uint64_t serial,
                   bool forgone = false);
  // Moves up to `max` of posted_pending_'s records, oldest first, into posted_ and posted_order_ (caller
  // holds mu_).  Every reader of posted_ flushes them all first: what it reads is what it would be had
  // each transfer written its record itself.
  void flush_posted(std::size_t max = SIZE_MAX);
  void forget_posted();  // posted_'s records whose session the engine forgot, oldest first
  // The serial of req's session now (0 without an engine), from one engine lookup that also checks
  // `local`: when it lies in the engine's pool, it must be inside the slot leased to that session.
  // `role` (when not null) gets that session's role (none without an engine), from the same lookup.
  // Throws UnknownRequestError when req has no session, TransportError for a range outside its slot.
  // Caller holds no transport lock (it asks the engine).
  std::uint64_t session_for(const char* call, std::uint64_t req, const Region& local,
                            std::optional<Role>* role = nullptr) const;
  // session_for's checks on a lookup already made (`info`: the engine's answer for req); with `op` (an active
  // transfer's), also that the session's role posts it: READ from a receiver, WRITE from a sender.
  std::uint64_t session_check(const char* call, std::uint64_t req, const Region& local,
                              const std::optional<SessionInfo>& info, const XferOp* op = nullptr) const;
  bool preparing(std::uint64_t req) const;  // caller holds mu_
  void unprepare(std::uint64_t req);        // caller holds mu_  // the refusal while req's release is retried
  void sweep();
  // A passive entry the sweep finds cancelled (CancelRequested) or retires, its session Poisoned without
  // evidence: its stop is to be sent again (TransportOptions::stop_resends); once per entry.  Caller holds mu_.
  void schedule_resend(std::uint64_t req, Entry& e) noexcept;
  void resend_stops();  // the sweep: those due, while an answer can still count

  std::shared_ptr<Engine> engine_;
  TransportOptions opts_;
  std::unique_ptr<Agent> agent_;
  std::shared_ptr<Relay> relay_;
  std::uint64_t abort_hook_ = 0;  // this transport's hook in the engine (removed by stop())
  mutable std::mutex mu_;  // guards the maps below; never held while calling the agent or engine
  std::unordered_map<std::uint64_t, Entry> entries_;
  std::map<Agent::RegionId, Region> regions_;  // what register_region registered (deregister's check)
  using ReqTag = std::pair<std::uint64_t, std::uint64_t>;
  std::map<ReqTag, StopMemo> stopped_reqs_;  // (req, tag) stopped before we posted: remember_stopped
  ReqTag stopped_cursor_{0, 0};              // where the next sweep_stopped() goes on
  // forgo()'s offers: (req, tag) -> the peer that made it, and their order (oldest first) for the bound.
  // Hashed: every transfer() looks its offer up (a tree of 65,536 cold nodes would cost ~16 misses).
  struct ReqTagHash {
    std::size_t operator()(const ReqTag& k) const noexcept {
      return std::hash<std::uint64_t>{}(k.first * 0x9e3779b97f4a7c15ULL ^ k.second);
    }
  };
  struct Forgone {
    std::string peer;
    bool answered = false;  // a stop for it was answered: pushed out, it goes to the stop memory
  };
  std::unordered_map<ReqTag, Forgone, ReqTagHash> forgone_;
  std::deque<ReqTag> forgone_order_;
  Forgone* forgone_of(std::uint64_t req, std::uint64_t tag, const std::string& peer);  // null: not; caller holds mu_
  EndedMap ended_;  // swept passive entries (until the engine forgets req)
  std::size_t ended_cursor_ = 0;  // where forget_gone goes on (a bucket)
  // the offer each active entry posted (or skipped), kept past the entry while its session lives: a
  // late stop naming it needs no memory (an offer is posted once)
  EndedMap posted_;
  // posted_'s records as (req, serial), oldest first (a record may have been replaced since: its serial
  // tells).  The engine forgets terminated sessions oldest first too, so a sweep finds the records that
  // went at the front, and stops soon after the first that did not: a few checks per transfer, where a
  // walk of the whole map took the lock and the engine's shards for thousands every sweep.
  std::deque<std::pair<std::uint64_t, std::uint64_t>> posted_order_;
  std::size_t posted_added_ = 0;  // note_posted() calls since the last forget_posted() (its budget)
  // Records that transfer() wrote, not moved into posted_ yet: an append to a sequential buffer on the
  // transfer path, where an insert into a hash map of tens of thousands of records touched a random page
  // (and the NIXL calls after it paid for the TLB and cache entries it evicted); the sweep moves them in
  // chunks, and a reader of posted_ first moves them all.  [posted_head_, end) are still to move.
  struct PostedNote {
    std::uint64_t req = 0, tag = 0, serial = 0;
    std::string peer;
    bool forgone = false;
  };
  std::vector<PostedNote> posted_pending_;
  std::size_t posted_head_ = 0;
  std::map<std::uint64_t, HeldOffer> held_offers_;  // by tag (unique on this transport): hold_offer
  // Stops to send again (schedule_resend), by (when due, the session's serial: unique in the engine).
  struct Resend {
    std::uint64_t req = 0, tag = 0;
    std::string peer;
    std::uint32_t sent = 0;  // resends so far
  };
  using ResendKey = std::pair<std::chrono::steady_clock::time_point, std::uint64_t>;
  std::map<ResendKey, Resend> resends_;
  // The stops' looks and sends (resend_stops, on_pass: try_lock, never waiting) against add_peer() (taken before
  // mu_): a stop that passed its look before remove_peer() must not go out once the peer is loaded again (a
  // restarted one would answer for a transfer it never saw: no evidence for the old one's).
  std::mutex resend_mu_;
  std::uint64_t tag_salt_ = 0, tag_count_ = 0;      // expect()'s tags: a bijection of the count (mu_)
  // Stops for the progress thread to send: an abort hook runs on the thread that cancelled (an
  // executor's poll or cancel, holding the GIL), which must never wait on the backend (DESIGN §7).
  // Each with removals_ as of its queueing: on_pass() drops one whose entry a remove_peer() took since.
  struct Outgoing {
    std::string peer;
    NotifMessage m;
    std::uint64_t removals = 0;
  };
  std::mutex outbox_mu_;
  std::vector<Outgoing> outbox_;  // guarded by outbox_mu_
  mutable std::mutex failures_mu_;
  std::deque<Failure> failures_;  // guarded by failures_mu_ (recent_failures)
  std::map<std::uint64_t, bool> unreleased_;  // release failed (value: proven quiescent); retried on tick
  // Invariant: every request prepared through this transport that is not released yet, or was released
  // without evidence that it stopped (those are in unproven_ too: their bytes may still land), with its
  // local range: what deregister_region checks (with preparing_).
  std::unordered_map<std::uint64_t, Region> held_;
  // transfer() calls between their checks and their entry (as many as run at once: a short vector)
  std::vector<std::pair<std::uint64_t, Region>> preparing_;
  std::set<std::string> removed_peers_;                  // remove_peer() until add_peer() loads it again
  std::deque<std::string> removed_order_;                // the same, oldest first (bounded)
  // Peers a NIXL post failed to (NIXL then keeps them marked disconnected): transfers to them are refused before
  // the expose, until remove_peer().  Empty but for that: the transfer path tests emptiness only.
  std::set<std::string> failed_post_peers_;
  void file_peer_reasons();  // (mu_ held) failed_post_peers_ changed: the engine's health lists them
  void retry_releases();
  std::mutex retry_mu_;                  // retry_releases() one at a time (taken before mu_)
  std::atomic<bool> swept_out_{false};  // stop() stopped the progress thread: no sweep retries releases any more
  std::uint64_t removals_ = 0;  // remove_peer() calls so far: expect() tells its entry's loss by them (mu_)
  // Requests of ours that ended without evidence (marked with the erase of their entry): never a
  // "quiesced" for them, never their id again, and their ranges in held_ for good (unless a Done of
  // their own post() comes after all: transfer()).
  std::set<std::uint64_t> unproven_;
  std::set<Agent::RegionId> retiring_;  // deregister_region in progress: no new transfer may use them
  std::chrono::steady_clock::time_point next_sweep_{};
  std::atomic<bool> stopped_{false};
  // In-post entries marked since (a count, bumped under mu_): `abandon` (remove_peer(), stop()),
  // `cancel_requested` (a cancel) or `peer_stop`.  A transfer_batch posting its items one after another
  // looks again only when it moved, and skips the items marked before their post.
  std::atomic<std::uint64_t> in_post_marks_{0};
  std::mutex bare_mu_;
  std::condition_variable bare_cv_;
  std::atomic<std::uint64_t> bare_done_{0};
  std::atomic<int> bare_waiters_{0};  // wait_completions() calls asleep on bare_cv_ (guarded changes: bare_mu_)
  struct Counters {
    std::atomic<std::uint64_t> posted{0}, completed_in_post{0}, completed{0}, failed{0},
        post_errors{0}, cancelled_before_post{0}, peer_stops{0}, stops_sent{0}, quiesced_sent{0},
        done_received{0}, quiesced_received{0}, orphan_notifications{0}, bad_notifications{0},
        send_errors{0}, release_failures{0}, unsafe_releases{0}, late_evidence{0}, abandoned{0},
        passive_swept{0}, stops_unanswered{0}, unsafe_acks{0}, stale_notifications{0}, stops_resent{0},
        resends_skipped{0};
  } ctr_;
  std::unique_ptr<NixlProgress> progress_;  // Invariant: last member; destroyed first
};

const char* to_string(PostResult r) noexcept;

}  // namespace lifecycle::transport
