// LoopbackAgent: an in-process Agent that copies bytes on its own worker thread.
//
// Theory of operation
// -------------------
// Loopback agents of one process find each other through a process-wide registry (name -> endpoint);
// their "metadata" is just the name. A posted transfer becomes a job for the initiator's worker
// thread, which copies in chunks (optionally paced to `bytes_per_second`, so that a test can cancel
// "mid-transfer"; or held by the caller, `hold`, for a window no scheduler can close early), then
// marks the job Done and, with a `done_tag`, queues the Done notification at the
// peer. It mimics NIXL where DESIGN §3 cares: releasing an in-flight request returns success at once
// but the copy goes on, and a request released before its copy ends never sends its notification
// (one released after the worker's last check may still send it: the copy is whole by then, so the
// note is still true evidence).
//
// Memory safety: every chunk is copied under a process-wide shared lock after checking that both
// endpoints are alive and both ranges are still registered; deregistration and agent destruction take
// the lock exclusively, so a copy never touches memory whose owner said it is gone (the job fails).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lifecycle/transport/agent.hpp"

namespace lifecycle::transport {

// The longest `latency` (the binding takes it too).  The constructor refuses (InvalidArgumentError naming the field)
// a latency outside [0, kMaxLoopbackLatency] and a bytes_per_second that is not 0 or in [1024, 1e15].
inline constexpr std::chrono::seconds kMaxLoopbackLatency{3600};

struct LoopbackOptions {
  std::string name;
  double bytes_per_second = 0;           // 0: copy at memcpy speed
  std::chrono::microseconds latency{0};  // added before each job starts copying
  std::size_t chunk = 256 * 1024;
  // While *hold is true, a job that has copied its bytes does not finish (no Done, no notification):
  // a test keeps a transfer in flight for exactly as long as it needs, however slow the machine.
  // The worker polls it every millisecond; the agent's destruction ends the wait.
  std::shared_ptr<const std::atomic<bool>> hold;
};

class LoopbackAgent final : public Agent {
 public:
  explicit LoopbackAgent(LoopbackOptions opts);
  ~LoopbackAgent() override;
  LoopbackAgent(const LoopbackAgent&) = delete;
  LoopbackAgent& operator=(const LoopbackAgent&) = delete;

  const std::string& name() const noexcept override { return name_; }
  const char* backend_name() const noexcept override { return "loopback"; }
  RegionId register_region(const Region& r) override;
  void deregister_region(RegionId id) override;
  std::size_t registered_regions() const override;
  std::string local_metadata() override;
  std::string load_remote_metadata(const std::string& md) override;
  void invalidate_remote(const std::string& peer) override;
  bool knows_peer(const std::string& peer) const override;
  void prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
               const std::string& peer, std::optional<std::uint64_t> done_tag) override;
  XferState post(std::uint64_t req) override;
  XferStatus status(std::uint64_t req) override;
  ReleaseStatus release(std::uint64_t req) override;
  std::size_t live_requests() const override;
  void send_notification(const std::string& peer, const NotifMessage& m) override;
  std::vector<RawNotification> fetch_notifications(std::size_t& skipped) override;

  struct Endpoint;  // shared with peers through the registry (loopback.cpp)
  struct Job;

 private:
  void run();

  std::string name_;
  LoopbackOptions opts_;
  std::shared_ptr<Endpoint> ep_;
  mutable std::mutex mu_;  // guards the maps and the queue below
  std::map<std::string, std::weak_ptr<Endpoint>> peers_;
  std::map<std::uint64_t, std::shared_ptr<Job>> xfers_;  // prepared or posted, not released
  std::deque<std::shared_ptr<Job>> queue_;               // posted, not started (released ones too)
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread worker_;  // Invariant: last member
};

}  // namespace lifecycle::transport
