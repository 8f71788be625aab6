#include "lifecycle/transport/transport.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#include <vector>

#include "lifecycle/errors.hpp"
#include "lifecycle/transport/nixl_capi.hpp"  // TransportError

namespace lifecycle::transport {

// The engine holds the abort hook for its whole life; the hook reaches the transport only through
// this relay, which stop() disconnects (so a hook can never call into a destroyed transport).
struct Transport::Relay {
  std::recursive_mutex mu;
  Transport* target = nullptr;  // guarded by mu
};

const char* to_string(PostResult r) noexcept {
  switch (r) {
    case PostResult::Posted:
      return "Posted";
    case PostResult::CompletedInPost:
      return "CompletedInPost";
    case PostResult::CancelledBeforePost:
      return "CancelledBeforePost";
  }
  return "?";
}

namespace {

// Executor-facing error for an event the engine refused (expose of a session in the wrong state).
[[noreturn]] void throw_refused(const ApplyResult& r, std::uint64_t req, Event ev) {
  switch (r.status) {
    case Status::Unknown:
      throw UnknownRequestError(req, ev);
    case Status::Illegal:
    case Status::Stay:
    case Status::Late:
    case Status::Deferred:
      throw IllegalTransitionError(req, r.from, ev);
    case Status::Moved:
    case Status::Duplicate:
    case Status::NoSlot:
    case Status::BadArgument:
      break;
  }
  throw InvalidArgumentError("event", std::string(kEventNames[static_cast<int>(ev)]) +
                                          " refused for request " + std::to_string(req));
}

bool terminal_or_final(State s) { return kTerminal[static_cast<int>(s)] || kFinal[static_cast<int>(s)]; }

}  // namespace

Transport::Transport(std::shared_ptr<Engine> engine, std::unique_ptr<Agent> agent,
                     TransportOptions opts)
    : engine_(std::move(engine)), opts_(opts), agent_(std::move(agent)),
      relay_(std::make_shared<Relay>()) {
  if (!agent_) throw TransportError("Transport: no agent");
  relay_->target = this;
  if (engine_) {
    std::weak_ptr<Relay> weak = relay_;
    abort_hook_ = engine_->add_abort_hook([weak](std::uint64_t req, Role) {
      if (auto relay = weak.lock()) {
        std::lock_guard<std::recursive_mutex> lk(relay->mu);
        if (relay->target != nullptr) relay->target->on_abort(req);
      }
    });
  }
  progress_ = std::make_unique<NixlProgress>(*agent_, *this, opts_.progress);
}

Transport::~Transport() { stop(); }

Agent::RegionId Transport::register_region(const Region& r) {
  const Agent::RegionId id = agent_->register_region(r);
  std::lock_guard<std::mutex> lk(mu_);
  regions_[id] = r;
  return id;
}

void Transport::deregister_region(Agent::RegionId id) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto reg = regions_.find(id);
    if (reg != regions_.end()) {
      const Region& g = reg->second;
      std::size_t held = 0, unreleased = 0, unproven = 0, passive = 0;
      std::uint64_t example = 0;
      for (const auto& [req, r] : held_) {
        if (!r.overlaps(g)) continue;
        ++held;
        unreleased += unreleased_.count(req);
        unproven += unproven_.count(req);
        example = req;
      }
      for (const auto& [req, e] : entries_) {
        if (e.side != Side::Passive) continue;
        ++passive;
        if (held == 0) example = req;
      }
      if (held + passive > 0) {
        throw TransportError("deregister_region: region " + std::to_string(id) + " of transport " + name() +
                             " may still be touched by the backend (" + std::to_string(held) +
                             " transfer requests over it: " + std::to_string(unreleased) + " awaiting a retried "
                             "release, " + std::to_string(unproven) + " ended without evidence; " +
                             std::to_string(passive) + " passive sessions; e.g. request " + std::to_string(example) +
                             "): keep the memory until they end");
      }
      retiring_.insert(id);  // transfer() and expect() refuse to start over it from here on
    }
  }
  try {
    agent_->deregister_region(id);
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    retiring_.erase(id);
    throw;
  }
  std::lock_guard<std::mutex> lk(mu_);
  retiring_.erase(id);
  regions_.erase(id);
}
std::string Transport::metadata() { return agent_->local_metadata(); }
std::string Transport::add_peer(const std::string& md) { return agent_->load_remote_metadata(md); }

