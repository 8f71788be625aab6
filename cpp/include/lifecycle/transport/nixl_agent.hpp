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
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "lifecycle/transport/nixl_capi.hpp"

namespace lifecycle::transport {

enum class MemKind : std::uint8_t { Dram, Vram };

// A contiguous memory range. For VRAM, dev_id is the CUDA device index; for DRAM it is 0.
struct Region {
  std::uintptr_t addr = 0;
  std::size_t len = 0;
  std::uint64_t dev_id = 0;
  MemKind kind = MemKind::Dram;
};

enum class XferOp : std::uint8_t { Read, Write };

// What NIXL said about one transfer request.
enum class XferState : std::uint8_t {
  InProgress,  // NIXL_IN_PROG
  Done,        // NIXL_SUCCESS: the only backend-side quiescence evidence
  Failed,      // any error (1.5.1 C API: disconnects and transfer errors both map to kErrBackend)
  Unknown,     // this agent holds no request with that id (never posted, or released)
};
const char* to_string(XferState s) noexcept;

struct XferStatus {
  XferState state = XferState::Unknown;
  int capi_status = 0;  // raw nixl_capi_status_t
};

// Notification wire format: 16 bytes, little-endian.
//   [0..4) magic "KVLC"  [4] version=1  [5] kind  [6..8) reserved=0  [8..16) request id
enum class NotifKind : std::uint8_t { Done = 1, Stop = 2, Quiesced = 3 };
const char* to_string(NotifKind k) noexcept;

struct NotifMessage {
  std::uint64_t req = 0;
  NotifKind kind = NotifKind::Done;
};
constexpr std::size_t kNotifWireSize = 16;
std::array<std::uint8_t, kNotifWireSize> encode_notif(const NotifMessage& m) noexcept;
// nullopt when `bytes` is not a valid message (wrong size, magic, version or kind).
std::optional<NotifMessage> decode_notif(const std::string& bytes) noexcept;

struct RawNotification {
  std::string peer;   // remote agent name
  std::string bytes;  // message as sent
};

struct NixlAgentOptions {
  std::string name;
  // UCX backend parameters added on top of the plugin defaults (key, value).
  std::vector<std::pair<std::string, std::string>> ucx_params;
  // NIXL's own UCX progress thread. Off by default: NixlProgress's polling (getXferStatus,
  // getNotifs) drives UCX, and NIXL's thread costs ~0.33 core per idle agent (measured, 1.5.1).
  // The passive side of a transfer must be polled too (a NixlProgress on every agent).
  bool nixl_progress_thread = false;
};

class NixlAgent {
 public:
  using RegionId = std::uint64_t;

  // Creates the agent and its UCX backend. Throws NixlCallError on failure.
  NixlAgent(std::shared_ptr<const NixlCapi> api, NixlAgentOptions opts);
  ~NixlAgent();  // releases outstanding requests, deregisters regions, destroys backend and agent
  NixlAgent(const NixlAgent&) = delete;
  NixlAgent& operator=(const NixlAgent&) = delete;

  const std::string& name() const noexcept { return name_; }

  // --- memory registration (export metadata after registering; peers must reload it)
  RegionId register_region(const Region& r);
  void deregister_region(RegionId id);

  // --- metadata
  std::string local_metadata();                          // bytes to ship to peers
  std::string load_remote_metadata(const std::string& md);  // returns the remote agent name
  void invalidate_remote(const std::string& peer);
  void connect(const std::string& peer);  // optional: establish the connection eagerly

  // --- transfers. `req` is the caller's id; one live transfer per id.
  // READ: bytes move remote -> local. WRITE: local -> remote. With `notify`, the peer receives
  // encode_notif({req, Done}) when the transfer completes. Returns the post status: Done (completed
  // synchronously), InProgress, or throws NixlCallError (nothing posted; nothing held for `req`).
  XferState post(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                 const std::string& peer, bool notify = true);
  // Non-blocking.
  XferStatus status(std::uint64_t req);
  // Release (aborting if active) and forget the request. Returns the release status; a failed
  // release keeps the handle (NIXL still owns the transfer) and reports failure. NOT evidence.
  capi::status_t release(std::uint64_t req);
  std::size_t live_requests() const;

  // --- notifications
  void send_notification(const std::string& peer, const NotifMessage& m);
  void send_raw_notification(const std::string& peer, const std::string& bytes);
  // Non-blocking: drains what has arrived since the last call.
  std::vector<RawNotification> fetch_notifications();

 private:
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
  };
  std::map<RegionId, Registration> regions_;  // Invariant: every entry is registered with NIXL
  RegionId next_region_ = 1;
  std::map<std::uint64_t, XferReqHandle> xfers_;  // Invariant: every entry was posted
  std::vector<XferReqHandle> unreleasable_;  // release failed; retried in the destructor
};

}  // namespace lifecycle::transport
