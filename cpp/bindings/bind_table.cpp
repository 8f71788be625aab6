// The compiled table, exported so Python can check it against the file it was generated from.
#include "lifecycle/table_gen.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

template <std::size_t N>
static py::tuple names(const char* const (&xs)[N]) {
  py::tuple t(N);
  for (std::size_t i = 0; i < N; ++i) t[i] = py::str(xs[i]);
  return t;
}

void register_table(py::module_& m) {
  m.attr("TABLE_TEXT") = py::str(kTableText);
  m.attr("TABLE_DIGEST") = py::str(kTableDigest);
  m.attr("STATE_NAMES") = names(kStateNames);
  m.attr("EVENT_NAMES") = names(kEventNames);
  m.attr("OUTCOME_NAMES") = names(kOutcomeNames);
  m.attr("CANCEL_RESULT_NAMES") = names(kCancelResultNames);
  m.attr("TERMINATE_RESULT_NAMES") = names(kTerminateResultNames);
  m.def("table_cells", [] {
    static const char* actions[] = {"illegal", "move", "stay", "late", "defer"};
    py::list out;
    for (int s = 0; s < kNumStates; ++s)
      for (int e = 0; e < kNumEvents; ++e) {
        const Cell& c = kTable[s][e];
        out.append(py::make_tuple(kStateNames[s], kEventNames[e], actions[static_cast<int>(c.action)],
                                  kStateNames[static_cast<int>(c.dst)], kOutcomeNames[static_cast<int>(c.outcome)],
                                  c.result == 0xff ? py::object(py::none()) : py::object(py::int_(c.result)), c.line));
      }
    return out;
  }, "Every (state, event) cell of the compiled table: (state, event, action, dst, outcome, result, line).");
}

}  // namespace lifecycle::bindings
