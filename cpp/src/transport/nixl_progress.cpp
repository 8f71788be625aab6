#include "lifecycle/transport/nixl_progress.hpp"

#include <sys/prctl.h>

#include <algorithm>
#include <exception>
#include <vector>

namespace lifecycle::transport {

NixlProgress::NixlProgress(Agent& agent, EventSink& sink, NixlProgressOptions opts)
    : agent_(agent), sink_(sink), opts_(opts), thread_([this] { run(); }) {}

NixlProgress::~NixlProgress() { stop(); }

void NixlProgress::stop() {
  stop_.store(true);
  wake();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

template <class F>
bool NixlProgress::to_sink(F&& call) {
  try {
    call();
    return true;
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.sink_errors;
    return false;
  }
}

void NixlProgress::watch(std::uint64_t req) { watch(&req, 1); }

void NixlProgress::watch(const std::uint64_t* reqs, std::size_t n) {
  if (n == 0) return;
  // All or nothing: the nodes are made first, outside the lock (a throw changes nothing), then spliced in,
  // which allocates nothing and cannot throw.  A throw half-way used to leave part of the batch watched, and
  // a caller's one-by-one retry could then watch again a request already reported.
  std::map<std::uint64_t, std::uint64_t> add;
  for (std::size_t i = 0; i < n; ++i) add.emplace(reqs[i], 0);
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [req, watch] : add) watch = ++watches_;
    watched_.merge(add);
    for (const auto& [req, watch] : add) watched_[req] = watch;  // watched already: the new watch (no allocation)
  }
  wake();
}

void NixlProgress::wake() {
  {
    std::lock_guard<std::mutex> lk(sleep_mu_);
    woken_ = true;
  }
  sleep_cv_.notify_one();
}

void NixlProgress::unwatch(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  watched_.erase(req);
}

std::size_t NixlProgress::watched() const {
  std::lock_guard<std::mutex> lk(mu_);
  return watched_.size();
}

NixlProgressStats NixlProgress::statistics() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void NixlProgress::run() {
  // Short sleeps must stay short: the default 50 us timer slack would dominate completion latency.
  (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
  using SteadyClock = std::chrono::steady_clock;
  auto idle = opts_.min_idle_sleep;
  auto next_tick = SteadyClock::now() + opts_.tick_interval;
  while (!stop_.load()) {
    if (opts_.tick_interval.count() > 0 && SteadyClock::now() >= next_tick) {
      to_sink([&] { sink_.on_tick(); });
      next_tick = SteadyClock::now() + opts_.tick_interval;
    }
    if (pass()) {
      idle = opts_.min_idle_sleep;
      continue;
    }
    auto cap = opts_.max_idle_sleep;
    if (watched() > 0) cap = std::min(cap, opts_.busy_max_sleep);
    idle = std::min(idle, cap);
    {
      std::unique_lock<std::mutex> lk(sleep_mu_);  // no other lock held
      sleep_cv_.wait_for(lk, idle, [this] { return woken_; });
      if (woken_) idle = opts_.min_idle_sleep;
      woken_ = false;
    }
    idle = std::min(idle * 2, cap);
  }
}

bool NixlProgress::pass() {
  std::vector<std::uint64_t>& snapshot = snapshot_;
  {
    std::lock_guard<std::mutex> lk(mu_);
    snapshot.clear();
    gens_.clear();
    for (const auto& [req, watch] : watched_) {
      snapshot.push_back(req);
      gens_.push_back(watch);
    }
    ++stats_.passes;
  }
  bool progressed = false;
  to_sink([&] { progressed = sink_.on_pass(); });

  // Every watched request's status under one agent call (one hand-off of the agent's lock with a posting
  // thread, not one per request), then one lock of ours for the bookkeeping, then the reports.
  const std::size_t n = snapshot.size();
  // (InProgress until answered: should the call itself throw, the requests it did not answer are polled
  // again next pass, not failed for an error that was not theirs.)
  statuses_.assign(n, XferStatus{XferState::InProgress, 0});
  errors_.assign(n, std::string());
  bool batch_error = false;
  if (n > 0) {
    try {
      agent_.status_batch(snapshot.data(), n, statuses_.data(), errors_.data());
    } catch (...) {
      batch_error = true;
    }
  }
  report_.assign(n, false);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (batch_error) ++stats_.poll_errors;
    for (std::size_t i = 0; i < n; ++i) {
      ++stats_.status_polls;
      if (!errors_[i].empty()) ++stats_.poll_errors;
      // Only report requests still watched, by the watch the status was read for: unwatch may have raced
      // with this pass, and then the id's next request been posted and watched (its own status is unread).
      const auto w = watched_.find(snapshot[i]);
      if (statuses_[i].state != XferState::InProgress && w != watched_.end() && w->second == gens_[i]) {
        watched_.erase(w);
        report_[i] = true;
        if (statuses_[i].state == XferState::Done) {
          ++stats_.completions;
        } else {
          ++stats_.failures;
        }
      }
    }
  }
  done_.clear();  // this pass's Done requests, reported together after the failures
  for (std::size_t i = 0; i < n; ++i) {
    if (!report_[i]) continue;
    progressed = true;
    const std::uint64_t req = snapshot[i];
    std::string& error = errors_[i];
    switch (statuses_[i].state) {
      case XferState::Done:
        done_.push_back(req);
        break;
      case XferState::Failed:
        if (error.empty()) {
          error = std::string(agent_.backend_name()) + " transfer status error " +
                  std::to_string(statuses_[i].capi_status);
        }
        to_sink([&] { sink_.on_fail(req, error.c_str()); });
        break;
      case XferState::Unknown:
        to_sink([&] { sink_.on_fail(req, "no NIXL transfer request held for this id"); });
        break;
      case XferState::InProgress:
        break;  // not reported
    }
  }

  // (These requests are no longer watched: a report the sink drops is never made again.  A batch the sink
  // could not take, e.g. an allocation its size needs, goes again one request at a time, which allocates
  // nothing per batch; what a sink did of the batch before it threw, it finds done.)
  if (!done_.empty() && !to_sink([&] { sink_.on_complete_batch(done_.data(), done_.size()); }) && done_.size() > 1) {
    for (const std::uint64_t req : done_) to_sink([&] { sink_.on_complete_batch(&req, 1); });
  }

  std::vector<RawNotification> notes;
  std::size_t skipped = 0;
  try {
    notes = agent_.fetch_notifications(skipped);
  } catch (...) {
    skipped = 1;
  }
  if (skipped != 0) {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.poll_errors += skipped;
  }
  for (const RawNotification& n : notes) {
    progressed = true;
    if (auto m = decode_notif(n.bytes)) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        ++stats_.notifications;
      }
      to_sink([&] { sink_.on_notification(n.peer, *m); });
    } else {
      {
        std::lock_guard<std::mutex> lk(mu_);
        ++stats_.bad_notifications;
      }
      to_sink([&] { sink_.on_bad_notification(n.peer, n.bytes); });
    }
  }
  return progressed;
}

}  // namespace lifecycle::transport
