#include "lifecycle/transport/loopback.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <shared_mutex>

#include "lifecycle/error_base.hpp"           // InvalidArgumentError
#include "lifecycle/transport/nixl_capi.hpp"  // TransportError

namespace lifecycle::transport {

namespace {

constexpr const char* kMdPrefix = "KVLC-LOOPBACK/1:";

// Held shared while a chunk is copied; exclusively while memory stops being valid.
std::shared_mutex& mem_mutex() {
  static std::shared_mutex m;
  return m;
}

// The same copy through a pipe (write from src, read into dst: each fails with EFAULT on memory it cannot
// read or write), for where process_vm_readv is refused (a seccomp filter: ENOSYS or EPERM).  Each worker
// thread has its own pipe; after an error it is replaced, so no bytes of a failed copy stay in it.
int pipe_copy(std::uint8_t* dst, const std::uint8_t* src, std::size_t n) {
  struct Pipe {
    int fd[2] = {-1, -1};
    ~Pipe() { reset(); }
    void reset() {
      for (int& f : fd) {
        if (f >= 0) ::close(f);
        f = -1;
      }
    }
  };
  thread_local Pipe p;
  // Non-blocking: a pipe can hold less than 64 KiB (pipe-user-pages-soft reached: 1-2 pages), and a blocking
  // write larger than it would wait for a reader that is this very thread.  A short write is fine: its bytes
  // are read back before the next one, so the pipe is empty at every write.
  constexpr std::size_t kStep = 64 * 1024;
  while (n > 0) {
    if (p.fd[0] < 0 && ::pipe2(p.fd, O_CLOEXEC | O_NONBLOCK) != 0) return errno;
    const std::size_t step = std::min(n, kStep);
    ssize_t put;
    do put = ::write(p.fd[1], src, step); while (put < 0 && errno == EINTR);
    if (put <= 0) {
      const int err = put < 0 ? errno : EFAULT;
      p.reset();
      return err;
    }
    for (ssize_t got_all = 0; got_all < put;) {
      ssize_t got;
      do got = ::read(p.fd[0], dst + got_all, static_cast<std::size_t>(put - got_all)); while (got < 0 && errno == EINTR);
      if (got <= 0) {
        const int err = got < 0 ? errno : EFAULT;
        p.reset();  // (the unread bytes go with it)
        return err;
      }
      got_all += got;
    }
    dst += put;
    src += put;
    n -= static_cast<std::size_t>(put);
  }
  return 0;
}

// Whether copies go through a pipe: $LIFECYCLE_LOOPBACK_COPY is "pipe" (tests), or process_vm_readv was refused.
// The variable is read once per process, by the first agent's constructor: the bindings make agents with the GIL
// held, and getenv beside a Python thread's os.environ change (putenv / unsetenv) is undefined.
std::atomic<bool>& use_pipe() {
  static std::atomic<bool> pipe{[] {
    const char* v = std::getenv("LIFECYCLE_LOOPBACK_COPY");
    return v != nullptr && std::strcmp(v, "pipe") == 0;
  }()};
  return pipe;
}

// Copies n bytes src -> dst through the kernel (process_vm_readv on this process), so a registered range that
// is not mapped readable (src) or writable (dst) -- a raw Mem the caller freed or never owned -- fails the
// copy with EFAULT instead of a SIGSEGV.  Returns 0 or the errno.  Where that call is refused (a seccomp
// filter: ENOSYS or EPERM), or $LIFECYCLE_LOOPBACK_COPY is "pipe" (tests), the copy goes through a pipe.
int checked_copy(std::uint8_t* dst, const std::uint8_t* src, std::size_t n) {
  std::atomic<bool>& pipe = use_pipe();
  const pid_t self = ::getpid();
  while (n > 0) {
    if (pipe.load(std::memory_order_relaxed)) return pipe_copy(dst, src, n);
    iovec l{dst, n};
    iovec r{const_cast<std::uint8_t*>(src), n};
    const ssize_t got = ::process_vm_readv(self, &l, 1, &r, 1, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOSYS || errno == EPERM) {
        pipe.store(true, std::memory_order_relaxed);
        continue;
      }
      return errno;
    }
    if (got == 0) return EFAULT;
    dst += got;
    src += got;
    n -= static_cast<std::size_t>(got);
  }
  return 0;
}

}  // namespace

