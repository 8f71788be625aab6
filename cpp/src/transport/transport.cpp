#include "lifecycle/transport/transport.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>  // PRIxPTR
#include <cstdio>
#include <exception>
#include <map>
#include <new>
#include <random>
#include <vector>

#include <pthread.h>  // pthread_atfork

#include "lifecycle/errors.hpp"
#include "lifecycle/transport/nixl_capi.hpp"  // TransportError
#include "lifecycle/transport/test_peer.hpp"

namespace lifecycle::transport {

namespace {
// A transfer_batch item's refusal (step 3) for a peer a NIXL post failed to: raised as PeerDisconnected.
constexpr const char* kPeerMarked = "had a post to its peer fail:";

// Bumped in every forked child (pthread_atfork), so a process can tell that it is a fork of the one that
// made a transport: pids can be reused, and a child in a new pid namespace can have its parent's pid.
std::atomic<std::uint64_t> g_fork_generation{0};
// Every transport of each engine, stopped ones too until destroyed (share_stop), under its mutex.  Never
// destroyed (a transport may outlive static destruction); a forked child starts a new one (the parent's
// transports are not the child's, and a thread of the parent may have held the lock at the fork), or none when
// that allocation fails: then no transport registers, and share_stop promises nothing (stops go unanswered).
struct EngineTransports {
  std::mutex mu;
  std::map<const Engine*, std::vector<Transport*>> of;
};
EngineTransports* g_engine_transports = new EngineTransports;
void on_fork_in_child() noexcept {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
  g_engine_transports = new (std::nothrow) EngineTransports;
}
[[maybe_unused]] const int g_atfork_registered = ::pthread_atfork(nullptr, nullptr, &on_fork_in_child);
}  // namespace

// The engine holds the abort hook for its whole life; the hook reaches the transport only through
// this relay, which stop() disconnects (so a hook can never call into a destroyed transport).
struct Transport::Relay {
  std::recursive_mutex mu;
  Transport* target = nullptr;  // guarded by mu
  // The fork generation of the process that made the transport.  In a fork() of it the engine's hook
  // reaches nothing: the transport's threads stayed with the parent, and a lock one of them held at the
  // fork stays held in the child for good, so a cancel there would hang on it.  Its passive sessions then
  // send no stop: in the child's copy of the engine they stay CancelRequested, or end Poisoned once that
  // engine's timers run past cancel_grace; never released.
  std::uint64_t generation = g_fork_generation.load(std::memory_order_relaxed);
};

std::recursive_mutex& TransportTestPeer::relay_mutex(Transport& t) { return t.relay_->mu; }
void TransportTestPeer::adopt(Transport& t) { t.relay_->generation = g_fork_generation.load(); }

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

constexpr std::size_t kMaxOtherStops = 64;  // per live transfer: stops naming other offers of its id

// The next records of an ordered map for one sweep, from `cursor` on, wrapping; at most kSweepBudget (a
// sweep does one engine lookup per record: a big map is walked over several sweeps, never all at once
// under the lock).  Leaves `cursor` on the first record not taken.  Caller holds the map's lock.
constexpr std::size_t kSweepBudget = 4096;
constexpr std::size_t kRemovedPeers = 4096;  // remove_peer() marks kept (see there)
template <class Map>
std::vector<std::pair<typename Map::key_type, typename Map::mapped_type>> next_batch(const Map& m,
                                                                                   typename Map::key_type& cursor) {
  std::vector<std::pair<typename Map::key_type, typename Map::mapped_type>> batch;
  auto it = m.lower_bound(cursor);
  while (batch.size() < kSweepBudget && batch.size() < m.size()) {
    if (it == m.end()) it = m.begin();
    batch.emplace_back(it->first, it->second);
    ++it;
  }
  cursor = it == m.end() ? typename Map::key_type{} : it->first;
  return batch;
}

// The same for a hash map (O(1) inserts on the transfer path): `cursor` is a bucket index.
template <class K, class V>
std::vector<std::pair<K, V>> next_batch(const std::unordered_map<K, V>& m, std::size_t& cursor) {
  std::vector<std::pair<K, V>> batch;
  const std::size_t n = m.bucket_count();
  if (m.empty() || n == 0) return batch;
  std::size_t b = cursor % n;
  for (std::size_t seen = 0; seen < n && batch.size() < kSweepBudget; ++seen, b = (b + 1) % n) {
    for (auto it = m.begin(b); it != m.end(b); ++it) batch.emplace_back(it->first, it->second);
  }
  cursor = b;
  return batch;
}

// splitmix64's finalizer: a bijection on 64 bits, so distinct counts give distinct tags.
std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

Transport::Transport(std::shared_ptr<Engine> engine, std::unique_ptr<Agent> agent,
                     TransportOptions opts)
    : engine_(std::move(engine)), opts_(opts), agent_(std::move(agent)),
      relay_(std::make_shared<Relay>()) {
  if (!agent_) throw TransportError("Transport: no agent");
  std::random_device rd;  // tags differ across transports (a restarted peer) as well as within one
  tag_salt_ = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  relay_->target = this;
  if (engine_) {
    std::weak_ptr<Relay> weak = relay_;
    abort_hook_ = engine_->add_abort_hook([weak](const Engine::Abort& a) {
      if (auto relay = weak.lock()) {
        if (g_fork_generation.load(std::memory_order_relaxed) != relay->generation) return;  // a fork: see Relay
        std::lock_guard<std::recursive_mutex> lk(relay->mu);
        if (relay->target != nullptr) relay->target->on_abort(a.req, a.serial);
      }
    });
  }
  progress_ = std::make_unique<NixlProgress>(*agent_, *this, opts_.progress);
  if (engine_) {
    // the early stops the engine's other transports answered bind this one too (share_stop)
    EngineTransports* reg = g_engine_transports;
    if (reg == nullptr) return;  // (a forked child that could not allocate it: share_stop refuses)
    std::lock_guard<std::mutex> g(reg->mu);
    auto& all = reg->of[engine_.get()];
    for (Transport* t : all) {
      std::lock_guard<std::mutex> lk(t->mu_);
      std::lock_guard<std::mutex> mine(mu_);
      for (const auto& [key, memo] : t->stopped_reqs_) stopped_reqs_.emplace(key, memo);
    }
    all.push_back(this);
  }
}

Transport::~Transport() {
  stop();
  // Only now out of share_stop's registry: a stopped transport posts nothing more, but what it released without
  // evidence (stop(), remove_peer(), an error) may still move bytes while its agent lives (unproven_).
  if (engine_) {
    if (EngineTransports* reg = g_engine_transports; reg != nullptr) {
      std::lock_guard<std::mutex> g(reg->mu);
      if (auto all = reg->of.find(engine_.get()); all != reg->of.end()) {
        all->second.erase(std::remove(all->second.begin(), all->second.end(), this), all->second.end());
        if (all->second.empty()) reg->of.erase(all);
      }
    }
  }
}

Agent::RegionId Transport::register_region(const Region& r) {
  const Agent::RegionId id = agent_->register_region(r);
  std::lock_guard<std::mutex> lk(mu_);
  regions_[id] = r;
  return id;
}

void Transport::deregister_region(Agent::RegionId id) {
  if (swept_out_.load()) retry_releases();  // (no sweep runs any more)
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Another call is deregistering it: both in the backend, the one that failed there would clear the mark
    // while the other still deregisters, and a transfer could start over that memory meanwhile.
    if (retiring_.count(id) != 0) {
      throw TransportError("deregister_region: region " + std::to_string(id) + " of transport " + name() +
                           " is being deregistered by another call: refused, nothing changed");
    }
    auto reg = regions_.find(id);
    if (reg != regions_.end()) {
      // Only what covers memory of this region blocks it: every other region stays free to go while other
      // requests are served (an executor that registers a buffer per request deregisters a finished one's).
      const Region& g = reg->second;
      std::size_t held = 0, unreleased = 0, unproven = 0, passive = 0, offers = 0;
      // the first use found, for the message: which request, in what state, over which range
      std::uint64_t example = 0;
      const char* state = nullptr;
      Region used{};
      const auto first = [&](std::uint64_t req, const char* what, const Region& r) {
        if (state != nullptr) return;
        example = req;
        state = what;
        used = r;
      };
      for (const auto& [req, r] : held_) {
        if (!r.overlaps(g)) continue;
        ++held;
        const bool retried = unreleased_.count(req) != 0, lost = unproven_.count(req) != 0;
        unreleased += retried;
        unproven += lost;
        first(req, lost ? "a transfer released without evidence that it stopped (its bytes may still land)"
                   : retried ? "a finished transfer whose release failed and awaits a retry"
                             : "a transfer request not released yet (in flight)",
              r);
      }
      for (const auto& [req, r] : preparing_) {  // being built: the request will name this registration
        if (!r.overlaps(g)) continue;
        ++held;
        first(req, "a transfer request being built", r);
      }
      for (const auto& [req, e] : entries_) {  // the peer holds (or is about to get) the descriptor of e.local
        if (e.side != Side::Passive || !e.local.overlaps(g)) continue;
        ++passive;
        first(req, "a passive session (the peer may write or read it)", e.local);
      }
      for (const auto& [tag, h] : held_offers_) {
        if (!h.local.overlaps(g)) continue;
        ++offers;
        first(h.req, "an offered range whose passive session ended without evidence (the peer may still write)",
              h.local);
      }
      if (state != nullptr) {
        char range[64];
        std::snprintf(range, sizeof range, "[%#" PRIxPTR ", +%zu)", used.addr, used.len);
        throw TransportError("deregister_region: region " + std::to_string(id) + " of transport " + name() +
                             " may still be touched by the backend (" + std::to_string(held) +
                             " transfer requests over it: " + std::to_string(unreleased) + " awaiting a retried "
                             "release, " + std::to_string(unproven) + " ended without evidence; " +
                             std::to_string(passive) + " passive sessions, " + std::to_string(offers) +
                             " offered ranges whose transfer ended without evidence; e.g. request " +
                             std::to_string(example) + ", " + state + ", over " + range +
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
namespace {
constexpr std::size_t kMagicLen = sizeof(Transport::kMetadataMagic) - 1;
constexpr std::size_t kEnvelopeLen = kMagicLen + 4;
// "kvlmd/": the magic without its version (a plain loop: string_view::find is no constant under UBSan)
constexpr std::size_t kPrefixLen = [] {
  std::size_t i = 0;
  while (Transport::kMetadataMagic[i] != '/') ++i;
  return i + 1;
}();
static_assert(kPrefixLen < kMagicLen, "the magic holds a version after its slash");

// CRC-32 as zlib computes it (reflected, polynomial 0xEDB88320): Python's zlib.crc32 checks it in the tests.
std::uint32_t crc32(const char* p, std::size_t n) noexcept {
  static constexpr auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1U) != 0 ? 0xEDB88320U ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t c = 0xFFFFFFFFU;
  for (std::size_t i = 0; i < n; ++i) c = table[(c ^ static_cast<unsigned char>(p[i])) & 0xFFU] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

std::string hex32(std::uint32_t v) {
  static const char* hex = "0123456789abcdef";
  std::string s(8, '0');
  for (int i = 7; i >= 0; --i, v >>= 4) s[static_cast<std::size_t>(i)] = hex[v & 15U];
  return s;
}

// The agent's metadata out of the envelope (checked), or `md` itself when it has none.
std::string unwrap_metadata(const std::string& md) {
  if (md.compare(0, kMagicLen, Transport::kMetadataMagic) != 0) {
    // A magic with a byte or two changed is a damaged envelope (its checksum cannot vouch for anything), and
    // another version of it is not ours to read; anything else is an outside agent's own metadata.
    std::size_t differ = 0;
    for (std::size_t i = 0; i < kMagicLen; ++i) differ += i >= md.size() || md[i] != Transport::kMetadataMagic[i];
    if (differ <= 2 || md.compare(0, kPrefixLen, Transport::kMetadataMagic, kPrefixLen) == 0) {
      throw InvalidArgumentError("metadata", "its envelope header is damaged or of another version (expected it to "
                                             "start with '" + std::string(Transport::kMetadataMagic) + "'); nothing loaded");
    }
    return md;
  }
  if (md.size() <= kEnvelopeLen) {
    throw InvalidArgumentError("metadata", "cut short: " + std::to_string(md.size()) + " bytes, no more than its " +
                                               std::to_string(kEnvelopeLen) + "-byte header");
  }
  std::uint32_t want = 0;
  for (int b = 3; b >= 0; --b) want = (want << 8) | static_cast<unsigned char>(md[kMagicLen + static_cast<std::size_t>(b)]);
  const std::uint32_t got = crc32(md.data() + kEnvelopeLen, md.size() - kEnvelopeLen);
  if (got != want) {
    throw InvalidArgumentError("metadata", "checksum mismatch: the bytes were changed or cut on the way (" +
                                               std::to_string(md.size() - kEnvelopeLen) + " bytes after the header, CRC-32 " +
                                               hex32(got) + ", the header says " + hex32(want) + "); nothing loaded");
  }
  return md.substr(kEnvelopeLen);
}
}  // namespace

std::string Transport::metadata() {
  const std::string md = agent_->local_metadata();
  if (md.empty()) throw TransportError("metadata: agent " + name() + " has none to ship");  // (add_peer refuses it)
  std::string out(kMetadataMagic, kMagicLen);
  const std::uint32_t c = crc32(md.data(), md.size());
  for (int b = 0; b < 4; ++b) out += static_cast<char>((c >> (8 * b)) & 0xFFU);
  out += md;
  return out;
}

namespace {
// Well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF) without NUL: what a peer's name
// must be to come back to Python as a str and go to the backend as a C string.
bool valid_name(const std::string& s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = p[i];
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c == 0) return false;
    if (c < 0x80) { ++i; continue; }
    if (c >= 0xC2 && c <= 0xDF) len = 1;
    else if (c >= 0xE0 && c <= 0xEF) { len = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return false;
    if (i + len >= n) return false;  // truncated sequence
    for (std::size_t k = 1; k <= len; ++k) {
      const unsigned b = p[i + k];
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += len + 1;
  }
  return !s.empty();
}
}  // namespace

std::string Transport::add_peer(const std::string& md) {
  std::lock_guard<std::mutex> one(resend_mu_);  // not while a stop is between its look and its send
  std::string peer;
  try {
    peer = agent_->load_remote_metadata(unwrap_metadata(md));
  } catch (const MetadataRefused& e) {
    throw InvalidArgumentError("metadata", e.what());
  }
  if (!valid_name(peer)) {
    // Loaded, but unusable: a name Python cannot decode (or one holding NUL) can never be named again.
    try {
      agent_->invalidate_remote(peer);
    } catch (const std::exception&) {
    }
    std::string shown;
    for (unsigned char ch : peer.substr(0, 64)) {
      static const char* hex = "0123456789abcdef";
      if (ch >= 0x20 && ch < 0x7F && ch != '\\') { shown += static_cast<char>(ch); continue; }
      shown += "\\x";
      shown += hex[ch >> 4];
      shown += hex[ch & 15];
    }
    throw InvalidArgumentError("metadata", "the peer's agent name '" + shown +
                                               "' is empty, not UTF-8, or holds a NUL byte: refused");
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (removed_peers_.erase(peer) != 0) removed_order_.erase(std::find(removed_order_.begin(), removed_order_.end(), peer));
  return peer;
}

ApplyResult Transport::apply(std::uint64_t req, Event ev, std::uint64_t serial) {
  return engine_ ? engine_->apply(req, ev, serial) : ApplyResult{};
}

void Transport::retire_passive(std::unordered_map<std::uint64_t, Entry>::iterator it,
                               const std::optional<SessionInfo>& info) {
  const bool same = info && info->serial == it->second.serial;
  // Ended without our note.  Without evidence from elsewhere either (or if its record is gone), the
  // peer may still write into the range.
  if (!same || (info->poisoned && !info->evidence)) hold_offer(it->first, it->second);
  ended_[it->first] = Ended{it->second.peer, it->second.tag, it->second.serial};
  entries_.erase(it);
  ctr_.passive_swept.fetch_add(1);
}

void Transport::send(const std::string& peer, const NotifMessage& m) {
  try {
    agent_->send_notification(peer, m);
    if (m.kind == NotifKind::Stop) ctr_.stops_sent.fetch_add(1);
    if (m.kind == NotifKind::Quiesced) ctr_.quiesced_sent.fetch_add(1);
  } catch (const std::exception&) {
    ctr_.send_errors.fetch_add(1);  // a dead peer: the engine's timers decide (grace -> Poisoned)
  }
}

// Every "quiesced" goes out here, except the test-only unsafe one: never while a transfer of ours for req
// ended without evidence (unproven_), nor while the engine's session for it was Poisoned without any
// (an earlier transport of this engine, whose bytes may still land; the engine remembers while the
// tombstone lives).  Our own Done, applied before this is called, is such evidence.
void Transport::send_acks(const std::string& peer, std::uint64_t req, const std::vector<std::uint64_t>& tags) {
  if (tags.empty()) return;
  bool refuse = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    refuse = unproven_.count(req) != 0;
  }
  if (!refuse && engine_) {
    const auto info = engine_->info(req);
    refuse = info && info->poisoned && !info->evidence;
  }
  if (refuse) {
    ctr_.stops_unanswered.fetch_add(tags.size());
    return;
  }
  for (std::uint64_t t : tags) send(peer, {req, NotifKind::Quiesced, t});
}

// Stop memory.  A pair is answered on the strength of being remembered, so it is never evicted (a
// forgotten pair would let its post go out into a range the peer reused).  It goes when it can no longer
// be posted: a transfer() for it consumes it (that entry skips its post), or the one session of ours
// that could post it has ended.  A session posts one offer, the one it holds when it posts: a stop that
// finds our session live and not posting binds to it; one that finds none, an ended one, or one already
// posting another offer can only be posted by a later session of the id (serials grow per id), and
// binds to the first that the sweep sees.  (An executor that hands an offer to a later session than the
// one it got it for is outside this; a pair whose session never comes stays, counted.)
bool Transport::remember_stopped(std::uint64_t req, std::uint64_t tag, StopMemo memo) {
  auto it = stopped_reqs_.find({req, tag});
  if (it != stopped_reqs_.end()) {
    if (it->second.session == 0 && memo.session == 0) it->second.after = std::max(it->second.after, memo.after);
    return true;
  }
  if (stopped_reqs_.size() >= opts_.remember_stopped) return false;
  stopped_reqs_.emplace(ReqTag{req, tag}, memo);
  return true;
}

bool Transport::share_stop(std::uint64_t req, std::uint64_t tag, StopMemo memo) {
  if (!engine_) return true;
  EngineTransports* reg = g_engine_transports;
  if (reg == nullptr) return false;  // (see EngineTransports)
  std::lock_guard<std::mutex> g(reg->mu);
  auto all = reg->of.find(engine_.get());
  if (all == reg->of.end()) return true;  // (none: this one is being destroyed)
  for (Transport* t : all->second) {
    if (t == this) continue;
    std::lock_guard<std::mutex> lk(t->mu_);
    // (a transfer of req it builds or holds may be this very offer's: past its look at the stop memory; one
    // of req that ended without evidence may still move bytes, though the engine may have forgotten it)
    if (t->entries_.count(req) != 0 || t->preparing(req) || t->unproven_.count(req) != 0 ||
        !t->remember_stopped(req, tag, memo)) {
      return false;
    }
  }
  return true;
}

void Transport::sweep_stopped() {
  std::vector<std::pair<ReqTag, StopMemo>> batch;
  {
    std::lock_guard<std::mutex> lk(mu_);
    batch = next_batch(stopped_reqs_, stopped_cursor_);
  }
  constexpr std::uint64_t kGone = ~0ULL;
  std::vector<std::tuple<ReqTag, StopMemo, StopMemo>> change;  // (pair, seen, new); new.session kGone: erase
  for (const auto& [key, memo] : batch) {
    const auto info = engine_->info(key.first);
    const bool live = info && !terminal_or_final(info->state);
    if (memo.session != 0) {
      if (!live || info->serial != memo.session) change.emplace_back(key, memo, StopMemo{kGone, 0});  // it ended
    } else if (info && info->serial >= memo.after) {
      // the first later session: it may post the pair while it lives; if it already ended, it did not
      change.emplace_back(key, memo, live ? StopMemo{info->serial, 0} : StopMemo{kGone, 0});
    }
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (!change.empty()) flush_posted();
  for (const auto& [key, seen, next] : change) {
    auto it = stopped_reqs_.find(key);
    if (it == stopped_reqs_.end() || it->second.session != seen.session || it->second.after != seen.after) {
      continue;  // consumed or changed meanwhile
    }
    if (next.session == kGone) {
      stopped_reqs_.erase(it);
    } else if (auto p = posted_.find(key.first); p != posted_.end() && p->second.serial == next.session) {
      it->second = StopMemo{0, next.session + 1};  // that session took another offer: a later one's
    } else {
      it->second = next;
    }
  }
}


std::vector<std::uint64_t> Transport::owed_acks(const Entry& e) {
  std::vector<std::uint64_t> tags = e.other_stops;
  if (e.peer_stop) tags.push_back(e.tag);
  return tags;
}

void Transport::hold_offer(std::uint64_t req, const Entry& e) { held_offers_[e.tag] = {req, e.peer, e.local}; }

void Transport::forget_held(std::uint64_t req, bool proven) {
  if (proven) {
    // Every caller ended its entry before releasing: an active entry here is a newer transfer of the id
    // (built once the agent forgot the old request), and the hold is now that one's.
    auto e = entries_.find(req);
    if (e == entries_.end() || e->second.side != Side::Active) held_.erase(req);
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

bool Transport::preparing(std::uint64_t req) const {
  for (const auto& [r, range] : preparing_) {
    if (r == req) return true;
  }
  return false;
}

void Transport::unprepare(std::uint64_t req) {
  for (auto& p : preparing_) {
    if (p.first == req) {
      p = preparing_.back();
      preparing_.pop_back();
      return;
    }
  }
}

std::uint64_t Transport::session_for(const char* call, std::uint64_t req, const Region& local,
                                     std::optional<Role>* role) const {
  if (!engine_) return 0;
  // One lookup for both checks: a session advertised between two would pass the slot check unseen.
  const std::optional<SessionInfo> info = engine_->info(req);
  const std::uint64_t serial = session_check(call, req, local, info);
  if (role != nullptr) *role = info->role;  // (session_check threw without one)
  return serial;
}

std::uint64_t Transport::session_check(const char* call, std::uint64_t req, const Region& local,
                                       const std::optional<SessionInfo>& info, const XferOp* op) const {
  // No session (yet): refused before anything is built.  Going on with "none" would let the expose move
  // a session advertised meanwhile under an entry that names none, so its aborts would pass it by.
  if (!info) throw UnknownRequestError(req, Event::expose);
  // The active side's op follows its role (DESIGN §9): a receiver READs into its blocks, a sender WRITEs
  // from them.  A sender's READ would overwrite the KV blocks it is there to send.
  if (op != nullptr && info->role != active_role(*op)) {
    const bool read = *op == XferOp::Read;
    throw RoleRefused(std::string(call) + ": request " + std::to_string(req) + " is a " +
                          kRoleNames[static_cast<int>(info->role)] + " session: a " + (read ? "READ" : "WRITE") +
                          (read ? " writes into its local range (its blocks are the source); a sender WRITEs"
                                : " reads its local range out to the peer; a receiver READs"),
                      req, read, kRoleNames[static_cast<int>(info->role)], "session");
  }
  const BufferPool* pool = engine_->pool();
  if (pool == nullptr || pool->bytes() == 0 || local.kind != MemKind::Dram) return info->serial;
  const Region whole{reinterpret_cast<std::uintptr_t>(pool->base()), pool->bytes(), 0, MemKind::Dram};
  if (!whole.spans_overlap(local)) return info->serial;
  const bool leased = info->slot != kNoSlot;
  const Region slot{whole.addr + (leased ? info->slot : 0) * pool->slot_size(), pool->slot_size(), 0, MemKind::Dram};
  if (!leased || !slot.contains(local)) {
    throw TransportError(std::string(call) + ": request " + std::to_string(req) + ": local range [" +
                         std::to_string(local.addr - whole.addr) + ", +" + std::to_string(local.len) +
                         ") of the engine's pool is not inside " +
                         (leased ? "slot " + std::to_string(info->slot) + ", the one leased to it"
                                 : std::string("a slot leased to it (it holds none)")));
  }
  return info->serial;
}

PostResult Transport::transfer(std::uint64_t req, XferOp op, const Region& local,
                               const Region& remote, const std::string& peer, std::uint64_t tag,
                               std::optional<Role> remote_role) {
  const TransferItem item{req, op, local, remote, &peer, tag, remote_role};
  TransferOutcome out;
  transfer_batch(&item, 1, &out);
  if (out.error) std::rethrow_exception(out.error);
  return out.result;
}

namespace {
// Room for `extra` more elements, grown geometrically as an insertion would (so that a call making room
// for each transfer does not reallocate or rehash on each): the growth that could fail comes here, before
// the caller changes anything.
template <class V>
void vector_room(V& v, std::size_t extra) {
  if (v.capacity() - v.size() < extra) v.reserve(std::max(v.size() + extra, 2 * v.capacity()));
}
template <class M>
void map_room(M& m, std::size_t extra) {
  if (static_cast<double>(m.size() + extra) > static_cast<double>(m.bucket_count()) * static_cast<double>(m.max_load_factor())) {
    m.reserve(std::max(m.size() + extra, 2 * m.size()));
  }
}

// A batch call's scratch array: one element on the stack (transfer(): no allocation on its path),
// else a vector.
template <class T>
struct Scratch {
  T one{};
  std::vector<T> many;
  T* get(std::size_t n) {
    if (n <= 1) return &one;
    many.resize(n);
    return many.data();
  }
};

}  // namespace

// What transfer_batch knows of one item between its phases.
struct Transport::Work {
  bool live = false;      // no outcome yet: goes on to the next phase
  bool reserved = false;  // in preparing_ (its range counts as held)
  bool built = false;     // prepared in the agent, and neither held_ nor an entry owns it yet
  bool entered = false;   // step 3 made its entry (undone should that step throw)
  std::optional<StopMemo> memo;  // its pair's stop memo: consumed once step 3 has made every entry (and
                                 // remembered again as it was, should the expose fail)
  std::uint64_t current = 0;  // the session it is for (session_for)
  bool stale = false;         // an offered passive entry of req was there: step 1 retires it if its session ended
  std::uint64_t serial = 0;   // the session expose moved
  const char* refuse = nullptr;  // why step 3 refused it (kPeerMarked: PeerDisconnected, else TransportError)
  bool skip = false, ack = false, gone = false, abandon = false;
  std::vector<std::uint64_t> acks;
};

void Transport::transfer_batch(const TransferItem* items, std::size_t n, TransferOutcome* out) {
  if (n == 0) return;
  // Every array the phases need, sized n, allocated here: an allocation failure after the entries exist
  // (step 3) would leave entries no one owns (their ids stay refused; a session exposed ends Poisoned by
  // the engine's timers, one still Advertised has no timer and is the executor's to cancel; a peer's stop
  // of it stays unanswered, which is safe).  What is left to fail after step 3 is a small allocation (a
  // message, a map node).
  Scratch<Work> wk;
  Work* w = wk.get(n);
  Scratch<std::uint64_t> id_s, serial_s, done_s;
  Scratch<std::uint8_t> event_s;
  Scratch<std::size_t> index_s;
  Scratch<ApplyResult> result_s, got_s;
  Scratch<std::optional<SessionInfo>> info_s;
  std::uint64_t* ids = id_s.get(n);        // step 1: every item's id; step 4: the live ones'
  std::uint64_t* serials = serial_s.get(n);
  std::uint64_t* done = done_s.get(n);     // step 7: the completed in post; step 8: the watched
  std::uint8_t* events = event_s.get(n);
  std::size_t* index = index_s.get(n);
  ApplyResult* r = result_s.get(n);
  ApplyResult* g = got_s.get(n);
  std::optional<SessionInfo>* info = info_s.get(n);
  auto fail = [&](std::size_t i, std::exception_ptr e) {
    out[i].error = std::move(e);
    w[i].live = false;
  };
  auto fail_with = [&](std::size_t i, const std::string& why) {
    fail(i, std::make_exception_ptr(TransportError("transfer: request " + std::to_string(items[i].req) + ": " + why)));
  };
  for (std::size_t i = 0; i < n; ++i) out[i] = TransferOutcome{};
  if (stopped_.load()) {
    for (std::size_t i = 0; i < n; ++i) fail(i, std::make_exception_ptr(TransportError("transfer: transport " + name() + " is stopped")));
    return;
  }
  struct Unprepare {  // every exit before the fourth phase (an exception in the first checks too) gives the reservations back
    Transport* t;
    const TransferItem* items;
    Work* w;
    std::size_t n;
    ~Unprepare() {
      bool any = false;  // (the usual case after phase 3: none, and no lock taken)
      for (std::size_t i = 0; i < n && !any; ++i) any = w[i].reserved;
      if (!any) return;
      std::lock_guard<std::mutex> lk(t->mu_);
      for (std::size_t i = 0; i < n; ++i) {
        if (w[i].reserved) t->unprepare(items[i].req);
      }
    }
  } reservation{this, items, w, n};
  struct Unbuild {  // every exit between the second phase and the third's hand-over releases what was built
    Transport* t;
    const TransferItem* items;
    Work* w;
    std::size_t n;
    ~Unbuild() {
      for (std::size_t i = 0; i < n; ++i) {
        if (!w[i].built) continue;
        // prepared, never posted: nothing moved, which is the evidence (a failed release is retried)
        try {
          t->release_xfer(items[i].req, true);
        } catch (...) {  // (an allocation for the retry: the request stays with the agent)
        }
      }
    }
  } built{this, items, w, n};
  {
    std::lock_guard<std::mutex> lk(mu_);  // (released before `reservation` runs: declared after it)
    vector_room(preparing_, n);  // the one growth of the loop below, before anything is reserved
    for (std::size_t i = 0; i < n; ++i) {
      const TransferItem& it = items[i];
      const std::uint64_t req = it.req;
      if (it.peer == nullptr) {
        fail_with(i, "no peer given");
        continue;
      }
      if (it.peer->find('\0') != std::string::npos) {  // (the agent would post to another peer than the entry's)
        fail(i, caught([&] { check_c_name(*it.peer, "peer", "transfer: request " + std::to_string(req)); }));
        continue;
      }
      // (a second item of req in this batch finds the first one's reservation)  An offered passive entry may
      // be an earlier session's, ended and not swept yet: step 1 tells, once it knows the id's session.
      const auto old = entries_.find(req);
      const bool passive = old != entries_.end() && engine_ && old->second.side == Side::Passive && old->second.offered;
      if ((old != entries_.end() && !passive) || preparing(req)) {
        fail(i, std::make_exception_ptr(TransportError("transfer: request " + std::to_string(req) + " already has a transfer")));
        continue;
      }
      w[i].stale = passive;
      if (unproven_.count(req) != 0) {  // its range and its id stay held: a reuse would free them
        fail(i, std::make_exception_ptr(TransportError("transfer: request " + std::to_string(req) +
                                                       " had a transfer that ended without evidence; give the new one another id")));
        continue;
      }
      if (forgone_of(req, it.tag, *it.peer)) {  // its stops are answered at once: a post would go out unseen
        fail_with(i, "its offer (tag " + std::to_string(it.tag) + ") from peer " + *it.peer +
                         " was forgone: forgo() promised it is never posted");
        continue;
      }
      if (unreleased_.count(req) != 0) {
        fail_with(i, "the release of its earlier transfer failed and is retried by the sweep; retry when "
                     "stats().unreleased is 0, or give the new one another id");
        continue;
      }
      bool retiring = false;
      for (Agent::RegionId id : retiring_) retiring = retiring || it.local.overlaps(regions_.at(id));
      if (retiring) {
        fail_with(i, "transport " + name() + " is deregistering its local range");
        continue;
      }
      // From here the range counts as held: the request built next names its registration, which must not
      // be deregistered before the entry (and held_) takes over, or the post would use a dead handle.
      preparing_.emplace_back(req, it.local);  // a vector: no allocation on the transfer path
      w[i].reserved = w[i].live = true;
    }
  }
  // 1. The session each transfer is for (the one expose will move): its entry names it from the start, so
  //    a late abort or note of an earlier session of the id never applies to this one.  A local range in
  //    the engine's pool must lie inside the slot leased to this very session: the evidence rule protects
  //    that slot, not a neighbour's.  One lookup per item, all in one engine call.
  if (engine_) {
    if (n == 1) {
      if (w[0].live) info[0] = engine_->info(items[0].req);
    } else {
      for (std::size_t i = 0; i < n; ++i) ids[i] = items[i].req;  // refused items: a harmless lookup
      engine_->info_batch(ids, n, info);
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (!w[i].live) continue;
      std::exception_ptr e = caught(
          [&] { w[i].current = session_check("transfer", items[i].req, items[i].local, info[i], &items[i].op); });
      if (e) fail(i, std::move(e));
    }
    // An offered passive entry of req whose session is not the id's session now (serials are unique: that
    // one ended and the engine forgot it) is retired here as the sweep would (its offer held, an Ended record
    // so that a late note reaches that session only), rather than refusing this transfer until the sweep
    // comes.  Nothing of ours moves for it: the peer posts, into the offered range, which stays held.  One of
    // this very session refuses as before.  (No entry of req can be made meanwhile: preparing_ holds the id.)
    bool stale = false;
    for (std::size_t i = 0; i < n; ++i) stale = stale || (w[i].live && w[i].stale);
    if (stale) {
      std::lock_guard<std::mutex> lk(mu_);
      for (std::size_t i = 0; i < n; ++i) {
        if (!w[i].live || !w[i].stale) continue;
        auto old = entries_.find(items[i].req);
        if (old == entries_.end()) continue;  // a note or the sweep took it meanwhile
        if (old->second.side == Side::Passive && old->second.offered && w[i].current != 0 &&
            old->second.serial != w[i].current) {
          retire_passive(old, info[i]);
        } else {
          fail(i, std::make_exception_ptr(TransportError("transfer: request " + std::to_string(items[i].req) +
                                                         " already has a transfer")));
        }
      }
    }
  }
  // 2. Build the requests: a bad peer or descriptor throws here, before anything is exposed.
  for (std::size_t i = 0; i < n; ++i) {
    if (!w[i].live) continue;
    const TransferItem& it = items[i];
    // The peer's side of DESIGN §9 (session_check did ours, whose refusal comes first): a WRITE into a sender's
    // offer would overwrite the blocks that side is there to send, a READ of a receiver's would take its empty
    // range.
    if (it.remote_role && *it.remote_role == active_role(it.op)) {
      const bool read = it.op == XferOp::Read;
      const char* role = kRoleNames[static_cast<int>(*it.remote_role)];
      const std::string why = read ? "a READ would take its empty range; a READ takes a sender's offer"
                                   : "a WRITE would overwrite the blocks it is there to send; a WRITE takes a "
                                     "receiver's offer";
      fail(i, std::make_exception_ptr(RoleRefused("transfer: request " + std::to_string(it.req) + ": the offer (tag " +
                                                      std::to_string(it.tag) + ") from peer " + *it.peer + " is a " +
                                                      role + " session's: " + why,
                                                  it.req, read, role, "offer")));
      continue;
    }
    std::exception_ptr e = caught([&] { agent_->prepare(it.req, it.op, it.local, it.remote, *it.peer, it.tag); });
    if (e) {
      fail(i, std::move(e));
    } else {
      w[i].built = true;
    }
  }
  // 3. The entries, and held_ takes over every reservation.
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Room for every insertion below, made before the first: a growth (a rehash) that fails throws here,
    // with nothing changed yet.  (What can still fail in the loop is a map node: a small allocation.)
    map_room(entries_, n);
    map_room(held_, n);
    if (engine_) vector_room(posted_pending_, n);
    // re-checked under mu_: stop() sets stopped_ before it collects the entries under mu_
    const bool stopped = stopped_.load();
    const std::size_t notes0 = posted_pending_.size();
    std::size_t i = 0;
    try {
    for (; i < n; ++i) {
      const TransferItem& it = items[i];
      if (w[i].live) {
        const std::uint64_t req = it.req;
        // (no deregistration can have started over `local` since the first checks: preparing_ blocks it)
        if (stopped) w[i].refuse = "is stopped";
        if (w[i].refuse == nullptr && removed_peers_.count(*it.peer) != 0) w[i].refuse = "removed its peer meanwhile";
        if (w[i].refuse == nullptr && !failed_post_peers_.empty() && failed_post_peers_.count(*it.peer) != 0) {
          w[i].refuse = kPeerMarked;
        }
        // (a forgo() since the first checks: its stop is answered at once from now on, so no post may follow)
        if (w[i].refuse == nullptr && forgone_of(req, it.tag, *it.peer)) w[i].refuse = "had its offer forgone meanwhile";
        // (An earlier request of the id whose retried release the sweep completes meanwhile is no matter:
        // its bookkeeping leaves the hold of an active entry alone, forget_held.)
        if (w[i].refuse == nullptr) {
          const std::uint64_t current = w[i].current;
          // (the memo is consumed below, once every entry is made: a throw here leaves it for a retry)
          const auto memo = stopped_reqs_.find({req, it.tag});
          const bool stopped_by_peer = memo != stopped_reqs_.end();  // this entry skips the post
          if (stopped_by_peer) w[i].memo = memo->second;
          entries_[req] = Entry{Side::Active, *it.peer, it.tag, current, {}, false, false, stopped_by_peer, false, {}};
          w[i].entered = true;
          if (engine_) {
            note_posted(req, *it.peer, it.tag, current);
            // this session takes this offer: stops for other offers of the id bound to it are a later one's
            for (auto s = stopped_reqs_.lower_bound({req, 0}); s != stopped_reqs_.end() && s->first.first == req; ++s) {
              if (s->second.session == current) s->second = StopMemo{0, current + 1};
            }
          }
        }
        held_[req] = it.local;  // refused too: the prepared request holds the range until it is released
        w[i].built = false;     // the entry (or, refused, the release below) has it now
      }
      if (w[i].reserved) {
        unprepare(it.req);  // held_ took over (or it was never prepared), in this same critical section
        w[i].reserved = false;
      }
    }
    } catch (...) {
      // A map node or a string could not be allocated: this step is undone for the items it reached, which
      // nothing has exposed or posted yet.  Their entries and records go, and their prepared requests go back
      // to `built`, whose release also ends the holds (Unbuild).  (Stops of other offers of an id, moved on
      // to a later session, stay there: remembered longer, which is safe.)
      for (std::size_t j = 0; j <= i && j < n; ++j) {
        if (!w[j].live) continue;
        if (w[j].entered) entries_.erase(items[j].req);
        w[j].entered = false;
        w[j].built = true;
      }
      const std::size_t added = posted_pending_.size() - notes0;
      posted_pending_.erase(posted_pending_.begin() + static_cast<std::ptrdiff_t>(notes0), posted_pending_.end());
      posted_added_ -= std::min(posted_added_, added);
      throw;
    }
    for (std::size_t k = 0; k < n; ++k) {
      if (w[k].memo) stopped_reqs_.erase({items[k].req, items[k].tag});  // consumed: this entry skips its post
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!w[i].live || w[i].refuse == nullptr) continue;
    release_xfer(items[i].req, true);  // prepared, never posted: nothing moved (a failed release is retried)
    const std::string what = "transfer: request " + std::to_string(items[i].req) + ": transport " + name() + " " +
                             w[i].refuse;
    fail(i, w[i].refuse == kPeerMarked
                ? std::make_exception_ptr(PeerDisconnected(what + " '" + *items[i].peer + "' (NIXL 1.5.1 then takes "
                                                           "it for disconnected: every later post to it fails): "
                                                           "refused before the expose; remove_peer() and add_peer() "
                                                           "its metadata first", *items[i].peer))
                : std::make_exception_ptr(TransportError(what)));
  }
  // (the session `serial` of req ended Quiesced(cancelled): false when unknown, or should the lookup throw)
  auto cancelled_now = [&](std::uint64_t req, std::uint64_t serial) {
    try {
      const std::optional<SessionInfo> now = engine_->info(req);
      return now && now->serial == serial && now->state == State::Quiesced && now->outcome == Outcome::cancelled;
    } catch (...) {
      return false;
    }
  };
  // 4. Expose (Advertised -> InFlight), in one engine call. A refused expose (cancelled, unknown) posts nothing.
  for (std::size_t i = 0; i < n; ++i) w[i].serial = w[i].current;
  if (engine_) {
    std::exception_ptr expose_error;  // the engine call itself threw (an allocation): which exposes it made is unknown
    try {
    if (n == 1) {
      if (w[0].live) r[0] = engine_->apply(items[0].req, Event::expose, w[0].serial);
    } else {
      std::size_t m = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (!w[i].live) continue;
        ids[m] = items[i].req;
        serials[m] = w[i].serial;
        events[m] = static_cast<std::uint8_t>(Event::expose);
        index[m++] = i;
      }
      if (m != 0) engine_->apply_batch(ids, events, serials, m, g);
      for (std::size_t k = 0; k < m; ++k) r[index[k]] = g[k];
    }
    } catch (...) {
      expose_error = std::current_exception();
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (!w[i].live) continue;
      const std::uint64_t req = items[i].req;
      if (!expose_error) {
        w[i].serial = r[i].serial;
        if (r[i].status == Status::Moved) continue;
      }
      std::vector<std::uint64_t> acks;
      {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = entries_.find(req);
        if (it != entries_.end()) {
          acks = owed_acks(it->second);
          // This offer's stop (the memo the entry consumed, or one it got since) is answered below, and a
          // session left Advertised may retry the offer: that retry must skip its post, so the pair is
          // remembered again: the consumed memo as it was (it may be a later session's), a stop the entry
          // got bound to this session (its offer).  No room: unanswered.
          const StopMemo again = w[i].memo.value_or(StopMemo{w[i].current, 0});
          if (it->second.peer_stop && !remember_stopped(req, it->second.tag, again)) {
            acks.pop_back();  // (owed_acks puts the entry's own tag last)
            ctr_.stops_unanswered.fetch_add(1);
          }
          entries_.erase(it);
        }
        // Its record took no offer either: with the session exposed by someone else (a refused expose: another
        // transport's transfer, the executor's own data path), a stop here must stay unanswered, as with no
        // record; a late stop naming this very tag is still answered (never posted).
        // (Not after a failed engine call: the session it may have moved is this call's, ended just below.)
        flush_posted();
        if (auto p = posted_.find(req); !expose_error && p != posted_.end() && p->second.serial == w[i].current &&
                                        p->second.tag == items[i].tag) {
          p->second.forgone = true;
        }
      }
      release_xfer(req, true);  // prepared, never posted: nothing moved
      send_acks(*items[i].peer, req, acks);
      if (expose_error) {
        // a session the call did move is ended as never posted (the evidence): Quiesced(cancelled); one it
        // did not stays as it was, the caller's to retry or cancel
        (void)caught([&] {
          const std::optional<SessionInfo> info_now = engine_->info(req);
          if (info_now && info_now->serial == w[i].current && info_now->state == State::InFlight) {
            (void)apply(req, Event::cancel, w[i].current);
            (void)apply(req, Event::complete, w[i].current);
          }
        });
        fail(i, expose_error);
      } else if (r[i].status == Status::Illegal && r[i].from == State::Quiesced && r[i].serial == w[i].current &&
                 info[i] && info[i]->state == State::Advertised && cancelled_now(req, w[i].current)) {
        // Advertised when this call began, Quiesced(cancelled) now: cancelled during the call, before its
        // expose (the executor's cancel; the test-only at-once answer to a peer's stop).  Never posted, as
        // when the cancel comes after the expose (step 5): the same answer, not an IllegalTransition that
        // only says which side of the expose the race fell.  (Quiesced(completed) here would be another
        // actor's expose and transfer on the same session, a misuse: that stays IllegalTransition.)
        ctr_.cancelled_before_post.fetch_add(1);
        out[i].result = PostResult::CancelledBeforePost;
        w[i].live = false;
      } else {
        fail(i, caught([&] { throw_refused(r[i], req, Event::expose); }));
      }
    }
  }
  // 5. A cancel between expose and here (or the peer's stop) wins: never posted is evidence.  The same look
  //    again before each post in step 6 when an in-post entry was marked meanwhile.  Caller holds mu_.
  auto look = [&](std::size_t i, bool posting) {
    auto it = entries_.find(items[i].req);
    if (it == entries_.end()) {
      // stop() or remove_peer() took the entry (and failed the session) meanwhile; (in step 6 only the
      // test-only unsafe_release_on_cancel takes an in-post entry: its post goes on, as before)
      w[i].gone = !posting;
    } else if (it->second.abandon || removed_peers_.count(it->second.peer) != 0) {
      // remove_peer()/stop() marked it in its post (abandon), or removed its peer after the entry was made
      // (its scan skips unposted ones): never posted, which is the evidence
      entries_.erase(it);
      w[i].gone = true;
    } else if (it->second.cancel_requested || it->second.peer_stop) {
      w[i].skip = true;
      w[i].ack = it->second.peer_stop;
      w[i].acks = owed_acks(it->second);
      entries_.erase(it);
    } else if (!posting) {
      it->second.serial = w[i].serial;
      it->second.posting = true;
      it->second.in_post = true;  // until its post() returned, this call owns the release (see below)
    }
  };
  // ... and what the look found, without mu_: the item ends unposted, Quiesced(cancelled).
  auto settle = [&](std::size_t i) {
    const std::uint64_t req = items[i].req, serial = w[i].serial;
    if (w[i].gone) {
      release_xfer(req, true);  // never posted: nothing moved, which is the evidence
      (void)apply(req, Event::cancel, serial);    // InFlight -> CancelRequested (if still there)
      (void)apply(req, Event::complete, serial);  // -> Quiesced(cancelled); late if stop() failed it
      fail_with(i, "transport " + name() + " stopped or its peer was removed before the post");
    } else {
      release_xfer(req, true);
      if (w[i].ack) (void)apply(req, Event::cancel, serial);  // InFlight -> CancelRequested (idempotent)
      (void)apply(req, Event::complete, serial);                // -> Quiesced(cancelled)
      send_acks(*items[i].peer, req, w[i].acks);
      ctr_.cancelled_before_post.fetch_add(1);
      out[i].result = PostResult::CancelledBeforePost;
      w[i].live = false;
    }
  };
  std::uint64_t marks = 0;  // in_post_marks_ as of this look (step 6 compares before each post)
  {
    std::lock_guard<std::mutex> lk(mu_);
    marks = in_post_marks_.load();
    for (std::size_t i = 0; i < n; ++i) {
      if (w[i].live) look(i, false);
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (w[i].live && (w[i].gone || w[i].skip)) settle(i);
  }
  // 6. Post, back to back. From here on the backend may touch the buffers until Done.  While an entry is
  //    in_post, remove_peer() or stop() may take it (marking the request unproven and failing the session)
  //    but leave its release to this call, which learns the outcome: one owner for the release.
  std::size_t ndone = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!w[i].live) continue;
    const std::uint64_t req = items[i].req;
    // remove_peer(), stop(), a cancel or the peer's stop marked an in-post entry since step 5 (rare): is
    // this one still to go?  (Once moved, every later item is looked at: one removal marks all of its
    // peer's.)
    if (in_post_marks_.load() != marks) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        look(i, true);
      }
      if (w[i].gone || w[i].skip) {
        settle(i);
        continue;
      }
    }
    XferState st = XferState::Failed;
    std::exception_ptr error = caught([&] { st = agent_->post(req); });
    if (error) {
      ctr_.post_errors.fetch_add(1);
      // The backend failed this transfer as surely as a status error does: its reason is kept the same way (it
      // was only in the caller's exception, and recent_failures() had nothing for the Poisoned session).
      try {
        std::rethrow_exception(error);
      } catch (const NixlCallError& x) {
        // A NIXL post that failed names the peer and the way back: NIXL 1.5.1 then takes the peer for
        // disconnected, and every later post to it fails too (measured, nixl-notes.md); add_peer() alone does
        // not reconnect it.  Later transfers to it are refused before their expose (each would fail after it:
        // Poisoned).  (The error path only: nothing of this runs for a post that goes out.)  Not where a
        // remove_peer() (or stop()) took the entry during the post: the remedy came already, and a mark set now
        // would refuse the peer that add_peer() loads fresh.
        {
          std::lock_guard<std::mutex> lk(mu_);
          const auto e = entries_.find(req);
          const bool abandoned = e != entries_.end() && e->second.abandon;
          if (!abandoned && failed_post_peers_.insert(*items[i].peer).second) file_peer_reasons();
        }
        NixlCallError named(x, " to peer '" + *items[i].peer + "'; with NIXL 1.5.1 a failed post leaves the peer " +
                                   "marked disconnected: every later transfer to it fails until remove_peer() and " +
                                   "add_peer() of its metadata");
        note_failure(req, w[i].serial, named.what());
        error = std::make_exception_ptr(std::move(named));
      } catch (const std::exception& x) {
        note_failure(req, w[i].serial, x.what());
      } catch (...) {
        note_failure(req, w[i].serial, "post failed (not a std::exception)");
      }
      finish_active(req, false);  // an error is not evidence: Poisoned
      fail(i, std::move(error));
      continue;
    }
    ctr_.posted.fetch_add(1);
    if (st == XferState::Done) {
      ctr_.completed_in_post.fetch_add(1);
      out[i].result = PostResult::CompletedInPost;
      w[i].live = false;
      done[ndone++] = req;  // its entry stays ours (in_post) until finished below
    }
  }
  // 7. Done inside the post: evidence, whoever asked (one `complete` call for them all; should that call's
  //    arrays fail to allocate, one call each, which needs none).
  try {
    finish_actives(done, ndone, true);
  } catch (...) {
    for (std::size_t k = 0; k < ndone; ++k) (void)caught([&] { finish_active(done[k], true); });
  }
  // 8. The rest are in flight: from here remove_peer() and stop() take them themselves.
  std::size_t nwatch = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (std::size_t i = 0; i < n; ++i) {
      if (!w[i].live) continue;
      auto it = entries_.find(items[i].req);
      if (it != entries_.end()) {
        it->second.in_post = false;
        w[i].abandon = it->second.abandon;
      }
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!w[i].live) continue;
    out[i].result = PostResult::Posted;
    if (w[i].abandon) {
      // remove_peer() or stop() came while its post() ran: what they would have done, now (no evidence)
      ctr_.abandoned.fetch_add(1);
      finish_active(items[i].req, false);
    } else {
      done[nwatch++] = items[i].req;  // (the completed ones' room, reused)
    }
  }
  try {
    progress_->watch(done, nwatch);
  } catch (...) {
    // The watch list could not grow (an allocation): one at a time.  A posted request that cannot be watched
    // would never be polled, its entry and backend request held for good: it is ended now, as remove_peer()
    // would (released without evidence: Poisoned, its range held), not left in flight with no owner.
    for (std::size_t k = 0; k < nwatch; ++k) {
      if (caught([&] { progress_->watch(done[k]); })) {
        ctr_.abandoned.fetch_add(1);
        (void)caught([&] { finish_active(done[k], false); });
      }
    }
  }
}

void Transport::forgo(std::uint64_t req, const std::string& peer, std::uint64_t tag) {
  check_c_name(peer, "peer", "forgo: request " + std::to_string(req));
  std::uint64_t serial = 0;
  if (engine_) {
    if (const auto ours = engine_->info(req)) serial = ours->serial;
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (opts_.remember_forgone > 0) {
    auto [f, fresh] = forgone_.try_emplace(ReqTag{req, tag}, Forgone{peer, false});
    if (!fresh) {
      if (f->second.peer != peer) f->second = Forgone{peer, false};  // (tags are unique per peer, not across peers)
    } else {
      try {
        forgone_order_.push_back(f->first);
      } catch (...) {
        forgone_.erase(f);
        throw;
      }
      if (forgone_order_.size() > opts_.remember_forgone) {
        const ReqTag old = forgone_order_.front();
        if (auto o = forgone_.find(old); o != forgone_.end()) {
          // An answered one must stay unpostable: remembered as an early stop of a later session (its memory
          // full: it goes, and only the executor's promise keeps its offer unposted).
          if (o->second.answered) (void)remember_stopped(old.first, old.second, StopMemo{0, 0});
          forgone_.erase(o);
        }
        forgone_order_.pop_front();
      }
    }
  }
  stopped_reqs_.erase({req, tag});
  // as if our transfer had taken it (a late stop for it is answered at once), unless a transfer of this
  // very session did take an offer: that record stays (its late stops need it more)
  flush_posted();
  auto p = posted_.find(req);
  if (engine_ && (p == posted_.end() || serial == 0 || p->second.serial != serial)) {
    note_posted(req, peer, tag, serial, true);
  }
}

Transport::Forgone* Transport::forgone_of(std::uint64_t req, std::uint64_t tag, const std::string& peer) {
  if (forgone_.empty()) return nullptr;
  const auto f = forgone_.find(ReqTag{req, tag});
  return f != forgone_.end() && f->second.peer == peer ? &f->second : nullptr;
}

void Transport::note_posted(std::uint64_t req, const std::string& peer, std::uint64_t tag, std::uint64_t serial,
                            bool forgone) {
  PostedNote& n = posted_pending_.emplace_back();
  n.forgone = forgone;
  n.req = req;
  n.tag = tag;
  n.serial = serial;
  n.peer.assign(peer);
  ++posted_added_;
}

void Transport::flush_posted(std::size_t max) {
  for (; max > 0 && posted_head_ < posted_pending_.size(); --max, ++posted_head_) {
    PostedNote& n = posted_pending_[posted_head_];
    posted_[n.req] = Ended{std::move(n.peer), n.tag, n.serial, n.forgone};
    posted_order_.emplace_back(n.req, n.serial);
  }
  if (posted_head_ == posted_pending_.size()) {  // all moved: start the buffer over (its capacity stays)
    posted_pending_.clear();
    posted_head_ = 0;
  }
}

void Transport::forget_posted() {
  // From the front, a chunk at a time (the engine is asked without the lock); stop once a chunk ends with
  // kKnownRun in a row that the engine still knows (the rest are younger), or at the budget: twice what
  // was added since the last sweep (at least kSweepBudget), so the records never outgrow the engine's at
  // any transfer rate.  A known one goes to the back: a long-lived session does not hold up the rest.
  constexpr std::size_t kChunk = 64, kKnownRun = 16;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> chunk, gone, known;
  std::size_t run = 0, budget = kSweepBudget;
  for (bool more = true; more;) {  // the transfers' records first, a chunk per lock hold
    std::lock_guard<std::mutex> lk(mu_);
    flush_posted(kChunk);
    more = posted_head_ < posted_pending_.size();
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    budget = std::max(budget, 2 * posted_added_);
    posted_added_ = 0;
  }
  for (std::size_t seen = 0; seen < budget && run < kKnownRun;) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      const std::size_t n = std::min(kChunk, posted_order_.size());
      if (n == 0) break;
      chunk.assign(posted_order_.begin(), posted_order_.begin() + static_cast<std::ptrdiff_t>(n));
      posted_order_.erase(posted_order_.begin(), posted_order_.begin() + static_cast<std::ptrdiff_t>(n));
    }
    seen += chunk.size();
    for (const auto& rec : chunk) {
      const auto info = engine_->info(rec.first);
      if (info && info->serial == rec.second) {
        known.push_back(rec);
        ++run;
      } else {
        gone.push_back(rec);
        run = 0;
      }
    }
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& [req, serial] : gone) {
    auto it = posted_.find(req);
    if (it != posted_.end() && it->second.serial == serial) posted_.erase(it);
  }
  for (const auto& rec : known) {
    auto it = posted_.find(rec.first);
    if (it != posted_.end() && it->second.serial == rec.second) posted_order_.push_back(rec);  // else replaced
  }
}

std::uint64_t Transport::expect(std::uint64_t req, const std::string& peer, const Region& local,
                                std::optional<Role>* role) {
  if (stopped_.load()) throw TransportError("expect: transport " + name() + " is stopped");
  check_c_name(peer, "peer", "expect: request " + std::to_string(req));
  if (!local.valid()) {
    throw TransportError("expect: request " + std::to_string(req) + ": the range is " + Region::kRefused);
  }
  std::uint64_t tag = 0;
  std::uint64_t removals = 0;  // remove_peer() calls when the entry was made
  // the session this offer is for: an entry left by an earlier session of the id (ended, not swept yet)
  // is retired here rather than refusing the new one
  std::optional<Role> offered;  // the session's role, from the same lookup: the peer checks its op against it
  const std::uint64_t current = session_for("expect", req, local, &offered);
  // a passive session needs its peer: to ask it to stop, and to know its notes
  if (!agent_->knows_peer(peer)) {
    throw TransportError("expect: request " + std::to_string(req) + ": unknown peer '" + peer +
                         "' (add_peer its metadata first)");
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (auto old = entries_.find(req); old != entries_.end() && old->second.side == Side::Passive &&
                                       current != 0 && old->second.offered && old->second.serial != current) {
      retire_passive(old, std::nullopt);  // its session is gone: what became of it is unknown here
    }
    if (entries_.count(req) != 0 || preparing(req)) {
      throw TransportError("expect: request " + std::to_string(req) + " already has a transfer");
    }
    if (stopped_.load()) throw TransportError("expect: transport " + name() + " is stopped");
    if (removed_peers_.count(peer) != 0) {
      throw TransportError("expect: request " + std::to_string(req) + ": peer '" + peer +
                           "' was removed (add_peer its metadata again first)");
    }
    // the peer may touch the range it gets the descriptor of: no region under it may retire meanwhile (one
    // elsewhere may: an executor frees a finished request's buffer while it offers another's)
    bool retiring = false;
    for (Agent::RegionId id : retiring_) retiring = retiring || local.overlaps(regions_.at(id));
    if (retiring) {
      throw TransportError("expect: request " + std::to_string(req) + ": transport " + name() +
                           " is deregistering a region its range overlaps; retry when it is done");
    }
    bool covered = false;
    for (const auto& [id, r] : regions_) covered = covered || r.contains(local);
    if (!covered) {
      throw TransportError("expect: request " + std::to_string(req) + ": local range not registered with transport " +
                           name() + " (register it before shipping its descriptor)");
    }
    do {
      tag = mix64(tag_salt_ + ++tag_count_);
    } while (tag == 0);
    entries_[req] = Entry{Side::Passive, peer, tag, current, local, false, false, false, false, {}};
    removals = removals_;
  }
  if (engine_) {
    const ApplyResult r = engine_->apply(req, Event::expose, current);
    bool taken = false, by_note = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = entries_.find(req);
      const bool mine = it != entries_.end() && it->second.tag == tag;
      // not stop() nor remove_peer(): the peer's answer to our stop took it (cancelled meanwhile).  Any
      // removal since the entry was made counts, not only a mark still set: remove_peer() then add_peer()
      // inside this window cleared it, and the session, failed while Advertised (refused) and then exposed,
      // was left InFlight with nobody to drive it.  (A removal of another peer meanwhile fails this session
      // too: safe, and rare.)
      by_note = !stopped_.load() && removals_ == removals;
      if (r.status != Status::Moved) {
        if (mine) entries_.erase(it);
      } else if (mine) {
        it->second.serial = r.serial;
        it->second.offered = true;
        // a new session of the id exposed: an earlier session's record can prove nothing any more (kept
        // when the expose is refused: that session may still be the id's, awaiting its late note)
        if (auto e = ended_.find(req); e != ended_.end() && e->second.serial != r.serial) ended_.erase(e);
      } else {
        taken = true;  // stop(), remove_peer() or the peer's answer took the entry while expose was applied
      }
    }
    if (r.status != Status::Moved) throw_refused(r, req, Event::expose);
    if (taken) {
      // Cancelled meanwhile, and the peer answered our stop (nothing of it names this tag): the entry
      // went with that evidence, and the session is (or is about to be: the note's thread applies it)
      // Quiesced(cancelled).  Told as a refused expose, the same as a cancel that came first.
      if (by_note) {
        const auto info = engine_->info(req);
        throw IllegalTransitionError(req, info ? info->state : State::CancelRequested, Event::expose);
      }
      // Else nobody would drive the session; the offer never left, yet whoever took the entry held its
      // range for good and failed the session by id, maybe before this expose: fail this very session too.
      (void)apply(req, Event::fail, r.serial);
      throw TransportError("expect: request " + std::to_string(req) + ": transport " + name() +
                           " stopped or its peer was removed meanwhile");
    }
  }
  if (!engine_) {  // a bare transport: nothing to expose, the offer leaves now
    std::lock_guard<std::mutex> lk(mu_);
    auto it = entries_.find(req);
    if (it == entries_.end() || it->second.tag != tag) {
      throw TransportError("expect: request " + std::to_string(req) + ": transport " + name() +
                           " stopped or its peer was removed meanwhile");
    }
    it->second.offered = true;
  }
  // No note can name this tag before the caller ships it, after this returns: nothing to catch up on.
  if (role != nullptr) *role = offered;
  return tag;
}

