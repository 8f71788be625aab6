// One NIXL agent with the UCX backend: registration, metadata exchange, transfers, notifications.
//
// Theory of operation
// -------------------
// The agent owns every NIXL object it creates (backend, registrations, transfer requests), keyed by
// ids the caller chooses (transfers: the engine's request id) or the agent returns (regions). The
// caller never holds a NIXL handle, so no handle can outlive the agent.
//
// Thread safety: the NIXL agent is created with THREAD_SYNC_STRICT and every call into it is also
// made under `mu_` (which guards the id maps). Calls are short and non-blocking in NIXL (post,
// status, notifications); nobody sleeps while holding `mu_`.
//
// Evidence (DESIGN §3): only `status() == Done` or a peer notification proves quiescence.
// `release()` returning success on an active transfer proves nothing: UCX returns while bytes are
// still landing. The agent reports what NIXL said; the engine decides.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "lifecycle/transport/agent.hpp"
#include "lifecycle/transport/nixl_capi.hpp"

namespace lifecycle::transport {

struct NixlAgentOptions {
  std::string name;
  // UCX backend parameters added on top of the plugin defaults (key, value).
  std::vector<std::pair<std::string, std::string>> ucx_params;
  // NIXL's own UCX progress thread. Off by default: NixlProgress's polling (getXferStatus,
  // getNotifs) drives UCX, and NIXL's thread costs ~0.33 core per idle agent (measured, 1.5.1).
  // The passive side of a transfer must be polled too (a NixlProgress on every agent).
  bool nixl_progress_thread = false;
};

class NixlAgent final : public Agent {
 public:
  using RegionId = Agent::RegionId;

  // Creates the agent and its UCX backend. Throws NixlCallError on failure.
  NixlAgent(std::shared_ptr<const NixlCapi> api, NixlAgentOptions opts);
  ~NixlAgent() override;  // releases outstanding requests, deregisters regions, destroys backend/agent
  NixlAgent(const NixlAgent&) = delete;
  NixlAgent& operator=(const NixlAgent&) = delete;

  const std::string& name() const noexcept override { return name_; }
  const char* backend_name() const noexcept override { return "nixl"; }

  // --- memory registration (export metadata after registering; peers must reload it)
  RegionId register_region(const Region& r) override;
  void deregister_region(RegionId id) override;
  std::size_t registered_regions() const override;

  // --- metadata
  std::string local_metadata() override;                            // bytes to ship to peers
  std::string load_remote_metadata(const std::string& md) override;  // returns the remote agent name
  void invalidate_remote(const std::string& peer) override;
  bool knows_peer(const std::string& peer) const override;
  void connect(const std::string& peer);  // optional: establish the connection eagerly

  // --- transfers (see Agent). prepare = create_xfer_req; post = post_xfer_req.
  void prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
               const std::string& peer, std::optional<std::uint64_t> done_tag) override;
  XferState post(std::uint64_t req) override;
  // prepare + post in one call. Returns Done (completed synchronously) or InProgress, or throws
  // NixlCallError (nothing posted; nothing held for `req`).
  XferState post(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                 const std::string& peer, std::optional<std::uint64_t> done_tag = 0);
  // Non-blocking. Unknown for ids never prepared, released, or prepared but not posted.
  XferStatus status(std::uint64_t req) override;
  void status_batch(const std::uint64_t* reqs, std::size_t n, XferStatus* out, std::string* errors) override;  // one lock
  // Release (aborting if active) and forget the request. Returns the release status; a failed
  // release keeps the handle (NIXL still owns the transfer) and reports failure. NOT evidence.
  ReleaseStatus release(std::uint64_t req) override;
  std::size_t live_requests() const override;  // prepared, posted and unreleasable requests

  // --- notifications
  void send_notification(const std::string& peer, const NotifMessage& m) override;
  void send_raw_notification(const std::string& peer, const std::string& bytes);
  // Non-blocking: drains what has arrived since the last call.
  std::vector<RawNotification> fetch_notifications(std::size_t& skipped) override;

 private:
  XferStatus status_locked(std::uint64_t req) noexcept;  // caller holds mu_
  std::shared_ptr<const NixlCapi> api_;
  std::string name_;
  mutable std::mutex mu_;  // guards every NIXL call and the maps below
  // Declaration order is destruction order in reverse: requests and registrations go before the
  // backend and the agent.
  AgentHandle agent_;
  BackendHandle backend_;
  OptArgsHandle backend_args_;  // opt args naming the UCX backend
  NotifMapHandle notif_map_;    // reused by fetch_notifications (guarded by mu_)
  struct Registration {
    RegDlistHandle dlist;
    Region region;
  };
  std::set<std::string> peers_;  // loaded with load_remote_metadata, not invalidated since
  std::map<RegionId, Registration> regions_;  // Invariant: every entry is registered with NIXL
  RegionId next_region_ = 1;
  struct Xfer {
    XferReqHandle handle;
    bool posted = false;
  };
  std::map<std::uint64_t, Xfer> xfers_;      // Invariant: every entry holds a created request
};

}  // namespace lifecycle::transport
