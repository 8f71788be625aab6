// Buffer pool: fixed-size slots leased to sessions through RAII leases.
//
// Invariant: every slot is in exactly one of Free, Leased, Quarantined.
// Invariant: a slot's generation increases on every lease, so (slot, generation) names one lease (no ABA).
// Invariant: a Quarantined slot returns to Free only through recover(slot, generation) with the
//            generation of the lease that was quarantined (positive evidence tied to that transfer).
//
// Bookkeeping is lazy: slots [touched(), num_slots()) have never been leased (Free, generation 0) and
// cost nothing, so a pool's memory grows with the slots it has used, like its anonymous data mapping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace lifecycle {

class BufferPool;

enum class SlotState : std::uint8_t { Free, Leased, Quarantined };

inline constexpr std::uint32_t kNoSlot = 0xffffffffu;

// Move-only owner of one leased slot.  Destroying a held lease returns the slot to the pool;
// quarantine() hands it to the pool's quarantine instead (the lease then owns nothing).
class Lease {
 public:
  Lease() = default;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  Lease(Lease&& o) noexcept : pool_(o.pool_), slot_(o.slot_), gen_(o.gen_), held_(o.held_) { o.held_ = false; }
  Lease& operator=(Lease&& o) noexcept {
    if (this != &o) {
      release();
      pool_ = o.pool_;
      slot_ = o.slot_;
      gen_ = o.gen_;
      held_ = o.held_;
      o.held_ = false;
    }
    return *this;
  }
  ~Lease() { release(); }

  bool held() const { return held_; }
  std::uint32_t slot() const { return slot_; }
  std::uint32_t generation() const { return gen_; }
  // back to Free (only when the caller holds proof of quiescence)
  void release() {
    if (held_) give_back();
  }
  void quarantine();  // to Quarantined (quiescence unknown)

 private:
  friend class BufferPool;
  Lease(BufferPool* p, std::uint32_t s, std::uint32_t g) : pool_(p), slot_(s), gen_(g), held_(true) {}
  void give_back();
  BufferPool* pool_ = nullptr;
  std::uint32_t slot_ = kNoSlot;
  std::uint32_t gen_ = 0;
  bool held_ = false;
};

struct PoolStats {
  std::uint32_t slots = 0;
  std::uint32_t free = 0;
  std::uint32_t leased = 0;
  std::uint32_t quarantined = 0;
  std::uint64_t leases = 0;      // total leases granted
  std::uint64_t recovered = 0;   // quarantined slots returned by evidence
  std::uint64_t slot_size = 0;
};

class BufferPool {
 public:
  BufferPool(std::uint32_t num_slots, std::uint64_t slot_size);
  // Unmaps the pool, except the pages of a quarantined slot: its quiescence is unknown, so a transfer
  // may still write it, and freed memory would take those bytes.  Those pages stay mapped for the life
  // of the process (counted in stranded_bytes()).
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // An empty (not held) lease when no slot is free.
  Lease lease();
  // Quarantined -> Free when (slot, generation) is the quarantined lease; false otherwise.
  bool recover(std::uint32_t slot, std::uint32_t generation);

  std::uint8_t* data(std::uint32_t slot) const;  // nullptr for kNoSlot / out of range
  std::uint8_t* base() const { return mem_.get(); }
  std::uint64_t slot_size() const { return slot_size_; }
  std::uint32_t num_slots() const { return num_slots_; }
  std::size_t bytes() const { return static_cast<std::size_t>(slot_size_) * num_slots_; }
  std::uint32_t touched() const;  // slots ever leased: the bookkeeping kept
  SlotState state(std::uint32_t slot) const;
  std::uint32_t generation(std::uint32_t slot) const;
  PoolStats stats() const;
  // Bytes that destroyed pools kept mapped for quarantined slots, in this process so far.
  static std::uint64_t stranded_bytes() noexcept;
  // Held across fork() (the engine's pthread_atfork handlers): a child never inherits it locked.
  void lock_for_fork() const { mu_.lock(); }
  void unlock_after_fork() const { mu_.unlock(); }

 private:
  friend class Lease;
  void do_release(std::uint32_t slot, std::uint32_t gen);
  void do_quarantine(std::uint32_t slot, std::uint32_t gen);

  struct Unmap {
    std::size_t bytes;
    void operator()(std::uint8_t* p) const noexcept;
  };
  std::uint64_t slot_size_;
  std::uint32_t num_slots_;
  std::unique_ptr<std::uint8_t, Unmap> mem_;  // anonymous mapping: page-aligned, zeroed lazily by the OS
  mutable std::mutex mu_;
  std::vector<SlotState> state_;     // slots [0, touched): the rest are Free, generation 0
  std::vector<std::uint32_t> gen_;   // same length as state_
  std::vector<std::uint32_t> free_;  // LIFO free list of touched slots; untouched ones are leased in order
  std::uint32_t quarantined_ = 0;
  std::uint64_t leases_ = 0;
  std::uint64_t recovered_ = 0;
};

}  // namespace lifecycle
