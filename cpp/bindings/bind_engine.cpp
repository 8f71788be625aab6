// Engine binding: convert and check arguments first, then call pure C++ (GIL released only around
// calls that can wait or run long: batches and wait_ready).
#include <Python.h>

#include <cstring>
#include <string_view>

#include "lifecycle/engine.hpp"
#include "lifecycle/errors.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

static std::uint64_t to_u64(py::handle h, const char* what) {
  PyObject* o = h.ptr();
  if (!PyLong_Check(o) || PyBool_Check(o))
    throw InvalidArgumentError(what, std::string("expected a non-negative int, got ") + Py_TYPE(o)->tp_name);
  unsigned long long v = PyLong_AsUnsignedLongLong(o);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw InvalidArgumentError(what, "must be an int in [0, 2**64), got " + int_text(h));
  }
  return static_cast<std::uint64_t>(v);
}

static std::int64_t to_i64(py::handle h, const char* what) {
  PyObject* o = h.ptr();
  if (!PyLong_Check(o) || PyBool_Check(o))
    throw InvalidArgumentError(what, std::string("expected an int, got ") + Py_TYPE(o)->tp_name);
  long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw InvalidArgumentError(what, "out of the int64 range: " + int_text(h));
  }
  return static_cast<std::int64_t>(v);
}

static Event to_event(py::handle h) {
  std::int64_t e = to_i64(h, "event");
  if (e < 0 || e >= kNumEvents) throw InvalidArgumentError("event", "no event with index " + std::to_string(e));
  return static_cast<Event>(e);
}

// A role as advertise() takes it ("sender" / "receiver", which a Role member is) or as its code (0 / 1).
static Role to_role(py::handle h) {
  if (py::isinstance<py::str>(h)) {
    const std::string s = text_arg(h, "role");  // (a lone surrogate: InvalidArgument, not a bare RuntimeError)
    if (s == "sender" || s == "receiver") return s == "sender" ? Role::sender : Role::receiver;
    throw InvalidArgumentError("role", "expected 'sender' or 'receiver' (or 0 / 1), got '" + s.substr(0, 40) +
                                           (s.size() > 40 ? "...'" : "'"));
  }
  std::int64_t r = to_i64(h, "role");
  if (r < 0 || r > 1) throw InvalidArgumentError("role", "must be 0 (sender) or 1 (receiver), got " + std::to_string(r));
  return static_cast<Role>(r);
}

// Raise the typed error for a rejected event; return whether the state changed.
static bool check(const ApplyResult& r, std::uint64_t req, Event ev) {
  switch (r.status) {
    case Status::Moved:
      return true;
    case Status::Stay:
    case Status::Late:
    case Status::Deferred:
      return false;
    case Status::Illegal:
      throw IllegalTransitionError(req, r.from, ev);
    case Status::Unknown:
      throw UnknownRequestError(req, ev);
    case Status::Duplicate:
      throw DuplicateRequestError(req, r.from);
    case Status::NoSlot:
      throw PoolExhaustedError(req, "no free slot in the buffer pool");
    case Status::BadArgument:
      throw InvalidArgumentError("event", std::string(kEventNames[static_cast<int>(ev)]) + " cannot be applied here");
  }
  return false;
}

// A batch stopped by an allocation failure keeps the items it applied (Engine's contract): MemoryError, with
// `.statuses` one code per item as the batch answers it, kNotApplied for the items it did not reach.
constexpr char kNotApplied = '\xff';

[[noreturn]] static void batch_out_of_memory(const std::string& out) {
  py::object err = py::module_::import("builtins").attr("MemoryError")(
      "the batch ran out of memory: the items it applied stay applied; .statuses has one code per item, 255 "
      "for those not applied");
  err.attr("statuses") = py::bytes(out);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
  throw py::error_already_set();
}

namespace {
struct BufView {
  py::buffer_info info;
  std::size_t n;
};
}  // namespace

