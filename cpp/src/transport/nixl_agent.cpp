#include "lifecycle/transport/nixl_agent.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string_view>

namespace lifecycle::transport {

namespace {

capi::mem_type_t to_capi(MemKind k) noexcept {
  switch (k) {
    case MemKind::Dram:
      return capi::kDram;
    case MemKind::Vram:
      return capi::kVram;
  }
  return capi::kUnknownMem;  // unreachable: the switch is exhaustive
}

capi::xfer_op_t to_capi(XferOp op) noexcept {
  switch (op) {
    case XferOp::Read:
      return capi::kRead;
    case XferOp::Write:
      return capi::kWrite;
  }
  return capi::kRead;  // unreachable
}

std::string req_context(std::uint64_t req) { return "request " + std::to_string(req); }

// NIXL 1.x's lengths and counts: 64-bit little-endian, at p.
std::uint64_t le64(const char* p) {
  std::uint64_t v = 0;
  for (int b = 7; b >= 0; --b) v = (v << 8) | static_cast<unsigned char>(p[b]);
  return v;
}

// NIXL 1.x's metadata (nixlSerDes): "nixlSerDes|", then records (a tag, a 64-bit length, the bytes, '|') in the
// order its loadRemoteMD reads them: Agent, Conns (a count), per backend t and c, "" = "MemSection", nixlSecElms
// (a count), per element bknd, nixlDList, t, n (a count) and n descriptors ""; later releases add UserMDs (a count)
// and per entry k, v.  NIXL loads the peer's connection before it reads the sections, and metadata cut there left
// that connection behind when the load failed (its invalidate_remote_md does not find it): the name could never be
// loaded again.  Cut: the data ends inside what the layout still expects.  Other: another layout (NIXL judges it).
enum class MdShape { Whole, Cut, Other };

class MdWalk {
 public:
  static constexpr std::uint64_t kMaxRecord = std::uint64_t{1} << 32;
  explicit MdWalk(const std::string& md) : md_(md) {}
  // the next record, tagged `tag`: its bytes (nullopt: the walk stopped, shape() says why)
  std::optional<std::string_view> next(std::string_view tag) {
    if (shape_ != MdShape::Whole) return std::nullopt;
    const std::size_t left = md_.size() - at_;
    if (left < tag.size() + 8) {  // (ends in the tag or the length: cut, if what is there fits the tag)
      const std::size_t n = std::min(left, tag.size());
      shape_ = md_.compare(at_, n, tag, 0, n) == 0 ? MdShape::Cut : MdShape::Other;
      return std::nullopt;
    }
    if (md_.compare(at_, tag.size(), tag) != 0) return stop(MdShape::Other);
    const std::size_t l = at_ + tag.size();
    const std::uint64_t len = le64(md_.data() + l);
    // A record of another layout where an untagged one is expected (a tag's bytes read as the length) is no cut:
    // NIXL judges it.  A cut record keeps its length, and no record of agent metadata comes near 4 GiB.
    if (len > kMaxRecord) return stop(MdShape::Other);
    if (len >= md_.size() - l - 8) return stop(MdShape::Cut);  // (its bytes and the '|' do not fit)
    if (md_[l + 8 + len] != '|') return stop(MdShape::Other);
    at_ = l + 8 + len + 1;
    return std::string_view(md_).substr(l + 8, static_cast<std::size_t>(len));
  }
  std::optional<std::uint64_t> count(std::string_view tag) {
    const auto v = next(tag);
    if (!v) return std::nullopt;
    if (v->size() != 8) return stop(MdShape::Other);
    return le64(v->data());
  }
  // the record `rec` exactly, tag, length and bytes (false: the walk stopped, shape() says why)
  bool literal(std::string_view rec) {
    if (shape_ != MdShape::Whole) return false;
    const std::size_t n = std::min(md_.size() - at_, rec.size());
    if (md_.compare(at_, n, rec, 0, n) != 0 || n < rec.size()) {
      shape_ = n < rec.size() && md_.compare(at_, n, rec, 0, n) == 0 ? MdShape::Cut : MdShape::Other;
      return false;
    }
    at_ += rec.size();
    return true;
  }
  bool at_end() const { return shape_ == MdShape::Whole && at_ == md_.size(); }
  MdShape shape() const { return shape_; }