void Transport::apply(std::uint64_t req, Event ev) {
  if (engine_) (void)engine_->apply(req, ev);
}

void Transport::send(const std::string& peer, std::uint64_t req, NotifKind kind) {
  try {
    agent_->send_notification(peer, {req, kind});
    if (kind == NotifKind::Stop) ctr_.stops_sent.fetch_add(1);
    if (kind == NotifKind::Quiesced) ctr_.quiesced_sent.fetch_add(1);
  } catch (const std::exception&) {
    ctr_.send_errors.fetch_add(1);  // a dead peer: the engine's timers decide (grace -> Poisoned)
  }
}

void Transport::remember_stopped(std::uint64_t req) {
  if (stopped_reqs_.insert(req).second) stopped_order_.push_back(req);
  while (stopped_order_.size() > opts_.remember_stopped) {
    stopped_reqs_.erase(stopped_order_.front());
    stopped_order_.pop_front();
  }
}


void Transport::forget_held(std::uint64_t req, bool proven) {
  if (proven) {
    held_.erase(req);
  } else {
    unproven_.insert(req);  // released is not evidence (DESIGN §3): its range stays held, for good
  }
}

// Every release of a request goes through here: a failed one is counted and kept for the sweep to
// retry (the agent still holds the handle, and stats()' `unreleased` shows it until it goes).
void Transport::release_xfer(std::uint64_t req, bool proven) {
  const ReleaseStatus st = agent_->release(req);
  std::lock_guard<std::mutex> lk(mu_);
  if (st == kReleased || st == kReleaseUnknownRequest) {
    forget_held(req, proven);
    return;
  }
  ctr_.release_failures.fetch_add(1);
  unreleased_[req] = proven;
}

