#include "lifecycle/pool.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "lifecycle/errors.hpp"

namespace lifecycle {

void Lease::give_back() {
  held_ = false;
  pool_->do_release(slot_, gen_);
}

void Lease::quarantine() {
  if (held_) {
    held_ = false;
    pool_->do_quarantine(slot_, gen_);
  }
}

void BufferPool::Unmap::operator()(std::uint8_t* p) const noexcept {
  if (p != nullptr) munmap(p, bytes);
}

namespace {
std::atomic<std::uint64_t> g_stranded_bytes{0};
}

std::uint64_t BufferPool::stranded_bytes() noexcept { return g_stranded_bytes.load(); }

BufferPool::~BufferPool() {
  if (quarantined_ == 0 || !mem_) return;  // mem_ unmaps it all
  const std::size_t total = mem_.get_deleter().bytes;
  std::uint8_t* base = mem_.release();
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::size_t from = 0, kept = 0;  // [0, from) is decided: unmapped, or kept for a quarantined slot
  for (std::size_t s = 0; s < state_.size(); ++s) {
    if (state_[s] != SlotState::Quarantined) continue;
    const std::size_t lo = s * slot_size_ / page * page;
    const std::size_t hi = std::min(total, ((s + 1) * slot_size_ + page - 1) / page * page);
    if (lo > from) munmap(base + from, lo - from);
    if (hi > std::max(lo, from)) kept += hi - std::max(lo, from);
    from = std::max(from, hi);
  }
  if (total > from) munmap(base + from, total - from);
  g_stranded_bytes += kept;
}

BufferPool::BufferPool(std::uint32_t num_slots, std::uint64_t slot_size)
    : slot_size_(slot_size), num_slots_(num_slots), mem_(nullptr, Unmap{0}) {
  if (num_slots > 0 && slot_size == 0) throw InvalidArgumentError("slot_size", "must be > 0 when num_slots > 0");
  if (num_slots > 0 && slot_size > (std::uint64_t{1} << 40) / num_slots)
    throw InvalidArgumentError("slot_size", "num_slots * slot_size exceeds 1 TiB");
  if (num_slots > 0) {
    std::size_t bytes = static_cast<std::size_t>(num_slots) * slot_size;
    std::size_t rounded = (bytes + 4095) & ~std::size_t{4095};
    void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw InvalidArgumentError("num_slots", "cannot map " + std::to_string(bytes) + " bytes");
    mem_ = std::unique_ptr<std::uint8_t, Unmap>(static_cast<std::uint8_t*>(p), Unmap{rounded});
  }
  // Bookkeeping for the first slots up front (no reallocation on the lease path of a small pool); the
  // rest grows with use.
  const std::uint32_t first = std::min<std::uint32_t>(num_slots, 4096);
  state_.reserve(first);
  gen_.reserve(first);
  free_.reserve(first);
}

Lease BufferPool::lease() {
  std::lock_guard<std::mutex> g(mu_);
  std::uint32_t s;
  if (!free_.empty()) {
    s = free_.back();
    free_.pop_back();
  } else if (state_.size() < num_slots_) {  // the lowest never-leased slot (free_ is empty: none touched is free)
    s = static_cast<std::uint32_t>(state_.size());
    // free_ holds each touched slot at most once: room for this one now, so release() (a Lease's destructor)
    // and recover() never allocate
    if (free_.capacity() <= state_.size()) free_.reserve(std::max(state_.size() + 1, free_.capacity() * 2));
    state_.push_back(SlotState::Free);  // may throw std::bad_alloc: nothing changed yet but a Free entry
    try {
      gen_.push_back(0);
    } catch (...) {
      state_.pop_back();
      throw;
    }
  } else {
    return Lease();
  }
  // Invariant: a slot on the free list is Free (no slot leased twice).
  if (state_[s] != SlotState::Free) std::abort();
  state_[s] = SlotState::Leased;
  ++leases_;
  return Lease(this, s, ++gen_[s]);
}

void BufferPool::do_release(std::uint32_t slot, std::uint32_t gen) {
  std::lock_guard<std::mutex> g(mu_);
  if (state_[slot] != SlotState::Leased || gen_[slot] != gen) std::abort();  // internal invariant
  state_[slot] = SlotState::Free;
  free_.push_back(slot);
}

void BufferPool::do_quarantine(std::uint32_t slot, std::uint32_t gen) {
  std::lock_guard<std::mutex> g(mu_);
  if (state_[slot] != SlotState::Leased || gen_[slot] != gen) std::abort();  // internal invariant
  state_[slot] = SlotState::Quarantined;
  ++quarantined_;
}

bool BufferPool::recover(std::uint32_t slot, std::uint32_t generation) {
  std::lock_guard<std::mutex> g(mu_);
  if (slot >= state_.size() || state_[slot] != SlotState::Quarantined || gen_[slot] != generation) return false;
  state_[slot] = SlotState::Free;
  --quarantined_;
  ++recovered_;
  free_.push_back(slot);
  return true;
}

std::uint8_t* BufferPool::data(std::uint32_t slot) const {
  if (slot >= num_slots_) return nullptr;
  return mem_.get() + static_cast<std::size_t>(slot) * slot_size_;
}

SlotState BufferPool::state(std::uint32_t slot) const {
  std::lock_guard<std::mutex> g(mu_);
  if (slot >= num_slots_) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
  return slot < state_.size() ? state_[slot] : SlotState::Free;
}

std::uint32_t BufferPool::generation(std::uint32_t slot) const {
  std::lock_guard<std::mutex> g(mu_);
  if (slot >= num_slots_) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
  return slot < gen_.size() ? gen_[slot] : 0;
}

std::uint32_t BufferPool::touched() const {
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<std::uint32_t>(state_.size());
}

PoolStats BufferPool::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  PoolStats s;
  s.slots = num_slots_;
  s.free = static_cast<std::uint32_t>(free_.size() + (num_slots_ - state_.size()));
  s.quarantined = quarantined_;
  s.leased = s.slots - s.free - s.quarantined;
  s.leases = leases_;
  s.recovered = recovered_;
  s.slot_size = slot_size_;
  return s;
}

}  // namespace lifecycle