void Transport::finish_active(std::uint64_t req, bool done) { finish_actives(&req, 1, done); }

void Transport::finish_actives(const std::uint64_t* reqs, std::size_t n, bool done) {
  if (n == 0) return;
  struct Fin {
    bool found = false;
    std::vector<std::uint64_t> acks;
    std::string peer;
    std::uint64_t serial = 0;
  };
  // Every array sized n allocated before the entries are taken (n == 1: none): an allocation failure
  // after the erase below would leave requests that no one releases and sessions no one ends.
  Scratch<Fin> fs;
  Fin* f = fs.get(n);
  Scratch<std::uint64_t> id_s, serial_s;
  Scratch<std::uint8_t> event_s;
  Scratch<ApplyResult> result_s;
  std::uint64_t* ids = id_s.get(n);
  std::uint64_t* serials = serial_s.get(n);
  std::uint8_t* events = event_s.get(n);
  ApplyResult* r = result_s.get(n);
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Two passes: what can allocate first (the acks, the peer, unproven_'s node), for every request, then
    // the erases, which cannot throw.  A throw in the first pass leaves every entry in place, for a retry
    // (the progress thread's one by one) to find; erasing as it went lost the ones before the throw.
    for (std::size_t i = 0; i < n; ++i) {
      auto it = entries_.find(reqs[i]);
      if (it == entries_.end() || it->second.side != Side::Active) continue;
      f[i].acks = owed_acks(it->second);
      if (!f[i].acks.empty()) f[i].peer = it->second.peer;
      f[i].serial = it->second.serial;
      if (!done) unproven_.insert(reqs[i]);  // with the erase: a stop arriving now is never answered
      f[i].found = true;
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (f[i].found) entries_.erase(reqs[i]);
    }
  }
  // Release first (after Done it is safe; after an error it changes nothing about the verdict), so
  // that once the engine reports the session terminal the transport holds nothing for it.
  std::size_t found = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!f[i].found) continue;
    release_xfer(reqs[i], done);  // Done is evidence; an error is not
    (done ? ctr_.completed : ctr_.failed).fetch_add(1);
    ++found;
  }
  if (found == 0) return;
  const Event ev = done ? Event::complete : Event::fail;
  if (engine_) {
    if (n == 1) {
      r[0] = apply(reqs[0], ev, f[0].serial);
      if (done && r[0].status == Status::Late) ctr_.late_evidence.fetch_add(1);
    } else {
      std::size_t m = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (!f[i].found) continue;
        ids[m] = reqs[i];
        serials[m] = f[i].serial;
        events[m++] = static_cast<std::uint8_t>(ev);
      }
      try {
        engine_->apply_batch(ids, events, serials, m, r);
        for (std::size_t k = 0; k < m; ++k) {
          if (done && r[k].status == Status::Late) ctr_.late_evidence.fetch_add(1);
        }
      } catch (...) {
        // the engine's call failed (an allocation): one call each (one it applied answers Stay), so that
        // no session whose request is released already waits for its timers
        for (std::size_t k = 0; k < m; ++k) (void)caught([&] { (void)apply(ids[k], ev, serials[k]); });
      }
    }
  } else if (done) {
    // As Engine::notify_pushed: the lock and the wake-up only for a waiter asleep (the count and the
    // waiter's registration are both seq_cst: one of the two sees the other, no lost wake-up).
    bare_done_.fetch_add(found);
    if (bare_waiters_.load() > 0) {
      std::lock_guard<std::mutex> lk(bare_mu_);
      bare_cv_.notify_all();
    }
  }
  // "quiesced" only after our own request reached Done: an error proves nothing.
  if (done) {
    for (std::size_t i = 0; i < n; ++i) {
      if (f[i].found) send_acks(f[i].peer, reqs[i], f[i].acks);
    }
  }
}

