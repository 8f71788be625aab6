#include "lifecycle/transport/nixl_capi.hpp"

#include <dlfcn.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <vector>

namespace lifecycle::transport {

namespace {

std::atomic<std::uint64_t> g_release_failures{0};

std::string unavailable_message(const std::string& library, const std::string& symbol,
                                const std::string& detail, const std::string& source) {
  std::ostringstream os;
  os << "NIXL C API unavailable: ";
  if (!symbol.empty()) os << "symbol " << symbol << " missing; ";
  os << detail << "; library=" << (library.empty() ? "<none>" : library);
  if (!source.empty()) os << " (from " << source << ")";
  // (the variable only stands in for a path not given: naming it alone misled a caller that gave one)
  os << "; install it with `" << NixlCapi::kInstallHint << "` or give the path of libnixl_capi.so (capi_path, or "
     << NixlCapi::kPathEnv << " when none is given)";
  return os.str();
}

std::string call_message(const std::string& call, int status, const std::string& context) {
  std::ostringstream os;
  os << "NIXL call nixl_capi_" << call << " failed with status " << status;
  if (!context.empty()) os << " (" << context << ")";
  return os.str();
}

}  // namespace

NixlUnavailable::NixlUnavailable(std::string library, std::string missing_symbol,
                                 std::string detail, const std::string& source)
    : TransportError(unavailable_message(library, missing_symbol, detail, source)),
      library_(std::move(library)),
      missing_symbol_(std::move(missing_symbol)) {}

NixlCallError::NixlCallError(std::string call, int status, const std::string& context)
    : TransportError(call_message(call, status, context)), call_(std::move(call)), status_(status) {}

void check_capi(capi::status_t st, const char* call, const std::string& context) {
  if (st != capi::kSuccess) throw NixlCallError(call, static_cast<int>(st), context);
}

std::uint64_t capi_release_failures() noexcept { return g_release_failures.load(); }
void note_capi_release_failure() noexcept { g_release_failures.fetch_add(1); }

namespace {
std::mutex g_kept_mu;
std::vector<const void*>* g_kept = nullptr;  // never freed: a root that keeps what it holds reachable
}  // namespace

void keep_forever(const void* handle) noexcept {
  if (handle == nullptr) return;
  try {
    std::lock_guard<std::mutex> lk(g_kept_mu);
    if (g_kept == nullptr) g_kept = new std::vector<const void*>();
    g_kept->push_back(handle);
  } catch (...) {  // (out of memory: the handle stays unreleased all the same)
  }
}

std::size_t kept_forever() noexcept {
  std::lock_guard<std::mutex> lk(g_kept_mu);
  return g_kept == nullptr ? 0 : g_kept->size();
}

std::vector<std::string> nixl_capi_required_symbols() {
  std::vector<std::string> out;
#define LIFECYCLE_NIXL_NAME(name, ret, params) out.emplace_back("nixl_capi_" #name);
  LIFECYCLE_NIXL_CAPI_SYMBOLS(LIFECYCLE_NIXL_NAME)
#undef LIFECYCLE_NIXL_NAME
  return out;
}

std::pair<std::string, std::string> NixlCapi::resolve(const std::string& path, const std::string& source) {
  // The path given wins (argument > environment): until session 29 the variable overrode it, and a caller that
  // passed a path was told of another library, with nothing to say where that one came from.  The environment
  // is read only without one (until session 29 on every load, inside the bindings' NoGil: see the header).
  if (!path.empty()) return {path, source};
  if (const char* env = std::getenv(kPathEnv); env != nullptr && *env != '\0') {
    return {env, std::string("$") + kPathEnv};
  }
  throw NixlUnavailable("", "", std::string("no library path given and ") + kPathEnv + " unset");
}

std::shared_ptr<const NixlCapi> NixlCapi::load(const std::string& path, const std::string& source) {
  const auto [chosen, from] = resolve(path, source);

  // A path to something other than a file is refused unopened: dlopen opens a FIFO to read, and waited there for a
  // writer for good.  (A missing file, or a bare name the loader searches for, is dlopen's to report.)
  struct stat st{};
  if (chosen.find('/') != std::string::npos && ::stat(chosen.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    const char* what = S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket";
    throw NixlUnavailable(chosen, "", chosen + " is not a regular file (" + what + "); nothing was loaded", from);
  }

  // RTLD_NODELETE: NIXL/UCX start threads and register atexit hooks; unmapping them is unsafe.
  dlerror();
  void* dl = dlopen(chosen.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (dl == nullptr) {
    const char* err = dlerror();
    throw NixlUnavailable(chosen, "", std::string("dlopen failed: ") + (err ? err : "unknown"), from);
  }

  std::shared_ptr<NixlCapi> api(new NixlCapi());
  api->path_ = chosen;
  api->dl_ = dl;

  std::vector<std::string> missing;
#define LIFECYCLE_NIXL_RESOLVE(name, ret, params)                                  \
  {                                                                                \
    dlerror();                                                                     \
    void* sym = dlsym(dl, "nixl_capi_" #name);                                     \
    if (sym == nullptr) {                                                          \
      missing.emplace_back("nixl_capi_" #name);                                    \
    } else {                                                                       \
      api->name = reinterpret_cast<ret(*) params>(sym);                            \
    }                                                                              \
  }
  LIFECYCLE_NIXL_CAPI_SYMBOLS(LIFECYCLE_NIXL_RESOLVE)
#undef LIFECYCLE_NIXL_RESOLVE

  if (!missing.empty()) {
    std::ostringstream detail;
    detail << missing.size() << " of " << nixl_capi_required_symbols().size()
           << " required symbols not found (";
    for (std::size_t i = 0; i < missing.size() && i < 4; ++i) detail << (i ? ", " : "") << missing[i];
    if (missing.size() > 4) detail << ", ...";
    detail << "); not a compatible libnixl_capi.so (need nixl-cu12 1.5.1)";
    throw NixlUnavailable(chosen, missing.front(), detail.str(), from);
  }
  if (api->is_stub()) {
    throw NixlUnavailable(chosen, "", "library is a stub build of the NIXL C API (no NIXL inside)", from);
  }
  return api;
}

NixlCapi::~NixlCapi() {
  if (dl_ != nullptr) dlclose(dl_);  // RTLD_NODELETE keeps the code mapped
}

capi::status_t XferReqHandle::reset() noexcept {
  if (req_ == nullptr) return capi::kSuccess;
  const capi::status_t st = api_->release_xfer_req(agent_, req_);
  if (st != capi::kSuccess) {
    note_capi_release_failure();
    return st;  // still held: NIXL could not abort it, so it must not be freed
  }
  if (api_->destroy_xfer_req(req_) != capi::kSuccess) note_capi_release_failure();
  req_ = nullptr;
  return st;
}

}  // namespace lifecycle::transport
