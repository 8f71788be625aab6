// One translator: every C++ error type -> its Python class in lifecycle.errors.
#include "lifecycle/errors.hpp"
#include "lifecycle/transport/nixl_capi.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {

static void raise(const char* cls, py::tuple args) {
  py::object errors = py::module_::import("lifecycle.errors");
  py::object exc = errors.attr(cls)(*args);
  PyErr_SetObject(py::type::handle_of(exc).ptr(), exc.ptr());
}

static void raise_with(const char* cls, const std::string& msg, const py::dict& attrs) {
  py::object errors = py::module_::import("lifecycle.errors");
  py::object exc = errors.attr(cls)(msg);
  for (auto item : attrs) py::setattr(exc, item.first, item.second);
  PyErr_SetObject(py::type::handle_of(exc).ptr(), exc.ptr());
}

void register_errors(py::module_&) {
  namespace tp = lifecycle::transport;
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
    } catch (const tp::NixlUnavailable& e) {
      py::dict a;
      a["library"] = e.library();
      a["missing_symbol"] = e.missing_symbol();
      raise_with("NixlUnavailable", e.what(), a);
    } catch (const tp::NixlCallError& e) {
      py::dict a;
      a["call"] = e.call();
      a["status"] = e.status();
      raise_with("TransportError", e.what(), a);
    } catch (const tp::TransportError& e) {
      raise_with("TransportError", e.what(), py::dict());
    } catch (const Error& e) {
      raise("LifecycleError", py::make_tuple(e.what()));
    }
  });
}

}  // namespace lifecycle::bindings
