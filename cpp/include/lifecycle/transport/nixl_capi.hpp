// NIXL C API, loaded at run time.
//
// Theory of operation
// -------------------
// The nixl-cu12 wheel ships `libnixl_capi.so` (a C wrapper over nixlAgent) but no headers. We declare
// the handful of C functions we use ourselves (ABI checked against the installed nixl-cu12 1.5.1:
// `nm -D --defined-only` plus disassembly of the argument use, see docs/nixl-notes.md), dlopen the
// library by absolute path, and resolve EVERY symbol up front. A missing library or symbol is one
// typed exception (`NixlUnavailable`) naming the symbol, the library path and the fix; it never
// surfaces later as a crash in the middle of a transfer.
//
// Every NIXL object is held by a move-only RAII owner (`CapiOwner`) whose destructor releases it and
// checks the status. Owners keep the function table (and so the dlopen handle) alive.
//
// Nothing in this header includes NIXL or pybind11.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "lifecycle/error_base.hpp"

namespace lifecycle::transport {

// ---------------------------------------------------------------------------------------------------
// Errors. TODO(lead): reparent TransportError under the core LifecycleError once it exists in C++.
class TransportError : public lifecycle::Error {
 public:
  using lifecycle::Error::Error;
};

// A peer's metadata refused before anything was loaded (its agent name cannot be used).  Transport::add_peer
// reports it as InvalidArgumentError("metadata"), like a loaded name it refuses.
class MetadataRefused : public TransportError {
 public:
  using TransportError::TransportError;
};

// A transfer to a peer that a post already failed to (NIXL 1.5.1 then takes the peer for disconnected: every later
// post to it fails, after its request was exposed), refused before anything is built or exposed: the session stays
// Advertised (cancel it: never exposed, it frees now).  Until remove_peer() and add_peer() of its metadata.
class PeerDisconnected : public TransportError {
 public:
  PeerDisconnected(const std::string& message, std::string peer_name)
      : TransportError(message), peer(std::move(peer_name)) {}
  std::string peer;
};

// A transfer that DESIGN §9's role rule refuses, before anything is built or exposed: the session's own role
// does not take `op` (whose = "session"), or the offer is of a role that `op` does not take (whose = "offer").
// The caller's bug, never a backend failure: reconnecting or retrying cannot help.  `role` is the role that
// refused (the session's, or the offer's).
class RoleRefused : public TransportError {
 public:
  RoleRefused(const std::string& message, std::uint64_t request, bool read, const char* role, const char* whose)
      : TransportError(message), request(request), op(read ? "read" : "write"), role(role), whose(whose) {}
  std::uint64_t request;
  const char* op;
  const char* role;
  const char* whose;
};

// The NIXL C library cannot be used: not found, not loadable, a stub build, or a symbol is missing.
// Attributes carry the context so callers never parse the message.
class NixlUnavailable : public TransportError {
 public:
  // `source` says where the library's path came from ("the capi_path argument"); the message quotes it.
  NixlUnavailable(std::string library, std::string missing_symbol, std::string detail, const std::string& source = "");
  const std::string& library() const noexcept { return library_; }
  // First missing symbol, empty when the library itself could not be loaded.
  const std::string& missing_symbol() const noexcept { return missing_symbol_; }

 private:
  std::string library_;
  std::string missing_symbol_;
};

// A NIXL C API call returned an error status.
class NixlCallError : public TransportError {
 public:
  NixlCallError(std::string call, int status, const std::string& context);
  // `e` with `more` appended to its message (what the caller knows that the failed call did not)
  NixlCallError(const NixlCallError& e, const std::string& more)
      : TransportError(e.what() + more), call_(e.call_), status_(e.status_) {}
  const std::string& call() const noexcept { return call_; }
  int status() const noexcept { return status_; }