 private:
  std::nullopt_t stop(MdShape s) {
    shape_ = s;
    return std::nullopt;
  }
  const std::string& md_;
  std::size_t at_ = 11;  // past "nixlSerDes|"
  MdShape shape_ = MdShape::Whole;
};

// (each record takes at least 10 bytes, so no count makes a loop outrun the data)
MdShape nixl_md_shape(const std::string& md) {
  static constexpr std::string_view kHeader = "nixlSerDes|";
  if (md.size() < kHeader.size()) {
    return md.compare(0, md.size(), kHeader, 0, md.size()) == 0 ? MdShape::Cut : MdShape::Other;
  }
  if (md.compare(0, kHeader.size(), kHeader) != 0) return MdShape::Other;
  MdWalk w(md);
  const auto records = [&](std::uint64_t n, std::initializer_list<std::string_view> tags) {
    for (std::uint64_t i = 0; i < n; ++i) {
      for (std::string_view t : tags) {
        if (!w.next(t)) return false;
      }
    }
    return true;
  };
  if (!w.next("Agent")) return w.shape();
  const auto conns = w.count("Conns");
  if (!conns || !records(*conns, {"t", "c"})) return w.shape();
  // (matched whole: read as an untagged record, another layout's tagged one here could pass for a cut)
  static constexpr std::string_view kMemSection{"\x0a\0\0\0\0\0\0\0MemSection|", 19};
  if (!w.literal(kMemSection)) return w.shape();
  const auto elements = w.count("nixlSecElms");
  if (!elements) return w.shape();
  for (std::uint64_t e = 0; e < *elements; ++e) {
    if (!w.next("bknd") || !w.next("nixlDList") || !w.next("t")) return w.shape();
    const auto descs = w.count("n");
    if (!descs || !records(*descs, {""})) return w.shape();
  }
  if (w.at_end()) return MdShape::Whole;  // (NIXL 1.5.1 ends here)
  const auto user = w.count("UserMDs");
  if (!user || !records(*user, {"k", "v"})) return w.shape();
  return w.at_end() ? MdShape::Whole : MdShape::Other;
}

}  // namespace

NixlAgent::NixlAgent(std::shared_ptr<const NixlCapi> api, NixlAgentOptions opts)
    : api_(std::move(api)), name_(std::move(opts.name)) {
  const NixlCapi& a = *api_;

  capi::agent_config_t cfg{};
  cfg.enable_prog_thread = opts.nixl_progress_thread;
  cfg.enable_listen_thread = false;  // metadata travels as bytes the caller ships
  cfg.listen_port = 0;
  cfg.thread_sync = capi::kSyncStrict;
  cfg.num_workers = 1;
  cfg.pthr_delay_us = 0;
  cfg.lthr_delay_us = 100000;
  cfg.capture_telemetry = false;
  capi::agent_t raw_agent = nullptr;
  check_c_name(name_, "name");
  check_capi(a.create_configured_agent(name_.c_str(), &cfg, &raw_agent), "create_configured_agent",
             "agent " + name_);
  agent_ = AgentHandle(api_, raw_agent);

  capi::mem_list_t raw_mems = nullptr;
  capi::params_t raw_params = nullptr;
  check_capi(a.get_plugin_params(agent_.get(), "UCX", &raw_mems, &raw_params), "get_plugin_params",
             "UCX plugin not found; is NIXL_PLUGIN_DIR wrong?");
  MemListHandle mems(api_, raw_mems);
  ParamsHandle params(api_, raw_params);
  for (const auto& [k, v] : opts.ucx_params) {
    check_capi(a.params_add(params.get(), k.c_str(), v.c_str()), "params_add", k);
  }

  capi::backend_t raw_backend = nullptr;
  check_capi(a.create_backend(agent_.get(), "UCX", params.get(), &raw_backend), "create_backend",
             "UCX backend for agent " + name_);
  backend_ = BackendHandle(api_, raw_backend);

  capi::opt_args_t raw_args = nullptr;
  check_capi(a.create_opt_args(&raw_args), "create_opt_args");
  backend_args_ = OptArgsHandle(api_, raw_args);
  check_capi(a.opt_args_add_backend(backend_args_.get(), backend_.get()), "opt_args_add_backend");

  capi::notif_map_t raw_map = nullptr;
  check_capi(a.create_notif_map(&raw_map), "create_notif_map");
  notif_map_ = NotifMapHandle(api_, raw_map);
}

NixlAgent::~NixlAgent() {
  std::lock_guard<std::mutex> lk(mu_);
  bool stuck = false;  // a request NIXL could not abort: it may still move bytes
  for (auto& [req, x] : xfers_) {
    (void)req;
    // two more tries for a request whose release failed before; one that still fails is leaked on purpose
    if (x.handle.reset() != capi::kSuccess && x.handle.reset() != capi::kSuccess) {
      x.handle.leak();
      stuck = true;
    }
  }
  xfers_.clear();
  if (stuck) {
    // Destroying the agent would free the backend under that request, and deregistering would pull its
    // memory's keys from under it: the agent, its backend and its registrations are leaked with it.
    for (auto& [id, reg] : regions_) {
      (void)id;
      reg.dlist.leak();
    }
    regions_.clear();
    notif_map_.leak();
    backend_args_.leak();
    backend_.leak();
    agent_.leak();
    note_capi_release_failure();
    return;
  }
  for (auto& [id, reg] : regions_) {
    (void)id;
    if (api_->deregister_mem(agent_.get(), reg.dlist.get(), backend_args_.get()) != capi::kSuccess) {
      note_capi_release_failure();
    }
  }
  regions_.clear();
}

NixlAgent::RegionId NixlAgent::register_region(const Region& r) {
  if (!r.valid()) throw TransportError(std::string("register_region: the region is ") + Region::kRefused);
  const NixlCapi& a = *api_;
  capi::reg_dlist_t raw = nullptr;
  check_capi(a.create_reg_dlist(to_capi(r.kind), &raw), "create_reg_dlist");
  RegDlistHandle dlist(api_, raw);
  check_capi(a.reg_dlist_add_desc(dlist.get(), r.addr, r.len, r.dev_id, nullptr, 0),
             "reg_dlist_add_desc");
  std::lock_guard<std::mutex> lk(mu_);
  check_capi(a.register_mem(agent_.get(), dlist.get(), backend_args_.get()), "register_mem",
             "agent " + name_ + ", " + std::to_string(r.len) + " bytes");
  const RegionId id = next_region_++;
  regions_.emplace(id, Registration{std::move(dlist), r});
  return id;
}

void NixlAgent::deregister_region(RegionId id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end()) {
    throw TransportError("deregister_region: unknown region " + std::to_string(id));
  }
  check_capi(api_->deregister_mem(agent_.get(), it->second.dlist.get(), backend_args_.get()),
             "deregister_mem", "region " + std::to_string(id));
  regions_.erase(it);
}

