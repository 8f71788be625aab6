#include "lifecycle/clock.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

void register_clock(py::module_& m) {
  py::class_<Clock, std::shared_ptr<Clock>>(m, "Clock", guarded_metaclass(), guarded_new_setup()).def("now_ns", &Clock::now_ns);
  py::class_<SteadyClock, Clock, std::shared_ptr<SteadyClock>>(m, "SteadyClock", guarded_metaclass(), guarded_new_setup()).def(py::init<>());
  m.def("steady_source", &steady_source, "Where SteadyClock reads CLOCK_MONOTONIC from: 'tsc' or 'monotonic'.");
  // Starts the clock at import, with the GIL held: it reads $LIFECYCLE_CLOCK once per process, and its first
  // reading may come inside NoGil or on a transport's thread, beside a Python thread changing os.environ.
  (void)steady_source();
  m.def("monotonic_ns", &monotonic_ns, "CLOCK_MONOTONIC through clock_gettime, ns.");
  py::class_<ManualClock, Clock, std::shared_ptr<ManualClock>>(m, "ManualClock", guarded_metaclass(), guarded_new_setup())
      .def(py::init([](py::handle start) { return std::make_shared<ManualClock>(int64_arg(start, "start_ns")); }),
           py::arg("start_ns") = 0)
      .def("advance", [](ManualClock& c, py::handle d) { c.advance(int64_arg(d, "delta_ns")); }, py::arg("delta_ns"))
      .def("set", [](ManualClock& c, py::handle t) { c.set(int64_arg(t, "t_ns")); }, py::arg("t_ns"));
}

}  // namespace lifecycle::bindings