struct LoopbackAgent::Endpoint {
  std::string name;
  bool alive = true;                            // guarded by mem_mutex()
  std::map<RegionId, Region> regions;           // guarded by mem_mutex()
  RegionId next_region = 1;                     // guarded by mem_mutex()
  std::mutex inbox_mu;
  std::vector<RawNotification> inbox;           // guarded by inbox_mu

  bool covers(const Region& r) const {  // caller holds mem_mutex() (shared or exclusive)
    for (const auto& [id, reg] : regions) {
      (void)id;
      if (reg.contains(r)) return true;
    }
    return false;
  }
  void deliver(RawNotification n) {
    std::lock_guard<std::mutex> lk(inbox_mu);
    inbox.push_back(std::move(n));
  }
};

struct LoopbackAgent::Job {
  std::uint64_t req = 0;
  XferOp op = XferOp::Read;
  Region local, remote;
  std::string peer;
  std::optional<std::uint64_t> done_tag;  // the Done note for the peer, if any
  std::weak_ptr<Endpoint> peer_ep;
  std::atomic<int> state{0};  // 0 prepared/in progress, 1 done, 2 failed (a disconnect), 3 the copy faulted
  std::string fault;          // state 3: what faulted (written before the state's release store)
  std::atomic<bool> released{false};
  bool posted = false;  // guarded by the agent's mu_
};

namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, std::weak_ptr<LoopbackAgent::Endpoint>>& registry() {
  static std::map<std::string, std::weak_ptr<LoopbackAgent::Endpoint>> r;
  return r;
}

}  // namespace

LoopbackAgent::LoopbackAgent(LoopbackOptions opts)
    : name_(opts.name), opts_(std::move(opts)), ep_(std::make_shared<Endpoint>()) {
  if (name_.empty()) throw TransportError("loopback agent: empty name");
  // (a latency past the bound overflowed the clock's nanoseconds in the worker's wait, which then did not wait; a
  // pace under 1 KiB/s made a copy's deadline overflow the clock)
  if (opts_.latency.count() < 0 || opts_.latency > kMaxLoopbackLatency) {
    throw InvalidArgumentError("latency", "expected a delay in [0, " + std::to_string(kMaxLoopbackLatency.count()) +
                                              " s], got " + std::to_string(opts_.latency.count()) + " us");
  }
  const double bps = opts_.bytes_per_second;
  if (!std::isfinite(bps) || (bps != 0 && !(bps >= 1024)) || bps > 1e15) {
    throw InvalidArgumentError("bytes_per_second", "expected 0 (unpaced) or a rate in [1024, 1e15] bytes/s, got " +
                                                       std::to_string(bps));
  }
  if (opts_.chunk == 0) opts_.chunk = 256 * 1024;
  (void)use_pipe();  // reads the environment here, not on the worker (see use_pipe)
  ep_->name = name_;
  {
    std::lock_guard<std::mutex> lk(registry_mutex());
    auto& slot = registry()[name_];
    if (!slot.expired()) throw TransportError("loopback agent: name " + name_ + " already in use");
    slot = ep_;
  }
  worker_ = std::thread([this] { run(); });
}

LoopbackAgent::~LoopbackAgent() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  {
    std::unique_lock<std::shared_mutex> mem(mem_mutex());
    ep_->alive = false;
    ep_->regions.clear();
  }
  std::lock_guard<std::mutex> lk(registry_mutex());
  auto it = registry().find(name_);
  if (it != registry().end() && it->second.lock() == ep_) registry().erase(it);
}

Agent::RegionId LoopbackAgent::register_region(const Region& r) {
  if (!r.valid()) throw TransportError(std::string("register_region: the region is ") + Region::kRefused);
  if (r.kind != MemKind::Dram) throw TransportError("loopback agent: only DRAM can be registered");
  std::unique_lock<std::shared_mutex> mem(mem_mutex());
  const RegionId id = ep_->next_region++;
  ep_->regions.emplace(id, r);
  return id;
}

