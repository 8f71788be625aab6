// The base of every C++ error of kv-lifecycle (no dependency on the generated table, so the
// transport layer can use it standalone).  The bindings map each subclass to a lifecycle.errors class.
#pragma once
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

namespace lifecycle {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bad argument, named (the bindings raise lifecycle.errors.InvalidArgument with .argument set).
class InvalidArgumentError : public Error {
 public:
  InvalidArgumentError(std::string arg, const std::string& msg)
      : Error("invalid " + arg + ": " + msg), argument(std::move(arg)), detail(msg) {}
  std::string argument;
  std::string detail;
};

// f(), with what it threw captured (nullptr when it returned): per-item errors of a batch call.
template <class F>
std::exception_ptr caught(F&& f) {
  try {
    f();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

}  // namespace lifecycle