std::string NixlAgent::local_metadata() {
  void* data = nullptr;
  std::size_t len = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    check_capi(api_->get_local_md(agent_.get(), &data, &len), "get_local_md", "agent " + name_);
  }
  // The C API mallocs the copy; we own it.
  std::unique_ptr<void, decltype(&std::free)> owned(data, &std::free);
  return std::string(static_cast<const char*>(owned.get()), len);
}

std::string NixlAgent::load_remote_metadata(const std::string& md) {
  if (md.empty()) throw TransportError("load_remote_metadata: empty metadata");
  // The C API hands the peer's name back as a C string: a name holding a NUL would come back cut, the
  // peer then known under a name that is not its own (and never invalidated: NIXL keeps the whole one).
  // NIXL 1.x serializes the name first ("nixlSerDes|Agent", a 64-bit length, the bytes); checked before
  // anything is loaded.  (Metadata in another layout goes on to NIXL, which judges it.)
  static constexpr char kHead[] = "nixlSerDes|Agent";
  constexpr std::size_t kHeadLen = sizeof(kHead) - 1;
  std::string named;  // the name in it (NIXL 1.x's layout), for the error below
  if (md.size() >= kHeadLen + 8 && md.compare(0, kHeadLen, kHead) == 0) {
    const std::uint64_t len = le64(md.data() + kHeadLen);
    const std::size_t at = kHeadLen + 8;
    if (len <= md.size() - at && md.find('\0', at) < at + len) {
      throw MetadataRefused("the peer agent's name in it holds a NUL byte (NIXL would cut it there): refused, "
                            "nothing loaded into agent " + name_);
    }
    if (len <= md.size() - at) named = md.substr(at, static_cast<std::size_t>(len));
  }
  if (nixl_md_shape(md) == MdShape::Cut) {
    throw MetadataRefused("it ends inside a record NIXL's layout still expects (" + std::to_string(md.size()) +
                          " bytes: cut on the way?): refused, nothing loaded into agent " + name_ +
                          " (NIXL would have kept the peer's connection from it, and refused its whole metadata "
                          "for good)");
  }
  char* name = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    const capi::status_t st = api_->load_remote_md(agent_.get(), md.data(), md.size(), &name);
    if (st != capi::kSuccess) {
      // NIXL 1.5.1 refuses another agent's metadata under a name it holds (measured: a peer restarted under
      // the same name; its log says NIXL_ERR_NOT_ALLOWED), and this status alone named neither the peer nor
      // the way out
      const bool held = !named.empty() && peers_.count(named) != 0;
      throw NixlCallError("load_remote_md", static_cast<int>(st),
                          "agent " + name_ + (held ? "; a peer named '" + named + "' is loaded already, with other " +
                                                         "metadata (restarted?): remove_peer() it first"
                                                   : std::string()));
    }
  }
  std::unique_ptr<char, decltype(&std::free)> owned(name, &std::free);  // strdup'ed by the C API
  std::string peer(owned.get());
  std::lock_guard<std::mutex> lk(mu_);
  peers_.insert(peer);
  return peer;
}

