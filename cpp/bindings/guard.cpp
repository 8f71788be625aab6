// Every class of lifecycle._core refuses X.__new__(X) without X(...): such an object holds no C++ state, and
// a method called on it dereferenced null (SIGSEGV).  The classes take a metaclass whose __call__ marks the
// type it is making; their tp_new makes an instance only for that mark.
#include <pybind11/pybind11.h>

#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {
namespace {

thread_local PyTypeObject* g_making = nullptr;  // the type this thread's X(...) is making, if any
ternaryfunc g_base_call = nullptr;               // pybind11's metaclass __call__

extern "C" PyObject* guarded_call(PyObject* type, PyObject* args, PyObject* kwargs) {
  PyTypeObject* const saved = g_making;
  g_making = reinterpret_cast<PyTypeObject*>(type);
  PyObject* self = g_base_call(type, args, kwargs);
  g_making = saved;
  return self;
}

extern "C" PyObject* guarded_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (g_making != type) {
    PyErr_Format(PyExc_TypeError,
                 "%s.__new__(%s) alone makes an object with no C++ state behind it (its methods would crash); "
                 "only %s(...), or the library for the objects it hands out, makes one",
                 type->tp_name, type->tp_name, type->tp_name);
    return nullptr;
  }
  g_making = nullptr;  // one instance per call (a nested X(...) in __init__ marks again)
  return py::detail::pybind11_object_new(type, args, kwargs);
}

}  // namespace

py::metaclass guarded_metaclass() {
  static PyObject* meta = [] {
    auto* base = reinterpret_cast<PyObject*>(py::detail::get_internals().default_metaclass);
    py::dict ns;
    ns["__module__"] = "lifecycle._core";
    py::object made = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&PyType_Type))(
        "_guarded_type", py::make_tuple(py::handle(base)), ns);
    auto* t = reinterpret_cast<PyTypeObject*>(made.ptr());
    g_base_call = reinterpret_cast<PyTypeObject*>(base)->tp_call;
    // A __call__ in the dict too, for what looks it up by name: type(X).__call__(X, ...), and a Python
    // metaclass derived from this one (its slot calls whatever __call__ its MRO finds; pybind11's would
    // skip the mark and every construction would be refused).
    made.attr("__call__") = py::cpp_function(
        [](py::handle cls, py::args args, py::kwargs kwargs) {
          PyObject* self = guarded_call(cls.ptr(), args.ptr(), kwargs.ptr());
          if (self == nullptr) throw py::error_already_set();
          return py::reinterpret_steal<py::object>(self);
        },
        py::is_method(made), py::name("__call__"));
    t->tp_call = guarded_call;  // after the setattr, which set the slot to the generic one: direct calls skip it
    PyType_Modified(t);
    return made.release().ptr();  // lives as long as the process (the classes hold it too)
  }();
  return py::metaclass(py::handle(meta));
}

py::custom_type_setup guarded_new_setup() {
  return py::custom_type_setup([](PyHeapTypeObject* ht) { ht->ht_type.tp_new = guarded_new; });
}

}  // namespace lifecycle::bindings
