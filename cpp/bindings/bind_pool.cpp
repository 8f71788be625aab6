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
// A slot index: an int (not a bool: True was slot 1) in [0, num_slots), else InvalidArgumentError("slot").
std::uint32_t slot_index(const BufferPool& p, py::handle h) {
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr())) {  // (an int, or numpy's integers)
    throw InvalidArgumentError("slot", std::string("expected an int, got ") + Py_TYPE(h.ptr())->tp_name);
  }
  PyObject* idx = PyNumber_Index(h.ptr());
  if (idx == nullptr) {  // an __index__ that raised (a numpy array of more than one int)
    if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError)) {
      throw py::error_already_set();  // KeyboardInterrupt, MemoryError: not ours to rename
    }
    PyErr_Clear();
    throw InvalidArgumentError("slot", std::string("expected an int, got a ") + Py_TYPE(h.ptr())->tp_name +
                                           " that is not one index");
  }
  const py::object index = py::reinterpret_steal<py::object>(idx);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < 0 || v >= static_cast<long long>(p.num_slots())) {
    // (the index, not str() of the object given: a __str__ may raise, return a lone surrogate, or print past the
    // 4300 digits of an int)
    throw InvalidArgumentError("slot", int_text(index) + " out of range [0, " +
                                           std::to_string(p.num_slots()) + ")");
  }
  return static_cast<std::uint32_t>(v);
}
}  // namespace

void register_pool(py::module_& m) {
  m.def("stranded_pool_bytes", &BufferPool::stranded_bytes,
        "Bytes that destroyed pools kept mapped for quarantined slots (a transfer may still write them).");
  py::class_<SlotBuffer>(m, "_SlotBuffer", py::buffer_protocol(), guarded_metaclass(), guarded_new_setup())
      .def_buffer([](SlotBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<std::uint8_t>::format(), 1, {b.len}, {1}, false);
      });
  // The pool is owned by its engine; Python gets a non-owning view (keep_alive on the engine getter).
  py::class_<BufferPool, std::unique_ptr<BufferPool, py::nodelete>>(m, "BufferPool", guarded_metaclass(), guarded_new_setup())
      .def("stats", [](const BufferPool& p) { return stats_dict(p.stats()); })
      .def("slot_state", [](const BufferPool& p, py::handle h) {
        const std::uint32_t slot = slot_index(p, h);
        static const char* names[] = {"Free", "Leased", "Quarantined"};
        return std::string(names[static_cast<int>(p.state(slot))]);
      })
      .def("generation", [](const BufferPool& p, py::handle h) { return p.generation(slot_index(p, h)); })
      .def("slot_view", [](py::object self, py::handle h) {
        BufferPool& p = self.cast<BufferPool&>();
        const std::uint32_t slot = slot_index(p, h);
        // (from_memory kept nothing alive: a view used after its engine went wrote into freed memory)
        py::object exporter = py::cast(SlotBuffer{self, p.data(slot),
                                                  static_cast<py::ssize_t>(p.slot_size())});
        return py::memoryview(exporter);
      }, "A writable memoryview of one slot's bytes; it keeps the engine alive.")
      .def_property_readonly("base_address", [](const BufferPool& p) { return reinterpret_cast<std::uintptr_t>(p.base()); })
      .def_property_readonly("nbytes", &BufferPool::bytes)
      .def_property_readonly("slot_size", &BufferPool::slot_size)
      .def_property_readonly("num_slots", &BufferPool::num_slots);
}

}  // namespace lifecycle::bindings
