// Every class of lifecycle._core refuses X.__new__(X) without X(...): such an object holds no C++ state, and
// a method called on it dereferenced null (SIGSEGV).  The classes take a metaclass whose __call__ marks the
// type it is making; their tp_new makes an instance only for that mark.
#include <pybind11/pybind11.h>

#include <cstring>

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

namespace lifecycle::bindings {
// Any object, taken only in pybind11's second pass (with conversions): a refusal overload made of these is
// tried after every real overload had both of its passes (in the first pass, without conversions, it took
// calls that a real overload takes only with conversions: None for a shared_ptr).
struct LaterArg {
  py::object value;
};
}  // namespace lifecycle::bindings

namespace pybind11::detail {
template <>
struct type_caster<lifecycle::bindings::LaterArg> {
  PYBIND11_TYPE_CASTER(lifecycle::bindings::LaterArg, const_name("object"));
  bool load(handle src, bool convert) {
    if (!convert) return false;
    value.value = reinterpret_borrow<object>(src);
    return true;
  }
  static handle cast(const lifecycle::bindings::LaterArg& v, return_value_policy, handle) {
    return v.value.inc_ref();
  }
};
}  // namespace pybind11::detail

// pybind11's TypeError for a call that no overload takes quotes repr() of every argument ("Invoked with: ..."),
// and torch's repr() of a tensor whose storage was freed under it (untyped_storage().resize_(0)) reads that
// memory: e.expose(1, t), e.tick(t) or _core.bench_native(t) died with SIGSEGV.  Every function, method and
// constructor of the module gets a last overload that takes any arguments and raises that TypeError, naming the
// arguments' types only.
namespace lifecycle::bindings {
namespace {

std::string signatures(PyObject* cfunc) {
  std::string out;
  int k = 0;
  for (const auto* r = py::detail::function_record_ptr_from_PyObject(PyCFunction_GET_SELF(cfunc)); r != nullptr;
       r = r->next) {
    out += "    " + std::to_string(++k) + ". " + std::string(r->name) + (r->signature ? r->signature : "()") + "\n";
  }
  return out;
}

// The pybind11 function behind `f` (a module function, an instance method, a staticmethod's), else null.
PyObject* pybind_function(py::handle f) {
  PyObject* fn = f.ptr();
  if (PyObject_TypeCheck(fn, &PyStaticMethod_Type)) {
    fn = py::getattr(f, "__func__").ptr();  // (borrowed: the staticmethod holds it)
  }
  if (fn != nullptr && PyInstanceMethod_Check(fn)) fn = PyInstanceMethod_GET_FUNCTION(fn);
  if (fn == nullptr || !PyCFunction_Check(fn) || PyCFunction_GET_SELF(fn) == nullptr) return nullptr;
  return py::detail::function_record_ptr_from_PyObject(PyCFunction_GET_SELF(fn)) != nullptr ? fn : nullptr;
}

py::cpp_function refusal(const std::string& name, py::handle fn, py::handle scope, bool method) {
  const std::string sigs = signatures(fn.ptr());
  auto refuse = [name, sigs](const LaterArg& first, const py::args& args, const py::kwargs& kwargs) -> py::object {
    std::string types = Py_TYPE(first.value.ptr())->tp_name;
    for (auto a : args) types += std::string(", ") + Py_TYPE(a.ptr())->tp_name;
    for (auto kv : kwargs) {
      // (escaped: a keyword holding a lone surrogate made a strict conversion raise pybind11's bare RuntimeError)
      const auto key = py::reinterpret_steal<py::object>(
          PyUnicode_AsEncodedString(kv.first.ptr(), "utf-8", "backslashreplace"));
      if (!key) throw py::error_already_set();
      types += ", " + std::string(PyBytes_AS_STRING(key.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(key.ptr()))) +
               "=" + Py_TYPE(kv.second.ptr())->tp_name;
    }
    throw py::type_error(name + "(): incompatible function arguments. The following argument types are "
                         "supported:\n" + sigs + "\nInvoked with arguments of the types: " + types);
  };
  // (a method's self takes no conversion in pybind11's second pass: `first`, after it, is what defers it)
  if (method) {
    return py::cpp_function([refuse](py::handle, const LaterArg& first, const py::args& args,
                                     const py::kwargs& kwargs) { return refuse(first, args, kwargs); },
                            py::name(name.c_str()), py::is_method(scope), py::sibling(fn),
                            py::arg("first") = py::none());
  }
  return py::cpp_function(refuse, py::name(name.c_str()), py::scope(scope), py::sibling(fn),
                          py::arg("first") = py::none());
}

// pybind11 answers __init__ on an object already made with None and does nothing (its dispatcher, before any
// overload): ManualClock(5).__init__(7) left the clock at 5 without a word.  A class's __init__ is wrapped to refuse
// it, naming the class; a first __init__ (X(...), a subclass's super().__init__) goes on to pybind11's.
py::cpp_function init_once(py::object init, py::handle cls, const std::string& cls_name) {
  auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  // help() still shows the constructor's signatures (the text lives as long as the class: the process)
  const char* doc = strdup(("Once per object (a second call raises TypeError); then:\n" +
                            py::str(py::getattr(init, "__doc__", py::str())).cast<std::string>()).c_str());
  return py::cpp_function(
      [init, type, cls_name](py::handle self, const py::args& args, const py::kwargs& kwargs) -> py::object {
        if (PyObject_TypeCheck(self.ptr(), type)) {  // (else pybind11's own refusal of the self)
          auto* inst = reinterpret_cast<py::detail::instance*>(self.ptr());
          const auto vh = inst->get_value_and_holder(py::detail::get_type_info(type), false);
          if (vh && vh.instance_registered()) {
            throw py::type_error(cls_name + ".__init__ called again on an object already made: pybind11 would "
                                 "ignore it (the object stays as it was); make a new one instead");
          }
        }
        return init(self, *args, **kwargs);
      },
      // (not named __init__: pybind11 takes any function of that name for a constructor, and its dispatcher
      // answers the call on an object already made before this body runs)
      py::name("__init_once__"), py::is_method(cls), py::doc(doc));
}

}  // namespace

void add_refusals(py::module_& m) {
  std::vector<std::pair<std::string, py::object>> functions;  // (set after the walk over the module's dict)
  for (auto item : py::reinterpret_borrow<py::dict>(m.attr("__dict__"))) {
    const std::string name = py::str(item.first).cast<std::string>();
    py::handle v = item.second;
    if (PyType_Check(v.ptr())) {
      if (py::str(py::getattr(v, "__module__", py::str())).cast<std::string>() != "lifecycle._core") continue;
      const py::dict ns(v.attr("__dict__"));  // (a copy: a class's __dict__ is a mappingproxy)
      std::vector<std::pair<std::string, py::object>> add;
      for (auto member : ns) {
        const std::string mname = py::str(member.first).cast<std::string>();
        if (mname.rfind("__", 0) == 0 && mname != "__init__") continue;
        PyObject* fn = pybind_function(member.second);
        if (fn == nullptr) continue;
        const bool is_static = PyObject_TypeCheck(member.second.ptr(), &PyStaticMethod_Type);
        py::cpp_function cf = refusal(mname, fn, v, !is_static);
        add.emplace_back(mname, is_static ? py::object(py::staticmethod(cf)) : py::object(cf));
      }
      for (auto& [mname, f] : add) {
        // (the refusal overload joined the __init__ chain as its sibling: f is the whole chain)
        py::setattr(v, mname.c_str(), mname == "__init__" ? py::object(init_once(f, v, name)) : f);
      }
    } else if (PyObject* fn = pybind_function(v)) {
      functions.emplace_back(name, refusal(name, fn, m, false));
    }
  }
  for (auto& [name, f] : functions) m.attr(name.c_str()) = f;
}

}  // namespace lifecycle::bindings