void NixlAgent::invalidate_remote(const std::string& peer) {
  check_c_name(peer, "peer");
  std::lock_guard<std::mutex> lk(mu_);
  peers_.erase(peer);
  check_capi(api_->invalidate_remote_md(agent_.get(), peer.c_str()), "invalidate_remote_md", peer);
}

bool NixlAgent::knows_peer(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(mu_);
  return peers_.count(peer) != 0;
}

void NixlAgent::connect(const std::string& peer) {
  check_c_name(peer, "peer");
  std::lock_guard<std::mutex> lk(mu_);
  check_capi(api_->agent_make_connection(agent_.get(), peer.c_str(), backend_args_.get()),
             "agent_make_connection", peer);
}

void NixlAgent::prepare(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                        const std::string& peer, std::optional<std::uint64_t> done_tag) {
  if (local.len != remote.len) {
    throw TransportError("post: " + req_context(req) + ": local and remote lengths differ (" +
                         std::to_string(local.len) + " vs " + std::to_string(remote.len) + ")");
  }
  if (!local.valid() || !remote.valid()) {
    throw TransportError("post: " + req_context(req) + ": a range is " + Region::kRefused);
  }
  check_c_name(peer, "peer", req_context(req));
  {
    std::lock_guard<std::mutex> lk(mu_);
    bool covered = false;
    for (const auto& [id, reg] : regions_) {
      (void)id;
      if (reg.region.contains(local)) covered = true;
    }
    if (!covered) throw TransportError("post: " + req_context(req) + ": local range not registered");
  }
  const NixlCapi& a = *api_;
  // Build descriptor lists and opt args outside the lock (pure local objects).
  capi::xfer_dlist_t raw = nullptr;
  check_capi(a.create_xfer_dlist(to_capi(local.kind), &raw), "create_xfer_dlist");
  XferDlistHandle ldl(api_, raw);
  check_capi(a.xfer_dlist_add_desc(ldl.get(), local.addr, local.len, local.dev_id),
             "xfer_dlist_add_desc");
  raw = nullptr;
  check_capi(a.create_xfer_dlist(to_capi(remote.kind), &raw), "create_xfer_dlist");
  XferDlistHandle rdl(api_, raw);
  check_capi(a.xfer_dlist_add_desc(rdl.get(), remote.addr, remote.len, remote.dev_id),
             "xfer_dlist_add_desc");

  capi::opt_args_t raw_args = nullptr;
  check_capi(a.create_opt_args(&raw_args), "create_opt_args");
  OptArgsHandle args(api_, raw_args);
  check_capi(a.opt_args_add_backend(args.get(), backend_.get()), "opt_args_add_backend");
  if (done_tag) {
    const auto msg = encode_notif({req, NotifKind::Done, *done_tag});
    check_capi(a.opt_args_set_notif_msg(args.get(), msg.data(), msg.size()),
               "opt_args_set_notif_msg");
    check_capi(a.opt_args_set_has_notif(args.get(), true), "opt_args_set_has_notif");
  }

  std::lock_guard<std::mutex> lk(mu_);
  if (xfers_.count(req) != 0) {
    throw TransportError("post: " + req_context(req) + " already has a live transfer");
  }
  capi::xfer_req_t raw_req = nullptr;
  check_capi(a.create_xfer_req(agent_.get(), to_capi(op), ldl.get(), rdl.get(), peer.c_str(),
                               &raw_req, args.get()),
             "create_xfer_req", req_context(req) + " to " + peer);
  xfers_.emplace(req, Xfer{XferReqHandle(api_, agent_.get(), raw_req), false});
}

