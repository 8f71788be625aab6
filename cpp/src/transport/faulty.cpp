#include "lifecycle/transport/faulty.hpp"

#include <utility>

#include "lifecycle/error_base.hpp"  // InvalidArgumentError
#include "lifecycle/transport/nixl_capi.hpp"  // TransportError

namespace lifecycle::transport {

namespace {

std::uint64_t mix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

enum RollKind : std::uint64_t { kPostFault = 1, kDrop = 2, kDup = 3, kRelease = 4 };

}  // namespace

FaultyAgent::FaultyAgent(std::unique_ptr<Agent> inner, FaultOptions opts)
    : inner_(std::move(inner)), opts_(opts) {
  if (!inner_) throw TransportError("FaultyAgent: no inner agent");
  const std::pair<const char*, double> probabilities[] = {
      {"delay", opts_.delay}, {"error", opts_.error}, {"disconnect", opts_.disconnect},
      {"never_completes", opts_.never_completes}, {"drop_notification", opts_.drop_notification},
      {"duplicate_notification", opts_.duplicate_notification}, {"release_failure", opts_.release_failure}};
  for (const auto& [field, p] : probabilities) {
    if (!(p >= 0 && p <= 1)) {  // (NaN too)
      throw InvalidArgumentError(field, "expected a probability in [0, 1], got " + std::to_string(p));
    }
  }
  // one roll picks at most one of these four (prepare): beyond a total of 1 the later ones fire less often than asked
  const double status = opts_.delay + opts_.error + opts_.disconnect + opts_.never_completes;
  if (status > 1 + 1e-9) {
    throw InvalidArgumentError("faults", "delay + error + disconnect + never_completes must not exceed 1 (one roll "
                                         "picks at most one of them), got " + std::to_string(status));
  }
  const std::pair<const char*, std::chrono::microseconds> delays[] = {{"delay_for", opts_.delay_for},
                                                                       {"duplicate_after", opts_.duplicate_after}};
  for (const auto& [field, d] : delays) {
    if (d.count() < 0 || d > kMaxFaultDelay) {
      throw InvalidArgumentError(field, "expected a delay in [0, " + std::to_string(kMaxFaultDelay.count()) +
                                            " s], got " + std::to_string(d.count()) + " us");
    }
  }
}

double FaultyAgent::roll(std::uint64_t kind, std::uint64_t a, std::uint64_t b, std::uint64_t c) const noexcept {
  std::uint64_t h = mix64(mix64(mix64(opts_.seed ^ (kind << 56)) ^ a) ^ b);
  if (c != 0) h = mix64(h ^ c);  // (c == 0: the two-key roll it was, so an id's first session decides as before)
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
}

std::string FaultyAgent::load_remote_metadata(const std::string& md) {
  std::string peer = inner_->load_remote_metadata(md);
  std::lock_guard<std::mutex> lk(mu_);
  disconnected_.erase(peer);  // fresh metadata: a fresh peer
  cut_.erase(peer);
  return peer;
}

bool FaultyAgent::is_cut(const std::string& peer, std::uint64_t req) const {
  auto it = cut_.find(peer);
  return it != cut_.end() && it->second.count(req) != 0;
}

void FaultyAgent::prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                          const std::string& peer, std::optional<std::uint64_t> done_tag) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (disconnected_.count(peer) != 0) {
      throw TransportError("post: request " + std::to_string(req) + ": peer " + peer +
                           " disconnected (injected)");
    }
  }
  inner_->prepare(req, op, local, remote, peer, done_tag);
  try {
    std::lock_guard<std::mutex> lk(mu_);
    // Which session of req this is on this agent (its entry, live or retired, counts them): the rolls' occurrence,
    // so the sessions of a reused id decide independently.  They come one after another (one live transfer per
    // id), so the count follows the caller's order for that id, whatever other threads do meanwhile.
    const auto live = xfers_.find(req);
    const auto old = live == xfers_.end() ? retired_.find(req) : retired_.end();
    const std::uint64_t session = live != xfers_.end() ? live->second.session + 1
                                  : old != retired_.end() ? old->second.session + 1 : 0;
    // One roll picks at most one status fault, in a fixed order of the cumulative probabilities.
    const double r = roll(kPostFault, req, session);
    Fault f = Fault::None;
    double acc = 0;
    if (r < (acc += opts_.delay)) {
      f = Fault::Delay;
    } else if (r < (acc += opts_.error)) {
      f = Fault::Error;
    } else if (r < (acc += opts_.disconnect)) {
      f = Fault::Disconnect;
    } else if (r < (acc += opts_.never_completes)) {
      f = Fault::NeverCompletes;
    }
    Xfer x{peer, f, {}, false, false, 0, next_gen_ + 1, session};  // (may throw: nothing changed yet)
    if (live != xfers_.end()) {
      live->second = std::move(x);
    } else if (old != retired_.end()) {
      auto node = retired_.extract(old);  // its node comes back: a reused id allocates no entry
      node.mapped() = std::move(x);
      xfers_.insert(std::move(node));
    } else {
      xfers_.emplace(req, std::move(x));
    }
    ++next_gen_;
  } catch (...) {
    inner_->release(req);  // prepared, never posted: nothing of it runs
    throw;
  }
}

