// Transport binding: NIXL / loopback transports (optionally wrapped by the fault injector) that drive
// an engine. Arguments are converted first, then the GIL is released around every call that can
// take time (agent creation, registration, posts, stop). C++ threads never touch Python.
#include <pybind11/stl.h>

#include <cmath>

#include "lifecycle/engine.hpp"
#include "lifecycle/errors.hpp"
#include "lifecycle/transport/bench.hpp"
#include "lifecycle/transport/faulty.hpp"
#include "lifecycle/transport/loopback.hpp"
#include "lifecycle/transport/nixl_agent.hpp"
#include "lifecycle/transport/nixl_capi.hpp"
#include "lifecycle/transport/transport.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

namespace tp = lifecycle::transport;

namespace {

// Raise lifecycle.errors.<cls>(message) with attributes set (callers never parse messages).
tp::MemKind to_kind(const std::string& k) {
  if (k == "dram" || k == "cpu") return tp::MemKind::Dram;
  if (k == "vram" || k == "cuda") return tp::MemKind::Vram;
  throw InvalidArgumentError("kind", "expected 'dram' or 'vram', got '" + k + "'");
}

tp::XferOp to_op(const std::string& op) {
  if (op == "read") return tp::XferOp::Read;
  if (op == "write") return tp::XferOp::Write;
  throw InvalidArgumentError("op", "expected 'read' or 'write', got '" + op + "'");
}

tp::Region region(std::uint64_t addr, std::uint64_t len, const std::string& kind, std::uint64_t dev) {
  if (addr == 0) throw InvalidArgumentError("addr", "null address");
  if (len == 0) throw InvalidArgumentError("nbytes", "must be > 0");
  const tp::Region r{static_cast<std::uintptr_t>(addr), static_cast<std::size_t>(len), dev, to_kind(kind)};
  if (!r.valid()) {
    throw InvalidArgumentError("nbytes", std::to_string(len) + " bytes at address " + std::to_string(addr) +
                                             ": the range is " + tp::Region::kRefused);
  }
  return r;
}

// An offer's role (TransferItem::remote_role): None (not known: not checked), 0 (sender) or 1 (receiver), the
// engine binding's codes.
std::optional<Role> role_arg(py::handle h, const char* name, const std::string& where) {
  if (h.is_none()) return std::nullopt;
  std::string got = std::string("a ") + Py_TYPE(h.ptr())->tp_name;
  if (PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr())) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow == 0 && (v == 0 || v == 1)) return static_cast<Role>(v);
    got = overflow != 0 ? "an int out of range" : std::to_string(v);
  }
  throw InvalidArgumentError(name, where + "expected None, 0 (sender) or 1 (receiver), got " + got);
}

py::object role_code(const std::optional<Role>& r) {
  return r ? py::object(py::int_(static_cast<int>(*r))) : py::object(py::none());
}

// A duration option in seconds, finite and in [lo, hi], as microseconds (no overflowing cast).
std::chrono::microseconds seconds_opt(const char* name, double v, double lo, double hi) {
  if (!std::isfinite(v) || v < lo || v > hi) {
    throw InvalidArgumentError(name, "expected seconds in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                         "], got " + std::to_string(v));
  }
  return std::chrono::microseconds(static_cast<std::int64_t>(v * 1e6));
}

// An agent's name: a str UTF-8 can encode (text_arg), not empty, and without NUL: it goes to NIXL as a C
// string, and one holding a NUL was cut there (the peers saw another name).
std::string agent_name(py::handle h) {
  std::string name = text_arg(h, "name");
  if (name.empty()) throw InvalidArgumentError("name", "must not be empty");
  tp::check_c_name(name, "name");
  return name;
}

double get_f(const py::dict& d, const char* k, double dflt) {
  if (!d.contains(k)) return dflt;
  try {
    return d[k].cast<double>();
  } catch (const py::cast_error&) {
    throw InvalidArgumentError(k, std::string("expected a number, got a ") + Py_TYPE(d[k].ptr())->tp_name);
  }
}

double probability(const py::dict& d, const char* k) {
  const double p = get_f(d, k, 0);
  if (!(p >= 0 && p <= 1)) throw InvalidArgumentError(k, "expected a probability in [0, 1], got " + std::to_string(p));
  return p;
}

