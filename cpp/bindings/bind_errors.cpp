// One translator: every C++ error type -> its Python class in lifecycle.errors.
#include "lifecycle/errors.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

static void raise(const char* cls, py::tuple args) {
  py::object errors = py::module_::import("lifecycle.errors");
  py::object exc = errors.attr(cls)(*args);
  PyErr_SetObject(py::type::handle_of(exc).ptr(), exc.ptr());
}

void register_errors(py::module_&) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IllegalTransitionError& e) {
      raise("IllegalTransition", py::make_tuple(e.request, kStateNames[static_cast<int>(e.state)],
                                                kEventNames[static_cast<int>(e.event)]));
    } catch (const UnknownRequestError& e) {
      raise("UnknownRequest", py::make_tuple(e.request, kEventNames[static_cast<int>(e.event)]));
    } catch (const DuplicateRequestError& e) {
      raise("DuplicateRequest", py::make_tuple(e.request, kStateNames[static_cast<int>(e.state)]));
    } catch (const InvalidArgumentError& e) {
      raise("InvalidArgument", py::make_tuple(e.argument, e.detail));
    } catch (const PoolExhaustedError& e) {
      raise("PoolExhausted", py::make_tuple(e.request, e.detail));
    } catch (const Error& e) {
      raise("LifecycleError", py::make_tuple(e.what()));
    }
  });
}

}  // namespace lifecycle::bindings