static BufView view(py::handle obj, const char* what, std::size_t itemsize) {
  if (!PyObject_CheckBuffer(obj.ptr()))
    throw InvalidArgumentError(what, std::string("expected a buffer (bytes, array.array, numpy array), got ") +
                                         Py_TYPE(obj.ptr())->tp_name);
  py::buffer b = py::reinterpret_borrow<py::buffer>(obj);
  py::buffer_info bi;
  try {
    bi = b.request();
  } catch (py::error_already_set& e) {  // the exporter refused (numpy: "cannot include dtype 'M' in a buffer")
    throw InvalidArgumentError(what, std::string("its buffer cannot be exported (") + e.what() + ")");
  }
  if (static_cast<std::size_t>(bi.itemsize) != itemsize || bi.ndim != 1 ||
      (bi.ndim == 1 && bi.strides[0] != bi.itemsize))
    throw InvalidArgumentError(what, "expected a contiguous 1-D buffer of " + std::to_string(itemsize) +
                                         "-byte items, got itemsize " + std::to_string(bi.itemsize) + ", ndim " +
                                         std::to_string(bi.ndim));
  // Integers in native byte order only: a float64 or big-endian buffer of the right size was read as raw bits.
  std::string f = bi.format;
  if (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == '<')) f.erase(0, 1);
  const bool ok = f.size() == 1 && std::string_view(itemsize == 8 ? "qQlLnN" : "bBc").find(f[0]) != std::string_view::npos;
  if (!ok) {
    throw InvalidArgumentError(what, "expected integers in native byte order (array 'q'/'Q', numpy int64/uint64, "
                                     "bytes), got buffer format '" + bi.format + "'");
  }
  std::size_t n = static_cast<std::size_t>(bi.size);
  // A signed buffer's negative items are no ids: read as uint64 they were ids from 2**64 down
  // (advertise_batch(np.array([-1])) made session 18446744073709551615, where advertise(-1) is refused).
  if (itemsize == 8 && std::string_view("qln").find(f[0]) != std::string_view::npos) {
    const auto* p = static_cast<const std::int64_t*>(bi.ptr);
    for (std::size_t i = 0; i < n; ++i)
      if (p[i] < 0)
        throw InvalidArgumentError(what, "must be ints in [0, 2**64), got " + std::to_string(p[i]) + " (item " +
                                             std::to_string(i) + ")");
  }
  return BufView{std::move(bi), n};
}

// nbytes as advertise and advertise_batch take it: >= 0, within one slot of this engine's pool (the batch once
// answered a size past slot_size, or any size without a pool, with BadArgument for every item).
static std::uint64_t to_nbytes(Engine& e, py::handle h) {
  const std::int64_t nb = to_i64(h, "nbytes");
  if (nb < 0) throw InvalidArgumentError("nbytes", "must be >= 0, got " + std::to_string(nb));
  const std::uint64_t unb = static_cast<std::uint64_t>(nb);
  if (unb > 0 && e.pool()->num_slots() == 0)
    throw InvalidArgumentError("nbytes", "this engine has no buffer pool (num_slots=0)");
  if (unb > e.pool()->slot_size())
    throw InvalidArgumentError("nbytes",
                               std::to_string(nb) + " exceeds slot_size " + std::to_string(e.pool()->slot_size()));
  return unb;
}