void Transport::on_abort(std::uint64_t req, std::uint64_t serial) {
  std::string peer;
  std::uint64_t tag = 0, removals = 0;
  bool passive = false, release_now = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    removals = removals_;
    auto it = entries_.find(req);
    if (it == entries_.end()) return;  // not ours, or already finished
    Entry& e = it->second;
    // the hook runs after the engine's lock is released: the cancelled session may have ended and the id
    // been advertised again; this entry then belongs to the new session, which nobody cancelled
    if (e.serial != serial) return;
    switch (e.side) {
      case Side::Active:
        e.cancel_requested = true;
        if (e.in_post) in_post_marks_.fetch_add(1);  // its transfer_batch call looks again before the post
        if (e.posting && opts_.unsafe_release_on_cancel) {
          release_now = true;
          entries_.erase(it);
        }
        break;  // otherwise: keep polling until Done or an error
      case Side::Passive:
        passive = true;
        peer = e.peer;
        tag = e.tag;
        break;
    }
  }
  if (passive) {
    {
      std::lock_guard<std::mutex> lk(outbox_mu_);
      outbox_.push_back(Outgoing{std::move(peer), NotifMessage{req, NotifKind::Stop, tag}, removals});
    }
    progress_->wake();
    return;
  }
  if (release_now) {
    // TEST ONLY (negative control): release is NOT evidence; this is the bug the tests must catch.
    progress_->unwatch(req);
    release_xfer(req, true);  // the bug on purpose: release taken as evidence
    ctr_.unsafe_releases.fetch_add(1);
    (void)apply(req, Event::complete, serial);
  }
}

