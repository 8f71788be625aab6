// The base of every C++ error of kv-lifecycle (no dependency on the generated table, so the
// transport layer can use it standalone).  The bindings map each subclass to a lifecycle.errors class.
#pragma once
#include <exception>
#include <stdexcept>

namespace lifecycle {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
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