void LoopbackAgent::deregister_region(RegionId id) {
  std::unique_lock<std::shared_mutex> mem(mem_mutex());  // waits for chunks in flight
  if (ep_->regions.erase(id) == 0) {
    throw TransportError("deregister_region: unknown region " + std::to_string(id));
  }
}

std::size_t LoopbackAgent::registered_regions() const {
  std::shared_lock<std::shared_mutex> mem(mem_mutex());
  return ep_->regions.size();
}

std::string LoopbackAgent::local_metadata() { return kMdPrefix + name_; }

std::string LoopbackAgent::load_remote_metadata(const std::string& md) {
  const std::string prefix = kMdPrefix;
  if (md.compare(0, prefix.size(), prefix) != 0) {
    throw TransportError("load_remote_metadata: not loopback metadata");
  }
  std::string peer = md.substr(prefix.size());
  std::shared_ptr<Endpoint> ep;
  {
    std::lock_guard<std::mutex> lk(registry_mutex());
    auto it = registry().find(peer);
    if (it != registry().end()) ep = it->second.lock();
  }
  if (!ep) throw TransportError("load_remote_metadata: no live loopback agent named " + peer);
  std::lock_guard<std::mutex> lk(mu_);
  peers_[peer] = ep;
  return peer;
}

bool LoopbackAgent::knows_peer(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(mu_);
  return peers_.count(peer) != 0;
}

void LoopbackAgent::invalidate_remote(const std::string& peer) {
  std::lock_guard<std::mutex> lk(mu_);
  peers_.erase(peer);
}

void LoopbackAgent::prepare(std::uint64_t req, XferOp op, const Region& local,
                            const Region& remote, const std::string& peer, std::optional<std::uint64_t> done_tag) {
  const std::string ctx = "request " + std::to_string(req);
  if (local.len != remote.len) throw TransportError("post: " + ctx + ": lengths differ");
  if (!local.valid() || !remote.valid()) {
    throw TransportError("post: " + ctx + ": a range is " + Region::kRefused);
  }
  auto job = std::make_shared<Job>();
  job->req = req;
  job->op = op;
  job->local = local;
  job->remote = remote;
  job->peer = peer;
  job->done_tag = done_tag;
  std::lock_guard<std::mutex> lk(mu_);
  auto p = peers_.find(peer);
  if (p == peers_.end()) throw TransportError("post: " + ctx + ": unknown peer " + peer);
  auto pep = p->second.lock();
  if (!pep) throw TransportError("post: " + ctx + ": peer " + peer + " is gone");
  {
    std::shared_lock<std::shared_mutex> mem(mem_mutex());
    if (!ep_->covers(local)) throw TransportError("post: " + ctx + ": local range not registered");
    if (!pep->alive || !pep->covers(remote)) {
      throw TransportError("post: " + ctx + ": remote range not registered at " + peer);
    }
  }
  if (xfers_.count(req) != 0) throw TransportError("post: " + ctx + " already has a live transfer");
  job->peer_ep = pep;
  xfers_.emplace(req, std::move(job));
}

XferState LoopbackAgent::post(std::uint64_t req) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = xfers_.find(req);
    if (it == xfers_.end() || it->second->posted) {
      throw TransportError("post: request " + std::to_string(req) + " not prepared or already posted");
    }
    it->second->posted = true;
    queue_.push_back(it->second);
  }
  cv_.notify_all();
  return XferState::InProgress;
}

XferStatus LoopbackAgent::status(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  if (it == xfers_.end() || !it->second->posted) return {XferState::Unknown, 0};
  switch (it->second->state.load()) {
    case 0:
      return {XferState::InProgress, 1};
    case 1:
      return {XferState::Done, 0};
    case 3:
      throw TransportError(it->second->fault);  // status_batch turns it into Failed with this reason
    default:
      return {XferState::Failed, -2};
  }
}