// The engine's clock: None (steady) or a core clock whose now_ns is the core's.  The engine reads it in C++, never
// through Python: a subclass's Python now_ns was silently ignored (every timer and timestamp on the base clock's
// time while the clock itself said another).
static std::shared_ptr<Clock> to_clock(py::handle h) {
  if (h.is_none()) return nullptr;
  const py::handle base = py::type::of<Clock>();
  if (PyObject_IsInstance(h.ptr(), base.ptr()) != 1) {
    PyErr_Clear();  // (an __instancecheck__ that raised: no clock either)
    throw InvalidArgumentError("clock", std::string("expected a lifecycle clock (ManualClock, SteadyClock) or None, "
                                                    "got ") + Py_TYPE(h.ptr())->tp_name);
  }
  PyObject* mro = Py_TYPE(h.ptr())->tp_mro;  // the class that defines now_ns for this object
  for (Py_ssize_t i = 0; mro != nullptr && i < PyTuple_GET_SIZE(mro); ++i) {
    auto* k = reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(mro, i));
    if (k->tp_dict == nullptr || PyDict_GetItemString(k->tp_dict, "now_ns") == nullptr) continue;
    const PyObject* kt = reinterpret_cast<PyObject*>(k);
    if (kt != base.ptr() && kt != py::type::of<ManualClock>().ptr() && kt != py::type::of<SteadyClock>().ptr()) {
      throw InvalidArgumentError("clock", std::string("a ") + Py_TYPE(h.ptr())->tp_name + " overrides now_ns in "
                                          "Python, which the engine never calls (it reads the core's clock): drive a "
                                          "ManualClock with advance() / set() instead");
    }
    break;
  }
  return h.cast<std::shared_ptr<Clock>>();
}

static py::dict health_dict(const Health& h) {
  py::dict d;
  d["healthy"] = h.healthy;
  py::list reasons;
  for (auto& r : h.reasons) reasons.append(r);
  d["reasons"] = reasons;
  py::dict counts;
  for (int k = 0; k < kNumStates; ++k) counts[kStateNames[k]] = h.counts[static_cast<std::size_t>(k)];
  d["counts"] = counts;
  d["quarantined"] = h.quarantined;
  d["quarantine_budget"] = h.quarantine_budget;
  d["oldest_nonterminal_ns"] = h.oldest_nonterminal_ns;
  d["since_progress_ns"] = h.since_progress_ns;
  d["backend_healthy"] = h.backend_healthy;
  // (set_backend_health takes text only; "replace" for a reason set from C++ that is not UTF-8)
  PyObject* reason = PyUnicode_DecodeUTF8(h.backend_reason.data(), static_cast<Py_ssize_t>(h.backend_reason.size()), "replace");
  if (reason == nullptr) throw py::error_already_set();
  d["backend_reason"] = py::reinterpret_steal<py::object>(reason);
  d["live"] = h.live;
  return d;
}

// Every queued record (the first `max`) merged straight into a bytes object: one copy from the shard queues.
static py::bytes drain_bytes(Engine& e, bool hold_notices = false, std::size_t max = SIZE_MAX) {
  py::object out;
  e.drain_to([&out](std::size_t n) {
    PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n * sizeof(Record)));
    if (b == nullptr) throw py::error_already_set();
    out = py::reinterpret_steal<py::object>(b);
    return reinterpret_cast<Record*>(PyBytes_AS_STRING(b));
  }, hold_notices, max);
  if (!out) return py::bytes();
  return py::reinterpret_borrow<py::bytes>(out);
}

