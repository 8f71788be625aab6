#include "lifecycle/engine.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <exception>
#include <new>
#include <thread>
#include <unordered_set>

#include <pthread.h>  // pthread_atfork

#include "lifecycle/errors.hpp"

namespace lifecycle {
namespace {

constexpr std::uint32_t kNil = 0xffffffffu;
constexpr std::uint32_t kChunkBits = 12;
constexpr std::uint32_t kChunk = 1u << kChunkBits;

// kNotice: a tombstone whose TerminateNow is not yet delivered (Shard::hold_notice says why it is kept).
enum Flag : std::uint8_t { kDeferred = 1, kEvidence = 2, kQuarantined = 4, kWasPoisoned = 8, kNotice = 16 };

inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

// A request id as the table sees it, hashed once per call: the low bits of the hash choose the
// shard, the high 32 bits are the map tag (and the tag's low bits the home bucket).
struct Engine::Key {
  std::uint64_t req;
  std::uint64_t h;
  explicit Key(std::uint64_t id) : req(id), h(mix(id)) {}
  Key(std::uint64_t id, std::uint64_t hashed) : req(id), h(hashed) {}  // hashed == mix(id), computed earlier
  std::uint32_t tag() const { return static_cast<std::uint32_t>(h >> 32); }
};

namespace {

struct alignas(64) Session {  // one cache line: a call touches one line per session
  std::uint64_t req = 0;
  std::uint64_t serial = 0;  // (per-shard count << 12) | shard index: unique in the engine
  std::int64_t t_state = 0;  // when the session entered `state` (engine clock)
  Lease lease;
  std::uint32_t prev = kNil, next = kNil;  // intrusive list of sessions in the same state
  State state = State::Advertised;
  Role role = Role::sender;
  Outcome outcome = Outcome::none;
  std::uint8_t flags = 0;
};
static_assert(sizeof(Session) == 64, "a session is one cache line");

inline int si(State s) { return static_cast<int>(s); }
// Exposed: some agent may be moving bytes (health's progress deadline waits on these).
inline bool exposed(State s) { return s == State::InFlight || s == State::CancelRequested; }

// Shard lock.  Critical sections are a few dozen nanoseconds and never wait on anything, so a
// test-and-test-and-set lock beats a futex mutex; after a short spin it yields (a preempted holder
// on an oversubscribed machine must not be spun against).
class SpinMutex {
 public:
  void lock() noexcept {
    for (int spins = 0;; ++spins) {
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins > 64) std::this_thread::yield();
      }
    }
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

}  // namespace

// One shard: a cache-line aligned island, touched by one lock.
struct alignas(64) Engine::Shard {
  mutable SpinMutex mu;
  // Open-addressing map req -> slab index: linear probing, backward-shift deletion, 8-byte buckets
  // (one cache line holds 8).  A bucket keeps the key's tag, not the id: a tag match is confirmed
  // against the session's id, and the home bucket is the tag's low bits, so growing and deleting
  // never touch the sessions or rehash.
  struct Bucket {
    std::uint32_t tag;
    std::uint32_t idx;  // kNil = empty
  };
  std::vector<Bucket> map;
  std::size_t size = 0;
  // slab of sessions in fixed chunks (stable addresses, no doubling slack); free list via `next`
  std::vector<std::unique_ptr<Session[]>> chunks;
  std::uint32_t free_head = kNil;
  std::uint32_t high = 0;
  // per-state lists ordered by state entry time
  std::array<std::uint32_t, kNumStates> head{}, tail{};
  std::array<std::uint64_t, kNumStates> count{};
  // Tombstones held for their TerminateNow (flag kNotice): out of the Terminated list, so eviction never
  // meets them, yet counted in count[Terminated].  Invariant: held == the length of the held list.
  std::uint32_t held_head = kNil, held_tail = kNil;
  std::uint64_t held = 0;
  std::vector<Record> queue;
  std::vector<Record> spare;  // the queue's other buffer: drain swaps them, so memory is reused hot
  // Records a failed drain put back, or a bounded drain left (from spill_at on: the ones before it were taken),
  // taken first by the next one.  Invariant: each precedes (seq) every record in queue, and queued counts them
  // too; spill_at < spill.size(), or both are 0.  Filled by a swap: a put-back runs after an allocation failed,
  // and one that allocated (the taken run grown to hold the queue behind it) could fail too, and lost the records.
  std::vector<Record> spill;
  std::size_t spill_at = 0;
  // queue.size() + spill.size() - spill_at, mirrored for lock-free peeks (a plain store on x86).  A peek that misses
  // a record pushed concurrently only delays it to the next drain; the sleeping path of wait_ready counts
  // under the locks, so no wake-up is lost.
  std::atomic<std::uint32_t> queued{0};
  Counters ctr;
  std::int64_t last_t = INT64_MIN;  // Invariant: entry times in this shard never go backwards
  std::int64_t last_terminal = INT64_MIN;  // last entry into a terminal state (health's progress)
  // When the shard's exposed sessions (InFlight, CancelRequested) last went from none to some: while there are
  // any, the exposure of the oldest one or earlier (a session leaves them only for a terminal state, which moves
  // last_terminal past it).  Health's progress clock: a timeout or a cancel, which re-enters the session in
  // CancelRequested, does not restart it (counted from that entry, it did: health said OK up to another deadline).
  std::int64_t exposed_since = INT64_MIN;
  std::atomic<std::uint64_t>* record_seq = nullptr;  // the engine's counter
  std::uint64_t index = 0;    // this shard's index (the low 12 bits of its sessions' serials)
  std::uint64_t serials = 0;  // sessions created here

  std::int64_t stamp(std::int64_t t) {
    if (t < last_t) t = last_t;
    last_t = t;
    return t;
  }

  Shard() {
    head.fill(kNil);
    tail.fill(kNil);
    map.assign(16, Bucket{0, kNil});
  }

  Session& at(std::uint32_t i) { return chunks[i >> kChunkBits][i & (kChunk - 1)]; }
  const Session& at(std::uint32_t i) const { return chunks[i >> kChunkBits][i & (kChunk - 1)]; }

  std::size_t home(std::uint32_t tag) const { return tag & (map.size() - 1); }

  std::uint32_t find(const Key& k) const {
    const std::size_t m = map.size() - 1;
    const std::uint32_t tag = k.tag();
    for (std::size_t b = home(tag);; b = (b + 1) & m) {
      const Bucket e = map[b];
      if (e.idx == kNil) return kNil;
      if (e.tag == tag && at(e.idx).req == k.req) return e.idx;
    }
  }

  void place(Bucket e) {
    const std::size_t m = map.size() - 1;
    std::size_t b = home(e.tag);
    while (map[b].idx != kNil) b = (b + 1) & m;
    map[b] = e;
  }

  // The session of k, or kNil with *hole = the empty bucket where k belongs (one probe for both
  // the duplicate check and the insertion; grows first, so the hole stays valid).
  std::uint32_t find_or_hole(const Key& k, std::size_t* hole) {
    if ((size + 1) * 4 > map.size() * 3) {
      std::vector<Bucket> old(map.size() * 2, Bucket{0, kNil});
      old.swap(map);
      for (const Bucket& e : old)
        if (e.idx != kNil) place(e);
    }
    const std::size_t m = map.size() - 1;
    const std::uint32_t tag = k.tag();
    for (std::size_t b = home(tag);; b = (b + 1) & m) {
      const Bucket e = map[b];
      if (e.idx == kNil) {
        *hole = b;
        return kNil;
      }
      if (e.tag == tag && at(e.idx).req == k.req) return e.idx;
    }
  }

