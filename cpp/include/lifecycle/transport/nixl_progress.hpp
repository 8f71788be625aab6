// A progress thread that turns agent statuses and notifications into events (any Agent: NIXL,
// loopback, fault injector).
//
// Theory of operation
// -------------------
// The executor posts a transfer on the agent, then `watch(req)`. The progress thread loops: for each
// watched request it asks NIXL for the status (non-blocking), and it drains incoming notifications.
//   status Done            -> sink.on_complete_batch(reqs, n) with every request the pass found Done,
//                             after its polls (unwatched; still held by the agent)
//   status Failed/Unknown  -> sink.on_fail(req, why)  (request unwatched; still held by the agent)
//   notification from peer -> sink.on_notification(peer, message)
//   malformed notification -> sink.on_bad_notification(peer, bytes)
// It never blocks on one transfer; when a pass finds nothing it sleeps (backing off from
// `min_idle_sleep` to `max_idle_sleep`, or to `busy_max_sleep` while some request is watched) with
// no lock held; watch() and wake() cut the sleep short. Every `tick_interval` (when > 0) it calls
// sink.on_tick() (the engine transport fires timers and sweeps there). Sink calls are made on the progress
// thread with no lock held, so a sink may call watch()/unwatch() and the agent. The sink must not
// touch Python (DESIGN §7): it queues events for the engine.  A sink call that throws is caught and
// counted (`sink_errors`), and the thread goes on; what that call left undone stays undone (a session
// whose completion it dropped ends by the engine's timers: Poisoned, no evidence assumed).
//
// With NixlAgentOptions::nixl_progress_thread off (the default) this loop is what drives UCX, so
// every agent needs one, passive side included (a READ's target must progress to serve it).
//
// Releasing a request is the engine's call (agent.release), after unwatch(); a request that is
// released while a pass is polling it reads as Unknown and is ignored because it is no longer
// watched.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <condition_variable>

#include "lifecycle/transport/agent.hpp"

namespace lifecycle::transport {

class EventSink {
 public:
  virtual void on_complete(std::uint64_t req) = 0;
  // The requests one pass found Done, together (after its status polls): a sink may handle them in one
  // go (one engine call, one wake-up).  Default: on_complete for each, in order.
  virtual void on_complete_batch(const std::uint64_t* reqs, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) on_complete(reqs[i]);
  }
  virtual void on_fail(std::uint64_t req, const char* why) = 0;
  virtual void on_notification(const std::string& peer, const NotifMessage& m) = 0;
  virtual void on_bad_notification(const std::string& peer, const std::string& bytes) = 0;
  virtual void on_tick() {}
  // Start of every pass, on the progress thread: work queued for it (e.g. notifications that
  // executor calls must not send themselves).  Returns whether it did any.
  virtual bool on_pass() { return false; }
  virtual ~EventSink() = default;
};

struct NixlProgressOptions {
  std::chrono::microseconds min_idle_sleep{20};
  std::chrono::microseconds max_idle_sleep{1000};
  std::chrono::microseconds busy_max_sleep{50};  // sleep cap while a transfer is watched
  std::chrono::microseconds tick_interval{0};    // on_tick period; 0 = never
};

struct NixlProgressStats {
  std::uint64_t passes = 0;
  std::uint64_t status_polls = 0;
  std::uint64_t completions = 0;
  std::uint64_t failures = 0;
  std::uint64_t notifications = 0;
  std::uint64_t bad_notifications = 0;
  std::uint64_t poll_errors = 0;  // a NIXL call threw inside the loop (reported via on_fail)
  std::uint64_t sink_errors = 0;  // a sink call threw (caught; the thread went on)
};

class NixlProgress {
 public:
  // `agent` and `sink` must outlive this object. The thread starts immediately.
  NixlProgress(Agent& agent, EventSink& sink, NixlProgressOptions opts = {});
  ~NixlProgress();  // stop() + join
  NixlProgress(const NixlProgress&) = delete;
  NixlProgress& operator=(const NixlProgress&) = delete;

  void watch(std::uint64_t req);  // also wakes the thread
  void watch(const std::uint64_t* reqs, std::size_t n);  // the same for n requests: one lock, one wake
  void wake();
  void unwatch(std::uint64_t req);
  std::size_t watched() const;
  void stop();
  NixlProgressStats statistics() const;

 private:
  void run();
  bool pass();  // true when something happened
  template <class F>
  bool to_sink(F&& call);  // call(); false: it threw (caught and counted in sink_errors)

  Agent& agent_;
  EventSink& sink_;
  NixlProgressOptions opts_;
  mutable std::mutex mu_;
  // req -> the watch it is (a number no earlier watch had): a status a pass read is reported only to the
  // watch it was read for, not to a later request of the id watched meanwhile.  Guarded by mu_.
  std::map<std::uint64_t, std::uint64_t> watched_;
  std::uint64_t watches_ = 0;  // the last watch's number; guarded by mu_
  std::vector<std::uint64_t> snapshot_, gens_;  // pass()'s scratch: the watched requests and their watches
  // pass()'s scratch (the progress thread's own): each watched request's status and status error,
  // whether it is reported, and the requests found Done
  std::vector<XferStatus> statuses_;
  std::vector<std::string> errors_;
  std::vector<bool> report_;
  std::vector<std::uint64_t> done_;
  NixlProgressStats stats_;          // guarded by mu_
  std::atomic<bool> stop_{false};
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  bool woken_ = false;  // guarded by sleep_mu_
  std::thread thread_;  // Invariant: last member; started after everything above is constructed
};

}  // namespace lifecycle::transport