PostResult Transport::transfer(std::uint64_t req, XferOp op, const Region& local,
                               const Region& remote, const std::string& peer) {
  if (stopped_.load()) throw TransportError("transfer: transport " + name() + " is stopped");
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (entries_.count(req) != 0) {
      throw TransportError("transfer: request " + std::to_string(req) + " already has a transfer");
    }
    if (unproven_.count(req) != 0) {  // its range and its id stay held: a reuse would free them
      throw TransportError("transfer: request " + std::to_string(req) + " had a transfer that ended without "
                           "evidence; give the new one another id");
    }
  }
  // 0. A local range in the engine's pool must lie inside the slot leased to this very session: the
  //    evidence rule protects that slot, not a neighbour's (one lookup, only for pool memory).
  if (engine_ && engine_->pool() != nullptr && engine_->pool()->bytes() > 0 && local.kind == MemKind::Dram) {
    const BufferPool& pool = *engine_->pool();
    const Region whole{reinterpret_cast<std::uintptr_t>(pool.base()), pool.bytes(), 0, MemKind::Dram};
    if (whole.spans_overlap(local)) {
      const auto info = engine_->info(req);  // none: expose below refuses it (UnknownRequest)
      const bool leased = info && info->slot != kNoSlot;
      const Region slot{whole.addr + (leased ? info->slot : 0) * pool.slot_size(), pool.slot_size(), 0, MemKind::Dram};
      if (info && (!leased || !slot.contains(local))) {
        throw TransportError("transfer: request " + std::to_string(req) + ": local range [" +
                             std::to_string(local.addr - whole.addr) + ", +" + std::to_string(local.len) +
                             ") of the engine's pool is not inside " +
                             (leased ? "slot " + std::to_string(info->slot) + ", the one leased to it"
                                     : std::string("a slot leased to it (it holds none)")));
      }
    }
  }
  // 1. Build the request: a bad peer or descriptor throws here, before anything is exposed.
  agent_->prepare(req, op, local, remote, peer, /*notify=*/true);
  bool stopped_by_peer = false;
  const char* refuse = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    // re-checked under mu_: stop() sets stopped_ before it collects the entries under mu_
    if (stopped_.load()) refuse = "is stopped";
    for (Agent::RegionId id : retiring_)
      if (refuse == nullptr && local.overlaps(regions_.at(id))) refuse = "is being deregistered (its local range)";
    if (refuse == nullptr) {
      stopped_by_peer = stopped_reqs_.count(req) != 0;
      entries_[req] = Entry{Side::Active, peer, false, false, stopped_by_peer};
      held_[req] = local;
    }
  }
  if (refuse != nullptr) {
    (void)agent_->release(req);  // prepared, never posted, never held: nothing moved
    throw TransportError("transfer: request " + std::to_string(req) + ": transport " + name() + " " + refuse);
  }
  // 2. Expose (Advertised -> InFlight). A refused expose (cancelled, unknown) posts nothing.
  if (engine_) {
    const ApplyResult r = engine_->apply(req, Event::expose);
    if (r.status != Status::Moved) {
      bool ack = false;
      {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = entries_.find(req);
        if (it != entries_.end()) {
          ack = it->second.peer_stop;
          entries_.erase(it);
        }
      }
      release_xfer(req, true);  // prepared, never posted: nothing moved
      if (ack) send(peer, req, NotifKind::Quiesced);
      throw_refused(r, req, Event::expose);
    }
  }
  // 3. A cancel between expose and here (or the peer's stop) wins: never posted is evidence.
  bool skip = false, ack = false, gone = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = entries_.find(req);
    if (it == entries_.end()) {
      gone = true;  // stop() or remove_peer() took the entry (and failed the session) meanwhile
    } else if (Entry& e = it->second; e.cancel_requested || e.peer_stop) {
      skip = true;
      ack = e.peer_stop;
      entries_.erase(req);
    } else {
      e.posting = true;
    }
  }
  if (gone) {
    release_xfer(req, true);  // never posted: nothing moved, which is the evidence
    if (engine_) {
      (void)engine_->cancel(req);                      // InFlight -> CancelRequested (if still there)
      (void)engine_->apply(req, Event::complete);      // -> Quiesced(cancelled); late if stop() failed it
    }
    throw TransportError("transfer: request " + std::to_string(req) + ": transport " + name() +
                         " stopped or its peer was removed before the post");
  }
  if (skip) {
    release_xfer(req, true);
    if (engine_ && ack) (void)engine_->cancel(req);  // InFlight -> CancelRequested (idempotent)
    apply(req, Event::complete);                                  // -> Quiesced(cancelled)
    if (ack) send(peer, req, NotifKind::Quiesced);
    ctr_.cancelled_before_post.fetch_add(1);
    return PostResult::CancelledBeforePost;
  }
  // 4. Post. From here on the backend may touch the buffers until Done.
  XferState st;
  try {
    st = agent_->post(req);
  } catch (...) {
    ctr_.post_errors.fetch_add(1);
    finish_active(req, false);  // an error is not evidence: Poisoned
    throw;
  }
  ctr_.posted.fetch_add(1);
  if (st == XferState::Done) {
    ctr_.completed_in_post.fetch_add(1);
    finish_active(req, true);
    return PostResult::CompletedInPost;
  }
  progress_->watch(req);
  return PostResult::Posted;
}

void Transport::expect(std::uint64_t req, const std::string& peer) {
  if (stopped_.load()) throw TransportError("expect: transport " + name() + " is stopped");
  // a passive session needs its peer: to ask it to stop, and to know its notes
  if (!agent_->knows_peer(peer)) {
    throw TransportError("expect: request " + std::to_string(req) + ": unknown peer '" + peer +
                         "' (add_peer its metadata first)");
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (entries_.count(req) != 0) {
      throw TransportError("expect: request " + std::to_string(req) + " already has a transfer");
    }
    if (stopped_.load()) throw TransportError("expect: transport " + name() + " is stopped");
    // a passive session has no range here (the peer holds our descriptor): none may start meanwhile
    if (!retiring_.empty()) {
      throw TransportError("expect: request " + std::to_string(req) + ": transport " + name() +
                           " is deregistering a region; retry when it is done");
    }
    entries_[req] = Entry{Side::Passive, peer, false, false, false};
  }
  if (engine_) {
    const ApplyResult r = engine_->apply(req, Event::expose);
    if (r.status != Status::Moved) {
      std::lock_guard<std::mutex> lk(mu_);
      entries_.erase(req);
      throw_refused(r, req, Event::expose);
    }
  }
  // From here on a note completes the session directly; one that came before (even after the entry
  // was made, while expose was being applied) waits in early_ and is taken now.
  bool early = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto e = entries_.find(req);
    if (e != entries_.end() && e->second.side == Side::Passive) e->second.exposed = true;
    auto it = early_.find(req);
    if (it != early_.end() && it->second.first == peer) {
      early = true;
      early_.erase(it);
      entries_.erase(req);
    }
  }
  if (early) apply(req, Event::complete);
}