 private:
  std::string call_;
  int status_;
};

// ---------------------------------------------------------------------------------------------------
// C declarations (our own; must match libnixl_capi.so of nixl-cu12 1.5.1).
namespace capi {

extern "C" {
struct agent_s;
struct params_s;
struct mem_list_s;
struct backend_s;
struct opt_args_s;
struct xfer_dlist_s;
struct reg_dlist_s;
struct xfer_req_s;
struct notif_map_s;
}

using agent_t = agent_s*;
using params_t = params_s*;
using mem_list_t = mem_list_s*;
using backend_t = backend_s*;
using opt_args_t = opt_args_s*;
using xfer_dlist_t = xfer_dlist_s*;
using reg_dlist_t = reg_dlist_s*;
using xfer_req_t = xfer_req_s*;
using notif_map_t = notif_map_s*;

// nixl_capi_status_t (a C enum: int-sized).
enum status_t : int {
  kSuccess = 0,
  kErrInvalidParam = -1,
  kErrBackend = -2,  // 1.5.1 maps every transfer failure, remote disconnect included, to this
  kErrInvalidState = -3,
  kErrException = -4,
  kErrNoTelemetry = -5,
  kErrNotSupported = -6,
  kInProgress = 1,
  kInProgressWithErr = 2,  // declared upstream; 1.5.1 never returns it
};

enum mem_type_t : int { kDram = 0, kVram = 1, kBlock = 2, kObject = 3, kFile = 4, kUnknownMem = 5 };
enum xfer_op_t : int { kRead = 0, kWrite = 1 };
enum thread_sync_t : int { kSyncNone = 0, kSyncStrict = 1, kSyncRw = 2 };

// nixl_capi_agent_config_t; 1.5.1 reads offsets 0,1,4,8,16,24,32 (num_workers at 12 is ignored).
struct agent_config_t {
  bool enable_prog_thread;
  bool enable_listen_thread;
  int listen_port;
  thread_sync_t thread_sync;
  unsigned int num_workers;
  std::uint64_t pthr_delay_us;
  std::uint64_t lthr_delay_us;
  bool capture_telemetry;
};
static_assert(sizeof(agent_config_t) == 40, "nixl_capi_agent_config_t layout");

}  // namespace capi

// X-macro: (member name, return type, parameter list). The C symbol is `nixl_capi_<name>`.
// Adding a row here makes it a required symbol, resolved at load time.
#define LIFECYCLE_NIXL_CAPI_SYMBOLS(X)                                                                \
  X(is_stub, bool, ())                                                                                \
  X(create_configured_agent, capi::status_t,                                                          \
    (const char*, const capi::agent_config_t*, capi::agent_t*))                                       \
  X(destroy_agent, capi::status_t, (capi::agent_t))                                                   \
  X(get_local_md, capi::status_t, (capi::agent_t, void**, std::size_t*))                              \
  X(load_remote_md, capi::status_t, (capi::agent_t, const void*, std::size_t, char**))               \
  X(invalidate_remote_md, capi::status_t, (capi::agent_t, const char*))                               \
  X(agent_make_connection, capi::status_t, (capi::agent_t, const char*, capi::opt_args_t))           \
  X(get_plugin_params, capi::status_t,                                                                \
    (capi::agent_t, const char*, capi::mem_list_t*, capi::params_t*))                                 \
  X(destroy_mem_list, capi::status_t, (capi::mem_list_t))                                             \
  X(destroy_params, capi::status_t, (capi::params_t))                                                 \
  X(params_add, capi::status_t, (capi::params_t, const char*, const char*))                           \
  X(create_backend, capi::status_t,                                                                   \
    (capi::agent_t, const char*, capi::params_t, capi::backend_t*))                                   \
  X(destroy_backend, capi::status_t, (capi::backend_t))                                               \
  X(create_opt_args, capi::status_t, (capi::opt_args_t*))                                             \
  X(destroy_opt_args, capi::status_t, (capi::opt_args_t))                                             \
  X(opt_args_add_backend, capi::status_t, (capi::opt_args_t, capi::backend_t))                        \
  X(opt_args_set_notif_msg, capi::status_t, (capi::opt_args_t, const void*, std::size_t))             \
  X(opt_args_set_has_notif, capi::status_t, (capi::opt_args_t, bool))                                 \
  X(create_reg_dlist, capi::status_t, (capi::mem_type_t, capi::reg_dlist_t*))                         \
  X(destroy_reg_dlist, capi::status_t, (capi::reg_dlist_t))                                           \
  X(reg_dlist_add_desc, capi::status_t,                                                               \
    (capi::reg_dlist_t, std::uintptr_t, std::size_t, std::uint64_t, const void*, std::size_t))        \
  X(register_mem, capi::status_t, (capi::agent_t, capi::reg_dlist_t, capi::opt_args_t))              \
  X(deregister_mem, capi::status_t, (capi::agent_t, capi::reg_dlist_t, capi::opt_args_t))            \
  X(create_xfer_dlist, capi::status_t, (capi::mem_type_t, capi::xfer_dlist_t*))                       \
  X(destroy_xfer_dlist, capi::status_t, (capi::xfer_dlist_t))                                         \
  X(xfer_dlist_add_desc, capi::status_t,                                                              \
    (capi::xfer_dlist_t, std::uintptr_t, std::size_t, std::uint64_t))                                 \
  X(create_xfer_req, capi::status_t,                                                                  \
    (capi::agent_t, capi::xfer_op_t, capi::xfer_dlist_t, capi::xfer_dlist_t, const char*,             \
     capi::xfer_req_t*, capi::opt_args_t))                                                            \
  X(post_xfer_req, capi::status_t, (capi::agent_t, capi::xfer_req_t, capi::opt_args_t))              \
  X(get_xfer_status, capi::status_t, (capi::agent_t, capi::xfer_req_t))                               \
  X(release_xfer_req, capi::status_t, (capi::agent_t, capi::xfer_req_t))                              \
  X(destroy_xfer_req, capi::status_t, (capi::xfer_req_t))                                             \
  X(create_notif_map, capi::status_t, (capi::notif_map_t*))                                           \
  X(destroy_notif_map, capi::status_t, (capi::notif_map_t))                                           \
  X(get_notifs, capi::status_t, (capi::agent_t, capi::notif_map_t, capi::opt_args_t))                \
  X(notif_map_size, capi::status_t, (capi::notif_map_t, std::size_t*))                                \
  X(notif_map_get_agent_at, capi::status_t, (capi::notif_map_t, std::size_t, const char**))          \
  X(notif_map_get_notifs_size, capi::status_t, (capi::notif_map_t, const char*, std::size_t*))       \
  X(notif_map_get_notif, capi::status_t,                                                              \
    (capi::notif_map_t, const char*, std::size_t, const void**, std::size_t*))                        \
  X(notif_map_clear, capi::status_t, (capi::notif_map_t))                                             \
  X(gen_notif, capi::status_t,                                                                        \
    (capi::agent_t, const char*, const void*, std::size_t, capi::opt_args_t))

// The resolved function table. Immutable after load; share it with shared_ptr<const NixlCapi>.
class NixlCapi {
 public:
  // Environment variable load() takes the path from when it is given none.
  static constexpr const char* kPathEnv = "KV_LIFECYCLE_NIXL_CAPI";
  static constexpr const char* kInstallHint = "pip install nixl-cu12==1.5.1";