  void fill(std::size_t hole, const Key& k, std::uint32_t idx) {
    map[hole] = Bucket{k.tag(), idx};
    ++size;
  }

  // Remove the bucket of slab entry idx (whose key has this tag).
  void erase(std::uint32_t tag, std::uint32_t idx) {
    const std::size_t m = map.size() - 1;
    std::size_t b = home(tag);
    while (map[b].idx != kNil && map[b].idx != idx) b = (b + 1) & m;
    if (map[b].idx == kNil) return;
    // backward-shift deletion keeps probe chains intact without tombstones
    std::size_t hole = b;
    for (std::size_t j = (hole + 1) & m; map[j].idx != kNil; j = (j + 1) & m) {
      const std::size_t h = home(map[j].tag);
      const bool movable = hole <= j ? (h <= hole || h > j) : (h <= hole && h > j);
      if (movable) {
        map[hole] = map[j];
        hole = j;
      }
    }
    map[hole].idx = kNil;
    --size;
  }

  std::uint32_t alloc() {
    if (free_head != kNil) {
      std::uint32_t i = free_head;
      free_head = at(i).next;
      return i;
    }
    if ((high & (kChunk - 1)) == 0) {
      auto chunk = std::make_unique<Session[]>(kChunk);  // owned before the vector may throw
      chunks.push_back(std::move(chunk));
    }
    return high++;
  }

  // Back to the free list.  Only tombstones are freed: their lease was released or quarantined
  // when they entered the final state, so there is nothing to return; advertise re-initialises.
  void release_slot(std::uint32_t i) {
    Session& s = at(i);
    s.lease.release();
    s.next = free_head;
    free_head = i;
  }

  void link(std::uint32_t i, State st) {
    Session& s = at(i);
    int k = si(st);
    s.prev = tail[k];
    s.next = kNil;
    if (tail[k] != kNil) at(tail[k]).next = i; else head[k] = i;
    tail[k] = i;
    ++count[k];
  }

  void unlink(std::uint32_t i) {
    Session& s = at(i);
    int k = si(s.state);
    if (s.prev != kNil) at(s.prev).next = s.next; else head[k] = s.next;
    if (s.next != kNil) at(s.next).prev = s.prev; else tail[k] = s.prev;
    s.prev = s.next = kNil;
    --count[k];
  }

  // A deferred session just Terminated keeps its tombstone until its TerminateNow was delivered (the
  // executor's on_terminate ran): evicted before, the id could be advertised again by an executor not yet
  // told, and the callback's calls (a re-entrant terminate: DESIGN 5 says AlreadyTerminated) reached the
  // new session, or NotFound.  Held, the id stays taken (advertise: Duplicate) until release_notice.
  void hold_notice(std::uint32_t i) {
    unlink(i);  // from the Terminated list
    Session& s = at(i);
    s.flags |= kNotice;
    s.prev = held_tail;
    s.next = kNil;
    if (held_tail != kNil) at(held_tail).next = i; else held_head = i;
    held_tail = i;
    ++held;
    ++count[si(State::Terminated)];
  }

  // Its notice was delivered: an ordinary tombstone from now on (the newest), evicted in its turn.
  void release_notice(std::uint32_t i) {
    Session& s = at(i);
    if (s.prev != kNil) at(s.prev).next = s.next; else held_head = s.next;
    if (s.next != kNil) at(s.next).prev = s.prev; else held_tail = s.prev;
    s.flags = static_cast<std::uint8_t>(s.flags & ~kNotice);
    --held;
    --count[si(State::Terminated)];
    link(i, State::Terminated);
  }

  std::size_t exposed_count() const { return count[si(State::InFlight)] + count[si(State::CancelRequested)]; }

  void move(std::uint32_t i, State dst, std::int64_t now) {
    if (!exposed(at(i).state) && exposed(dst) && exposed_count() == 0) exposed_since = now;
    unlink(i);
    Session& s = at(i);
    s.state = dst;
    s.t_state = now;
    link(i, dst);
  }

  // Room for n more records, taken before a call changes anything: the pushes after a move never allocate,
  // so an allocation failure (std::bad_alloc) leaves the session as it was, never moved with its records lost.
  void room(std::size_t n) {
    if (queue.capacity() - queue.size() < n)
      queue.reserve(std::max({queue.capacity() * 2, queue.size() + n, std::size_t{64}}));
  }

