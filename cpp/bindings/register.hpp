#pragma once
#include <pybind11/pybind11.h>

namespace lifecycle::bindings {
void register_errors(pybind11::module_& m);
void register_table(pybind11::module_& m);
void register_clock(pybind11::module_& m);
void register_pool(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_bench(pybind11::module_& m);
void register_transport(pybind11::module_& m);
void register_audit(pybind11::module_& m);
}  // namespace lifecycle::bindings
