// NoGil: the GIL released for a scope, safe at interpreter exit.
//
// While Python finalizes, CPython < 3.14 ends a thread that asks for the GIL back with pthread_exit(),
// which glibc runs as a forced unwind.  Through pybind11's gil_scoped_release, whose destructor is
// implicitly noexcept, that unwind is std::terminate(): a daemon thread inside any binding call when
// the program exits (an executor's poll thread, say) aborted the whole process ("terminate called
// without an active exception", SIGABRT; pybind11 issue #2215).  NoGil parks such a thread instead,
// as CPython 3.14 itself does: the process is exiting, and a parked thread touches nothing.  A thread
// that was already waiting inside PyEval_RestoreThread when finalization began still gets
// pthread_exit(); the destructor catches that unwind and parks the thread there (it never returns, so
// the unwind is never swallowed).  Letting the unwind pass instead was not enough: a call that threw
// runs this destructor during its own unwinding, where a second exception is std::terminate whatever
// the destructor's noexcept says (a review found it, session 20), and the unwind would run the
// binding's cleanups (Py_DECREFs) without the GIL.  The thread that finalizes (the main thread) is
// never parked: it may call in here itself at exit (a transport dropped then stops), and gets the GIL
// back as usual.
#include <chrono>
#include <thread>
#if defined(__GLIBCXX__)
#include <cxxabi.h>  // abi::__forced_unwind: glibc's pthread_exit unwinds with it
#endif

#include "register.hpp"

namespace py = pybind11;

namespace lifecycle::bindings {
namespace {

// threading.main_thread().ident, read at import.  The main thread runs the finalization (Py_FinalizeEx), and
// may itself call in here meanwhile (a transport dropped at exit stops): it must get the GIL back.  0: unknown,
// never park.  (A host that embeds Python and finalizes it from another thread would have that thread parked
// here at exit: such hosts should stop their transports before Py_FinalizeEx.)
unsigned long g_main_thread = 0;

[[noreturn]] void park() noexcept {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));  // the process is exiting
}

bool finalizing() noexcept {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

}  // namespace

NoGil::NoGil() {
  (void)py::detail::get_internals();  // as gil_scoped_release: set up while the GIL is held
  tstate_ = PyEval_SaveThread();
}

NoGil::~NoGil() {
  if (g_main_thread != 0 && finalizing() && PyThread_get_thread_ident() != g_main_thread) park();
#if defined(__GLIBCXX__)
  try {
    PyEval_RestoreThread(tstate_);
  } catch (abi::__forced_unwind&) {  // finalization began while this thread waited for the GIL
    park();
  }
#else
  PyEval_RestoreThread(tstate_);  // (elsewhere pthread_exit does not unwind C++ frames)
#endif
}

void register_nogil(py::module_& m) {
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  // Test hook (tests/test_lifetime.py): one short release of the GIL, by NoGil or, as the negative control,
  // by pybind11's own guard.
  m.def("_gil_release_probe", [](bool pybind11_guard) {
    const auto spin = [] {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
      while (std::chrono::steady_clock::now() < until) {
      }
    };
    if (pybind11_guard) {
      py::gil_scoped_release nogil;
      spin();
    } else {
      NoGil nogil;
      spin();
    }
  }, py::arg("pybind11_guard") = false);
}

}  // namespace lifecycle::bindings
