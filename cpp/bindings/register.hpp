#pragma once
#include <pybind11/pybind11.h>

#include <exception>

namespace lifecycle::bindings {
// The GIL released for a scope, like pybind11::gil_scoped_release, except that a thread taking the GIL
// back while Python exits is parked instead of aborting the process (nogil.cpp).  Every release in the
// bindings uses it.
class NoGil {
 public:
  NoGil();
  ~NoGil();
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;

 private:
  PyThreadState* tstate_ = nullptr;
};

// The Python exception object (lifecycle.errors) for one of the library's C++ errors; None for another
// exception.  The exception translator raises it; batch calls return it in the item's place.
pybind11::object error_object(std::exception_ptr p);
// A str argument as UTF-8 (InvalidArgumentError naming `what` for a non-str, or one UTF-8 cannot encode:
// a lone surrogate, where pybind11's own conversion raised a bare RuntimeError or "incompatible arguments").
std::string text_arg(pybind11::handle h, const char* what);
// An int argument in the int64 range (InvalidArgumentError naming `what` for a bool, a float, another type, or
// one out of range, where pybind11 raised a bare "incompatible function arguments" TypeError).
std::int64_t int64_arg(pybind11::handle h, const char* what);
// An int argument in [0, 2**64) (an int, or an integer with __index__: numpy's), else InvalidArgumentError naming
// `what` and the value: pybind11's own uint64 took True as 1 and answered -1 or 2**64 with its bare "incompatible
// function arguments" TypeError, which names neither the argument nor what was wrong.
std::uint64_t uint64_arg(pybind11::handle h, const char* what);
// An int (exactly, or a subclass: int's own repr) as text for an error message; one too long for str() (past
// its 4300 digits, a ValueError that replaced the typed error) is "an int of N bits".
std::string int_text(pybind11::handle h);
// C++ text -> str, bytes that are not UTF-8 escaped (\xNN), never a UnicodeDecodeError.
pybind11::str lossless_str(const std::string& s);
// Extra py::class_ arguments every class here takes: X.__new__(X) without X(...) raises TypeError instead of
// making an object whose methods crash (guard.cpp).
pybind11::metaclass guarded_metaclass();
pybind11::custom_type_setup guarded_new_setup();
void register_errors(pybind11::module_& m);
void register_table(pybind11::module_& m);
void register_clock(pybind11::module_& m);
void register_pool(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_bench(pybind11::module_& m);
void register_transport(pybind11::module_& m);
void register_audit(pybind11::module_& m);
void register_nogil(pybind11::module_& m);
// Last: every function and method refuses arguments it does not take naming their types, never their repr()
// (guard.cpp).
void add_refusals(pybind11::module_& m);
}  // namespace lifecycle::bindings
