#include "lifecycle/bench.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

void register_bench(py::module_& m) {
  m.def("bench_native", [](py::handle n_arg, bool cancelled, py::handle churn_arg) {
    const std::uint64_t n = uint64_arg(n_arg, "n");
    const std::uint64_t churn_bytes = uint64_arg(churn_arg, "churn_bytes");
    BenchResult r;
    {
      NoGil nogil;
      r = bench_native(n, cancelled, churn_bytes);
    }
    return py::make_tuple(r.transitions, r.seconds);
  }, py::arg("n"), py::arg("cancelled") = false, py::arg("churn_bytes") = 0,
     "(transitions, seconds) of the native single-thread loop; churn_bytes > 0: that many bytes pass "
     "through the core's caches before each engine call (cold-cache calls) and only the engine calls "
     "are timed.");
}

}  // namespace lifecycle::bindings
