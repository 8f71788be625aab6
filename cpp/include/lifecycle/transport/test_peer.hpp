// TEST ONLY (cpp/tests/test_transport.cpp): reaches into a Transport for the fork guard's test.
#pragma once

#include <mutex>

namespace lifecycle::transport {

class Transport;

struct TransportTestPeer {
  // The lock the engine's abort hook takes: held by another thread at a fork, it stays held in the child.
  static std::recursive_mutex& relay_mutex(Transport& t);
  // Makes this process's fork generation the transport's own, as if it had made it: the guard's control.
  static void adopt(Transport& t);
};

}  // namespace lifecycle::transport