XferState NixlAgent::post(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  if (it == xfers_.end() || it->second.posted) {
    throw TransportError("post: " + req_context(req) + (it == xfers_.end() ? " was not prepared"
                                                                          : " was already posted"));
  }
  it->second.posted = true;  // from here on NIXL may touch the buffers, whatever post returns
  const capi::status_t st = api_->post_xfer_req(agent_.get(), it->second.handle.get(), nullptr);
  if (st != capi::kSuccess && st != capi::kInProgress) {
    throw NixlCallError("post_xfer_req", static_cast<int>(st), req_context(req));
  }
  return st == capi::kSuccess ? XferState::Done : XferState::InProgress;
}

XferState NixlAgent::post(std::uint64_t req, XferOp op, const Region& local, const Region& remote,
                          const std::string& peer, std::optional<std::uint64_t> done_tag) {
  prepare(req, op, local, remote, peer, done_tag);
  try {
    return post(req);
  } catch (...) {
    (void)release(req);
    throw;
  }
}

XferStatus NixlAgent::status(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  return status_locked(req);
}

void NixlAgent::status_batch(const std::uint64_t* reqs, std::size_t n, XferStatus* out, std::string* errors) {
  std::lock_guard<std::mutex> lk(mu_);
  (void)errors;  // a status query of NIXL's raises nothing (a C call and a map lookup)
  for (std::size_t i = 0; i < n; ++i) out[i] = status_locked(reqs[i]);
}