bool Transport::on_pass() {
  // The stops' looks and sends under resend_mu_, as the resends' (add_peer() waits); while an add_peer() holds
  // it, a later pass sends them: this thread never waits on a metadata load.  (Nothing queued, the common pass:
  // one lock, as before.)
  {
    std::lock_guard<std::mutex> lk(outbox_mu_);
    if (outbox_.empty()) return false;
  }
  std::unique_lock<std::mutex> one(resend_mu_, std::try_to_lock);
  if (!one.owns_lock()) return false;
  std::vector<Outgoing> out;
  {
    std::lock_guard<std::mutex> lk(outbox_mu_);
    if (outbox_.empty()) return false;
    out.swap(outbox_);
  }
  for (const Outgoing& o : out) {
    {
      // A remove_peer() since it was queued: unsent if that took its entry (the peer may be loaded again by
      // now, and a restarted one answers a stop it never saw, which the Ended record would take as evidence).
      std::lock_guard<std::mutex> lk(mu_);
      if (o.removals != removals_) {
        auto it = entries_.find(o.m.req);
        if (it == entries_.end() || it->second.side != Side::Passive || it->second.peer != o.peer ||
            it->second.tag != o.m.tag) {
          continue;
        }
      }
    }
    send(o.peer, o.m);
  }
  return true;
}