void register_engine(py::module_& m) {
  py::list status;
  for (const char* s : kStatusNames) status.append(s);
  m.attr("STATUS_NAMES") = py::tuple(status);
  py::list kinds;
  for (const char* s : kRecordKindNames) kinds.append(s);
  m.attr("RECORD_KIND_NAMES") = py::tuple(kinds);
  m.attr("RECORD_SIZE") = sizeof(Record);
  m.attr("MAX_DURATION_NS") = kMaxDurationNs;  // the longest timer a Config takes (engine.py checks seconds with it)
  m.attr("RECORD_FORMAT") = "<QqIIBBBBBBBBQ";  // ... deferred, result, seq

  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine", guarded_metaclass(), guarded_new_setup())
      .def(py::init([](std::int64_t transfer_timeout_ns, std::int64_t cancel_grace_ns, std::int64_t progress_deadline_ns,
                       std::int64_t quarantine_budget, std::int64_t num_slots, std::int64_t slot_size,
                       std::int64_t tombstones, std::int64_t shards, py::handle clock_arg,
                       std::int64_t wait_spin_ns) {
             std::shared_ptr<Clock> clock = to_clock(clock_arg);
             Config c;
             if (quarantine_budget < 0 || quarantine_budget > 0xffffffffLL)
               throw InvalidArgumentError("quarantine_budget", "must be in [0, 2**32)");
             if (num_slots < 0 || num_slots > (1LL << 31)) throw InvalidArgumentError("num_slots", "must be in [0, 2**31]");
             if (slot_size < 0) throw InvalidArgumentError("slot_size", "must be >= 0");
             if (tombstones < 0 || tombstones > 0xffffffffLL) throw InvalidArgumentError("tombstones", "must be in [0, 2**32)");
             if (shards < 1 || shards > 4096) throw InvalidArgumentError("shards", "must be in [1, 4096]");
             if (wait_spin_ns < 0 || wait_spin_ns > 1'000'000'000)
               throw InvalidArgumentError("wait_spin", "must be in [0, 1] seconds");
             c.transfer_timeout_ns = transfer_timeout_ns;
             c.cancel_grace_ns = cancel_grace_ns;
             c.progress_deadline_ns = progress_deadline_ns;
             c.quarantine_budget = static_cast<std::uint32_t>(quarantine_budget);
             c.num_slots = static_cast<std::uint32_t>(num_slots);
             c.slot_size = static_cast<std::uint64_t>(slot_size);
             c.tombstones = static_cast<std::uint32_t>(tombstones);
             c.shards = static_cast<std::uint32_t>(shards);
             c.wait_spin_ns = wait_spin_ns;
             return std::make_shared<Engine>(c, std::move(clock));
           }),
           py::arg("transfer_timeout_ns"), py::arg("cancel_grace_ns"), py::arg("progress_deadline_ns"),
           py::arg("quarantine_budget"), py::arg("num_slots"), py::arg("slot_size"), py::arg("tombstones"),
           py::arg("shards"), py::arg("clock") = nullptr, py::arg("wait_spin_ns") = Config{}.wait_spin_ns)
      .def("_advertise", [](Engine& e, py::handle req, py::handle role, py::handle nbytes) {
             std::uint64_t r = to_u64(req, "request");
             Role ro = to_role(role);
             check(e.advertise(r, ro, to_nbytes(e, nbytes)), r, kCreateEvent);
           }, py::arg("request"), py::arg("role"), py::arg("nbytes") = 0)
      .def("apply", [](Engine& e, py::handle req, py::handle ev) {
             std::uint64_t r = to_u64(req, "request");
             Event evv = to_event(ev);
             if (evv == kCreateEvent) throw InvalidArgumentError("event", "advertise creates a session; call advertise()");
             return check(e.apply(r, evv), r, evv);
           }, py::arg("request"), py::arg("event"),
           "Apply an event; True when the state changed.  Raises IllegalTransition / UnknownRequest.")
      .def("apply_raw", [](Engine& e, py::handle req, py::handle ev) {
             std::uint64_t r = to_u64(req, "request");
             Event evv = to_event(ev);
             ApplyResult a = evv == kCreateEvent ? ApplyResult{Status::BadArgument, State::Advertised, State::Advertised, 0xff}
                                                 : e.apply(r, evv);
             return py::make_tuple(static_cast<int>(a.status), static_cast<int>(a.from), static_cast<int>(a.to),
                                   static_cast<int>(a.result));
           }, py::arg("request"), py::arg("event"), "Apply without raising: (status, from, to, result) codes.")
      .def("expose", [](Engine& e, py::handle req) { std::uint64_t r = to_u64(req, "request"); return check(e.apply(r, Event::expose), r, Event::expose); })
      .def("complete", [](Engine& e, py::handle req) { std::uint64_t r = to_u64(req, "request"); return check(e.apply(r, Event::complete), r, Event::complete); })
      .def("fail", [](Engine& e, py::handle req) { std::uint64_t r = to_u64(req, "request"); return check(e.apply(r, Event::fail), r, Event::fail); })
      .def("_cancel", [](Engine& e, py::handle req) { return static_cast<int>(e.cancel(to_u64(req, "request"))); })
      .def("_terminate", [](Engine& e, py::handle req) { return static_cast<int>(e.terminate(to_u64(req, "request"))); })
      .def("apply_batch", [](Engine& e, py::handle ids, py::handle events) {
             BufView iv = view(ids, "ids", 8);
             BufView ev = view(events, "events", 1);
             if (iv.n != ev.n) throw InvalidArgumentError("events", "length " + std::to_string(ev.n) + " != ids length " + std::to_string(iv.n));
             const auto* ip = static_cast<const std::uint64_t*>(iv.info.ptr);
             const auto* ep = static_cast<const std::uint8_t*>(ev.info.ptr);
             std::string out(iv.n, kNotApplied);
             try {
               NoGil nogil;
               e.apply_batch(ip, ep, iv.n, reinterpret_cast<std::uint8_t*>(out.data()));
             } catch (const std::bad_alloc&) {
               batch_out_of_memory(out);
             }
             return py::bytes(out);
           }, py::arg("ids"), py::arg("events"), "Batch apply: uint64 ids and uint8 event codes in, one Status code per item out.")
      .def("advertise_batch", [](Engine& e, py::handle ids, py::handle role, py::handle nbytes) {
             BufView iv = view(ids, "ids", 8);
             Role ro = to_role(role);
             const std::uint64_t nb = to_nbytes(e, nbytes);
             const auto* ip = static_cast<const std::uint64_t*>(iv.info.ptr);
             std::string out(iv.n, kNotApplied);
             try {
               NoGil nogil;
               e.advertise_batch(ip, iv.n, ro, nb, reinterpret_cast<std::uint8_t*>(out.data()));
             } catch (const std::bad_alloc&) {
               batch_out_of_memory(out);
             }
             return py::bytes(out);
           }, py::arg("ids"), py::arg("role"), py::arg("nbytes") = 0)
      .def("tick", &Engine::tick, "Fire expired timers; returns how many fired.  Never blocks on a transport.")
      .def("_drain", [](Engine& e) { return drain_bytes(e); },
           "Every queued record, packed (RECORD_FORMAT), without blocking (the caller delivers its notices).")
      .def("_poll_into", [](Engine& e, py::handle inbox, py::handle notices, std::int64_t limit) {
             // poll()'s native half in one call: fire due timers, evaluate health (the bool only; Python asks
             // for the reasons when it changes), drain the queued records (the first `limit`).  The batch is
             // handed over before this returns, to objects the engine keeps (the bytes appended to the list
             // `inbox`, every TerminateNow's request to the deque `notices`).  A signal whose handler raises
             // (Ctrl-C, a SIGTERM handler's SystemExit, a SIGALRM timeout) that arrives during the drain is raised
             // as this call returns: a batch returned as a value was dropped there, and its on_terminate calls
             // never ran.
             if (!PyList_Check(inbox.ptr())) throw InvalidArgumentError("inbox", "expected a list");
             // notices' extend, found before the drain too: found after it, a missing one raised with the batch
             // drained, its notices lost and their tombstones held for ever (advertise: Duplicate)
             py::object extend = py::getattr(notices, "extend", py::none());
             if (!PyCallable_Check(extend.ptr()))
               throw InvalidArgumentError("notices", std::string("expected a deque, got ") + Py_TYPE(notices.ptr())->tp_name);
             e.tick();
             const bool healthy = e.health().healthy;
             // (the notices' tombstones stay until poll() delivered them: _notice_delivered)
             // (limit: the records at most, the first ones (poll_budget); negative: all)
             py::bytes raw = drain_bytes(e, true, limit < 0 ? SIZE_MAX : static_cast<std::size_t>(limit));
             const Py_ssize_t size = PyBytes_GET_SIZE(raw.ptr());
             if (size == 0) return healthy;
             const auto* rec = reinterpret_cast<const Record*>(PyBytes_AS_STRING(raw.ptr()));
             const std::size_t n = static_cast<std::size_t>(size) / sizeof(Record);
             try {
               py::list tnow;
               for (std::size_t i = 0; i < n; ++i)
                 if (rec[i].kind == RecordKind::TerminateNow) tnow.append(py::int_(rec[i].req));
               if (!tnow.empty()) extend(tnow);  // (first: a notice matters more than a log line)
             } catch (...) {
               // The notices could not be handed over (a MemoryError; the extend's own error): they are lost with
               // this batch, but their tombstones are not held for ever (the ids refused by advertise as
               // Duplicate until the process ends): released as a C++ caller's drain releases them.
               for (std::size_t i = 0; i < n; ++i)
                 if (rec[i].kind == RecordKind::TerminateNow) e.notice_delivered(rec[i].req);
               throw;
             }
             if (PyList_Append(inbox.ptr(), raw.ptr()) != 0) throw py::error_already_set();
             return healthy;
           }, py::arg("inbox"), py::arg("notices"), py::arg("limit") = -1,
           "tick + drain + health without blocking: appends the packed records (RECORD_FORMAT) to the list "
           "inbox and each TerminateNow's request to notices (the first `limit` records, the rest left queued; "
           "negative: all); returns healthy.")
      .def("_notice_delivered", [](Engine& e, py::handle req) { e.notice_delivered(to_u64(req, "request")); },
           py::arg("request"),
           "request's TerminateNow was delivered (its on_terminate ran): its tombstone may go from now on.")
      .def("_wait_ready", [](Engine& e, double timeout_s) {
             if (!(timeout_s >= 0)) throw InvalidArgumentError("timeout", "must be >= 0");
             std::int64_t ns = timeout_s > 1e9 ? INT64_MAX / 2 : static_cast<std::int64_t>(timeout_s * 1e9);
             NoGil nogil;
             return e.wait_ready(ns);
           }, py::arg("timeout"), "Block (GIL released) until a record is queued or timeout seconds pass.")
      .def("next_deadline_ns", &Engine::next_deadline_ns)
      .def("pending", &Engine::pending)
      .def("now_ns", &Engine::now_ns)
      .def("_health", [](Engine& e) { return health_dict(e.health()); })
      .def("unhealthy", &Engine::unhealthy)
      .def(
          "set_backend_health",
          [](Engine& e, py::handle healthy, py::handle reason) {
            if (!PyBool_Check(healthy.ptr())) {
              throw InvalidArgumentError("healthy", std::string("expected a bool, got ") + Py_TYPE(healthy.ptr())->tp_name);
            }
            // text only: bytes would reach health() as a reason that may not decode
            e.set_backend_health(healthy.ptr() == Py_True, text_arg(reason, "reason"));
          },
          py::arg("healthy"), py::arg("reason") = "")
      .def("_info", [](const Engine& e, py::handle req) -> py::object {
             auto i = e.info(to_u64(req, "request"));
             if (!i) return py::none();
             return py::make_tuple(static_cast<int>(i->role), static_cast<int>(i->state), static_cast<int>(i->outcome),
                                   i->deferred, i->evidence, i->slot == kNoSlot ? -1 : static_cast<std::int64_t>(i->slot),
                                   i->generation, i->state_since_ns, i->serial);
           }, py::arg("request"),
           "(role, state, outcome, deferred, evidence, slot, generation, state_since_ns, serial) or None.")
      .def("_counters", [](const Engine& e) {
             Counters c = e.counters();
             py::dict d;
             d["transitions"] = c.transitions; d["illegal"] = c.illegal; d["late"] = c.late; d["unknown"] = c.unknown;
             d["duplicate"] = c.duplicate; d["deferred"] = c.deferred; d["terminate_now"] = c.terminate_now;
             d["timeouts"] = c.timeouts; d["grace_expired"] = c.grace_expired; d["quarantined"] = c.quarantined;
             d["recovered"] = c.recovered;
             return d;
           })
      .def("memory_bytes", &Engine::memory_bytes)
      .def("live_sessions", &Engine::live_sessions)
      .def_property_readonly("pool", [](Engine& e) { return e.pool(); }, py::return_value_policy::reference_internal);
}

}  // namespace lifecycle::bindings
