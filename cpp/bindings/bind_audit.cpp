// Audit binding: lifecycle/audit.py drives the native replay (lifecycle/audit.hpp).  Arguments are checked
// and converted first; feed() and run() then release the GIL around pure C++.
#include <Python.h>

#include <atomic>

#include "lifecycle/audit.hpp"
#include "lifecycle/errors.hpp"
#include "register.hpp"

namespace py = pybind11;
namespace au = lifecycle::audit;

namespace lifecycle::bindings {

namespace {

std::int64_t arg_i64(py::handle h, const char* what) {
  PyObject* o = h.ptr();
  if (!PyLong_Check(o) || PyBool_Check(o))
    throw InvalidArgumentError(what, std::string("expected an int, got ") + Py_TYPE(o)->tp_name);
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0) throw InvalidArgumentError(what, "out of the int64 range: " + int_text(h));
  return static_cast<std::int64_t>(v);
}

// An int of any size, clamped to +-2**100 (far beyond any time difference a log can hold).
au::Int arg_wide(py::handle h, const char* what) {
  PyObject* o = h.ptr();
  if (!PyLong_Check(o) || PyBool_Check(o))
    throw InvalidArgumentError(what, std::string("expected an int, got ") + Py_TYPE(o)->tp_name);
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0) return (overflow > 0 ? 1 : -1) * (static_cast<au::Int>(1) << 100);
  return v;
}

py::object pyint(au::Int v) {
  if (v >= INT64_MIN && v <= INT64_MAX) return py::reinterpret_steal<py::object>(PyLong_FromLongLong(static_cast<long long>(v)));
  std::string s = au::to_string(v);
  return py::reinterpret_steal<py::object>(PyLong_FromString(s.c_str(), nullptr, 10));
}

py::object opt_int(bool has, au::Int v) { return has ? pyint(v) : py::object(py::none()); }

// One Python-side owner; a second thread calling in while the first runs without the GIL is refused.
class Replay {
 public:
  explicit Replay(const au::Options& o) : a_(o) {}
  class Use {
   public:
    explicit Use(Replay& r) : r_(r) {
      if (r_.busy_.exchange(true)) throw InvalidArgumentError("AuditReplay", "in use by another thread");
    }
    ~Use() { r_.busy_.store(false); }
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;

   private:
    Replay& r_;
  };
  au::Auditor a_;
  std::size_t nsrc_ = 0;
  bool finished_ = false;

 private:
  std::atomic<bool> busy_{false};
};

std::size_t arg_src(Replay& r, py::handle h) {
  std::int64_t i = arg_i64(h, "source");
  if (i < 0 || static_cast<std::size_t>(i) >= r.nsrc_)
    throw InvalidArgumentError("source", "no source " + std::to_string(i) + " in the current group");
  return static_cast<std::size_t>(i);
}

void check_open(const Replay& r) {
  if (r.finished_) throw InvalidArgumentError("AuditReplay", "already finished");
}

py::tuple summary(const au::Summary& s) {
  py::list segs;
  for (auto& g : s.segments) segs.append(py::make_tuple(kStateNames[g.first], pyint(g.second.first), pyint(g.second.second)));
  py::list kinds;
  for (auto k : s.kinds) kinds.append(au::kind_name(k));
  return py::make_tuple(pyint(s.rank), pyint(s.request), py::bytes(s.role), s.role_depth, s.file, pyint(s.line),
                        pyint(s.start), pyint(s.end),
                        s.outcome >= 0 ? py::object(py::str(au::outcome_name(s.outcome))) : py::object(py::none()),
                        kStateNames[s.final_state], segs, kinds, s.ended);
}

py::dict histogram(const au::Histogram& h) {
  py::dict buckets;
  for (std::size_t b = 0; b < h.buckets.size(); ++b)
    if (h.buckets[b] != 0) buckets[py::int_(b)] = py::int_(h.buckets[b]);
  py::dict d;
  d["buckets"] = buckets;
  d["max"] = pyint(h.max);
  d["total"] = pyint(h.total);
  return d;
}

py::list edges(const std::vector<au::Edge>& es) {
  py::list out;
  for (auto& e : es)
    out.append(py::make_tuple(e.src >= 0 ? py::object(py::str(kStateNames[e.src])) : py::object(py::none()),
                              kEventNames[e.event], kStateNames[e.dst], e.count));
  return out;
}

}  // namespace