void Transport::on_complete(std::uint64_t req) { finish_active(req, true); }

void Transport::on_complete_batch(const std::uint64_t* reqs, std::size_t n) { finish_actives(reqs, n, true); }

void Transport::on_fail(std::uint64_t req, const char* why) {
  // The session the entry drives, for the note (an error's path only; 0 where the entry went meanwhile)
  std::uint64_t serial = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    const auto it = entries_.find(req);
    if (it != entries_.end() && it->second.side == Side::Active) serial = it->second.serial;
  }
  note_failure(req, serial, why);  // before the fail event: a poll that sees Poisoned finds the reason
  finish_active(req, false);
}

void Transport::note_failure(std::uint64_t req, std::uint64_t serial, const char* why) noexcept {
  try {
    std::string text(why != nullptr ? why : "");
    if (text.size() > 512) text.resize(512);
    std::lock_guard<std::mutex> lk(failures_mu_);
    if (failures_.size() == kFailureLog) failures_.pop_front();
    failures_.push_back(Failure{req, serial, std::move(text)});
  } catch (...) {  // the reason is lost, never the event
  }
}

std::vector<Transport::Failure> Transport::recent_failures() const {
  std::lock_guard<std::mutex> lk(failures_mu_);
  return {failures_.begin(), failures_.end()};
}