XferState FaultyAgent::post(std::uint64_t req) {
  Fault f = Fault::None;
  bool cut = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = xfers_.find(req);
    if (it != xfers_.end()) {
      it->second.posted_at = std::chrono::steady_clock::now();
      f = it->second.fault;
      if (!it->second.counted) {
        it->second.counted = true;
        switch (f) {
          case Fault::None:
            break;
          case Fault::Delay:
            ++stats_.delays;
            break;
          case Fault::Error:
            ++stats_.errors;
            break;
          case Fault::Disconnect:
            ++stats_.disconnects;
            disconnected_.insert(it->second.peer);
            break;
          case Fault::NeverCompletes:
            ++stats_.never_completes;
            break;
        }
        // posted at or after a disconnect of its peer (prepared before it): cut off with it
        if (disconnected_.count(it->second.peer) != 0) {
          cut_[it->second.peer].insert(req);
          it->second.cut = true;
        }
      }
      cut = it->second.cut;
    }
  }
  const XferState st = inner_->post(req);
  // a status fault or a cut applies from the first status on: a Done inside post() is not reported
  return f == Fault::None && !cut ? st : XferState::InProgress;
}

XferStatus FaultyAgent::status(std::uint64_t req) {
  const XferStatus inner = inner_->status(req);  // always polled: it drives the inner backend
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  if (it == xfers_.end() || inner.state == XferState::Unknown) return inner;
  if (it->second.cut) return {XferState::Failed, -2};  // (sticky: fresh metadata does not undo it)
  switch (it->second.fault) {
    case Fault::None:
      return inner;
    case Fault::Delay:
      if (std::chrono::steady_clock::now() - it->second.posted_at < opts_.delay_for) {
        return {XferState::InProgress, 1};
      }
      return inner;
    case Fault::Error:
    case Fault::Disconnect:
      return {XferState::Failed, -2};
    case Fault::NeverCompletes:
      return {XferState::InProgress, 1};
  }
  return inner;
}

ReleaseStatus FaultyAgent::release(std::uint64_t req) {
  std::uint64_t gen = 0;  // the transfer this release is for (0: none of ours)
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = xfers_.find(req);
    if (it != xfers_.end()) {
      gen = it->second.gen;
      const std::uint64_t attempt = it->second.release_attempts++;
      if (roll(kRelease, req, attempt, it->second.session) < opts_.release_failure) {
        ++stats_.release_failures;
        return -2;  // kErrBackend: the request stays held
      }
    }
  }
  const ReleaseStatus rs = inner_->release(req);
  if (gen != 0 && (rs == kReleased || rs == kReleaseUnknownRequest)) {  // gone from the inner agent: retire its entry
    // ... its own only: once the inner agent let the id go, another thread may have prepared a new transfer of it
    std::lock_guard<std::mutex> lk(mu_);
    auto it = xfers_.find(req);
    if (it != xfers_.end() && it->second.gen == gen) {
      // kept for its session count (the node moves: no allocation); bounded: past kMaxRetired the smallest id goes
      if (retired_.size() >= kMaxRetired) retired_.erase(retired_.begin());
      retired_.insert(xfers_.extract(it));
    }
  }
  return rs;
}

void FaultyAgent::send_notification(const std::string& peer, const NotifMessage& m) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (is_cut(peer, m.req)) {
      throw TransportError("send_notification: request " + std::to_string(m.req) + ": peer " + peer +
                           " disconnected (injected)");
    }
  }
  inner_->send_notification(peer, m);
}

std::vector<RawNotification> FaultyAgent::fetch_notifications(std::size_t& skipped) {
  std::vector<RawNotification> in = inner_->fetch_notifications(skipped);
  std::vector<RawNotification> out;
  std::lock_guard<std::mutex> lk(mu_);
  if (in.empty() && late_.empty()) return in;
  const auto now = std::chrono::steady_clock::now();
  // held-back duplicates first (they came before anything fetched now); bounded: past 65,536 the
  // oldest goes out early
  while (!late_.empty() && (late_.front().due <= now || late_.size() > 65536)) {
    const auto m = decode_notif(late_.front().note.bytes);
    if (m && is_cut(late_.front().note.peer, m->req)) {
      ++stats_.dropped;  // cut off since: notes about it vanish, a late copy too
    } else {
      out.push_back(std::move(late_.front().note));
    }
    late_.pop_front();
  }
  for (auto& n : in) {
    const auto m = decode_notif(n.bytes);
    if (m && is_cut(n.peer, m->req)) {
      ++stats_.dropped;
      continue;
    }
    const std::uint64_t key = m ? m->req * 4 + static_cast<std::uint64_t>(m->kind) : 0;  // the rolls' input
    // counted per (peer, request, kind) itself: key wraps from id 2**62 on (id 1 and 2**62 + 1 share it)
    auto seen_key = std::make_tuple(n.peer, m ? m->req : 0, m ? static_cast<std::uint8_t>(m->kind) : std::uint8_t{0});
    // bounded: the occurrences restart at a fixed count of keys, not at a fetch's end; which keys came before
    // the restart follows the arrival order across requests, so past it a repeated note may not replay
    if (notif_seen_.size() >= 65536 && notif_seen_.count(seen_key) == 0) notif_seen_.clear();
    const std::uint64_t occ = notif_seen_[std::move(seen_key)]++;
    if (roll(kDrop, key, occ) < opts_.drop_notification) {
      ++stats_.dropped;
      continue;
    }
    if (roll(kDup, key, occ) < opts_.duplicate_notification) {
      ++stats_.duplicated;
      if (opts_.duplicate_after.count() > 0) {
        late_.push_back({now + opts_.duplicate_after, n});
      } else {
        out.push_back(n);
      }
    }
    out.push_back(std::move(n));
  }
  return out;
}

FaultStats FaultyAgent::fault_stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

Fault FaultyAgent::fault_of(std::uint64_t req) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  return it == xfers_.end() ? Fault::None : it->second.fault;
}

}  // namespace lifecycle::transport