XferStatus NixlAgent::status_locked(std::uint64_t req) noexcept {
  auto it = xfers_.find(req);
  if (it == xfers_.end() || !it->second.posted) return {XferState::Unknown, 0};
  const capi::status_t st = api_->get_xfer_status(agent_.get(), it->second.handle.get());
  switch (st) {
    case capi::kSuccess:
      return {XferState::Done, st};
    case capi::kInProgress:
      return {XferState::InProgress, st};
    case capi::kErrInvalidParam:
    case capi::kErrBackend:
    case capi::kErrInvalidState:
    case capi::kErrException:
    case capi::kErrNoTelemetry:
    case capi::kErrNotSupported:
    case capi::kInProgressWithErr:
      return {XferState::Failed, st};
  }
  return {XferState::Failed, st};  // a code this version does not know
}

ReleaseStatus NixlAgent::release(std::uint64_t req) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = xfers_.find(req);
  if (it == xfers_.end()) return kReleaseUnknownRequest;
  const capi::status_t st = it->second.handle.reset();
  // A failed release keeps the request under its id, so the caller's retry (the transport's sweep)
  // retries this very handle; live_requests() counts it meanwhile.
  if (st == capi::kSuccess) xfers_.erase(it);
  return static_cast<ReleaseStatus>(st);
}

std::size_t NixlAgent::live_requests() const {
  std::lock_guard<std::mutex> lk(mu_);
  return xfers_.size();
}

std::size_t NixlAgent::registered_regions() const {
  std::lock_guard<std::mutex> lk(mu_);
  return regions_.size();
}

void NixlAgent::send_notification(const std::string& peer, const NotifMessage& m) {
  send_raw_notification(peer, encode_notif_string(m));
}

void NixlAgent::send_raw_notification(const std::string& peer, const std::string& bytes) {
  check_c_name(peer, "peer");
  std::lock_guard<std::mutex> lk(mu_);
  check_capi(api_->gen_notif(agent_.get(), peer.c_str(), bytes.data(), bytes.size(),
                             backend_args_.get()),
             "gen_notif", "to " + peer);
}

std::vector<RawNotification> NixlAgent::fetch_notifications(std::size_t& skipped) {
  skipped = 0;
  std::vector<RawNotification> out;
  const NixlCapi& a = *api_;
  std::lock_guard<std::mutex> lk(mu_);
  capi::notif_map_t map = notif_map_.get();
  // getNotifs appends into the map; we copy everything out and clear it, also when a call throws
  // (otherwise the next fetch would deliver the same notifications again).
  struct ClearOnExit {
    const NixlCapi& a;
    capi::notif_map_t m;
    ~ClearOnExit() {
      if (a.notif_map_clear(m) != capi::kSuccess) note_capi_release_failure();
    }
  } clear_on_exit{a, map};
  check_capi(a.get_notifs(agent_.get(), map, nullptr), "get_notifs", "agent " + name_);
  std::size_t peers = 0;
  check_capi(a.notif_map_size(map, &peers), "notif_map_size");
  // An entry (or a peer's list) that a call fails to hand over is skipped and counted: the map is cleared
  // below whatever happens, so a throw here would lose every good notification of this fetch with it
  // (evidence that then only the engine's timers would replace, by Poisoned).
  for (std::size_t i = 0; i < peers; ++i) {
    const char* peer = nullptr;
    std::size_t n = 0;
    if (a.notif_map_get_agent_at(map, i, &peer) != capi::kSuccess || peer == nullptr ||
        a.notif_map_get_notifs_size(map, peer, &n) != capi::kSuccess) {
      ++skipped;  // (how many notes the peer had is unknown: one counted)
      continue;
    }
    for (std::size_t j = 0; j < n; ++j) {
      const void* data = nullptr;
      std::size_t len = 0;
      if (a.notif_map_get_notif(map, peer, j, &data, &len) != capi::kSuccess || (data == nullptr && len != 0)) {
        ++skipped;
        continue;
      }
      out.push_back({std::string(peer), std::string(static_cast<const char*>(data), len)});
    }
  }
  return out;
}

}  // namespace lifecycle::transport