  void push(RecordKind kind, const Session& s, std::uint8_t from, Event ev, std::int64_t now, bool deferred = false) {
    Record r;
    r.req = s.req;
    r.t_ns = now;
    r.slot = s.lease.slot();
    r.gen = s.lease.generation();
    r.kind = kind;
    r.from = from;
    r.to = static_cast<std::uint8_t>(s.state);
    r.event = static_cast<std::uint8_t>(ev);
    r.outcome = static_cast<std::uint8_t>(s.outcome);
    r.role = static_cast<std::uint8_t>(s.role);
    r.deferred = deferred ? 1 : 0;
    r.result = 0xff;
    // Counted before it is numbered, both seq_cst: a drain that reads the counter past this number then sees
    // this shard's count non-zero (drain_to's cut), unless a drain took the record already.
    queued.fetch_add(1, std::memory_order_seq_cst);
    r.seq = record_seq->fetch_add(1, std::memory_order_seq_cst);
    queue.push_back(r);  // (room() reserved it: never throws)
  }
};

namespace {

// What one critical section needs besides the shard: read once per call (or per batch).
struct Ctx {
  std::int64_t now;
  BufferPool& pool;
  bool unhealthy;
  std::uint32_t tomb_cap;  // tombstones kept per shard
  std::vector<Engine::Abort>* aborts;
  std::size_t pushed = 0;
};

}  // namespace

// Live engines, for the fork handlers.  A child forked while some thread held a shard lock (a batch call with
// the GIL released, a transport's progress thread) or wait_mu_ inherited it held by a thread that does not
// exist there: its first poll(), which never blocks, spun for ever (review).  The handlers take every lock of
// every live engine before fork() and release them after, in the parent and in the child.
struct Engine::ForkGuard {
  static std::mutex& mu() {
    static auto* m = new std::mutex;  // never destroyed: a fork during exit still finds it
    return *m;
  }
  static std::unordered_set<Engine*>& live() {
    static auto* s = new std::unordered_set<Engine*>;
    return *s;
  }
  static void prepare() {
    mu().lock();
    for (Engine* e : live()) e->lock_for_fork();
  }
  static void parent() {
    for (Engine* e : live()) e->unlock_after_fork(false);
    mu().unlock();
  }
  static void child() {
    for (Engine* e : live()) e->unlock_after_fork(true);
    mu().unlock();
  }
  static void add(Engine* e) {
    static const int registered = ::pthread_atfork(&prepare, &parent, &child);
    (void)registered;
    std::lock_guard<std::mutex> g(mu());
    live().insert(e);
  }
  static void remove(Engine* e) {
    std::lock_guard<std::mutex> g(mu());
    live().erase(e);
  }
};

// The order every other path takes them in: wait_mu_ before a shard (wait_ready), a shard before the pool's
// (a lease under the shard lock); hooks_mu_ and backend_mu_ are never held with another (backend_mu_ is a leaf: a
// transport files its health reasons under its own lock).
void Engine::lock_for_fork() {
  wait_mu_.lock();
  for (Shard& sh : shards()) sh.mu.lock();
  pool_->lock_for_fork();
  hooks_mu_.lock();
  backend_mu_.lock();
}

void Engine::unlock_after_fork(bool child) {
  backend_mu_.unlock();
  hooks_mu_.unlock();
  pool_->unlock_after_fork();
  for (Shard& sh : shards()) sh.mu.unlock();
  if (child) {
    // a drain under way is not here: what it took is not either, and never comes back; the child drains its own
    draining_.store(false, std::memory_order_relaxed);
    // the parent's waiters are not here: no wake-up to owe them, and a condition variable that counted them
    // is made anew (destroying it would wait for them)
    waiters_.store(0);
    new (&wait_cv_) std::condition_variable();
  }
  wait_mu_.unlock();
}

Engine::Engine(Config cfg, std::shared_ptr<const Clock> clock)
    : cfg_(cfg), clock_(clock ? std::move(clock) : std::make_shared<SteadyClock>()) {
  if (cfg_.shards == 0 || cfg_.shards > 4096) throw InvalidArgumentError("shards", "must be in 1..4096");
  if (cfg_.progress_deadline_ns <= 0) throw InvalidArgumentError("progress_deadline", "must be > 0");
  // Each at most kMaxDuration (about 31.7 years): a timer + the deadline + a clock reading stays far from the
  // int64 range (9e9 s each once made health report a fresh session wedged).
  const std::pair<const char*, std::int64_t> durations[] = {{"transfer_timeout", cfg_.transfer_timeout_ns},
                                                            {"cancel_grace", cfg_.cancel_grace_ns},
                                                            {"progress_deadline", cfg_.progress_deadline_ns}};
  for (const auto& [name, ns] : durations) {
    if (ns < 0 || ns > kMaxDurationNs) {
      throw InvalidArgumentError(name, "must be in [0, " + std::to_string(kMaxDurationNs / 1'000'000'000) +
                                           "] seconds, got " + std::to_string(ns) + " ns");
    }
  }
  std::uint32_t n = 1;
  while (n < cfg_.shards) n <<= 1;
  cfg_.shards = n;
  shard_mask_ = n - 1;
  // rounded up: rounded down, a window smaller than the shard count kept no tombstone at all (tombstones=8 with
  // 16 shards forgot a session at once, as tombstones=0 does: a late DONE could not recover its slot)
  tomb_cap_ = static_cast<std::uint32_t>((std::uint64_t{cfg_.tombstones} + n - 1) / n);
  pool_ = std::make_unique<BufferPool>(cfg_.num_slots, cfg_.slot_size);
  shards_ = std::make_unique<Shard[]>(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    shards_[i].record_seq = &record_seq_;
    shards_[i].index = i;  // < 4096 = 2**12 (checked above)
  }
  last_progress_ns_ = clock_->now_ns();
  ForkGuard::add(this);  // last: a constructor that throws registers nothing
}

// A session whose transfer may still write its slot (InFlight, CancelRequested, Poisoned: no evidence of
// quiescence) gives its slot to the quarantine, not back to the pool, so the pool's destructor keeps it
// mapped; the others' leases go back as their sessions are destroyed.
Engine::~Engine() {
  ForkGuard::remove(this);
  for (std::uint64_t k = 0; k <= shard_mask_; ++k) {
    Shard& sh = shards_[k];
    for (std::uint32_t i = 0; i < sh.high; ++i) {
      Session& s = sh.at(i);
      if (s.lease.held() && (s.state == State::InFlight || s.state == State::CancelRequested || s.state == State::Poisoned)) {
        s.lease.quarantine();
      }
    }
  }
}

Engine::Shard& Engine::shard_of(const Key& k) const { return shards_[k.h & shard_mask_]; }
std::span<Engine::Shard> Engine::shards() const { return {shards_.get(), static_cast<std::size_t>(shard_mask_ + 1)}; }

// No counter on the hot path: a waiter registers in waiters_ and then inspects the shard queues
// under their locks.  If this load sees no waiter, the waiter's registration happened after our
// shard unlock in the lock chain, so its inspection sees our record: no lost wake-up.
void Engine::notify_pushed(std::size_t n) {
  if (n == 0) return;
  if (waiters_.load() > 0) {
    std::lock_guard<std::mutex> g(wait_mu_);
    wait_cv_.notify_all();
  }
}

void Engine::run_aborts(std::vector<Abort>& aborts) {
  if (aborts.empty()) return;
  std::shared_ptr<const AbortHooks> hooks;
  {
    std::lock_guard<std::mutex> g(hooks_mu_);
    hooks = hooks_;
  }
  if (!hooks) return;
  // A hook that throws (a transport's bad_alloc) skips no other: stopped there, the other hooks for that session
  // and every later session's abort never ran, their transfers left to cancel_grace.  The first error goes on.
  std::exception_ptr first;
  for (const Abort& a : aborts) {
    for (const auto& [id, hook] : *hooks) {
      try {
        hook(a);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
  }
  if (first) std::rethrow_exception(first);
}

// A call that applied some items and then threw (an allocation failed on a later one, which it left
// untouched): what it did stays done, so its waiters are woken and its aborts run before the error goes on.
// A hook's own error gives way to the first one.
void Engine::finish_after_throw(std::size_t pushed, std::vector<Abort>& aborts) noexcept {
  try {
    notify_pushed(pushed);
    run_aborts(aborts);
  } catch (...) {
  }
}

bool Engine::degraded() const {
  return unhealthy_.load(std::memory_order_relaxed) || !backend_healthy_.load(std::memory_order_relaxed);
}

// Batches: the items are grouped by shard (a counting sort, stable, so every request's events keep
// their order), and each shard's items run under one lock acquisition per kRun items with the
// lookups software-pipelined: the home bucket of item j+8 and the session of item j+4 are
// prefetched while item j is applied.  A batch of 100 k ids on a table larger than the cache
// runs at the speed of one that fits.  Records of one batch are therefore in shard order across
// requests (they carry the batch's one clock reading, or a shard's later stamp: entry times never go back).
template <class Fn>
void Engine::for_each_by_shard(const std::uint64_t* ids, std::size_t n, Fn&& fn) const {
  constexpr std::size_t kSlice = std::size_t{1} << 24;  // item indices fit in 32 bits
  for (std::size_t base = 0; base < n; base += kSlice) group_slice(ids, base, std::min(n, base + kSlice), fn);
}

template <class Fn>
void Engine::group_slice(const std::uint64_t* all, std::size_t base, std::size_t stop, Fn& fn) const {
  const std::uint64_t* ids = all + base;
  const std::size_t n = stop - base;
  constexpr std::size_t kRun = 256;  // items per lock hold: transport threads wait at most ~25 us
  constexpr std::size_t kAhead = 8;
  const std::size_t nshards = shard_mask_ + 1;
  std::vector<std::uint64_t> hash(n);
  std::vector<std::uint32_t> start(nshards + 1, 0);
  for (std::size_t i = 0; i < n; ++i) {
    hash[i] = Key(ids[i]).h;
    ++start[(hash[i] & shard_mask_) + 1];
  }
  for (std::size_t s = 0; s < nshards; ++s) start[s + 1] += start[s];
  std::vector<std::uint32_t> order(n);
  {
    std::vector<std::uint32_t> pos(start.begin(), start.end() - 1);
    for (std::size_t i = 0; i < n; ++i) order[pos[hash[i] & shard_mask_]++] = static_cast<std::uint32_t>(i);
  }
  for (std::size_t s = 0; s < nshards; ++s) {
    Shard& sh = shards_[s];
    const std::size_t end = start[s + 1];
    for (std::size_t lo = start[s]; lo < end; lo += kRun) {
      const std::size_t hi = std::min(end, lo + kRun);
      std::lock_guard<SpinMutex> g(sh.mu);
      for (std::size_t j = lo; j < hi; ++j) {
        if (j + kAhead < hi) {
          const std::uint32_t tag = static_cast<std::uint32_t>(hash[order[j + kAhead]] >> 32);
          __builtin_prefetch(&sh.map[sh.home(tag)]);
        }
        if (j + kAhead / 2 < hi) {
          const std::uint32_t a = order[j + kAhead / 2];
          const Shard::Bucket e = sh.map[sh.home(static_cast<std::uint32_t>(hash[a] >> 32))];
          if (e.idx != kNil) __builtin_prefetch(&sh.at(e.idx));
        }
        const std::uint32_t i = order[j];
        fn(sh, Key(ids[i], hash[i]), base + i);
      }
    }
  }
}

// Caller holds sh.mu.  Creates the session; pushes one record.
static ApplyResult advertise_locked(Engine::Shard& sh, const Engine::Key& h, Role role,
                                    std::uint64_t nbytes, BufferPool& pool, std::int64_t now) {
  ApplyResult r;
  std::size_t hole = 0;
  std::uint32_t found = sh.find_or_hole(h, &hole);
  if (found != kNil) {
    ++sh.ctr.duplicate;
    r.status = Status::Duplicate;
    r.from = r.to = sh.at(found).state;
    return r;
  }
  // What may throw comes before the lease (a lease given back still counts, and bumps the slot's generation)
  sh.room(1);
  const std::uint32_t idx = sh.alloc();
  Lease lease;
  if (nbytes > 0) {
    try {
      lease = pool.lease();
    } catch (...) {
      sh.release_slot(idx);
      throw;
    }
    if (!lease.held()) {
      sh.release_slot(idx);
      r.status = Status::NoSlot;
      return r;
    }
  }
  now = sh.stamp(now);
  Session& s = sh.at(idx);
  s.req = h.req;
  s.serial = (++sh.serials << 12) | sh.index;
  s.role = role;
  s.state = kInitialState;
  s.t_state = now;
  s.outcome = Outcome::none;
  s.flags = 0;
  s.lease = std::move(lease);
  sh.link(idx, kInitialState);
  sh.fill(hole, h, idx);
  ++sh.ctr.transitions;
  sh.push(RecordKind::Transition, s, kNoState, kCreateEvent, now);
  r.status = Status::Moved;
  r.from = r.to = kInitialState;
  r.serial = s.serial;
  return r;
}

static bool advertise_args_ok(Role role, std::uint64_t nbytes, const BufferPool& pool) {
  if (static_cast<std::uint8_t>(role) > 1) return false;
  return nbytes == 0 || (pool.num_slots() > 0 && nbytes <= pool.slot_size());
}

ApplyResult Engine::advertise(std::uint64_t req, Role role, std::uint64_t nbytes) {
  ApplyResult r;
  r.status = Status::BadArgument;
  if (!advertise_args_ok(role, nbytes, *pool_)) return r;
  const Key h(req);
  Shard& sh = shard_of(h);
  {
    std::lock_guard<SpinMutex> g(sh.mu);
    r = advertise_locked(sh, h, role, nbytes, *pool_, clock_->now_ns());
  }
  if (r.status == Status::Moved) notify_pushed(1);
  return r;
}

void Engine::advertise_batch(const std::uint64_t* ids, std::size_t n, Role role, std::uint64_t nbytes,
                             std::uint8_t* out) {
  if (!advertise_args_ok(role, nbytes, *pool_)) {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(Status::BadArgument);
    return;
  }
  const std::int64_t now = clock_->now_ns();
  std::size_t pushed = 0;
  try {
    for_each_by_shard(ids, n, [&](Shard& sh, const Key& k, std::size_t i) {
      const ApplyResult r = advertise_locked(sh, k, role, nbytes, *pool_, now);
      pushed += r.status == Status::Moved;
      out[i] = static_cast<std::uint8_t>(r.status);
    });
  } catch (...) {
    std::vector<Abort> none;
    finish_after_throw(pushed, none);
    throw;
  }
  notify_pushed(pushed);
}

static void enter_final(Engine::Shard& sh, Session& s, State from, Ctx& cx) {
  switch (from) {
    case State::Quiesced:
      s.lease.release();  // positive evidence: back to the pool
      break;
    case State::Poisoned:
      if (s.lease.held()) {
        s.lease.quarantine();
        s.flags |= kQuarantined;
        ++sh.ctr.quarantined;
        sh.push(RecordKind::SlotQuarantined, s, static_cast<std::uint8_t>(from), Event::terminate, cx.now);
        ++cx.pushed;
      }
      break;
    case State::Advertised:
    case State::InFlight:
    case State::CancelRequested:
    case State::Terminated:
      // unreachable: the build-time validator only admits final entries from terminal states
      break;
  }
}

static void try_recover(Engine::Shard& sh, Session& s, Ctx& cx) {
  if ((s.flags & kQuarantined) && cx.pool.recover(s.lease.slot(), s.lease.generation())) {
    s.flags = static_cast<std::uint8_t>(s.flags & ~kQuarantined);
    ++sh.ctr.recovered;
    sh.push(RecordKind::BufferRecovered, s, static_cast<std::uint8_t>(s.state), Event::complete, cx.now);
    ++cx.pushed;
  }
}

// Forget the oldest tombstones beyond the cap.  They were terminated thousands of calls ago, so
// their slab entry and map bucket are cold: each eviction prefetches what the next one touches
// (the next victim's bucket, the victim after it), so the steady state evicts from cache.
static void evict_tombstones(Engine::Shard& sh, std::uint32_t cap) {
  const int k = si(State::Terminated);
  while (sh.count[k] - sh.held > cap) {  // (held ones are not in the list: release_notice puts them back)
    const std::uint32_t victim = sh.head[k];
    sh.unlink(victim);
    sh.erase(Engine::Key(sh.at(victim).req).tag(), victim);
    sh.release_slot(victim);
    const std::uint32_t next = sh.head[k];
    if (next != kNil) {
      const Session& n = sh.at(next);
      __builtin_prefetch(&sh.map[sh.home(Engine::Key(n.req).tag())], 1);
      if (n.next != kNil) __builtin_prefetch(&sh.at(n.next), 1);
    }
  }
}

// More records than one apply_one can queue: each of these at most once (6) — the move, the deferred terminate
// it runs, slot_quarantined, buffer_recovered, terminate_now, the call's result; two to spare.
constexpr std::size_t kMaxRecordsPerApply = 8;

// The one place where a table cell is applied.  Caller holds sh.mu.  Everything it may allocate is taken
// first (record room, the abort's entry): a std::bad_alloc leaves the session untouched.
static ApplyResult apply_locked(Engine::Shard& sh, std::uint32_t idx, Event ev, Ctx& cx) {
  Session& s = sh.at(idx);
  const Cell& c = kTable[si(s.state)][static_cast<int>(ev)];
  sh.room(kMaxRecordsPerApply);
  if (c.action == Action::Move && c.dst == State::CancelRequested && cx.aborts &&
      cx.aborts->size() == cx.aborts->capacity())
    cx.aborts->reserve(std::max<std::size_t>(8, cx.aborts->capacity() * 2));
  ApplyResult r;
  r.from = s.state;
  r.to = s.state;
  r.result = c.result;
  switch (c.action) {
    case Action::Illegal:
      ++sh.ctr.illegal;
      sh.push(RecordKind::IllegalEvent, s, static_cast<std::uint8_t>(s.state), ev, cx.now);
      ++cx.pushed;
      r.status = Status::Illegal;
      return r;
    case Action::Stay:
      r.status = Status::Stay;
      return r;
    case Action::Late:
      ++sh.ctr.late;
      sh.push(RecordKind::LateEvent, s, static_cast<std::uint8_t>(s.state), ev, cx.now);
      ++cx.pushed;
      if (ev == Event::complete) {
        if (s.state == State::Poisoned) s.flags |= kEvidence;  // recovered when terminated
        if (s.state == State::Terminated) {
          if (s.flags & kWasPoisoned) s.flags |= kEvidence;  // info().evidence: it did stop after all
          try_recover(sh, s, cx);
        }
      }
      r.status = Status::Late;
      return r;
    case Action::Defer:
      r.status = Status::Deferred;
      if (s.flags & kDeferred) {
        r.result = static_cast<std::uint8_t>(TerminateResult::AlreadyDeferred);
      } else {
        s.flags |= kDeferred;
        ++sh.ctr.deferred;
      }
      return r;
    case Action::Move:
      break;
  }
  const State from = s.state;
  sh.move(idx, c.dst, cx.now);
  if (c.outcome != Outcome::none) s.outcome = c.outcome;
  if (c.dst == State::Poisoned) s.flags |= kWasPoisoned;  // remembered by the tombstone too
  ++sh.ctr.transitions;
  sh.push(RecordKind::Transition, s, static_cast<std::uint8_t>(from), ev, cx.now);
  ++cx.pushed;
  r.status = Status::Moved;
  r.to = c.dst;
  if (ev == Event::cancel && cx.unhealthy &&
      c.result == static_cast<std::uint8_t>(CancelResult::CancelRequestedInFlight))
    r.result = static_cast<std::uint8_t>(CancelResult::BackendUnhealthy);
  if (c.dst == State::CancelRequested && cx.aborts) cx.aborts->push_back(Engine::Abort{s.req, s.role, s.serial});
  if (ev == Event::timeout) ++sh.ctr.timeouts;
  if (ev == Event::grace_expired) ++sh.ctr.grace_expired;
  if (kFinal[si(c.dst)]) {
    enter_final(sh, s, from, cx);
    if (s.flags & kEvidence) try_recover(sh, s, cx);
  }
  if (kTerminal[si(c.dst)]) {
    sh.last_terminal = cx.now;  // stamped: never goes backwards within the shard
    if (s.flags & kDeferred) {
      // Exactly-once deferred termination: the flag is cleared in the same critical section that
      // performs the terminate move and queues the single TerminateNow notice.  A cancel that got here
      // answers CancelledDeferred (frees now: no): the notice releases the session, the cancel must not.
      if (ev == Event::cancel) r.result = static_cast<std::uint8_t>(CancelResult::CancelledDeferred);
      s.flags = static_cast<std::uint8_t>(s.flags & ~kDeferred);
      const Cell& t = kTable[si(c.dst)][static_cast<int>(Event::terminate)];
      const State tfrom = s.state;
      sh.move(idx, t.dst, cx.now);
      ++sh.ctr.transitions;
      sh.push(RecordKind::Transition, s, static_cast<std::uint8_t>(tfrom), Event::terminate, cx.now, true);
      enter_final(sh, s, tfrom, cx);
      if (s.flags & kEvidence) try_recover(sh, s, cx);
      sh.push(RecordKind::TerminateNow, s, static_cast<std::uint8_t>(tfrom), Event::terminate, cx.now, true);
      sh.hold_notice(idx);  // kept until the notice was delivered (Shard::hold_notice)
      ++sh.ctr.terminate_now;
      cx.pushed += 2;
      r.to = s.state;
    }
  }
  return r;
}

// Queue what cancel / terminate answered, right after the records the call itself produced (the
// session is still in the table: tombstones are evicted only at the end of the critical section).
static void push_result(Engine::Shard& sh, std::uint32_t idx, const ApplyResult& r, Event ev, Ctx& cx) {
  if (r.result == 0xff || r.status == Status::Illegal) return;
  sh.push(RecordKind::CallResult, sh.at(idx), static_cast<std::uint8_t>(r.from), ev, cx.now);
  sh.queue.back().result = r.result;
  ++cx.pushed;
}

// One event on one session, under its shard lock.  Unknown ids are counted, nothing else happens.
// `serial` != 0: only the session with that serial (another session of the id counts as unknown).
static ApplyResult apply_one(Engine::Shard& sh, const Engine::Key& h, Event ev, Ctx& cx, std::uint64_t serial = 0) {
  ApplyResult r;
  std::uint32_t idx = sh.find(h);
  if (idx == kNil || (serial != 0 && sh.at(idx).serial != serial)) {
    ++sh.ctr.unknown;
    r.status = Status::Unknown;
    r.result = 0xff;
    return r;
  }
  cx.now = sh.stamp(cx.now);
  r = apply_locked(sh, idx, ev, cx);
  r.serial = sh.at(idx).serial;  // the slot of a tombstone evicted below may be reused later, not now
  if (ev == Event::cancel || ev == Event::terminate) push_result(sh, idx, r, ev, cx);
  evict_tombstones(sh, cx.tomb_cap);
  return r;
}

ApplyResult Engine::apply(std::uint64_t req, Event ev) { return apply(req, ev, 0); }

ApplyResult Engine::apply(std::uint64_t req, Event ev, std::uint64_t serial) {
  if (static_cast<int>(ev) >= kNumEvents || ev == kCreateEvent) {
    ApplyResult r;
    r.status = Status::BadArgument;
    return r;
  }
  const Key h(req);
  Shard& sh = shard_of(h);
  std::vector<Engine::Abort> aborts;
  Ctx cx{0, *pool_, degraded(), tomb_cap_, &aborts};
  ApplyResult r;
  cx.now = clock_->now_ns();  // outside the lock; apply_one stamps it (monotonic per shard)
  {
    std::lock_guard<SpinMutex> g(sh.mu);
    r = apply_one(sh, h, ev, cx, serial);
  }
  notify_pushed(cx.pushed);
  run_aborts(aborts);
  return r;
}

template <class Put>
void Engine::apply_many(const std::uint64_t* ids, const std::uint8_t* events, const std::uint64_t* serials,
                        std::size_t n, Put&& put) {
  std::vector<Engine::Abort> aborts;
  const std::int64_t now = clock_->now_ns();
  Ctx cx{now, *pool_, degraded(), tomb_cap_, &aborts};
  try {
    for_each_by_shard(ids, n, [&](Shard& sh, const Key& k, std::size_t i) {
      if (events[i] >= kNumEvents || events[i] == static_cast<std::uint8_t>(kCreateEvent)) {
        ApplyResult bad;
        bad.status = Status::BadArgument;
        put(i, bad);
        return;
      }
      cx.now = now;
      put(i, apply_one(sh, k, static_cast<Event>(events[i]), cx, serials == nullptr ? 0 : serials[i]));
    });
  } catch (...) {
    finish_after_throw(cx.pushed, aborts);
    throw;
  }
  notify_pushed(cx.pushed);
  run_aborts(aborts);
}

void Engine::apply_batch(const std::uint64_t* ids, const std::uint8_t* events, std::size_t n, std::uint8_t* out) {
  apply_many(ids, events, nullptr, n,
             [out](std::size_t i, const ApplyResult& r) { out[i] = static_cast<std::uint8_t>(r.status); });
}

void Engine::apply_batch(const std::uint64_t* ids, const std::uint8_t* events, const std::uint64_t* serials,
                         std::size_t n, ApplyResult* out) {
  apply_many(ids, events, serials, n, [out](std::size_t i, const ApplyResult& r) { out[i] = r; });
}

CancelResult Engine::cancel(std::uint64_t req) {
  ApplyResult r = apply(req, Event::cancel);
  switch (r.status) {
    case Status::Unknown:
      return CancelResult::NotFound;
    case Status::Moved:
    case Status::Stay:
      return static_cast<CancelResult>(r.result);
    case Status::Late:
    case Status::Deferred:
    case Status::Illegal:
    case Status::Duplicate:
    case Status::NoSlot:
    case Status::BadArgument:
      break;
  }
  return CancelResult::NotCancellable;  // unreachable for a validated table
}

TerminateResult Engine::terminate(std::uint64_t req) {
  ApplyResult r = apply(req, Event::terminate);
  switch (r.status) {
    case Status::Unknown:
      return TerminateResult::NotFound;
    case Status::Moved:
    case Status::Stay:
    case Status::Deferred:
      return static_cast<TerminateResult>(r.result);
    case Status::Late:
    case Status::Illegal:
    case Status::Duplicate:
    case Status::NoSlot:
    case Status::BadArgument:
      break;
  }
  return TerminateResult::NotFound;  // unreachable for a validated table
}

std::size_t Engine::tick() {
  std::size_t fired = 0;
  std::vector<Engine::Abort> aborts;
  const std::int64_t to = cfg_.transfer_timeout_ns, grace = cfg_.cancel_grace_ns;
  Ctx cx{0, *pool_, unhealthy_.load(std::memory_order_relaxed), tomb_cap_, &aborts};
  try {
    for (Shard& sh : shards()) {
      std::lock_guard<SpinMutex> g(sh.mu);
      cx.now = sh.stamp(clock_->now_ns());
      const int fl = si(State::InFlight), cr = si(State::CancelRequested);
      while (to > 0 && sh.head[fl] != kNil && sh.at(sh.head[fl]).t_state <= cx.now - to) {
        apply_locked(sh, sh.head[fl], Event::timeout, cx);
        ++fired;
      }
      while (grace > 0 && sh.head[cr] != kNil && sh.at(sh.head[cr]).t_state <= cx.now - grace) {
        apply_locked(sh, sh.head[cr], Event::grace_expired, cx);
        ++fired;
      }
      evict_tombstones(sh, cx.tomb_cap);
    }
  } catch (...) {  // the timers not fired yet fire on a later tick
    finish_after_throw(cx.pushed, aborts);
    throw;
  }
  notify_pushed(cx.pushed);
  run_aborts(aborts);
  return fired;
}

std::int64_t Engine::next_deadline_ns() const {
  std::int64_t best = INT64_MAX;
  const std::int64_t to = cfg_.transfer_timeout_ns, grace = cfg_.cancel_grace_ns;
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    if (to > 0 && sh.head[si(State::InFlight)] != kNil)
      best = std::min(best, sh.at(sh.head[si(State::InFlight)]).t_state + to);
    if (grace > 0 && sh.head[si(State::CancelRequested)] != kNil)
      best = std::min(best, sh.at(sh.head[si(State::CancelRequested)]).t_state + grace);
  }
  return best;
}

std::size_t Engine::drain(std::vector<Record>& out) {
  return drain_to([&out](std::size_t n) {
    const std::size_t base = out.size();
    out.resize(base + n);
    return out.data() + base;
  });
}

std::size_t Engine::drain_to(const std::function<Record*(std::size_t)>& dest, bool hold_notices, std::size_t max) {
  // Each shard's queue is already in seq order; take from each the records numbered before this drain began (the
  // cut), then merge them by seq into dest(n).  Every record numbered before the cut is in its queue by the time
  // its shard's lock is taken here (it was numbered and queued under that lock; numbered after, it would be past
  // the cut), and its shard's count shows it (Shard::push counts before it numbers).  So each drain gives every
  // record below its cut, and none past it: successive drains come out in seq order.  Taking whatever was queued
  // instead, a record pushed to a shard already taken, numbered below one a shard taken later gave, came out in
  // the next drain, after the record it precedes: a slot released by one shard and leased by another was logged
  // leased, then released (with two threads pushing, one non-empty drain in five began below the previous one).
  if (max == 0) return 0;
  // One drain at a time: a drain that finds another under way returns 0 at once, taking nothing, so the drains
  // that return records never overlap and each gives every record below its cut.  (One that skipped only the
  // shards the other held, and took the rest, gave records numbered past those the held shards kept back, or put
  // back when the other's destination failed: the next drain gave them after it, a slot's release after its lease
  // in another shard.)  Then no other drain touches a shard's spill while this one holds its records.
  if (draining_.exchange(true, std::memory_order_acquire)) return 0;
  struct Draining {
    std::atomic<bool>& flag;
    ~Draining() { flag.store(false, std::memory_order_release); }
  } draining{draining_};
  const std::uint64_t cut = record_seq_.load(std::memory_order_seq_cst);
  std::vector<std::vector<Record>> runs;
  // each run's shard, where its records begin (a spill's, past what a bounded drain took) and, once copied,
  // where those copied end: a bounded drain (max) puts the rest back, as a failed one puts back all
  struct From {
    Shard* sh;
    std::size_t first, end;
  };
  std::vector<From> from;
  // Lossless when an allocation fails once records are out of their shards: each run goes back into its
  // shard's spill, which is empty (this drain took it with the run, and no other drain runs meanwhile),
  // so the swap allocates nothing, loses nothing, and the next drain takes it first, before what was queued since.
  // A wait_ready that fell asleep while the records were out is woken as they come back (no push wakes it).
  auto put_back = [this, &runs, &from]() noexcept {
    bool back = false;
    for (std::size_t i = 0; i < runs.size(); ++i) {
      if (runs[i].empty()) continue;  // (the shard whose take failed: nothing taken)
      Shard& sh = *from[i].sh;
      std::lock_guard<SpinMutex> g(sh.mu);
      sh.spill.swap(runs[i]);
      sh.spill_at = from[i].first;
      sh.queued.store(static_cast<std::uint32_t>(sh.queue.size() + sh.spill.size() - sh.spill_at),
                      std::memory_order_seq_cst);
      back = true;
    }
    runs.clear();
    from.clear();
    try {
      notify_pushed(back ? 1 : 0);
    } catch (...) {  // (std::mutex::lock's system_error: the waiter's timeout still ends its wait)
    }
  };
  std::size_t n = 0;
  std::uint64_t lo = UINT64_MAX, hi = 0;
  try {
    for (Shard& sh : shards()) {
      if (sh.queued.load(std::memory_order_seq_cst) == 0) continue;  // nothing to lock for
      // room for every shard's run before the first is taken (may throw std::bad_alloc: nothing is taken yet),
      // so neither vector grows once a run is out of its shard
      if (from.capacity() == 0) {
        runs.reserve(shard_mask_ + 1);
        from.reserve(shard_mask_ + 1);
      }
      runs.emplace_back();
      from.push_back(From{&sh, 0, 0});
      std::vector<Record>& run = runs.back();
      std::size_t& first = from.back().first;
      {
        std::lock_guard<SpinMutex> g(sh.mu);
        if (!sh.spill.empty()) {  // after a failed or a bounded drain: the spill, then the queue up to the cut
          const auto past = std::partition_point(sh.queue.begin(), sh.queue.end(),
                                                 [cut](const Record& r) { return r.seq < cut; });
          sh.spill.insert(sh.spill.end(), sh.queue.begin(), past);  // (may throw: nothing of this shard taken)
          sh.queue.erase(sh.queue.begin(), past);
          run.swap(sh.spill);
          first = sh.spill_at;
          sh.spill_at = 0;
        } else if (!sh.queue.empty()) {
          run.swap(sh.queue);
          sh.queue.swap(sh.spare);  // empty, with the capacity of an earlier run
          if (run.back().seq >= cut) {  // pushed since this drain began: those stay, for the next drain
            const auto past =
                std::partition_point(run.begin(), run.end(), [cut](const Record& r) { return r.seq < cut; });
            try {
              sh.queue.assign(past, run.end());
              run.erase(past, run.end());
            } catch (...) {  // (no room to keep them back: taken too, as they were before the cut)
              sh.queue.clear();
            }
          }
        }
        if (!run.empty()) sh.queued.store(static_cast<std::uint32_t>(sh.queue.size()), std::memory_order_seq_cst);
      }
      if (run.empty()) {
        runs.pop_back();
        from.pop_back();
        continue;
      }
      n += run.size() - first;
      lo = std::min(lo, run[first].seq);
      hi = std::max(hi, run.back().seq);
    }
  } catch (...) {
    put_back();
    throw;
  }
  // Hand the drained buffers back as the shards' spares (after the copy below, even if dest throws); what a
  // bounded drain did not copy goes back as its shard's spill (in place: spill_at past what was taken; moved to
  // the front only once what is left is no longer than what was taken: the records moved add up to no more).
  struct GiveBack {
    Engine& eng;
    std::vector<std::vector<Record>>& runs;
    std::vector<From>& from;
    ~GiveBack() {
      bool left = false;  // (put back: a waiter asleep meanwhile is woken, as put_back wakes it)
      for (std::size_t i = 0; i < runs.size(); ++i) {
        Shard& sh = *from[i].sh;
        std::vector<Record>& run = runs[i];
        std::size_t end = from[i].end;
        if (end < run.size() && end >= run.size() - end) {
          run.erase(run.begin(), run.begin() + static_cast<std::ptrdiff_t>(end));  // (moves, never allocates)
          end = 0;
        }
        if (end == run.size()) run.clear();
        std::lock_guard<SpinMutex> g(sh.mu);
        if (!run.empty()) {  // (the spill is empty: this drain took it, and no other drain runs)
          sh.spill.swap(run);
          sh.spill_at = end;
          sh.queued.store(static_cast<std::uint32_t>(sh.queue.size() + sh.spill.size() - sh.spill_at),
                          std::memory_order_seq_cst);
          left = true;
        } else if (sh.spare.capacity() < run.capacity()) {
          sh.spare.swap(run);
        }
      }
      try {
        eng.notify_pushed(left ? 1 : 0);
      } catch (...) {
      }
    }
  } give_back{*this, runs, from};
  if (n == 0) return 0;
  const std::size_t m = std::min(n, max);
  Record* dst = nullptr;
  // the k-way merge's bookkeeping, allocated with the destination: nothing may throw once records are copied
  const bool merge = runs.size() > 1 && (m != n || hi - lo + 1 != n);
  std::vector<std::size_t> heap;
  try {
    if (merge) heap.reserve(runs.size());
    dst = dest(m);
  } catch (...) {
    put_back();  // (then give_back has nothing left to hand back)
    throw;
  }
  for (From& f : from) f.end = f.first;
  if (runs.size() == 1) {
    std::copy_n(runs[0].begin() + static_cast<std::ptrdiff_t>(from[0].first), m, dst);
    from[0].end += m;
  } else if (!merge) {
    // seqs are unique, so a gap-free range is a permutation: place every record directly, O(n)
    for (std::size_t i = 0; i < runs.size(); ++i) {
      for (std::size_t j = from[i].first; j < runs[i].size(); ++j) dst[runs[i][j].seq - lo] = runs[i][j];
      from[i].end = runs[i].size();
    }
  } else {
    // records pushed concurrently left gaps, or only the first m go: k-way merge (k = shards with records)
    auto later = [&](std::size_t a, std::size_t b) { return runs[a][from[a].end].seq > runs[b][from[b].end].seq; };
    for (std::size_t i = 0; i < runs.size(); ++i) heap.push_back(i);
    std::make_heap(heap.begin(), heap.end(), later);
    for (std::size_t c = 0; c < m; ++c) {
      std::pop_heap(heap.begin(), heap.end(), later);
      std::size_t k = heap.back();
      *dst++ = runs[k][from[k].end++];
      if (from[k].end < runs[k].size()) std::push_heap(heap.begin(), heap.end(), later);
      else heap.pop_back();
    }
  }
  if (!hold_notices) {  // the caller delivers what it drained: their tombstones are ordinary ones now
    for (std::size_t i = 0; i < runs.size(); ++i) {
      Shard& sh = *from[i].sh;
      std::lock_guard<SpinMutex> g(sh.mu);
      if (sh.held == 0) continue;
      for (std::size_t j = from[i].first; j < from[i].end; ++j) {
        const Record& r = runs[i][j];
        if (r.kind != RecordKind::TerminateNow) continue;
        const std::uint32_t idx = sh.find(Key(r.req));
        if (idx != kNil && (sh.at(idx).flags & kNotice)) sh.release_notice(idx);
      }
      evict_tombstones(sh, tomb_cap_);
    }
  }
  return m;
}

std::size_t Engine::pending() const {
  std::size_t n = 0;
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    n += sh.queue.size() + sh.spill.size() - sh.spill_at;
  }
  return n;
}

bool Engine::peek_pending() const {
  for (Shard& sh : shards())
    if (sh.queued.load(std::memory_order_relaxed) != 0) return true;
  return false;
}

void Engine::notice_delivered(std::uint64_t req) {
  const Key k(req);
  Shard& sh = shard_of(k);
  std::lock_guard<SpinMutex> g(sh.mu);
  const std::uint32_t idx = sh.find(k);  // (while held, the id names no other session: advertise refuses it)
  if (idx == kNil || !(sh.at(idx).flags & kNotice)) return;
  sh.release_notice(idx);
  evict_tombstones(sh, tomb_cap_);
}

bool Engine::wait_ready(std::int64_t timeout_ns) {
  // (kMaxWaitNs: the spin's own deadline is taken from the bounded value too)
  timeout_ns = std::clamp<std::int64_t>(timeout_ns, 0, kMaxWaitNs);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(timeout_ns);
  // Spin first, bounded by cfg_.wait_spin_ns (Config), then sleep.  The peek takes no shard lock, so
  // the transport threads are not slowed.
  if (spin_for(std::min(timeout_ns, cfg_.wait_spin_ns), [this] { return peek_pending(); })) return true;
  std::unique_lock<std::mutex> lk(wait_mu_);
  waiters_.fetch_add(1);
  bool ready = true;
  while (pending() == 0) {
    if (wait_cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
      ready = pending() != 0;
      break;
    }
  }
  waiters_.fetch_sub(1);
  return ready;
}

void Engine::set_backend_health(bool healthy, std::string reason) {
  std::lock_guard<std::mutex> g(backend_mu_);
  backend_healthy_.store(healthy);
  backend_reason_ = std::move(reason);
}

void Engine::set_health_reasons(std::uint64_t key, std::vector<std::string> reasons) {
  std::lock_guard<std::mutex> g(backend_mu_);
  auto it = std::find_if(filed_reasons_.begin(), filed_reasons_.end(), [&](const auto& f) { return f.first == key; });
  if (it == filed_reasons_.end()) {
    if (!reasons.empty()) filed_reasons_.emplace_back(key, std::move(reasons));
  } else if (reasons.empty()) {
    filed_reasons_.erase(it);
  } else {
    it->second = std::move(reasons);
  }
}

std::uint64_t Engine::add_abort_hook(AbortHook hook) {
  std::lock_guard<std::mutex> g(hooks_mu_);
  auto next = hooks_ ? std::make_shared<AbortHooks>(*hooks_) : std::make_shared<AbortHooks>();
  const std::uint64_t id = next_hook_++;
  next->emplace_back(id, std::move(hook));
  hooks_ = std::move(next);
  return id;
}

void Engine::remove_abort_hook(std::uint64_t id) {
  std::lock_guard<std::mutex> g(hooks_mu_);
  if (!hooks_) return;
  auto next = std::make_shared<AbortHooks>();
  for (const auto& h : *hooks_)
    if (h.first != id) next->push_back(h);
  hooks_ = std::move(next);
}

static std::string secs(std::int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3fs", static_cast<double>(ns) / 1e9);
  return buf;
}

Health Engine::health() {
  Health h;
  const std::int64_t now = clock_->now_ns();
  const std::int64_t deadline = cfg_.progress_deadline_ns;
  std::int64_t oldest_exposed = INT64_MAX, oldest_any = INT64_MAX;
  struct Wedge { std::uint64_t req; State st; std::int64_t age; };
  std::vector<Wedge> wedged;
  std::int64_t lp = last_progress_ns_;  // admission start, then the latest terminal entry of any shard
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    lp = std::max(lp, sh.last_terminal);
    if (sh.exposed_count() > 0) oldest_exposed = std::min(oldest_exposed, sh.exposed_since);
    for (int k = 0; k < kNumStates; ++k) h.counts[static_cast<std::size_t>(k)] += sh.count[static_cast<std::size_t>(k)];
    for (State st : {State::Advertised, State::InFlight, State::CancelRequested}) {
      std::uint32_t hd = sh.head[si(st)];
      if (hd == kNil) continue;
      const Session& s = sh.at(hd);
      oldest_any = std::min(oldest_any, s.t_state);
      if (st == State::Advertised) continue;
      // per-entry check: the oldest entry of the state past its timer + the deadline is wedged,
      // whatever the other sessions do (one progressing transfer must not hide wedged ones)
      std::int64_t timer = st == State::InFlight ? cfg_.transfer_timeout_ns : cfg_.cancel_grace_ns;
      // (without a timer there is nothing to exceed: a long queue on a slow transport is not a wedge;
      // the global progress deadline still covers it)
      if (timer > 0 && now - s.t_state > timer + deadline) wedged.push_back({s.req, st, now - s.t_state});
    }
  }
  for (int k = 0; k < kNumStates; ++k)
    if (!kFinal[k]) h.live += h.counts[static_cast<std::size_t>(k)];
  // (at least 0: `now` was read before the locks, and another thread may stamp a session after it; a negative
  // age read as "none", -1)
  h.oldest_nonterminal_ns = oldest_any == INT64_MAX ? -1 : std::max<std::int64_t>(0, now - oldest_any);
  if (oldest_exposed != INT64_MAX) {
    h.since_progress_ns = std::max<std::int64_t>(0, now - std::max(lp, oldest_exposed));
    if (h.since_progress_ns > deadline)
      h.reasons.push_back("no progress: no session reached a terminal state for " + secs(h.since_progress_ns) +
                          " while " + std::to_string(h.counts[si(State::InFlight)] + h.counts[si(State::CancelRequested)]) +
                          " exposed session(s) wait (progress_deadline " + secs(deadline) + ")");
  } else {
    h.since_progress_ns = std::max<std::int64_t>(0, now - lp);
  }
  std::sort(wedged.begin(), wedged.end(), [](const Wedge& a, const Wedge& b) { return a.age > b.age; });
  for (const Wedge& w : wedged)
    h.reasons.push_back("wedged: request " + std::to_string(w.req) + " in " + kStateNames[si(w.st)] + " for " +
                        secs(w.age) + ", past its timer + progress_deadline");
  PoolStats ps = pool_->stats();
  h.quarantined = ps.quarantined;
  h.quarantine_budget = cfg_.quarantine_budget;
  if (ps.quarantined > cfg_.quarantine_budget) {
    h.reasons.push_back("quarantine: " + std::to_string(ps.quarantined) + " slots quarantined > budget " +
                        std::to_string(cfg_.quarantine_budget));
  } else if (ps.slots > 0 && ps.quarantined == ps.slots) {
    // a budget of at least the pool's size can never be exceeded: with every slot quarantined no advertise
    // that needs one can succeed until a slot is recovered, a wedge that health called OK
    h.reasons.push_back("quarantine: every slot of the pool (" + std::to_string(ps.slots) + ") quarantined (budget " +
                        std::to_string(cfg_.quarantine_budget) + "): none can be leased until one is recovered");
  }
  {
    std::lock_guard<std::mutex> g(backend_mu_);
    h.backend_healthy = backend_healthy_.load();
    h.backend_reason = backend_reason_;
    // (an empty reason listed "backend: " with nothing after it: no cause for the operator to read)
    if (!h.backend_healthy)
      h.reasons.push_back("backend: " + (backend_reason_.empty() ? "unhealthy (no reason given)" : backend_reason_));
    for (const auto& f : filed_reasons_) h.reasons.insert(h.reasons.end(), f.second.begin(), f.second.end());
  }
  h.healthy = h.reasons.empty();
  unhealthy_.store(!h.healthy);
  return h;
}

static SessionInfo info_of(const Session& s) {
  SessionInfo i;
  i.req = s.req;
  i.role = s.role;
  i.state = s.state;
  i.outcome = s.outcome;
  i.deferred = (s.flags & kDeferred) != 0;
  i.evidence = (s.flags & kEvidence) != 0;
  i.poisoned = (s.flags & kWasPoisoned) != 0;
  i.slot = s.lease.slot();
  i.generation = s.lease.generation();
  i.state_since_ns = s.t_state;
  i.serial = s.serial;
  return i;
}

std::optional<SessionInfo> Engine::info(std::uint64_t req) const {
  const Key k(req);
  Shard& sh = shard_of(k);
  std::lock_guard<SpinMutex> g(sh.mu);
  std::uint32_t idx = sh.find(k);
  if (idx == kNil) return std::nullopt;
  return info_of(sh.at(idx));
}

void Engine::info_batch(const std::uint64_t* ids, std::size_t n, std::optional<SessionInfo>* out) const {
  for_each_by_shard(ids, n, [&](Shard& sh, const Key& k, std::size_t i) {
    const std::uint32_t idx = sh.find(k);
    if (idx == kNil) {
      out[i].reset();
    } else {
      out[i] = info_of(sh.at(idx));
    }
  });
}

Counters Engine::counters() const {
  Counters c;
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    const Counters& x = sh.ctr;
    c.transitions += x.transitions; c.illegal += x.illegal; c.late += x.late; c.unknown += x.unknown;
    c.duplicate += x.duplicate; c.deferred += x.deferred; c.terminate_now += x.terminate_now;
    c.timeouts += x.timeouts; c.grace_expired += x.grace_expired; c.quarantined += x.quarantined;
    c.recovered += x.recovered;
  }
  return c;
}

std::size_t Engine::memory_bytes() const {
  std::size_t b = sizeof(*this);
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    b += sizeof(Shard) + sh.map.capacity() * sizeof(Shard::Bucket) +
         sh.chunks.size() * kChunk * sizeof(Session) + sh.chunks.capacity() * sizeof(void*) +
         (sh.queue.capacity() + sh.spare.capacity() + sh.spill.capacity()) * sizeof(Record);
  }
  return b;
}

std::uint64_t Engine::live_sessions() const {
  std::uint64_t n = 0;
  for (Shard& sh : shards()) {
    std::lock_guard<SpinMutex> g(sh.mu);
    for (int k = 0; k < kNumStates; ++k)
      if (!kFinal[k]) n += sh.count[static_cast<std::size_t>(k)];
  }
  return n;
}

}  // namespace lifecycle