void Transport::on_notification(const std::string& peer, const NotifMessage& m) {
  const std::uint64_t req = m.req;
  switch (m.kind) {
    case NotifKind::Done:
    case NotifKind::Quiesced: {
      (m.kind == NotifKind::Done ? ctr_.done_received : ctr_.quiesced_received).fetch_add(1);
      bool mine = false;
      std::uint64_t serial = 0;
      {
        std::lock_guard<std::mutex> lk(mu_);
        // The peer's transfer over an offered range we hold is over (DONE, or its answer to our stop):
        // the range may be deregistered, whatever became of the session meanwhile.
        auto h = held_offers_.find(m.tag);
        if (h != held_offers_.end() && h->second.req == req && h->second.peer == peer) held_offers_.erase(h);
        auto it = entries_.find(req);
        auto ended = ended_.find(req);
        if (it != entries_.end() && it->second.side == Side::Passive && it->second.peer == peer &&
            it->second.tag == m.tag) {
          mine = true;
          serial = it->second.serial;
          entries_.erase(it);
        } else if (ended != ended_.end() && ended->second.peer == peer && ended->second.tag == m.tag) {
          mine = true;  // the sweep took the entry: evidence for that session, if it still exists
          serial = ended->second.serial;
          ended_.erase(ended);
        } else if (it != entries_.end() || ended != ended_.end()) {
          ctr_.stale_notifications.fetch_add(1);  // another transfer of the id (earlier, or a duplicate)
        } else {
          ctr_.orphan_notifications.fetch_add(1);
        }
      }
      if (mine && engine_) {
        // only to the session the tag was drawn for: if the id was advertised again meanwhile, the new
        // session answers Unknown here and stays untouched
        const ApplyResult r = apply(req, Event::complete, serial);
        if (r.status == Status::Late) ctr_.late_evidence.fetch_add(1);
        if (r.status == Status::Unknown) ctr_.stale_notifications.fetch_add(1);
      }
      return;
    }
    case NotifKind::Stop: {
      ctr_.peer_stops.fetch_add(1);
      bool active = false, reply_now = false, cancel_now = false;
      std::optional<StopMemo> share;  // the pair's memo when the reply promises "never posted" (share_stop)
      std::uint64_t serial = 0;
      // our session of the id now: a pair stopped with no entry here binds to it while it lives
      const std::optional<SessionInfo> ours = engine_ ? engine_->info(req) : std::nullopt;
      StopMemo no_entry{0, ours ? ours->serial + 1 : 0};
      if (ours && !terminal_or_final(ours->state)) no_entry = StopMemo{ours->serial, 0};
      const bool exposed = ours && (ours->state == State::InFlight || ours->state == State::CancelRequested);
      {
        std::lock_guard<std::mutex> lk(mu_);
        flush_posted();  // (read below)
        auto it = entries_.find(req);
        const bool live_active = it != entries_.end() && it->second.side == Side::Active;
        if (live_active && it->second.tag == m.tag && it->second.peer == peer) {
          active = true;
          serial = it->second.serial;
          // Not posting yet: the transfer() call that made the entry is between its entry and its look
          // before the post (step 5), which finds peer_stop and ends the session unposted, cancel and all,
          // and answers the stop.  Cancelled here it went Advertised -> Quiesced before the call's expose,
          // which the engine then refused (an illegal event, and IllegalTransition for the caller).
          cancel_now = it->second.posting;
          // TEST ONLY (negative control): ack now instead of after our Done; the bug the passive
          // side's late-write test must catch
          if (opts_.unsafe_ack_stop_at_once) {
            reply_now = cancel_now = true;
          } else {
            it->second.peer_stop = true;
            if (it->second.in_post) in_post_marks_.fetch_add(1);  // as a cancel's (on_abort)
          }
        } else if (unproven_.count(req) != 0) {
          ctr_.stops_unanswered.fetch_add(1);  // ended without evidence: no ack, ever
        } else if (live_active && it->second.peer != peer) {
          // From another peer than the live transfer's: nothing of ours moves into that peer for the id
          // (an earlier transfer there ended, with evidence, else the id would be refused).  Answered
          // now, to the peer that asked; queued with the live one, it would go to the wrong peer.
          ctr_.stale_notifications.fetch_add(1);
          if (remember_stopped(req, m.tag, StopMemo{0, it->second.serial + 1})) {  // a later session's, if any
            reply_now = true;
            share = StopMemo{0, it->second.serial + 1};
          } else {
            ctr_.stops_unanswered.fetch_add(1);
          }
        } else if (live_active) {
          // A stop naming another offer of the id while this transfer is live: an earlier offer (whose
          // transfer ended, with evidence, else the id would be refused), a later one not posted yet, or
          // even this very one, if the caller posted it under a wrong tag.  Remember it (its post will be
          // skipped) and answer once this request is Done: safe in all three cases.  This one goes on.
          ctr_.stale_notifications.fetch_add(1);
          auto& owed = it->second.other_stops;
          if (!remember_stopped(req, m.tag, StopMemo{0, it->second.serial + 1})) {  // this one posts another
            ctr_.stops_unanswered.fetch_add(1);  // full: unanswered (safe)
          } else if (std::find(owed.begin(), owed.end(), m.tag) != owed.end()) {
            // a repeated stop: answered once, with the first
          } else if (owed.size() < kMaxOtherStops) {
            owed.push_back(m.tag);
          } else {
            ctr_.stops_unanswered.fetch_add(1);  // bounded: this one's peer ends Poisoned (safe)
          }
        } else if (Forgone* f = it == entries_.end() ? forgone_of(req, m.tag, peer) : nullptr) {
          reply_now = true;  // forgo(): never posted, and a transfer() of it is refused
          f->answered = true;
          share = no_entry;  // by this transport: the engine's others must not post it either (share_stop)
        } else if (auto p = posted_.find(req);
                   it == entries_.end() && p != posted_.end() && p->second.tag == m.tag && p->second.peer == peer) {
          reply_now = true;  // late, for the offer our transfer took (Done: else it would be unproven_)
        } else if (it == entries_.end() && exposed &&
                   (p == posted_.end() || p->second.serial != no_entry.session || p->second.forgone)) {
          // Our session of the id is exposed, and not by a transfer of this transport: another transport on
          // the engine (the offer handed to it, the stop sent here), or the executor's own data path, may be
          // moving the bytes.  Nothing here can tell when they stop: unanswered, the peer ends Poisoned
          // (safe).  Answered, the peer released its buffer under a live transfer (review).  A record forgo()
          // left is no transfer of ours either: the session exposed, another path moves the bytes.
          ctr_.stops_unanswered.fetch_add(1);
        } else if (it == entries_.end()) {
          // A later transfer() with this tag is cancelled before its post; full: unanswered (safe).  A
          // session of ours that took another offer already (its entry gone, its session not ended yet)
          // cannot post this one: a later session may.
          if (no_entry.session != 0 && p != posted_.end() && p->second.serial == no_entry.session) {
            no_entry = StopMemo{0, no_entry.session + 1};
          }
          if (remember_stopped(req, m.tag, no_entry)) {
            reply_now = true;
            share = no_entry;
          } else {
            ctr_.stops_unanswered.fetch_add(1);
          }
        } else {
          ctr_.orphan_notifications.fetch_add(1);  // our passive entry: the peer holds no descriptor of it
        }
      }
      if (active) {
        // Cancel here too (posting); the quiesced reply goes out when our request is Done (finish_active).
        if (cancel_now) (void)apply(req, Event::cancel, serial);
        if (reply_now) {
          ctr_.unsafe_acks.fetch_add(1);
          send(peer, {req, NotifKind::Quiesced, m.tag});
        }
      } else if (reply_now) {
        // Nothing of ours moves for (req, tag): never posted (and now never will be, by any transport of the
        // engine), or finished.
        if (share && !share_stop(req, m.tag, *share)) {
          ctr_.stops_unanswered.fetch_add(1);
          return;
        }
        send_acks(peer, req, {m.tag});
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

// Retry releases that failed: a request's range is held until it goes (for good where it ended without evidence).
// The sweep calls it; once the progress thread is gone, stop() and deregister_region() do, or stopping stranded even
// completed transfers' memory.  One retrier at a time: two could release one id twice.
void Transport::retry_releases() {
  std::lock_guard<std::mutex> one(retry_mu_);
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
}

void Transport::sweep() {
  retry_releases();
  if (!engine_) return;
  sweep_stopped();
  // Passive entries whose session ended without a note (grace expired, cancelled by the executor
  // before any exposure...), or is gone: nothing more to wait for.  Each leaves an Ended record, so
  // that a late note with its tag still reaches the engine as evidence for that very session.  Entries
  // not offered yet (expose still being applied) are expect()'s to settle.
  std::vector<std::tuple<std::uint64_t, std::uint64_t, bool>> passive;  // (req, serial, resend_queued)
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [req, e] : entries_) {
      if (e.side == Side::Passive && e.offered) passive.emplace_back(req, e.serial, e.resend_queued);
    }
  }
  for (const auto& [req, serial, queued] : passive) {
    const auto info = engine_->info(req);
    if (info && info->serial == serial && !terminal_or_final(info->state)) {
      // Cancelled, within cancel_grace: our stop or the peer's answer may have been lost, so it is asked again
      // while an answer still ends the session Quiesced (not Poisoned at grace)
      if (!queued && info->state == State::CancelRequested && opts_.stop_resends != 0) {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = entries_.find(req);
        if (it != entries_.end() && it->second.side == Side::Passive && it->second.serial == serial) {
          schedule_resend(req, it->second);
        }
      }
      continue;
    }
    std::lock_guard<std::mutex> lk(mu_);
    auto it = entries_.find(req);
    if (it != entries_.end() && it->second.side == Side::Passive && it->second.serial == serial) {
      // Poisoned without evidence: our stop or the peer's answer may have been lost, so it is asked again (one
      // queued while it was CancelRequested goes on, with its count)
      if (info && info->serial == serial && info->poisoned && !info->evidence) schedule_resend(req, it->second);
      retire_passive(it, info);
    }
  }
  resend_stops();
  // Records of sessions the engine forgot (their id may be advertised again: another serial).
  forget_gone(ended_, ended_cursor_);
  forget_posted();
}

void Transport::schedule_resend(std::uint64_t req, Entry& e) noexcept {
  if (opts_.stop_resends == 0 || e.resend_queued) return;
  e.resend_queued = true;  // queued or skipped, once: the sweep neither queues it twice nor counts it again
  if (resends_.size() >= opts_.stop_resend_limit) {
    ctr_.resends_skipped.fetch_add(1);  // this one stays as it is, quarantined (safe)
    return;
  }
  try {
    resends_.emplace(ResendKey{std::chrono::steady_clock::now() + opts_.stop_resend_delay, e.serial},
                     Resend{req, e.tag, e.peer, 0});
  } catch (const std::bad_alloc&) {
    ctr_.resends_skipped.fetch_add(1);
  }
}

// The stop of a cancelled passive session, again: the same request and tag, so the peer's answer (its
// "quiesced", or a late "done") is matched as the first stop's is: while the session is CancelRequested, by its
// live entry (it ends Quiesced); once it ended Poisoned without evidence, by the Ended record that the sweep
// left, as a late answer to the first stop is (on_notification), evidence for its quarantined slot and held offer
// (DESIGN §6).  Either way it reaches that very session only (its serial).  The peer answers only on its own
// evidence, as it does the first stop (send_acks).  Asked while an answer can still count: the engine's session
// is that serial, CancelRequested with its passive entry live, or Poisoned without evidence with its Ended record
// standing (the engine forgets it with the session); the peer is loaded and not removed since.
void Transport::resend_stops() {
  if (opts_.stop_resends == 0) return;
  // Each look and its send under resend_mu_: add_peer() waits for them, so none goes to the peer loaded again.
  // While an add_peer() holds it, the next sweep sends them (this thread never waits on a metadata load).
  std::unique_lock<std::mutex> one(resend_mu_, std::try_to_lock);
  if (!one.owns_lock()) return;
  constexpr std::size_t kResendBudget = 256;  // per sweep; the rest wait for the next
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::pair<ResendKey, Resend>> due;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = resends_.begin(); it != resends_.end() && it->first.first <= now && due.size() < kResendBudget;
         ++it) {
      due.emplace_back(it->first, it->second);
    }
  }
  for (const auto& [key, r] : due) {
    const std::uint64_t serial = key.second;
    const auto info = engine_->info(r.req);
    const bool same = info && info->serial == serial;
    const bool cancelling = same && info->state == State::CancelRequested;
    const bool unproven = same && info->poisoned && !info->evidence;
    bool ask = (cancelling || unproven) && agent_->knows_peer(r.peer);
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = resends_.find(key);
      if (it == resends_.end()) continue;  // remove_peer() took it
      const auto p = entries_.find(r.req);
      const bool live = p != entries_.end() && p->second.side == Side::Passive && p->second.serial == serial &&
                        p->second.tag == r.tag && p->second.peer == r.peer;
      auto e = ended_.find(r.req);
      const bool recorded = e != ended_.end() && e->second.serial == serial && e->second.tag == r.tag &&
                            e->second.peer == r.peer;
      ask = ask && removed_peers_.count(r.peer) == 0;
      // Poisoned at grace, its entry not retired yet: asked once the sweep left its Ended record (not counted)
      const bool later = ask && !cancelling && live;
      ask = ask && (cancelling ? live : recorded);
      std::uint32_t sent = it->second.sent;
      resends_.erase(it);
      if (later) {
        resends_.emplace(ResendKey{now + opts_.stop_resend_delay, serial}, Resend{r.req, r.tag, r.peer, sent});
        continue;
      }
      if (!ask) continue;
      ++sent;
      if (sent < opts_.stop_resends) {
        auto gap = opts_.stop_resend_delay;
        for (std::uint32_t k = 0; k < sent && gap < opts_.stop_resend_max_delay; ++k) gap *= 2;
        resends_.emplace(ResendKey{now + std::min(gap, opts_.stop_resend_max_delay), serial},
                         Resend{r.req, r.tag, r.peer, sent});
      }
    }
    try {
      agent_->send_notification(r.peer, {r.req, NotifKind::Stop, r.tag});
      ctr_.stops_resent.fetch_add(1);
    } catch (const std::exception&) {
      ctr_.send_errors.fetch_add(1);  // counted; the next resend, if any, tries again
    }
  }
}