  // dlopen `path` (empty: $KV_LIFECYCLE_NIXL_CAPI's) and resolve every symbol: the path given wins over the
  // variable.  Throws NixlUnavailable on any failure, naming `source` as where the path came from (for an empty
  // path: the variable).
  static std::shared_ptr<const NixlCapi> load(const std::string& path, const std::string& source = "");
  // The path load() takes and where it came from: `path` and `source`, or for an empty path the variable's
  // (NixlUnavailable when it is unset).  Only an empty path reads the environment: a binding resolves the path
  // with the GIL held and loads it without (getenv beside a Python thread's os.environ change, putenv or
  // unsetenv under the GIL, is undefined behaviour in glibc).
  static std::pair<std::string, std::string> resolve(const std::string& path, const std::string& source);

  const std::string& path() const noexcept { return path_; }

#define LIFECYCLE_NIXL_DECLARE_FN(name, ret, params) ret(*name) params = nullptr;
  LIFECYCLE_NIXL_CAPI_SYMBOLS(LIFECYCLE_NIXL_DECLARE_FN)
#undef LIFECYCLE_NIXL_DECLARE_FN

  ~NixlCapi();
  NixlCapi(const NixlCapi&) = delete;
  NixlCapi& operator=(const NixlCapi&) = delete;

