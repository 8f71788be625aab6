#include "lifecycle/errors.hpp"
#include "lifecycle/pool.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

static py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["slots"] = s.slots;
  d["free"] = s.free;
  d["leased"] = s.leased;
  d["quarantined"] = s.quarantined;
  d["leases"] = s.leases;
  d["recovered"] = s.recovered;
  d["slot_size"] = s.slot_size;
  return d;
}

void register_pool(py::module_& m) {
  // The pool is owned by its engine; Python gets a non-owning view (keep_alive on the engine getter).
  py::class_<BufferPool, std::unique_ptr<BufferPool, py::nodelete>>(m, "BufferPool")
      .def("stats", [](const BufferPool& p) { return stats_dict(p.stats()); })
      .def("slot_state", [](const BufferPool& p, std::int64_t slot) {
        if (slot < 0 || slot >= p.num_slots()) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
        static const char* names[] = {"Free", "Leased", "Quarantined"};
        return std::string(names[static_cast<int>(p.state(static_cast<std::uint32_t>(slot)))]);
      })
      .def("generation", [](const BufferPool& p, std::int64_t slot) {
        if (slot < 0 || slot >= p.num_slots()) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
        return p.generation(static_cast<std::uint32_t>(slot));
      })
      .def("slot_view", [](BufferPool& p, std::int64_t slot) {
        if (slot < 0 || slot >= p.num_slots()) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
        return py::memoryview::from_memory(p.data(static_cast<std::uint32_t>(slot)),
                                           static_cast<py::ssize_t>(p.slot_size()), false);
      }, "A writable memoryview of one slot's bytes (valid while the engine lives).")
      .def_property_readonly("base_address", [](const BufferPool& p) { return reinterpret_cast<std::uintptr_t>(p.base()); })
      .def_property_readonly("nbytes", &BufferPool::bytes)
      .def_property_readonly("slot_size", &BufferPool::slot_size)
      .def_property_readonly("num_slots", &BufferPool::num_slots);
}

}  // namespace lifecycle::bindings