void Transport::finish_active(std::uint64_t req, bool done) {
  bool ack = false;
  std::string peer;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = entries_.find(req);
    if (it == entries_.end() || it->second.side != Side::Active) return;
    ack = it->second.peer_stop;
    peer = it->second.peer;
    entries_.erase(it);
    if (!done) unproven_.insert(req);  // with the erase: a stop arriving now is never answered
  }
  // Release first (after Done it is safe; after an error it changes nothing about the verdict), so
  // that once the engine reports the session terminal the transport holds nothing for it.
  release_xfer(req, done);  // Done is evidence; an error is not
  (done ? ctr_.completed : ctr_.failed).fetch_add(1);
  if (engine_) {
    const ApplyResult r = engine_->apply(req, done ? Event::complete : Event::fail);
    if (done && r.status == Status::Late) ctr_.late_evidence.fetch_add(1);
  } else if (done) {
    {
      std::lock_guard<std::mutex> lk(bare_mu_);
      bare_done_.fetch_add(1);
    }
    bare_cv_.notify_all();
  }
  // "quiesced" only after our own request reached Done: an error proves nothing.
  if (done && ack) send(peer, req, NotifKind::Quiesced);
}

void Transport::on_abort(std::uint64_t req) {
  std::string peer;
  bool passive = false, release_now = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = entries_.find(req);
    if (it == entries_.end()) return;  // not ours, or already finished
    Entry& e = it->second;
    switch (e.side) {
      case Side::Active:
        e.cancel_requested = true;
        if (e.posting && opts_.unsafe_release_on_cancel) {
          release_now = true;
          entries_.erase(it);
        }
        break;  // otherwise: keep polling until Done or an error
      case Side::Passive:
        passive = true;
        peer = e.peer;
        break;
    }
  }
  if (passive) {
    {
      std::lock_guard<std::mutex> lk(outbox_mu_);
      outbox_.emplace_back(std::move(peer), req);
    }
    progress_->wake();
    return;
  }
  if (release_now) {
    // TEST ONLY (negative control): release is NOT evidence; this is the bug the tests must catch.
    progress_->unwatch(req);
    release_xfer(req, true);  // the bug on purpose: release taken as evidence
    ctr_.unsafe_releases.fetch_add(1);
    apply(req, Event::complete);
  }
}

bool Transport::on_pass() {
  std::vector<std::pair<std::string, std::uint64_t>> out;
  {
    std::lock_guard<std::mutex> lk(outbox_mu_);
    if (outbox_.empty()) return false;
    out.swap(outbox_);
  }
  for (const auto& [peer, req] : out) send(peer, req, NotifKind::Stop);
  return true;
}

void Transport::on_complete(std::uint64_t req) { finish_active(req, true); }

void Transport::on_fail(std::uint64_t req, const char*) { finish_active(req, false); }