void Transport::forget_gone(EndedMap& m, std::size_t& cursor) {
  std::vector<std::pair<std::uint64_t, Ended>> batch;
  {
    std::lock_guard<std::mutex> lk(mu_);
    batch = next_batch(m, cursor);
  }
  std::vector<std::pair<std::uint64_t, std::uint64_t>> stale;
  for (const auto& [req, e] : batch) {
    const auto info = engine_->info(req);
    if (!info || info->serial != e.serial) stale.emplace_back(req, e.serial);
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& [req, serial] : stale) {
    auto it = m.find(req);
    if (it != m.end() && it->second.serial == serial) m.erase(it);
  }
}

void Transport::remove_peer(const std::string& peer) {
  check_c_name(peer, "peer", "remove_peer");
  std::vector<std::tuple<std::uint64_t, Side, std::uint64_t>> gone;  // (req, side, serial)
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++removals_;
    // NIXL drops its mark with the peer's metadata (add_peer loads it fresh)
    if (failed_post_peers_.erase(peer) != 0) file_peer_reasons();
    // with the scan: an expect() or transfer() that looked the peer up before is refused when it makes
    // its entry, so none escapes both the scan and the refusal (until add_peer() loads it again)
    // The mark matters only while a call that looked the peer up before its invalidation still runs (a
    // few microseconds); the oldest marks go beyond kRemovedPeers, so names unique per restart stay bounded.
    if (removed_peers_.insert(peer).second) removed_order_.push_back(peer);
    for (auto it = resends_.begin(); it != resends_.end();) {  // not asked again: it is gone
      it = it->second.peer == peer ? resends_.erase(it) : std::next(it);
    }
    while (removed_order_.size() > kRemovedPeers) {
      removed_peers_.erase(removed_order_.front());
      removed_order_.pop_front();
    }
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.peer == peer && it->second.in_post) {
        it->second.abandon = true;  // its transfer() call, inside post(), finishes it (one owner)
        in_post_marks_.fetch_add(1);
        ++it;
      } else if (it->second.peer == peer && (it->second.side == Side::Passive || it->second.posting)) {
        gone.emplace_back(it->first, it->second.side, it->second.serial);
        if (it->second.side == Side::Active) unproven_.insert(it->first);  // with the erase
        if (it->second.side == Side::Passive && it->second.offered) {
          hold_offer(it->first, it->second);  // a late note (if the peer comes back) still releases it
          ended_[it->first] = Ended{it->second.peer, it->second.tag, it->second.serial};
        }
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto [req, side, serial] : gone) {
    if (side == Side::Active) {
      progress_->unwatch(req);
      release_xfer(req, false);  // posted, abandoned: no evidence
    }
    ctr_.abandoned.fetch_add(1);
    (void)apply(req, Event::fail, serial);  // no evidence can come any more: Poisoned (late if already ended)
  }
  try {
    agent_->invalidate_remote(peer);
  } catch (const std::exception&) {
    ctr_.send_errors.fetch_add(1);
  }
}