void register_audit(py::module_& m) {
  // The C++ defaults (for C++ callers); Python always passes its own, and a test checks the two agree.
  const au::Options def;
  py::dict defaults;
  defaults["window"] = def.window;
  defaults["top"] = def.top;
  defaults["keep_findings"] = def.keep_findings;
  defaults["keep_violating"] = def.keep_violating;
  defaults["max_line"] = def.max_line;
  defaults["max_depth"] = def.max_depth;
  defaults["lookahead"] = def.lookahead;
  defaults["max_tables"] = def.max_tables;
  m.attr("AUDIT_DEFAULTS") = defaults;
  m.attr("EVENTS_SCHEMA") = lifecycle::audit::kEventsSchema;
  py::class_<Replay>(m, "AuditReplay", guarded_metaclass(), guarded_new_setup(),
                     "Native replay of lifecycle logs (lifecycle.audit drives it; the Python Auditor is the reference).")
      .def(py::init([](py::handle window, py::handle top, py::handle keep_findings, py::handle keep_violating,
                       py::handle leak_age_ns, py::handle max_line, py::handle max_depth, py::handle lookahead,
                       py::handle max_tables) {
             au::Options o;
             o.window = arg_i64(window, "window");
             o.top = arg_i64(top, "top");
             o.keep_findings = arg_i64(keep_findings, "keep_findings");
             o.keep_violating = arg_i64(keep_violating, "keep_violating");
             o.leak_age_ns = arg_wide(leak_age_ns, "leak_age_ns");
             o.max_line = arg_i64(max_line, "max_line");
             o.max_depth = arg_i64(max_depth, "max_depth");
             o.lookahead = arg_i64(lookahead, "lookahead");
             o.max_tables = arg_i64(max_tables, "max_tables");
             return new Replay(o);
           }),
           py::arg("window"), py::arg("top"), py::arg("keep_findings"), py::arg("keep_violating"),
           py::arg("leak_age_ns"), py::arg("max_line"), py::arg("max_depth"), py::arg("lookahead"),
           py::arg("max_tables"))
      .def("begin", [](Replay& r, py::handle files) {
             Replay::Use use(r);
             check_open(r);
             if (!PyList_Check(files.ptr())) throw InvalidArgumentError("files", "expected a list of file numbers");
             std::vector<std::uint32_t> fs;
             for (auto h : py::reinterpret_borrow<py::list>(files)) {
               std::int64_t f = arg_i64(h, "files");
               if (f < 0 || f > UINT32_MAX) throw InvalidArgumentError("files", "file number out of range");
               fs.push_back(static_cast<std::uint32_t>(f));
             }
             r.a_.begin(fs);
             r.nsrc_ = fs.size();
           }, "Start a group of sources (one per file; several are merged by time).")
      .def("feed", [](Replay& r, py::handle src, py::handle data) {
             Replay::Use use(r);
             check_open(r);
             std::size_t i = arg_src(r, src);
             if (!PyBytes_Check(data.ptr()))
               throw InvalidArgumentError("data", std::string("expected bytes, got ") + Py_TYPE(data.ptr())->tp_name);
             char* p = nullptr;
             Py_ssize_t n = 0;
             PyBytes_AsStringAndSize(data.ptr(), &p, &n);
             NoGil nogil;  // `data` stays alive: the caller holds it
             r.a_.feed(i, p, static_cast<std::size_t>(n));
           }, "Raw bytes of source `src` (lines may span calls).")
      .def("end", [](Replay& r, py::handle src) {
             Replay::Use use(r);
             check_open(r);
             r.a_.end(arg_src(r, src));
           })
      .def("unreadable", [](Replay& r, py::handle src, py::handle why) {
             Replay::Use use(r);
             check_open(r);
             r.a_.unreadable(arg_src(r, src), text_arg(why, "why"));
           })
      .def("run", [](Replay& r) {
             Replay::Use use(r);
             check_open(r);
             long i;
             {
               NoGil nogil;
               i = r.a_.run();
             }
             if (i < 0) r.nsrc_ = 0;
             return i;
           }, "Replay what can be; the source to feed next, or -1 when the group is done.")
      .def("take_findings", [](Replay& r) {
             Replay::Use use(r);
             std::vector<au::Finding> fs = r.a_.take_findings();
             py::list out;
             for (auto& f : fs) {
               py::list pieces;
               for (auto& p : f.message) pieces.append(py::make_tuple(static_cast<int>(p.op), py::bytes(p.text), p.depth));
               py::list extra;
               for (auto& x : f.extra) {
                 py::object v;
                 switch (x.type) {
                   case au::Extra::integer: v = pyint(x.i); break;
                   case au::Extra::none: v = py::none(); break;
                   case au::Extra::string: v = py::str(x.s[0]); break;
                   case au::Extra::file: v = pyint(x.i); break;
                   case au::Extra::outcomes: v = py::make_tuple(x.s[0], x.s[1], x.s[2], x.s[3]); break;
                 }
                 extra.append(py::make_tuple(x.key, static_cast<int>(x.type), v));
               }
               out.append(py::make_tuple(au::kind_name(f.kind), f.file, pyint(f.line), opt_int(f.has_rank, f.rank),
                                         opt_int(f.has_request, f.request), pieces, extra));
             }
             return out;
           }, "Findings since the last call: (kind, file, line, rank, request, pieces, extra).")
      .def("finish", [](Replay& r, py::handle order) {
             Replay::Use use(r);
             check_open(r);
             if (!PyList_Check(order.ptr())) throw InvalidArgumentError("file_order", "expected a list of ints");
             std::vector<std::int64_t> fo;
             for (auto h : py::reinterpret_borrow<py::list>(order)) fo.push_back(arg_i64(h, "file_order"));
             au::Result res = r.a_.finish(fo);
             r.finished_ = true;
             py::dict d;
             d["lines"] = res.lines;
             d["events"] = res.events;
             d["requests"] = res.requests;
             d["terminated"] = res.terminated;
             d["live"] = res.live;
             py::list counts;
             for (auto& c : res.counts) counts.append(py::make_tuple(au::kind_name(c.first), c.second));
             d["counts"] = counts;
             py::list tis;
             for (std::size_t i = 0; i < res.time_in_state.size(); ++i)
               tis.append(py::make_tuple(kStateNames[res.tis_states[i]], histogram(res.time_in_state[i])));
             d["time_in_state"] = tis;
             d["lifetime"] = histogram(res.lifetime);
             py::list outcomes;
             for (std::size_t i = 0; i < res.outcomes.size(); ++i)
               outcomes.append(py::make_tuple(au::outcome_name(static_cast<int>(i)), res.outcomes[i]));
             d["outcomes"] = outcomes;
             py::list evc;
             for (std::size_t i = 0; i < res.event_counts.size(); ++i)
               evc.append(py::make_tuple(au::kLogEventNames[i], res.event_counts[i]));
             d["event_counts"] = evc;
             d["edges"] = edges(res.edges);
             d["illegal_edges"] = edges(res.illegal_edges);
             for (auto which : {"late", "rejected"}) {
               auto& src = std::string(which) == "late" ? res.late : res.rejected;
               py::list l;
               for (auto& x : src) l.append(py::make_tuple(kStateNames[x.first.first], kEventNames[x.first.second], x.second));
               d[which] = l;
             }
             py::list slowest, violating;
             for (auto& s : res.slowest) slowest.append(summary(s));
             for (auto& s : res.violating) violating.append(summary(s));
             d["slowest"] = slowest;
             d["violating"] = violating;
             py::list streams;
             for (auto& s : res.streams)
               streams.append(py::make_tuple(pyint(s.pid), pyint(s.events), pyint(s.next_seq), s.file, pyint(s.first_seq),
                                             s.has_proc ? pyint(s.proc) : py::object(py::none())));
             d["streams"] = streams;
             py::list ranks;
             for (auto v : res.ranks) ranks.append(pyint(v));
             d["ranks"] = ranks;
             return d;
           }, "End of input: the remaining checks, then the raw result (lifecycle.audit builds the AuditResult).");
  m.def("_audit_json_valid", [](py::bytes b) {
    std::string s = b;
    return au::json_valid(s.data(), s.size());
  }, "Test hook: would the audit's JSON reader accept this line.");
  m.def("_audit_is_blank", [](py::bytes b) {
    std::string s = b;
    return au::is_blank(s.data(), s.size());
  }, "Test hook: is this line whitespace only as str.strip() sees it.");
}

}  // namespace lifecycle::bindings
