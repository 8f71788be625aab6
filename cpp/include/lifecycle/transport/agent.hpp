// The agent interface every transport backend implements (NIXL, loopback, the fault injector).
//
// Theory of operation
// -------------------
// An Agent moves bytes between registered memory of two named agents and carries 24-byte
// notifications between them. It owns every backend object it creates; callers only hold ids (the
// request id for transfers, a RegionId for registrations). A transfer is two steps so that a bad
// descriptor is refused before anything is exposed:
//   prepare(req, ...)  builds the request (validates peer, lengths, registrations); nothing moves;
//   post(req)          starts it: from here on the backend may touch both buffers.
// status(req) is non-blocking; release(req) forgets the request (aborting it if active) and is NOT
// evidence that the bytes stopped (DESIGN §3): only status() == Done or a peer notification is.
//
// Every call is thread-safe. No call blocks on the network (NIXL's calls are non-blocking; the
// loopback agent queues work for its own thread).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace lifecycle::transport {

enum class MemKind : std::uint8_t { Dram, Vram };

// A contiguous memory range. For VRAM, dev_id is the CUDA device index; for DRAM it is 0.
struct Region {
  std::uintptr_t addr = 0;
  std::size_t len = 0;
  std::uint64_t dev_id = 0;
  MemKind kind = MemKind::Dram;

  // Non-empty, and inside the lower half of the address space (addr + len <= kEnd).  Untagged user-space memory,
  // host or device (CUDA's unified addresses), lies there on every 64-bit platform NIXL supports: the upper half
  // is the kernel's (a top-byte tag of 0x80 or more, HWASan's, would be refused; UCX cannot register those).
  // UCX rounds a range out to whole pages before its registration cache looks it up, so a range in the last
  // page wrapped to 0, and the lookup spun for ever in ucs_pgtable_search_range with the agent's lock held
  // (ending exactly at 2**64 did it too, and so did 4,095 bytes at 2**64 - 4,096).
  static_assert(sizeof(std::uintptr_t) == 8, "64-bit address spaces only");
  static constexpr std::uintptr_t kEnd = std::uintptr_t{1} << 63;
  // What a refused range is told (every layer says the same).
  static constexpr const char* kRefused = "empty, or runs past 2**63, the end of (untagged) user-space addresses";
  bool valid() const noexcept { return addr != 0 && len != 0 && addr < kEnd && len <= kEnd - addr; }
  // [r.addr, r.addr + r.len) lies inside this region (same kind and device), without overflow.
  bool contains(const Region& r) const noexcept {
    return kind == r.kind && dev_id == r.dev_id && r.addr >= addr && r.len <= len && r.addr - addr <= len - r.len;
  }
  // Some byte lies in both (addresses only; both valid(), so nothing wraps).
  bool spans_overlap(const Region& r) const noexcept { return r.addr - addr < len || addr - r.addr < r.len; }
  bool overlaps(const Region& r) const noexcept { return kind == r.kind && dev_id == r.dev_id && spans_overlap(r); }
};

enum class XferOp : std::uint8_t { Read, Write };

// What the backend said about one transfer request.
enum class XferState : std::uint8_t {
  InProgress,  // NIXL_IN_PROG
  Done,        // NIXL_SUCCESS: the only backend-side quiescence evidence
  Failed,      // any error (1.5.1 C API: disconnects and transfer errors both map to kErrBackend)
  Unknown,     // this agent holds no request with that id (never posted, or released)
};
const char* to_string(XferState s) noexcept;

struct XferStatus {
  XferState state = XferState::Unknown;
  int capi_status = 0;  // raw backend status (nixl_capi_status_t for NIXL)
};

// Notification wire format: 24 bytes, little-endian.
//   [0..4) magic "KVLC"  [4] version=2  [5] kind  [6..8) reserved=0  [8..16) request id  [16..24) tag
// The tag names one transfer of a request: the passive side draws it in expect() and ships it with its
// descriptor; the active side puts it in the Done note, the passive side in its stop, and a quiesced
// echoes the stop's. A note whose tag is not the live transfer's (an earlier transfer of a reused id, a
// duplicate) is never taken as evidence for it.
enum class NotifKind : std::uint8_t { Done = 1, Stop = 2, Quiesced = 3 };
const char* to_string(NotifKind k) noexcept;

