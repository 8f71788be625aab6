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

namespace {
// The exporter behind a slot_view: it holds the pool's Python object, which keeps the engine (the owner
// of the memory) alive, so a memoryview outliving every other reference still points at live bytes.
struct SlotBuffer {
  py::object pool;
  void* data;
  py::ssize_t len;
};
}  // namespace

void register_pool(py::module_& m) {
  py::class_<SlotBuffer>(m, "_SlotBuffer", py::buffer_protocol(), guarded_metaclass(), guarded_new_setup())
      .def_buffer([](SlotBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<std::uint8_t>::format(), 1, {b.len}, {1}, false);
      });
  // The pool is owned by its engine; Python gets a non-owning view (keep_alive on the engine getter).
  py::class_<BufferPool, std::unique_ptr<BufferPool, py::nodelete>>(m, "BufferPool", guarded_metaclass(), guarded_new_setup())
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
      .def("slot_view", [](py::object self, std::int64_t slot) {
        BufferPool& p = self.cast<BufferPool&>();
        if (slot < 0 || slot >= p.num_slots()) throw InvalidArgumentError("slot", std::to_string(slot) + " out of range");
        // (from_memory kept nothing alive: a view used after its engine went wrote into freed memory)
        py::object exporter = py::cast(SlotBuffer{self, p.data(static_cast<std::uint32_t>(slot)),
                                                  static_cast<py::ssize_t>(p.slot_size())});
        return py::memoryview(exporter);
      }, "A writable memoryview of one slot's bytes; it keeps the engine alive.")
      .def_property_readonly("base_address", [](const BufferPool& p) { return reinterpret_cast<std::uintptr_t>(p.base()); })
      .def_property_readonly("nbytes", &BufferPool::bytes)
      .def_property_readonly("slot_size", &BufferPool::slot_size)
      .def_property_readonly("num_slots", &BufferPool::num_slots);
}

}  // namespace lifecycle::bindings
