// The lifecycle engine: a concurrent session table driven by the generated transition table.
//
// Theory of operation
// -------------------
// Sessions live in N shards (request id -> shard by hash).  Each shard has one mutex guarding its
// hash map, its session slab, per-state intrusive lists (ordered by the time a session entered the
// state, which makes timers O(expired) and the oldest-entry health check O(shards)), per-state
// counts and its queue of records.  Every event (from executor calls, transport threads or timers)
// takes exactly one shard lock, looks up the table cell for (state, event) and applies it; so the
// engine is linearizable per session.  The engine never calls back into its caller while holding a
// lock, never blocks except in wait_ready(), and never logs: it appends Records to the shard queue,
// and the caller drains them (Python logs them and runs callbacks on its own thread).
//
// Deferred termination: terminate before a terminal state sets `deferred`.  The first move into a
// terminal state of a deferred session performs the terminate move in the same critical section and
// queues exactly one TerminateNow record; `deferred` is cleared there, so no interleaving can emit
// a second one.  That session's tombstone stays (the id taken) until the notice was delivered, so the
// executor's callback still finds it Terminated (drain_to says when it goes).
#pragma once
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lifecycle/clock.hpp"
#include "lifecycle/pool.hpp"
#include "lifecycle/table_gen.hpp"

namespace lifecycle {

enum class Role : std::uint8_t { sender, receiver };
inline constexpr const char* kRoleNames[2] = {"sender", "receiver"};

// What happened to one event.
enum class Status : std::uint8_t {
  Moved,        // the session changed state (one Transition record queued, more if deferred)
  Stay,         // accepted, nothing changed (idempotent executor call)
  Late,         // transport event after quiescence: counted, nothing changed
  Deferred,     // terminate before a terminal state (result says Deferred / AlreadyDeferred)
  Illegal,      // (state, event) has no row: session unchanged, counter incremented
  Unknown,      // no session with this id
  Duplicate,    // advertise of a live id
  NoSlot,       // advertise: the pool has no free slot
  BadArgument,  // e.g. advertise through apply(), size larger than a slot, event out of range
};
inline constexpr const char* kStatusNames[] = {"Moved",   "Stay",      "Late",   "Deferred",   "Illegal",
                                               "Unknown", "Duplicate", "NoSlot", "BadArgument"};

// The longest timer or deadline a Config may hold (1e9 s, about 31.7 years): sums of two of them and a
// clock reading stay inside int64.
inline constexpr std::int64_t kMaxDurationNs = 1'000'000'000LL * 1'000'000'000LL;

struct ApplyResult {
  Status status = Status::Unknown;
  State from = State::Advertised;  // state before the event (meaningless when Unknown)
  State to = State::Advertised;    // state after
  std::uint8_t result = 0xff;      // CancelResult / TerminateResult code for cancel / terminate
  std::uint64_t serial = 0;        // the session's serial (0 when Unknown, BadArgument or NoSlot)
};

// CallResult: what cancel / terminate answered (result code in Record::result), queued in the same
// critical section as the event so the log shows results in causal order with the transitions.
enum class RecordKind : std::uint8_t {
  Transition, TerminateNow, SlotQuarantined, BufferRecovered, LateEvent, IllegalEvent, CallResult
};
inline constexpr const char* kRecordKindNames[] = {"Transition",  "TerminateNow", "SlotQuarantined", "BufferRecovered",
                                                   "LateEvent",   "IllegalEvent", "CallResult"};
inline constexpr std::uint8_t kNoState = 0xff;  // Record::from of the creating advertise

struct Record {
  std::uint64_t req;
  std::int64_t t_ns;
  std::uint32_t slot;
  std::uint32_t gen;
  RecordKind kind;
  std::uint8_t from;     // State, or kNoState
  std::uint8_t to;       // State
  std::uint8_t event;    // Event
  std::uint8_t outcome;  // Outcome
  std::uint8_t role;     // Role
  std::uint8_t deferred; // 1 on the Terminated transition of a deferred terminate
  std::uint8_t result;   // CallResult: the CancelResult / TerminateResult code; else 0xff
  // Engine-wide order: one atomic counter, so a record made after another causally (e.g. a slot
  // leased by one shard after another shard released it) always has the larger seq.
  std::uint64_t seq;
};
static_assert(sizeof(Record) == 40);

// The longest wait a blocking call takes (2**61 ns, 73 years): a caller's INT64_MAX, "for ever", added to now
// overflowed and wrapped into the past (the wait returned at once).  wait_ready() and the transport's
// wait_completions() clamp to it.
inline constexpr std::int64_t kMaxWaitNs = std::int64_t{1} << 61;

struct Config {
  std::int64_t transfer_timeout_ns = 30'000'000'000;  // 0: no timer (negative: InvalidArgumentError)
  std::int64_t cancel_grace_ns = 5'000'000'000;       // 0: no timer (CancelRequested waits forever); not negative
  std::int64_t progress_deadline_ns = 60'000'000'000;
  std::uint32_t quarantine_budget = 64;
  std::uint32_t num_slots = 0;
  std::uint64_t slot_size = 0;
  // Terminated sessions remembered (for late events), all shards: each keeps tombstones / shards rounded up
  std::uint32_t tombstones = 1u << 16;
  std::uint32_t shards = 16;            // rounded up to a power of two
  // wait_ready spins (yielding) this long on a lock-free peek before it sleeps on the condition
  // variable: a completion usually lands within a few hundred microseconds of the wait, and a sleep
  // costs a futex wake-up plus a cold CPU (measured: completion -> poll p99 28 us vs 60-100 us with
  // a 50 us spin on the 2-core VM, docs/transport-measurements.md, session 3).  0: sleep at once.
  std::int64_t wait_spin_ns = 250'000;
};

struct Health {
  bool healthy = true;
  std::vector<std::string> reasons;
  std::array<std::uint64_t, kNumStates> counts{};
  std::uint32_t quarantined = 0;
  std::uint32_t quarantine_budget = 0;
  std::int64_t oldest_nonterminal_ns = -1;  // age of the oldest non-terminal session in its state
  std::int64_t since_progress_ns = -1;      // since the last terminal entry, or the oldest exposure if later
  bool backend_healthy = true;
  std::string backend_reason;
  std::uint64_t live = 0;  // sessions not Terminated
};

struct Counters {
  std::uint64_t transitions = 0, illegal = 0, late = 0, unknown = 0, duplicate = 0, deferred = 0,
                terminate_now = 0, timeouts = 0, grace_expired = 0, quarantined = 0, recovered = 0;
};

struct SessionInfo {
  std::uint64_t req = 0;
  Role role = Role::sender;
  State state = State::Advertised;
  Outcome outcome = Outcome::none;
  bool deferred = false;
  bool evidence = false;  // a late DONE arrived after Poisoned
  bool poisoned = false;  // it entered Poisoned (still known once Terminated, while its tombstone lives)
  std::uint32_t slot = kNoSlot;
  std::uint32_t generation = 0;
  std::int64_t state_since_ns = 0;
  // Names this session among every session of the engine: a request id advertised again (after its
  // tombstone went) gets another.  Never 0.
  std::uint64_t serial = 0;
};

class Engine {
 public:
  explicit Engine(Config cfg, std::shared_ptr<const Clock> clock = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Executor and transport calls: thread-safe, never block beyond one shard lock, and throw nothing but
  // std::bad_alloc, which leaves the item it failed on untouched (everything an item allocates is taken before
  // it changes anything).  A batch or tick() that throws keeps the items it applied before: their records stay
  // queued, their waiters are woken and their aborts run; the items after it are not applied.
  ApplyResult advertise(std::uint64_t req, Role role, std::uint64_t nbytes);
  ApplyResult apply(std::uint64_t req, Event ev);
  // The same, only to the session with that serial: another session of `req` (the id advertised again)
  // answers Unknown and is not touched.  What a transport uses for evidence that names one session.
  ApplyResult apply(std::uint64_t req, Event ev, std::uint64_t serial);
  // Batch: one clock read and one wake-up for the whole call; out[i] = Status of item i.
  // Items with an event code out of range or the creating event get BadArgument.
  void apply_batch(const std::uint64_t* ids, const std::uint8_t* events, std::size_t n, std::uint8_t* out);
  // The same with apply(req, ev, serial)'s answer for each item: item i goes only to the session with
  // serials[i] (0, or `serials` null: whichever holds ids[i]).  What a transport's batch uses.
  void apply_batch(const std::uint64_t* ids, const std::uint8_t* events, const std::uint64_t* serials,
                   std::size_t n, ApplyResult* out);
  void advertise_batch(const std::uint64_t* ids, std::size_t n, Role role, std::uint64_t nbytes, std::uint8_t* out);
  CancelResult cancel(std::uint64_t req);
  TerminateResult terminate(std::uint64_t req);

  // Fire expired timers (timeout, grace_expired).  Returns how many fired.  O(shards + fired).
  std::size_t tick();
  // Append every queued record to `out` in seq order (causal order), without blocking.
  std::size_t drain(std::vector<Record>& out);
  // The same, into dest(n): called once (when n > 0) for room for exactly n records, so a caller
  // can merge straight into its own buffer (the binding: a Python bytes object).
  // A deferred session's tombstone is kept (never evicted, its id not advertised again) until its
  // TerminateNow was delivered: by the drain that takes the notice, or with hold_notices by
  // notice_delivered(req), called once the executor's callback ran (the Python facade's poll()).
  // Lossless: when dest (or the drain's own allocation) throws, every record taken goes back without allocating,
  // in order, ahead of what was queued since, so memory running out again loses none.  One drain at a time: a
  // drain (drain_to) while another is under way (another thread, or dest's own) returns 0 at once, taking nothing,
  // so the drains that return records come out in seq order, across shards too.
  // At most `max` records (the first, in seq order; 0: none): the rest stays queued, ahead of what is queued
  // since, for the next drain.  Returns how many it gave.
  std::size_t drain_to(const std::function<Record*(std::size_t)>& dest, bool hold_notices = false,
                       std::size_t max = SIZE_MAX);
  void notice_delivered(std::uint64_t req);
  // Block (no GIL: callers release it) until a record is queued or timeout_ns elapses (steady time).
  // Records a drain puts back (what a bounded drain left, all a failed one took) wake it as a push does.
  bool wait_ready(std::int64_t timeout_ns);
  // Earliest pending timer deadline on the engine clock; INT64_MAX when none.
  std::int64_t next_deadline_ns() const;
  std::size_t pending() const;

  Health health();
  bool unhealthy() const { return unhealthy_.load(std::memory_order_relaxed); }
  void set_backend_health(bool healthy, std::string reason);
  // Reasons a transport files under its key (its abort hook's id): health() lists them while they stand.  Each
  // call replaces that key's list (empty: withdrawn).  Made when they change, never on a transfer's path.
  void set_health_reasons(std::uint64_t key, std::vector<std::string> reasons);
  // Called (outside every engine lock) for sessions that entered CancelRequested: the transport
  // must abort/ask its peer to stop.  Every transport that drives this engine adds its own hook
  // (each ignores requests it holds nothing for); remove_abort_hook(id) takes one out (a hook that is
  // running finishes first only if the caller ensures it, e.g. Transport's relay).  Thread-safe.
  // The hook gets the session's serial: it runs after the shard lock is released, so by then that
  // session may have ended and the id been advertised again (another serial), which it must not touch.
  // A hook that throws keeps no other hook or abort from running; the call then throws its first error
  // (the events stay applied).
  struct Abort {
    std::uint64_t req;
    Role role;
    std::uint64_t serial;
  };
  using AbortHook = std::function<void(const Abort&)>;
  std::uint64_t add_abort_hook(AbortHook hook);
  void remove_abort_hook(std::uint64_t id);

  std::optional<SessionInfo> info(std::uint64_t req) const;
  // out[i] = info(ids[i]), grouped by shard like apply_batch (one lock hold per shard, lookups prefetched).
  void info_batch(const std::uint64_t* ids, std::size_t n, std::optional<SessionInfo>* out) const;
  Counters counters() const;
  const Config& config() const { return cfg_; }
  BufferPool* pool() { return pool_.get(); }
  const Clock& clock() const { return *clock_; }
  std::int64_t now_ns() const { return clock_->now_ns(); }
  std::size_t memory_bytes() const;  // bytes held by the session table (maps + slabs + queues)
  std::uint64_t live_sessions() const;

 struct Shard;  // implementation detail (engine.cpp)
 struct ForkGuard;  // pthread_atfork handlers (engine.cpp)
 struct Key;    // a request id, mixed (engine.cpp)

 private:
  // fork(): every lock of the engine is taken before and released after (in the child too, where the
  // threads that could have held one do not exist), so a forked child never inherits one held.
  void lock_for_fork();
  void unlock_after_fork(bool child);
  Shard& shard_of(const Key& k) const;
  std::span<Shard> shards() const;
  bool degraded() const;
  bool peek_pending() const;  // lock-free, may miss a record being pushed right now
  template <class Fn>
  void for_each_by_shard(const std::uint64_t* ids, std::size_t n, Fn&& fn) const;
  template <class Fn>
  void group_slice(const std::uint64_t* ids, std::size_t base, std::size_t stop, Fn& fn) const;  // unhealthy or backend down: cancels answer BackendUnhealthy
  template <class Put>  // both apply_batch: put(i, result) for each item
  void apply_many(const std::uint64_t* ids, const std::uint8_t* events, const std::uint64_t* serials,
                  std::size_t n, Put&& put);
  void notify_pushed(std::size_t n);
  void run_aborts(std::vector<Abort>& aborts);
  void finish_after_throw(std::size_t pushed, std::vector<Abort>& aborts) noexcept;

  Config cfg_;
  std::shared_ptr<const Clock> clock_;
  std::unique_ptr<BufferPool> pool_;  // declared before shards_: leases die first
  std::unique_ptr<Shard[]> shards_;
  std::uint64_t shard_mask_;
  std::uint32_t tomb_cap_;           // tombstones kept per shard
  std::int64_t last_progress_ns_;    // admission start; shards keep their own last terminal entry
  std::atomic<bool> unhealthy_{false};
  std::atomic<std::uint64_t> record_seq_{0};
  std::atomic<bool> draining_{false};  // a drain is under way (drain_to: one at a time)
  std::atomic<bool> backend_healthy_{true};
  std::mutex backend_mu_;
  std::string backend_reason_;
  std::vector<std::pair<std::uint64_t, std::vector<std::string>>> filed_reasons_;  // (key, reasons); backend_mu_
  std::mutex hooks_mu_;
  std::uint64_t next_hook_ = 1;  // guarded by hooks_mu_
  // replaced, never mutated (copy on write): run_aborts calls a snapshot outside every lock
  using AbortHooks = std::vector<std::pair<std::uint64_t, AbortHook>>;  // (id, hook)
  std::shared_ptr<const AbortHooks> hooks_;  // guarded by hooks_mu_
  // wait_ready
  std::atomic<std::uint32_t> waiters_{0};
  std::mutex wait_mu_;
  std::condition_variable wait_cv_;
};

}  // namespace lifecycle
