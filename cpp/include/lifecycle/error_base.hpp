// The base of every C++ error of kv-lifecycle (no dependency on the generated table, so the
// transport layer can use it standalone).  The bindings map each subclass to a lifecycle.errors class.
#pragma once
#include <stdexcept>

namespace lifecycle {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace lifecycle
