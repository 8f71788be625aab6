// Typed C++ errors of the core.  The bindings map each to one Python exception class.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "lifecycle/error_base.hpp"
#include "lifecycle/table_gen.hpp"

namespace lifecycle {

class IllegalTransitionError : public Error {
 public:
  IllegalTransitionError(std::uint64_t req, State s, Event e)
      : Error(std::string("can't handle event ") + kEventNames[static_cast<int>(e)] + " when state=" +
              kStateNames[static_cast<int>(s)] + " for request " + std::to_string(req)),
        request(req), state(s), event(e) {}
  std::uint64_t request;
  State state;
  Event event;
};

class UnknownRequestError : public Error {
 public:
  UnknownRequestError(std::uint64_t req, Event e)
      : Error("no session for request " + std::to_string(req) + " for event " + kEventNames[static_cast<int>(e)]),
        request(req), event(e) {}
  std::uint64_t request;
  Event event;
};

class DuplicateRequestError : public Error {
 public:
  DuplicateRequestError(std::uint64_t req, State s)
      : Error("request " + std::to_string(req) + " already has a session (state=" + kStateNames[static_cast<int>(s)] +
              "); advertise refused"),
        request(req), state(s) {}
  std::uint64_t request;
  State state;
};

class PoolExhaustedError : public Error {
 public:
  PoolExhaustedError(std::uint64_t req, const std::string& msg)
      : Error("request " + std::to_string(req) + ": " + msg), request(req), detail(msg) {}
  std::uint64_t request;
  std::string detail;
};

}  // namespace lifecycle
