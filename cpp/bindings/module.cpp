// lifecycle._core: the module file only registers; one binding file per concept.
#include "register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "kv-lifecycle C++ core (engine, buffer pool, clock, table)";
  lifecycle::bindings::register_errors(m);
  lifecycle::bindings::register_table(m);
  lifecycle::bindings::register_clock(m);
  lifecycle::bindings::register_pool(m);
  lifecycle::bindings::register_engine(m);
  lifecycle::bindings::register_bench(m);
  lifecycle::bindings::register_transport(m);
  lifecycle::bindings::register_audit(m);
  lifecycle::bindings::register_nogil(m);
  lifecycle::bindings::add_refusals(m);
}
