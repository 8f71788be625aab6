#include "lifecycle/bench.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

void register_bench(py::module_& m) {
  m.def("bench_native", [](std::uint64_t n, bool cancelled) {
    BenchResult r;
    {
      py::gil_scoped_release nogil;
      r = bench_native(n, cancelled);
    }
    return py::make_tuple(r.transitions, r.seconds);
  }, py::arg("n"), py::arg("cancelled") = false, "(transitions, seconds) of the native single-thread loop.");
}

}  // namespace lifecycle::bindings