std::unique_ptr<tp::Agent> maybe_faulty(std::unique_ptr<tp::Agent> agent, const py::object& faults) {
  if (faults.is_none()) return agent;
  if (!py::isinstance<py::dict>(faults)) {
    throw InvalidArgumentError("faults", std::string("expected a dict of fault options, got a ") +
                                             Py_TYPE(faults.ptr())->tp_name);
  }
  py::dict d = faults.cast<py::dict>();
  tp::FaultOptions f;
  try {
    f.seed = d.contains("seed") ? d["seed"].cast<std::uint64_t>() : 0;
  } catch (const py::cast_error&) {
    throw InvalidArgumentError("seed", "expected an int in [0, 2**64)");
  }
  f.delay = probability(d, "delay");
  constexpr double kMaxDelayS = static_cast<double>(tp::kMaxFaultDelay.count());
  f.delay_for = seconds_opt("delay_s", get_f(d, "delay_s", 0.002), 0, kMaxDelayS);
  f.error = probability(d, "error");
  f.disconnect = probability(d, "disconnect");
  f.never_completes = probability(d, "never_completes");
  f.drop_notification = probability(d, "drop_notification");
  f.duplicate_notification = probability(d, "duplicate_notification");
  f.duplicate_after = seconds_opt("duplicate_after_s", get_f(d, "duplicate_after_s", 0), 0, kMaxDelayS);
  f.release_failure = probability(d, "release_failure");
  return std::make_unique<tp::FaultyAgent>(std::move(agent), f);
}

constexpr int kMaxStopResends = 64;

tp::TransportOptions options(bool unsafe_release_on_cancel, bool unsafe_ack_stop_at_once, double tick_s,
                             int stop_resends, double stop_resend_delay_s) {
  tp::TransportOptions o;
  o.unsafe_release_on_cancel = unsafe_release_on_cancel;
  o.unsafe_ack_stop_at_once = unsafe_ack_stop_at_once;
  // > 0: the tick runs the engine's timers and the sweep that retries failed releases
  o.progress.tick_interval = seconds_opt("tick", tick_s, 1e-5, 10);
  if (stop_resends < 0 || stop_resends > kMaxStopResends) {
    throw InvalidArgumentError("stop_resends", "expected an int in [0, " + std::to_string(kMaxStopResends) +
                                                   "] (0: off), got " + std::to_string(stop_resends));
  }
  o.stop_resends = static_cast<std::uint32_t>(stop_resends);
  o.stop_resend_delay = std::chrono::duration_cast<std::chrono::milliseconds>(
      seconds_opt("stop_resend_delay", stop_resend_delay_s, 1e-3, 3600));
  return o;
}

py::dict stats_dict(const tp::TransportStats& s) {
  py::dict d;
#define F(x) d[#x] = s.x;
  F(registered_regions) F(live_xfers) F(active) F(passive) F(watched) F(posted) F(completed_in_post)
  F(completed) F(failed) F(post_errors) F(cancelled_before_post) F(peer_stops) F(stops_sent)
  F(quiesced_sent) F(done_received) F(quiesced_received) F(orphan_notifications) F(bad_notifications)
  F(send_errors) F(release_failures) F(unsafe_releases) F(late_evidence) F(abandoned) F(passive_swept) F(stops_unanswered)
  F(unreleased) F(unsafe_acks) F(stale_notifications) F(held_offers)
  F(remembered_stops)
  F(posted_records)
  F(forgone_offers)
  F(stops_resent) F(resends_pending) F(resends_skipped)
#undef F
  return d;
}

}  // namespace

static py::dict bench_dict(const tp::BenchResult& r) {
  py::dict d;
  d["seconds"] = r.seconds;
  d["transfers"] = r.transfers;
  d["failed"] = r.failed;
  d["latency_ns"] = r.latency_ns;
  d["batch_ns"] = r.batch_ns;
  d["post_ns"] = r.post_ns;
  return d;
}