struct NotifMessage {
  std::uint64_t req = 0;
  NotifKind kind = NotifKind::Done;
  std::uint64_t tag = 0;
};
constexpr std::size_t kNotifWireSize = 24;
// A name that goes to NIXL as a C string (an agent's, a peer's) must hold no NUL: NIXL would cut it there and
// use another name than this library's records (a post to peer "b\0x" went to "b", while a stop from "b"
// matched no entry and was answered at once).  Throws InvalidArgumentError naming `what`, the name shown
// with \0 for each NUL; `context` (e.g. "request 5") leads the message.
void check_c_name(const std::string& name, const char* what, const std::string& context = {});

std::array<std::uint8_t, kNotifWireSize> encode_notif(const NotifMessage& m) noexcept;
std::string encode_notif_string(const NotifMessage& m);
// nullopt when `bytes` is not a valid message (wrong size, magic, version or kind).
std::optional<NotifMessage> decode_notif(const std::string& bytes) noexcept;

struct RawNotification {
  std::string peer;   // remote agent name
  std::string bytes;  // message as sent
};

// Release status: 0 = released; anything else = the backend still owns the request (kept, retried).
using ReleaseStatus = int;
constexpr ReleaseStatus kReleased = 0;
constexpr ReleaseStatus kReleaseUnknownRequest = -1;

class Agent {
 public:
  using RegionId = std::uint64_t;
  virtual ~Agent() = default;

  virtual const std::string& name() const noexcept = 0;
  virtual const char* backend_name() const noexcept = 0;

  // --- memory registration (export metadata after registering; peers must reload it)
  virtual RegionId register_region(const Region& r) = 0;
  virtual void deregister_region(RegionId id) = 0;
  virtual std::size_t registered_regions() const = 0;

  // --- metadata
  virtual std::string local_metadata() = 0;
  virtual std::string load_remote_metadata(const std::string& md) = 0;  // returns the peer name
  virtual void invalidate_remote(const std::string& peer) = 0;
  virtual bool knows_peer(const std::string& peer) const = 0;  // loaded, and not invalidated since

  // --- transfers. `req` is the caller's id; one live transfer per id.
  // READ: bytes move remote -> local. WRITE: local -> remote. With a `done_tag`, the peer receives
  // encode_notif({req, Done, *done_tag}) when the transfer completes. Throws TransportError (nothing held).
  virtual void prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                       const std::string& peer, std::optional<std::uint64_t> done_tag) = 0;
  // Starts a prepared request. Returns Done (completed synchronously) or InProgress; throws
  // TransportError when the backend refused it (the request stays held: release it).
  virtual XferState post(std::uint64_t req) = 0;
  virtual XferStatus status(std::uint64_t req) = 0;  // non-blocking
  // status() of n requests: out[i], or errors[i] = what status() threw (out[i] then Failed).  A backend
  // that serializes its calls answers all n under one lock (the progress thread's pass: one hand-off
  // with a posting thread instead of n).  Default: status() each, in order.
  virtual void status_batch(const std::uint64_t* reqs, std::size_t n, XferStatus* out, std::string* errors) {
    for (std::size_t i = 0; i < n; ++i) {
      try {
        out[i] = status(reqs[i]);
      } catch (const std::exception& e) {
        out[i] = {XferState::Failed, 0};
        errors[i] = e.what();
      }
    }
  }
  // Release (aborting if active) and forget. NOT evidence. A failed release keeps the handle.
  virtual ReleaseStatus release(std::uint64_t req) = 0;
  virtual std::size_t live_requests() const = 0;

  // --- notifications
  virtual void send_notification(const std::string& peer, const NotifMessage& m) = 0;
  // Non-blocking.  Entries the backend fails to hand over (one call's error) are skipped, counted in
  // `skipped`, and the rest returned: one bad entry does not take the others down with it.  Throws only
  // when nothing could be fetched.
  virtual std::vector<RawNotification> fetch_notifications(std::size_t& skipped) = 0;
};

}  // namespace lifecycle::transport
