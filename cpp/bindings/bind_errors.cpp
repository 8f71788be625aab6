// One translator: every C++ error type -> its Python class in lifecycle.errors.
#include "lifecycle/errors.hpp"
#include "lifecycle/transport/nixl_capi.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

static py::object make(const char* cls, const py::tuple& args) {
  return py::module_::import("lifecycle.errors").attr(cls)(*args);
}

// C++ text -> str without failing: an error's text may quote bytes a peer sent (metadata, a name), and a
// strict decode would replace the typed error with a UnicodeDecodeError (and lose a batch's results).
py::str lossless_str(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "backslashreplace");
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

static py::object make_with(const char* cls, const std::string& msg, const py::dict& attrs) {
  py::object exc = make(cls, py::make_tuple(lossless_str(msg)));
  for (auto item : attrs) py::setattr(exc, item.first, item.second);
  return exc;
}

py::object error_object(std::exception_ptr p) {
  namespace tp = lifecycle::transport;
  try {
    if (p) std::rethrow_exception(p);
  } catch (const IllegalTransitionError& e) {
    return make("IllegalTransition", py::make_tuple(e.request, kStateNames[static_cast<int>(e.state)],
                                                    kEventNames[static_cast<int>(e.event)]));
  } catch (const UnknownRequestError& e) {
    return make("UnknownRequest", py::make_tuple(e.request, kEventNames[static_cast<int>(e.event)]));
  } catch (const DuplicateRequestError& e) {
    return make("DuplicateRequest", py::make_tuple(e.request, kStateNames[static_cast<int>(e.state)]));
  } catch (const InvalidArgumentError& e) {
    return make("InvalidArgument", py::make_tuple(lossless_str(e.argument), lossless_str(e.detail)));
  } catch (const PoolExhaustedError& e) {
    return make("PoolExhausted", py::make_tuple(e.request, lossless_str(e.detail)));
  } catch (const tp::NixlUnavailable& e) {
    py::dict a;
    a["library"] = lossless_str(e.library());
    a["missing_symbol"] = lossless_str(e.missing_symbol());
    return make_with("NixlUnavailable", e.what(), a);
  } catch (const tp::PeerDisconnected& e) {
    py::dict a;
    a["peer"] = lossless_str(e.peer);
    return make_with("PeerDisconnected", e.what(), a);
  } catch (const tp::RoleRefused& e) {
    py::dict a;
    a["request"] = e.request;
    a["op"] = e.op;
    a["role"] = e.role;
    a["whose"] = e.whose;
    return make_with("RoleRefused", e.what(), a);
  } catch (const tp::NixlCallError& e) {
    py::dict a;
    a["call"] = lossless_str(e.call());
    a["status"] = e.status();
    return make_with("TransportError", e.what(), a);
  } catch (const tp::TransportError& e) {
    return make_with("TransportError", e.what(), py::dict());
  } catch (const Error& e) {
    return make("LifecycleError", py::make_tuple(lossless_str(e.what())));
  } catch (...) {
  }
  return py::none();
}

std::string text_arg(py::handle h, const char* what) {
  if (!PyUnicode_Check(h.ptr())) {
    throw InvalidArgumentError(what, std::string("expected a str, got ") + Py_TYPE(h.ptr())->tp_name);
  }
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
  if (p == nullptr) {
    PyErr_Clear();
    throw InvalidArgumentError(what, "cannot be encoded as UTF-8 (a lone surrogate?)");
  }
  return std::string(p, static_cast<std::size_t>(n));
}

std::string int_text(py::handle h) {
  // int's own repr: an int subclass's __repr__ may raise, or say anything
  PyObject* r = PyLong_Type.tp_repr(h.ptr());
  if (r != nullptr) return py::reinterpret_steal<py::str>(r).cast<std::string>();  // (digits: ASCII)
  if (!PyErr_ExceptionMatches(PyExc_ValueError)) throw py::error_already_set();  // (a MemoryError is not ours)
  PyErr_Clear();  // past the digits str() prints (4300: "Exceeds the limit ... for integer string conversion")
  const py::handle int_type(reinterpret_cast<PyObject*>(&PyLong_Type));
  const py::object below = py::reinterpret_steal<py::object>(PyLong_Type.tp_richcompare(h.ptr(), py::int_(0).ptr(), Py_LT));
  const bool negative = below.ptr() == Py_True;
  return std::string(negative ? "a negative int of " : "an int of ") +
         py::str(int_type.attr("bit_length")(h)).cast<std::string>() + " bits";
}

// `h` as an int object: an int, or an integer with __index__ (numpy's); else InvalidArgumentError naming `what`.
static py::object int_object(py::handle h, const char* what) {
  if (PyLong_CheckExact(h.ptr())) return py::reinterpret_borrow<py::object>(h);  // (the usual case: no __index__)
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr())) {
    throw InvalidArgumentError(what, std::string("expected an int, got ") + Py_TYPE(h.ptr())->tp_name);
  }
  py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
  if (!as_int) {
    // an __index__ that refused (a numpy array of several ints: "only integer scalar arrays ...") or returned a
    // non-int: the argument is not one int (a bare TypeError named neither it nor the call); KeyboardInterrupt,
    // MemoryError and a user __index__'s own other errors pass unchanged, as slot_index does
    if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError)) {
      throw py::error_already_set();
    }
    PyErr_Clear();
    throw InvalidArgumentError(what, std::string("expected an int, got a ") + Py_TYPE(h.ptr())->tp_name +
                                         " that is not one integer");
  }
  return as_int;
}

std::int64_t int64_arg(py::handle h, const char* what) {
  const py::object as_int = int_object(h, what);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(as_int.ptr(), &overflow);
  if (overflow != 0) throw InvalidArgumentError(what, "out of the int64 range");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<std::int64_t>(v);
}

std::uint64_t uint64_arg(py::handle h, const char* what) {
  const py::object as_int = int_object(h, what);
  const unsigned long long v = PyLong_AsUnsignedLongLong(as_int.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {  // negative, or past 64 bits
    PyErr_Clear();
    throw InvalidArgumentError(what, "must be an int in [0, 2**64), got " + int_text(as_int.ptr()));
  }
  return static_cast<std::uint64_t>(v);
}

void register_errors(py::module_&) {
  py::register_exception_translator([](std::exception_ptr p) {
    py::object exc = error_object(p);
    if (exc.is_none()) std::rethrow_exception(p);  // not one of ours: pybind11's own translation
    PyErr_SetObject(py::type::handle_of(exc).ptr(), exc.ptr());
  });
}

}  // namespace lifecycle::bindings