ReleaseStatus LoopbackAgent::release(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  if (it == xfers_.end()) return kReleaseUnknownRequest;
  // Like NIXL/UCX: returns at once; a job already queued or copying still lands its bytes, but a
  // released request never sends its notification.
  it->second->released.store(true);
  xfers_.erase(it);
  return kReleased;
}

std::size_t LoopbackAgent::live_requests() const {
  std::lock_guard<std::mutex> lk(mu_);
  return xfers_.size();
}

void LoopbackAgent::send_notification(const std::string& peer, const NotifMessage& m) {
  std::shared_ptr<Endpoint> ep;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto p = peers_.find(peer);
    if (p == peers_.end()) throw TransportError("send_notification: unknown peer " + peer);
    ep = p->second.lock();
  }
  if (!ep) throw TransportError("send_notification: peer " + peer + " is gone");
  ep->deliver({name_, encode_notif_string(m)});
}

std::vector<RawNotification> LoopbackAgent::fetch_notifications(std::size_t& skipped) {
  skipped = 0;
  std::vector<RawNotification> out;
  std::lock_guard<std::mutex> lk(ep_->inbox_mu);
  out.swap(ep_->inbox);
  return out;
}

void LoopbackAgent::run() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;  // queued jobs never started: they touch nothing
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    if (opts_.latency.count() > 0) {  // a wait that stop ends: the destructor must not sit out the latency
      std::unique_lock<std::mutex> lk(mu_);
      if (cv_.wait_for(lk, opts_.latency, [this] { return stop_; })) return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    bool ok = true;
    int copy_errno = 0;
    std::size_t fault_off = 0;
    for (std::size_t off = 0; off < job->local.len && ok; off += opts_.chunk) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
      }
      const std::size_t n = std::min(opts_.chunk, job->local.len - off);
      {
        std::shared_lock<std::shared_mutex> mem(mem_mutex());
        auto pep = job->peer_ep.lock();
        if (!pep || !pep->alive || !pep->covers(job->remote) || !ep_->covers(job->local)) {
          ok = false;  // the peer (or a registration) is gone: a disconnect
          break;
        }
        auto* l = reinterpret_cast<std::uint8_t*>(job->local.addr) + off;
        auto* r = reinterpret_cast<std::uint8_t*>(job->remote.addr) + off;
        copy_errno = job->op == XferOp::Read ? checked_copy(l, r, n) : checked_copy(r, l, n);
        if (copy_errno != 0) {
          ok = false;
          fault_off = off;
          break;
        }
      }
      if (opts_.bytes_per_second > 0) {
        const auto due = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                  std::chrono::duration<double>(static_cast<double>(off + n) /
                                                                opts_.bytes_per_second));
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait_until(lk, due, [this] { return stop_; });
      }
    }
    while (ok && opts_.hold && opts_.hold->load()) {
      std::unique_lock<std::mutex> lk(mu_);
      if (cv_.wait_for(lk, std::chrono::milliseconds(1), [this] { return stop_; })) return;
    }
    // Nothing may leave this thread (std::terminate): a note that cannot be made (an allocation) is lost, which
    // only leaves the peer without that evidence; a reason that cannot be made leaves the failure without it.
    if (ok && job->done_tag && !job->released.load()) {
      try {
        if (auto pep = job->peer_ep.lock()) {
          pep->deliver({name_, encode_notif_string({job->req, NotifKind::Done, *job->done_tag})});
        }
      } catch (...) {
      }
    }
    if (copy_errno != 0) {
      try {
        job->fault = "loopback copy for request " + std::to_string(job->req) + " faulted near byte " +
                     std::to_string(fault_off) + ": " + std::strerror(copy_errno) +
                     " (a registered range is not mapped " +
                     (job->op == XferOp::Read ? "readable at the peer or writable here"
                                              : "readable here or writable at the peer") +
                     ")";
        job->state.store(3, std::memory_order_release);
        continue;
      } catch (...) {  // (ok is false: Failed below, without its reason)
      }
    }
    job->state.store(ok ? 1 : 2);
  }
}

}  // namespace lifecycle::transport