 private:
  NixlCapi() = default;
  std::string path_;
  void* dl_ = nullptr;  // Invariant: the dlopen handle; owned, closed in the destructor.
};

// Names of every symbol that load() resolves (for docs and tests).
std::vector<std::string> nixl_capi_required_symbols();

// Throws NixlCallError unless `st` is kSuccess.
void check_capi(capi::status_t st, const char* call, const std::string& context = {});

// ---------------------------------------------------------------------------------------------------
// RAII owner for one NIXL C handle. `Release` is a stateless functor:
//   capi::status_t operator()(const NixlCapi&, Handle) const
// The destructor runs it once; a failing status is recorded in `release_failures()` (destructors
// never throw). Move-only.
std::uint64_t capi_release_failures() noexcept;
void note_capi_release_failure() noexcept;
// Keeps a NIXL handle that must never be released (it is under a transfer NIXL could not abort)
// reachable for the life of the process: deliberately kept, not lost (and so not a leak to LeakSanitizer).
void keep_forever(const void* handle) noexcept;
// How many handles keep_forever holds.
std::size_t kept_forever() noexcept;

template <class Handle, class Release>
class CapiOwner {
 public:
  CapiOwner() = default;
  CapiOwner(std::shared_ptr<const NixlCapi> api, Handle h) : api_(std::move(api)), h_(h) {}
  CapiOwner(CapiOwner&& o) noexcept : api_(std::move(o.api_)), h_(std::exchange(o.h_, nullptr)) {}
  CapiOwner& operator=(CapiOwner&& o) noexcept {
    if (this != &o) {
      reset();
      api_ = std::move(o.api_);
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  CapiOwner(const CapiOwner&) = delete;
  CapiOwner& operator=(const CapiOwner&) = delete;
  ~CapiOwner() { reset(); }

  Handle get() const noexcept { return h_; }
  explicit operator bool() const noexcept { return h_ != nullptr; }
  // Forget the handle without releasing it: leaked on purpose (something NIXL could not stop uses it),
  // and kept reachable for the life of the process (keep_forever).
  void leak() noexcept { keep_forever(std::exchange(h_, nullptr)); }

  // Release now; returns the release status (kSuccess when empty).
  capi::status_t reset() noexcept {
    capi::status_t st = capi::kSuccess;
    if (h_ != nullptr) {
      st = Release{}(*api_, h_);
      if (st != capi::kSuccess) note_capi_release_failure();
      h_ = nullptr;
    }
    return st;
  }

 private:
  std::shared_ptr<const NixlCapi> api_;
  Handle h_ = nullptr;
};

namespace capi_release {
#define LIFECYCLE_NIXL_RELEASER(Name, fn, H) \
  struct Name {                              \
    capi::status_t operator()(const NixlCapi& a, H h) const noexcept { return a.fn(h); } \
  };
LIFECYCLE_NIXL_RELEASER(Agent, destroy_agent, capi::agent_t)
LIFECYCLE_NIXL_RELEASER(Backend, destroy_backend, capi::backend_t)
LIFECYCLE_NIXL_RELEASER(Params, destroy_params, capi::params_t)
LIFECYCLE_NIXL_RELEASER(MemList, destroy_mem_list, capi::mem_list_t)
LIFECYCLE_NIXL_RELEASER(OptArgs, destroy_opt_args, capi::opt_args_t)
LIFECYCLE_NIXL_RELEASER(RegDlist, destroy_reg_dlist, capi::reg_dlist_t)
LIFECYCLE_NIXL_RELEASER(XferDlist, destroy_xfer_dlist, capi::xfer_dlist_t)
LIFECYCLE_NIXL_RELEASER(NotifMap, destroy_notif_map, capi::notif_map_t)
#undef LIFECYCLE_NIXL_RELEASER
}  // namespace capi_release

using AgentHandle = CapiOwner<capi::agent_t, capi_release::Agent>;
using BackendHandle = CapiOwner<capi::backend_t, capi_release::Backend>;
using ParamsHandle = CapiOwner<capi::params_t, capi_release::Params>;
using MemListHandle = CapiOwner<capi::mem_list_t, capi_release::MemList>;
using OptArgsHandle = CapiOwner<capi::opt_args_t, capi_release::OptArgs>;
using RegDlistHandle = CapiOwner<capi::reg_dlist_t, capi_release::RegDlist>;
using XferDlistHandle = CapiOwner<capi::xfer_dlist_t, capi_release::XferDlist>;
using NotifMapHandle = CapiOwner<capi::notif_map_t, capi_release::NotifMap>;

// A transfer request needs its agent to be released: release_xfer_req(agent, req) then
// destroy_xfer_req(req). If release fails (NIXL could not abort an active transfer) the C wrapper
// refuses destroy (kErrInvalidState) and the request is deliberately leaked: freeing it would be the
// use-after-free §3 forbids. Owned by NixlAgent, which guarantees the agent outlives it.
class XferReqHandle {
 public:
  XferReqHandle() = default;
  XferReqHandle(std::shared_ptr<const NixlCapi> api, capi::agent_t agent, capi::xfer_req_t req)
      : api_(std::move(api)), agent_(agent), req_(req) {}
  XferReqHandle(XferReqHandle&& o) noexcept
      : api_(std::move(o.api_)), agent_(o.agent_), req_(std::exchange(o.req_, nullptr)) {}
  XferReqHandle& operator=(XferReqHandle&& o) noexcept {
    if (this != &o) {
      reset();
      api_ = std::move(o.api_);
      agent_ = o.agent_;
      req_ = std::exchange(o.req_, nullptr);
    }
    return *this;
  }
  XferReqHandle(const XferReqHandle&) = delete;
  XferReqHandle& operator=(const XferReqHandle&) = delete;
  ~XferReqHandle() { reset(); }

  capi::xfer_req_t get() const noexcept { return req_; }
  explicit operator bool() const noexcept { return req_ != nullptr; }
  void leak() noexcept { keep_forever(std::exchange(req_, nullptr)); }  // unreleased: NIXL could not abort it

  // release + destroy. On a failed release the handle stays held (and is retried by the next reset);
  // returns the release status.
  capi::status_t reset() noexcept;

 private:
  std::shared_ptr<const NixlCapi> api_;
  capi::agent_t agent_ = nullptr;  // Invariant: not owned; outlives this handle (NixlAgent order).
  capi::xfer_req_t req_ = nullptr;
};

}  // namespace lifecycle::transport