// An executor that polls health sees what refuses transfers to a peer (the refusal itself only reaches the caller
// of a transfer to it).  The key is the abort hook's id: this transport's own within the engine.
void Transport::file_peer_reasons() {
  if (!engine_) return;
  std::vector<std::string> reasons;
  // Once stop() began, none: it withdraws them once, and a post failing while it runs (before it marks the
  // in-post entries) would file them again, for good.
  if (!stopped_.load()) {
    for (const std::string& peer : failed_post_peers_) {
      reasons.push_back("transport " + name() + ": peer '" + peer + "' disconnected after a failed post: "
                        "remove_peer + add_peer");
    }
  }
  engine_->set_health_reasons(abort_hook_, std::move(reasons));
}

void Transport::stop() {
  if (stopped_.exchange(true)) return;
  {
    std::lock_guard<std::recursive_mutex> lk(relay_->mu);
    relay_->target = nullptr;
  }
  if (engine_) engine_->remove_abort_hook(abort_hook_);  // the relay already made it a no-op
  {  // it refuses nothing more (stopped): its reasons go
    std::lock_guard<std::mutex> lk(mu_);
    failed_post_peers_.clear();
    file_peer_reasons();
  }
  progress_->stop();
  std::vector<std::pair<std::uint64_t, Entry>> all;
  {
    std::lock_guard<std::mutex> lk(mu_);
    resends_.clear();  // (no sweep resends them any more)
    for (auto it = entries_.begin(); it != entries_.end();) {
      auto& [req, e] = *it;
      if (e.in_post) {
        e.abandon = true;  // its transfer() call, inside post(), finishes it (one owner)
        in_post_marks_.fetch_add(1);
        ++it;
        continue;
      }
      all.emplace_back(req, e);
      if (e.side == Side::Active && e.posting) unproven_.insert(req);  // with the erase
      if (e.side == Side::Passive && e.offered) hold_offer(req, e);  // for good: no more notes
      it = entries_.erase(it);
    }
  }
  for (auto& [req, e] : all) {
    if (e.side == Side::Active && !e.posting) {
      // never posted: the transfer() call that made it is still running and, finding its entry gone,
      // resolves the session itself (never posted is evidence: Quiesced(cancelled), not Poisoned)
      release_xfer(req, true);
      continue;
    }
    if (e.side == Side::Active) release_xfer(req, false);  // a failure is retried below, and by deregister_region
    ctr_.abandoned.fetch_add(1);
    (void)apply(req, Event::fail, e.serial);
  }
  swept_out_.store(true);
  retry_releases();
  {
    std::lock_guard<std::mutex> lk(bare_mu_);
  }
  bare_cv_.notify_all();
}

bool Transport::wait_completions(std::uint64_t n, std::int64_t timeout_ns, std::int64_t spin_ns) {
  timeout_ns = std::clamp<std::int64_t>(timeout_ns, 0, kMaxWaitNs);  // INT64_MAX ("for ever") wrapped into the past
  if (spin_for(std::min(spin_ns, timeout_ns), [&] { return bare_done_.load() >= n || stopped_.load(); })) {
    return bare_done_.load() >= n;
  }
  std::unique_lock<std::mutex> lk(bare_mu_);
  bare_waiters_.fetch_add(1);
  const bool woke = bare_cv_.wait_for(lk, std::chrono::nanoseconds(timeout_ns),
                                      [&] { return bare_done_.load() >= n || stopped_.load(); });
  bare_waiters_.fetch_sub(1);
  return woke && bare_done_.load() >= n;
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
    s.held_offers = held_offers_.size();
    s.remembered_stops = stopped_reqs_.size();
    s.forgone_offers = forgone_.size();
    s.posted_records = posted_.size() + (posted_pending_.size() - posted_head_);  // (a re-posted id may count twice)
    s.resends_pending = resends_.size();
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
  s.stale_notifications = ctr_.stale_notifications.load();
  s.stops_resent = ctr_.stops_resent.load();
  s.resends_skipped = ctr_.resends_skipped.load();
  return s;
}

NixlProgressStats Transport::progress_stats() const { return progress_->statistics(); }

}  // namespace lifecycle::transport