void Transport::on_notification(const std::string& peer, std::uint64_t req, NotifKind kind) {
  switch (kind) {
    case NotifKind::Done:
    case NotifKind::Quiesced: {
      (kind == NotifKind::Done ? ctr_.done_received : ctr_.quiesced_received).fetch_add(1);
      bool mine = false;
      {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = entries_.find(req);
        if (it != entries_.end() && it->second.side == Side::Passive && it->second.peer == peer) {
          if (it->second.exposed) {
            mine = true;
            entries_.erase(it);
          } else {
            early_[req] = {peer, kind};  // expect() is applying expose right now: it takes the note after
          }
        } else if (it == entries_.end() && engine_) {
          // No entry: a late note for a session that already ended (evidence for a quarantined
          // slot), or a note that beat expect() (kept for it, bounded).
          auto info = engine_->info(req);
          if (info && terminal_or_final(info->state)) {
            mine = true;
          } else if (early_.size() < 4096) {
            early_[req] = {peer, kind};
            ctr_.orphan_notifications.fetch_add(1);
          }
        } else {
          ctr_.orphan_notifications.fetch_add(1);
        }
      }
      if (mine && engine_) {
        const ApplyResult r = engine_->apply(req, Event::complete);
        if (r.status == Status::Late) ctr_.late_evidence.fetch_add(1);
      }
      return;
    }
    case NotifKind::Stop: {
      ctr_.peer_stops.fetch_add(1);
      bool active = false, reply_now = false;
      {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = entries_.find(req);
        if (it != entries_.end() && it->second.side == Side::Active) {
          active = true;
          // TEST ONLY (negative control): ack now instead of after our Done; the bug the passive
          // side's late-write test must catch
          if (opts_.unsafe_ack_stop_at_once) reply_now = true; else it->second.peer_stop = true;
        } else if (it == entries_.end() && unproven_.count(req) != 0) {
          ctr_.stops_unanswered.fetch_add(1);  // ended without evidence: no ack, ever
        } else if (it == entries_.end()) {
          remember_stopped(req);  // a later transfer() for req is cancelled before its post
          reply_now = true;
        } else {
          ctr_.orphan_notifications.fetch_add(1);
        }
      }
      if (active) {
        // Cancel here too; the quiesced reply goes out when our request is Done (finish_active).
        if (engine_) (void)engine_->cancel(req);
        if (reply_now) {
          ctr_.unsafe_acks.fetch_add(1);
          send(peer, req, NotifKind::Quiesced);
        }
      } else if (reply_now) {
        // We hold no request for it (never posted, or already finished and released).
        if (engine_) {
          auto info = engine_->info(req);
          if (info && info->state == State::Advertised) (void)engine_->cancel(req);
          // Ended without evidence under an earlier transport of this engine (unproven_ knows this
          // one's; the engine remembers while the tombstone lives): its bytes may still land.
          if (info && info->poisoned && !info->evidence) {
            ctr_.stops_unanswered.fetch_add(1);
            return;
          }
        }
        send(peer, req, NotifKind::Quiesced);
      }
      return;
    }
  }
}

void Transport::on_bad_notification(const std::string&, const std::string&) {
  ctr_.bad_notifications.fetch_add(1);
}

void Transport::on_tick() {
  if (engine_) (void)engine_->tick();  // timers; abort hooks run here, on this thread
  const auto now = std::chrono::steady_clock::now();
  if (now >= next_sweep_) {
    next_sweep_ = now + opts_.sweep_interval;
    sweep();
  }
}

void Transport::sweep() {
  // Retry releases that failed.
  std::vector<std::pair<std::uint64_t, bool>> retry;
  {
    std::lock_guard<std::mutex> lk(mu_);
    retry.assign(unreleased_.begin(), unreleased_.end());
  }
  for (const auto& [req, proven] : retry) {
    const ReleaseStatus st = agent_->release(req);
    if (st == kReleased || st == kReleaseUnknownRequest) {
      std::lock_guard<std::mutex> lk(mu_);
      unreleased_.erase(req);
      forget_held(req, proven);
    }
  }
  if (!engine_) return;
  // Passive entries whose session ended without a note (grace expired, cancelled by the executor
  // before any exposure...): nothing more to wait for. A late note still reaches the engine.
  std::vector<std::uint64_t> passive;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [req, e] : entries_) {
      if (e.side == Side::Passive) passive.push_back(req);
    }
  }
  for (std::uint64_t req : passive) {
    auto info = engine_->info(req);
    if (!info || terminal_or_final(info->state)) {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = entries_.find(req);
      if (it != entries_.end() && it->second.side == Side::Passive) {
        entries_.erase(it);
        ctr_.passive_swept.fetch_add(1);
      }
    }
  }
  // Early notes whose session is gone or ended (a note for a live session stays for its expect()).
  std::vector<std::uint64_t> early;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [req, note] : early_) early.push_back(req);
  }
  std::vector<std::uint64_t> stale;
  for (std::uint64_t req : early) {
    auto info = engine_->info(req);
    if (!info || terminal_or_final(info->state)) stale.push_back(req);
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (std::uint64_t req : stale) early_.erase(req);
}

