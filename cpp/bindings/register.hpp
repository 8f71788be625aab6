#pragma once
#include <pybind11/pybind11.h>

#include <exception>

namespace lifecycle::bindings {
// The Python exception object (lifecycle.errors) for one of the library's C++ errors; None for another
// exception.  The exception translator raises it; batch calls return it in the item's place.
pybind11::object error_object(std::exception_ptr p);
void register_errors(pybind11::module_& m);
void register_table(pybind11::module_& m);
void register_clock(pybind11::module_& m);
void register_pool(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_bench(pybind11::module_& m);
void register_transport(pybind11::module_& m);
void register_audit(pybind11::module_& m);
}  // namespace lifecycle::bindings