void register_transport(py::module_& m) {
  // Transport errors -> lifecycle.errors (tried before the core translator: registered later).
  py::list syms;
  for (const auto& s : tp::nixl_capi_required_symbols()) syms.append(s);
  m.attr("NIXL_CAPI_SYMBOLS") = py::tuple(syms);
  m.attr("NIXL_CAPI_ENV") = tp::NixlCapi::kPathEnv;
  m.attr("METADATA_MAGIC") = py::bytes(tp::Transport::kMetadataMagic);  // metadata()'s envelope starts with it
  m.attr("REGION_END") = py::int_(static_cast<std::uint64_t>(tp::Region::kEnd));  // Mem checks with it
  m.attr("REGION_REFUSED") = tp::Region::kRefused;                                 // ... and says this

  m.def("load_nixl_capi", [](const std::string& path, const std::string& source) {
    tp::check_c_name(path, "path");  // (dlopen takes a C string: "lib.so\0junk" loaded lib.so)
    std::shared_ptr<const tp::NixlCapi> api;
    const auto [chosen, from] = tp::NixlCapi::resolve(path, source);  // (getenv with the GIL held: see resolve)
    {
      NoGil nogil;
      api = tp::NixlCapi::load(chosen, from);
    }
    return api->path();
  }, py::arg("path"), py::arg("source") = "",
     "Load libnixl_capi.so (an empty path: $KV_LIFECYCLE_NIXL_CAPI's) and resolve every symbol; returns the path "
     "used. Raises NixlUnavailable, naming `source` as where the path came from.");

  py::class_<tp::Transport>(m, "_Transport", guarded_metaclass(), guarded_new_setup())
      .def_static("nixl", [](std::shared_ptr<Engine> engine, py::handle name_arg, const std::string& capi_path,
                             bool unsafe_release_on_cancel, const py::object& faults,
                             const std::vector<std::pair<std::string, std::string>>& ucx_params,
                             bool nixl_progress_thread, double tick_s, bool unsafe_ack_stop_at_once,
                             const std::string& capi_source, int stop_resends, double stop_resend_delay_s) {
             const std::string name = agent_name(name_arg);
             tp::check_c_name(capi_path, "capi_path");  // (dlopen takes a C string: "lib.so\0junk" loaded lib.so)
             const tp::TransportOptions topts = options(unsafe_release_on_cancel, unsafe_ack_stop_at_once, tick_s,
                                                        stop_resends, stop_resend_delay_s);
             std::unique_ptr<tp::Transport> t;
             std::unique_ptr<tp::Agent> agent;
             const auto [chosen, from] = tp::NixlCapi::resolve(capi_path, capi_source);  // (see load_nixl_capi)
             {
               NoGil nogil;
               auto api = tp::NixlCapi::load(chosen, from);
               tp::NixlAgentOptions o;
               o.name = name;
               o.ucx_params = ucx_params;
               o.nixl_progress_thread = nixl_progress_thread;
               agent = std::make_unique<tp::NixlAgent>(std::move(api), std::move(o));
             }
             agent = maybe_faulty(std::move(agent), faults);
             {
               NoGil nogil;
               t = std::make_unique<tp::Transport>(std::move(engine), std::move(agent), topts);
             }
             return t;
           }, py::arg("engine"), py::arg("name"), py::arg("capi_path"), py::arg("unsafe_release_on_cancel") = false,
           py::arg("faults") = py::none(), py::arg("ucx_params") = std::vector<std::pair<std::string, std::string>>{},
           py::arg("nixl_progress_thread") = false, py::arg("tick_s") = 0.001,
           py::arg("unsafe_ack_stop_at_once") = false, py::arg("capi_source") = "", py::arg("stop_resends") = 8,
           py::arg("stop_resend_delay_s") = 0.1)
      .def_static("loopback", [](std::shared_ptr<Engine> engine, py::handle name_arg, double bytes_per_second,
                                 double latency_s, bool unsafe_release_on_cancel, const py::object& faults,
                                 double tick_s, bool unsafe_ack_stop_at_once, int stop_resends,
                                 double stop_resend_delay_s) {
             const std::string name = agent_name(name_arg);
             tp::LoopbackOptions o;
             o.name = name;
             const tp::TransportOptions topts = options(unsafe_release_on_cancel, unsafe_ack_stop_at_once, tick_s,
                                                        stop_resends, stop_resend_delay_s);
             o.bytes_per_second = bytes_per_second;  // (LoopbackAgent checks it)
             o.latency = seconds_opt("latency", latency_s, 0, static_cast<double>(tp::kMaxLoopbackLatency.count()));
             std::unique_ptr<tp::Agent> agent = std::make_unique<tp::LoopbackAgent>(o);
             agent = maybe_faulty(std::move(agent), faults);
             NoGil nogil;
             return std::make_unique<tp::Transport>(std::move(engine), std::move(agent), topts);
           }, py::arg("engine"), py::arg("name"), py::arg("bytes_per_second") = 0.0, py::arg("latency_s") = 0.0,
           py::arg("unsafe_release_on_cancel") = false, py::arg("faults") = py::none(), py::arg("tick_s") = 0.001,
           py::arg("unsafe_ack_stop_at_once") = false, py::arg("stop_resends") = 8,
           py::arg("stop_resend_delay_s") = 0.1)
      .def_property_readonly("name", [](tp::Transport& t) { return t.name(); })
      .def_property_readonly("backend", [](tp::Transport& t) { return std::string(t.agent().backend_name()); })
      .def("register_region", [](tp::Transport& t, py::handle addr, py::handle nbytes, py::handle kind,
                                 py::handle device) {
             tp::Region r = region(uint64_arg(addr, "addr"), uint64_arg(nbytes, "nbytes"), text_arg(kind, "kind"),
                                   uint64_arg(device, "device"));
             NoGil nogil;
             return t.register_region(r);
           }, py::arg("addr"), py::arg("nbytes"), py::arg("kind") = "dram", py::arg("device") = 0)
      .def("deregister_region", [](tp::Transport& t, py::handle id_arg) {
             const std::uint64_t id = uint64_arg(id_arg, "region_id");
             NoGil nogil;
             t.deregister_region(id);
           }, py::arg("region_id"))
      .def("metadata", [](tp::Transport& t) {
             std::string md;
             {
               NoGil nogil;
               md = t.metadata();
             }
             return py::bytes(md);
           })
      .def("add_peer", [](tp::Transport& t, const py::bytes& md) {
             std::string s = md;
             NoGil nogil;
             return t.add_peer(s);
           }, py::arg("metadata"))
      .def("remove_peer", [](tp::Transport& t, py::handle peer_arg) {
             const std::string peer = text_arg(peer_arg, "peer");  // (a bytes would pass as a std::string)
             NoGil nogil;
             t.remove_peer(peer);
           }, py::arg("peer"))
      .def("transfer", [](tp::Transport& t, py::handle req_arg, py::handle op, py::handle laddr,
                          py::handle len_arg, py::handle lkind, py::handle ldev, py::handle peer_arg,
                          py::handle raddr, py::handle rkind, py::handle rdev, py::handle tag_arg,
                          py::handle role_arg_) {
             const std::uint64_t req = uint64_arg(req_arg, "request");
             const std::uint64_t len = uint64_arg(len_arg, "nbytes");
             const std::string peer = text_arg(peer_arg, "peer");
             tp::XferOp o = to_op(text_arg(op, "op"));
             tp::Region l = region(uint64_arg(laddr, "local_addr"), len, text_arg(lkind, "local_kind"),
                                   uint64_arg(ldev, "local_device"));
             tp::Region r = region(uint64_arg(raddr, "remote_addr"), len, text_arg(rkind, "remote_kind"),
                                   uint64_arg(rdev, "remote_device"));
             const std::uint64_t tag = uint64_arg(tag_arg, "tag");
             const std::optional<Role> role = role_arg(role_arg_, "remote_role", "");
             tp::PostResult res;
             {
               NoGil nogil;
               res = t.transfer(req, o, l, r, peer, tag, role);
             }
             return std::string(tp::to_string(res));
           }, py::arg("request"), py::arg("op"), py::arg("local_addr"), py::arg("nbytes"), py::arg("local_kind"),
           py::arg("local_device"), py::arg("peer"), py::arg("remote_addr"), py::arg("remote_kind"),
           py::arg("remote_device"), py::arg("tag"), py::arg("remote_role") = py::none())
      .def("transfer_batch", [](tp::Transport& t, const py::list& items) {
             // Every item parsed (a bad one raises here, before anything is built), then one call.
             const std::size_t n = items.size();
             std::vector<std::string> peers(n);
             std::vector<tp::TransferItem> xs(n);
             static const char* const kFields[11] = {"request", "op", "local_addr", "nbytes", "local_kind",
                                                     "local_device", "peer", "remote_addr", "remote_kind",
                                                     "remote_device", "tag"};
             for (std::size_t i = 0; i < n; ++i) {
               if (!py::isinstance<py::tuple>(items[i])) {
                 throw InvalidArgumentError("transfers", "item " + std::to_string(i) + ": expected a tuple, got " +
                                                             std::string(Py_TYPE(items[i].ptr())->tp_name));
               }
               const py::tuple it = items[i].cast<py::tuple>();
               if (it.size() != 11 && it.size() != 12) {  // (12: with the offer's role)
                 throw InvalidArgumentError("transfers", "item " + std::to_string(i) + ": expected 11 or 12 fields, "
                                                             "got " + std::to_string(it.size()));
               }
               std::size_t k = 0;  // the field being read: named when its cast fails
               try {
                 auto u64 = [&](std::size_t f) { k = f; return it[f].cast<std::uint64_t>(); };
                 auto str = [&](std::size_t f) { k = f; return it[f].cast<std::string>(); };
                 const auto len = u64(3);
                 k = 6;
                 if (!PyUnicode_Check(it[6].ptr())) throw py::cast_error();  // (a bytes would pass as a std::string)
                 peers[i] = text_arg(it[6], "peer");
                 const std::uint64_t req = u64(0);
                 const tp::XferOp op = to_op(str(1));
                 const tp::Region local = region(u64(2), len, str(4), u64(5));
                 const tp::Region remote = region(u64(7), len, str(8), u64(9));
                 const std::uint64_t tag = u64(10);
                 const std::optional<Role> role =
                     it.size() == 12 ? role_arg(it[11], "transfers", "item " + std::to_string(i) +
                                                                           ": field remote_role (11): ")
                                     : std::nullopt;
                 xs[i] = tp::TransferItem{req, op, local, remote, &peers[i], tag, role};
               } catch (const py::cast_error&) {
                 throw InvalidArgumentError("transfers", "item " + std::to_string(i) + ": field " + kFields[k] + " (" +
                                                             std::to_string(k) + ") is a " +
                                                             std::string(Py_TYPE(it[k].ptr())->tp_name) + ", expected " +
                                                             (k == 1 || k == 4 || k == 6 || k == 8 ? "a str"
                                                                                                 : "an int in [0, 2**64)"));
               }
             }
             std::vector<tp::TransferOutcome> out(n);
             {
               NoGil nogil;
               t.transfer_batch(xs.data(), n, out.data());
             }
             py::list res(n);
             for (std::size_t i = 0; i < n; ++i) {
               if (!out[i].error) {
                 res[i] = py::str(tp::to_string(out[i].result));
                 continue;
               }
               py::object exc = error_object(out[i].error);
               if (exc.is_none()) {  // not one of ours (e.g. std::bad_alloc): a RuntimeError naming it
                 std::string what = "unknown error";
                 try {
                   std::rethrow_exception(out[i].error);
                 } catch (const std::exception& e) {
                   what = e.what();
                 } catch (...) {
                 }
                 exc = py::module_::import("builtins").attr("RuntimeError")(
                     lossless_str("transfer: request " + std::to_string(xs[i].req) + ": " + what));
               }
               res[i] = exc;
             }
             return res;
           }, py::arg("transfers"),
           "transfer() for each item (request, op, local_addr, nbytes, local_kind, local_device, peer, remote_addr, "
           "remote_kind, remote_device, tag[, remote_role]) in one call: a list, per item its result string or the "
           "exception transfer() would have raised for it")
      .def("expect", [](tp::Transport& t, py::handle req_arg, py::handle peer_arg, py::handle laddr,
                        py::handle len, py::handle lkind, py::handle ldev) {
             const std::uint64_t req = uint64_arg(req_arg, "request");
             const std::string peer = text_arg(peer_arg, "peer");
             tp::Region l = region(uint64_arg(laddr, "local_addr"), uint64_arg(len, "nbytes"),
                                   text_arg(lkind, "local_kind"), uint64_arg(ldev, "local_device"));
             std::optional<Role> role;
             std::uint64_t tag = 0;
             {
               NoGil nogil;
               tag = t.expect(req, peer, l, &role);
             }
             return py::make_tuple(tag, role_code(role));
           }, py::arg("request"), py::arg("peer"), py::arg("local_addr"), py::arg("nbytes"), py::arg("local_kind"),
           py::arg("local_device"),
           "(tag, role): the offer's tag and its session's role (0 sender, 1 receiver; None on a bare transport)")
      .def("forgo", [](tp::Transport& t, py::handle req_arg, py::handle peer_arg, py::handle tag_arg) {
             const std::uint64_t req = uint64_arg(req_arg, "request");
             const std::string peer = text_arg(peer_arg, "peer");
             const std::uint64_t tag = uint64_arg(tag_arg, "tag");
             NoGil nogil;
             t.forgo(req, peer, tag);
           }, py::arg("request"), py::arg("peer"), py::arg("tag"))
      .def("stop", [](tp::Transport& t) {
             NoGil nogil;
             t.stop();
           })
      .def_property_readonly("stopped", &tp::Transport::stopped)
      // the reads below take the agent's lock, which the progress thread holds across each NIXL call: the
      // GIL goes first, so a slow call stalls only the caller, not every Python thread
      .def("stats", [](const tp::Transport& t) {
             tp::TransportStats s;
             {
               NoGil nogil;
               s = t.stats();
             }
             return stats_dict(s);
           })
      .def("progress_stats", [](const tp::Transport& t) {
             tp::NixlProgressStats s;
             {
               NoGil nogil;
               s = t.progress_stats();
             }
             py::dict d;
             d["passes"] = s.passes; d["status_polls"] = s.status_polls; d["completions"] = s.completions;
             d["failures"] = s.failures; d["notifications"] = s.notifications;
             d["bad_notifications"] = s.bad_notifications; d["poll_errors"] = s.poll_errors;
             d["sink_errors"] = s.sink_errors;
             return d;
           })
      .def("fault_stats", [](tp::Transport& t) -> py::object {
             auto* f = dynamic_cast<tp::FaultyAgent*>(&t.agent());
             if (f == nullptr) return py::none();
             tp::FaultStats s;
             {
               NoGil nogil;
               s = f->fault_stats();
             }
             py::dict d;
             d["seed"] = f->options().seed; d["delays"] = s.delays; d["errors"] = s.errors;
             d["disconnects"] = s.disconnects; d["never_completes"] = s.never_completes; d["dropped"] = s.dropped;
             d["duplicated"] = s.duplicated; d["release_failures"] = s.release_failures;
             return d;
           })
      .def("recent_failures", [](const tp::Transport& t) {
             std::vector<tp::Transport::Failure> failures;
             {
               NoGil nogil;
               failures = t.recent_failures();
             }
             py::list out;
             for (const auto& f : failures) {
               PyObject* text =
                   PyUnicode_DecodeUTF8(f.reason.data(), static_cast<Py_ssize_t>(f.reason.size()), "replace");
               if (text == nullptr) throw py::error_already_set();
               out.append(py::make_tuple(f.req, py::reinterpret_steal<py::str>(text), f.serial));
             }
             return out;
           })
      .def("completions", &tp::Transport::completions)
      .def("wait_completions", [](tp::Transport& t, py::handle n_arg, double timeout_s) {
             const std::uint64_t n = uint64_arg(n_arg, "n");
             const auto us = seconds_opt("timeout", timeout_s, 0, 86400);  // checked before the GIL goes
             NoGil nogil;
             return t.wait_completions(n, static_cast<std::int64_t>(us.count()) * 1000);
           }, py::arg("n"), py::arg("timeout"));

  m.def("_bench_paired", [](tp::Transport& a, tp::Transport& b, py::handle peer_arg, py::handle op_arg,
                            py::handle local_addr, py::handle remote_addr, py::handle size, py::handle batch,
                            py::handle count, py::handle first_req, bool batch_calls) {
    if (&a == &b) throw InvalidArgumentError("b", "must be another transport than a");
    const std::string peer = text_arg(peer_arg, "peer");
    const tp::XferOp op = to_op(text_arg(op_arg, "op"));
    tp::BenchSpec spec{peer, op, static_cast<std::uintptr_t>(uint64_arg(local_addr, "local_addr")),
                       static_cast<std::uintptr_t>(uint64_arg(remote_addr, "remote_addr")), uint64_arg(size, "size"),
                       uint64_arg(batch, "batch"), uint64_arg(count, "count"), uint64_arg(first_req, "first_request"),
                       batch_calls};
    std::pair<tp::BenchResult, tp::BenchResult> r;
    {
      NoGil nogil;
      r = tp::bench_paired(a, b, spec);
    }
    return py::make_tuple(bench_dict(r.first), bench_dict(r.second));
  }, py::arg("a"), py::arg("b"), py::arg("peer"), py::arg("op"), py::arg("local_addr"), py::arg("remote_addr"),
     py::arg("size"), py::arg("batch"), py::arg("count"), py::arg("first_request"), py::arg("batch_calls") = false,
     "Run `count` transfers of `size` bytes, `batch` in flight, entirely in C++ (GIL released), through `a` and "
     "`b` batch by batch in alternation (a b, b a, ...): batch_ns[i] of the two results are a pair measured back "
     "to back. With an engine attached to a transport: advertise, transfer, wait (engine wait_ready + drain), "
     "terminate (batch_calls: the batch's advertisements in one advertise_batch, its transfers in one transfer_batch and "
     "each drain's terminations in one apply_batch); without one: transfer (batch_calls: transfer_batch) and wait for "
     "the completion count. Slot i of a batch uses local/remote "
     "address + i*size. `a` uses request ids first_request.., `b` first_request+count..");
}

}  // namespace lifecycle::bindings