void Transport::remove_peer(const std::string& peer) {
  std::vector<std::pair<std::uint64_t, Side>> gone;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.peer == peer && (it->second.side == Side::Passive || it->second.posting)) {
        gone.emplace_back(it->first, it->second.side);
        if (it->second.side == Side::Active) unproven_.insert(it->first);  // with the erase
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto [req, side] : gone) {
    if (side == Side::Active) {
      progress_->unwatch(req);
      release_xfer(req, false);  // posted, abandoned: no evidence
    }
    ctr_.abandoned.fetch_add(1);
    apply(req, Event::fail);  // no evidence can come any more: Poisoned (late if already ended)
  }
  try {
    agent_->invalidate_remote(peer);
  } catch (const std::exception&) {
    ctr_.send_errors.fetch_add(1);
  }
}

void Transport::stop() {
  if (stopped_.exchange(true)) return;
  {
    std::lock_guard<std::recursive_mutex> lk(relay_->mu);
    relay_->target = nullptr;
  }
  if (engine_) engine_->remove_abort_hook(abort_hook_);  // the relay already made it a no-op
  progress_->stop();
  std::vector<std::pair<std::uint64_t, Entry>> all;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [req, e] : entries_) {
      all.emplace_back(req, e);
      if (e.side == Side::Active && e.posting) unproven_.insert(req);  // with the erase
    }
    entries_.clear();
  }
  for (auto& [req, e] : all) {
    if (e.side == Side::Active && !e.posting) {
      // never posted: the transfer() call that made it is still running and, finding its entry gone,
      // resolves the session itself (never posted is evidence: Quiesced(cancelled), not Poisoned)
      release_xfer(req, true);
      continue;
    }
    if (e.side == Side::Active) release_xfer(req, false);  // a failure is retried by the agent's destructor
    ctr_.abandoned.fetch_add(1);
    apply(req, Event::fail);
  }
  {
    std::lock_guard<std::mutex> lk(bare_mu_);
  }
  bare_cv_.notify_all();
}

bool Transport::wait_completions(std::uint64_t n, std::int64_t timeout_ns, std::int64_t spin_ns) {
  if (spin_for(std::min(spin_ns, timeout_ns), [&] { return bare_done_.load() >= n || stopped_.load(); })) {
    return bare_done_.load() >= n;
  }
  std::unique_lock<std::mutex> lk(bare_mu_);
  return bare_cv_.wait_for(lk, std::chrono::nanoseconds(timeout_ns),
                           [&] { return bare_done_.load() >= n || stopped_.load(); }) &&
         bare_done_.load() >= n;
}

TransportStats Transport::stats() const {
  TransportStats s;
  s.registered_regions = agent_->registered_regions();
  s.live_xfers = agent_->live_requests();
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [req, e] : entries_) {
      (void)req;
      (e.side == Side::Active ? s.active : s.passive) += 1;
    }
    s.unreleased = unreleased_.size();
  }
  s.watched = progress_->watched();
  s.posted = ctr_.posted.load();
  s.completed_in_post = ctr_.completed_in_post.load();
  s.completed = ctr_.completed.load();
  s.failed = ctr_.failed.load();
  s.post_errors = ctr_.post_errors.load();
  s.cancelled_before_post = ctr_.cancelled_before_post.load();
  s.peer_stops = ctr_.peer_stops.load();
  s.stops_sent = ctr_.stops_sent.load();
  s.quiesced_sent = ctr_.quiesced_sent.load();
  s.done_received = ctr_.done_received.load();
  s.quiesced_received = ctr_.quiesced_received.load();
  s.orphan_notifications = ctr_.orphan_notifications.load();
  s.bad_notifications = ctr_.bad_notifications.load();
  s.send_errors = ctr_.send_errors.load();
  s.release_failures = ctr_.release_failures.load();
  s.unsafe_releases = ctr_.unsafe_releases.load();
  s.late_evidence = ctr_.late_evidence.load();
  s.abandoned = ctr_.abandoned.load();
  s.passive_swept = ctr_.passive_swept.load();
  s.stops_unanswered = ctr_.stops_unanswered.load();
  s.unsafe_acks = ctr_.unsafe_acks.load();
  return s;
}

NixlProgressStats Transport::progress_stats() const { return progress_->statistics(); }

}  // namespace lifecycle::transport
