// Native replay of structured lifecycle logs; see lifecycle/audit.hpp for the theory of operation.
// Every handler below mirrors the method of lifecycle/audit.py's Auditor with the same name; the
// differential tests (tests/test_audit_native.py) hold the two to identical results.
#include "lifecycle/audit.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <queue>
#include <set>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "lifecycle/engine.hpp"  // kRoleNames
#include "lifecycle/errors.hpp"
#include "lifecycle/table_gen.hpp"

namespace lifecycle::audit {

std::string to_string(Int v) {
  if (v == 0) return "0";
  bool neg = v < 0;
  unsigned __int128 u = neg ? static_cast<unsigned __int128>(-(v + 1)) + 1 : static_cast<unsigned __int128>(v);
  char buf[48];
  int i = 48;
  while (u != 0) {
    buf[--i] = static_cast<char>('0' + static_cast<int>(u % 10));
    u /= 10;
  }
  if (neg) buf[--i] = '-';
  return std::string(buf + i, static_cast<std::size_t>(48 - i));
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::malformed: return "malformed";
    case Kind::unreadable: return "unreadable";
    case Kind::illegal_transition: return "illegal_transition";
    case Kind::terminated_before_terminal: return "terminated_before_terminal";
    case Kind::leak: return "leak";
    case Kind::double_termination: return "double_termination";
    case Kind::wrong_result: return "wrong_result";
    case Kind::result_state_mismatch: return "result_state_mismatch";
    case Kind::misclassified_event: return "misclassified_event";
    case Kind::deferred_delivery: return "deferred_delivery";
    case Kind::deferred_order: return "deferred_order";
    case Kind::slot_reuse: return "slot_reuse";
    case Kind::rank_disagreement: return "rank_disagreement";
    case Kind::seq_gap: return "seq_gap";
    case Kind::collective_desync: return "collective_desync";
    case Kind::no_events: return "no_events";
    case Kind::rejected_event: return "rejected_event";
    case Kind::callback_error: return "callback_error";
    case Kind::unhealthy: return "unhealthy";
    case Kind::stream_start: return "stream_start";
    case Kind::adopted_session: return "adopted_session";
    case Kind::orphan_event: return "orphan_event";
    case Kind::table_mismatch: return "table_mismatch";
    case Kind::live: return "live";
    case Kind::window_evicted: return "window_evicted";
    case Kind::delivery_unchecked: return "delivery_unchecked";
    case Kind::log_filtered: return "log_filtered";
    case Kind::unjudged: return "unjudged";
  }
  return "?";
}

const char* const kLogEventNames[12] = {
    "lifecycle.transition", "lifecycle.cancel", "lifecycle.terminate", "lifecycle.terminate_now",
    "lifecycle.callback_error", "lifecycle.slot_quarantined", "lifecycle.buffer_recovered",
    "lifecycle.late_event", "lifecycle.illegal_transition", "lifecycle.health", "lifecycle.collective_desync",
    "lifecycle.log_level",
};
enum LogEvent : int {
  ev_transition, ev_cancel, ev_terminate, ev_terminate_now, ev_callback_error, ev_slot_quarantined,
  ev_buffer_recovered, ev_late_event, ev_illegal_transition, ev_health, ev_collective_desync, ev_log_level,
  kNumLogEvents
};

// The table's outcomes without the C++ enum's `none` (Python's spec.outcomes).
int num_outcomes() { return kNumOutcomes - 1; }
const char* outcome_name(int i) { return kOutcomeNames[i + 1]; }

void Histogram::add(Int v) {
  int b;
  if (v < 64) {
    b = v > 0 ? static_cast<int>(v) : 0;
  } else {
    auto u = static_cast<unsigned __int128>(v);
    auto hi = static_cast<std::uint64_t>(u >> 64), lo = static_cast<std::uint64_t>(u);
    int bits = hi != 0 ? 128 - __builtin_clzll(hi) : 64 - __builtin_clzll(lo);
    int e = bits - 6;
    b = (e << 5) + static_cast<int>(u >> e);
  }
  ++buckets[static_cast<std::size_t>(b)];
  ++count;
  total += v;
  if (v > max) max = v;
}

// ------------------------------------------------------------------------------------------------
// JSON: a strict RFC 8259 reader that accepts what orjson 3.x accepts (no depth limit, UTF-8 checked
// the way Python decodes it, integers outside [-2^63, 2^64) read as floats, numbers that round to
// infinity rejected).  Only the top-level object's members that the replay reads are kept; nested
// values are validated and kept as raw text.
// ------------------------------------------------------------------------------------------------
namespace {

enum class JT : std::uint8_t { missing, null, yes, no, integer, real, string, array, object };

struct JVal {
  JT t = JT::missing;
  bool sdec = false;      // string content lives in Doc::dec (it had escapes)
  std::uint32_t off = 0, len = 0;    // the raw text
  std::uint32_t soff = 0, slen = 0;  // string content
  std::uint32_t depth = 0;
  Int i = 0;
};

enum K : int {
  k_event, k_rank, k_seq, k_pid, k_t, k_request, k_table, k_from, k_trigger, k_to, k_outcome, k_deferred,
  k_slot, k_generation, k_role, k_result, k_error, k_healthy, k_reasons, k_seq_no, k_field, k_sites, k_state,
  k_schema, k_proc, k_engine, k_info_filtered, kNumK
};
constexpr const char* kKeyNames[kNumK] = {
    "event", "rank", "seq", "pid", "t_mono_ns", "request", "table", "from_state", "trigger", "to_state",
    "outcome", "deferred", "slot", "generation", "role", "result", "error", "healthy", "reasons", "seq_no",
    "field", "sites", "state", "schema", "proc", "engine", "info_filtered"};

struct Doc {
  JT top = JT::missing;
  JVal f[kNumK];
  std::string dec;
  std::uint32_t set = 0;  // bit k: f[k] was written (to reset only those)
  void reset() {
    for (std::uint32_t m = set; m != 0; m &= m - 1) f[__builtin_ctz(m)] = JVal{};
    set = 0;
    dec.clear();
    top = JT::missing;
  }
};

// The known key named p[0..n), -1 for any other: keys are bucketed by (length, first byte) once.
int key_id(const char* p, std::size_t n) {
  struct Index {
    std::vector<int> by[24][128];
    Index() {
      for (int k = 0; k < kNumK; ++k) {
        std::size_t len = std::strlen(kKeyNames[k]);
        by[len][static_cast<unsigned char>(kKeyNames[k][0])].push_back(k);
      }
    }
  };
  static const Index index;
  if (n == 0 || n >= 24 || static_cast<unsigned char>(p[0]) >= 128) return -1;
  for (int k : index.by[n][static_cast<unsigned char>(p[0])])
    if (std::memcmp(kKeyNames[k], p, n) == 0) return k;
  return -1;
}

inline bool is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
inline int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Length of the valid UTF-8 sequence at p (lead byte >= 0x80), 0 when invalid (Python's rules: no
// overlongs, no surrogates, nothing above U+10FFFF).
inline int utf8_len(const unsigned char* p, const unsigned char* e) {
  unsigned char c = p[0];
  auto cont = [&](int i, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return p + i < e && p[i] >= lo && p[i] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

void put_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Parser {
 public:
  // Parse one line into `d` (fields of a top-level object), false when orjson would reject it.
  bool parse(const char* p, std::size_t n, Doc& d) {
    b_ = reinterpret_cast<const unsigned char*>(p);
    e_ = b_ + n;
    s_ = b_;
    d.reset();
    doc_ = &d;
    why_ = nullptr;
    ws();
    if (s_ == e_) return fail("empty line");
    if (*s_ == '{') {
      d.top = JT::object;
      ++s_;
      ws();
      if (peek() == '}') {
        ++s_;
      } else {
        for (;;) {
          if (peek() != '"') return fail("expected a key");
          const unsigned char* k0 = s_;
          bool esc = false;
          if (!string(esc)) return false;
          int k;
          if (!esc) {
            k = key_id(reinterpret_cast<const char*>(k0 + 1), static_cast<std::size_t>(s_ - k0 - 2));
          } else {
            key_.clear();
            decode(k0, s_, key_);
            k = key_id(key_.data(), key_.size());
          }
          ws();
          if (peek() != ':') return fail("expected ':'");
          ++s_;
          ws();
          if (k >= 0) d.set |= 1u << k;  // before parsing: a failed parse leaves nothing stale behind
          JVal& v = k >= 0 ? d.f[k] : scratch_;
          if (!value(v, k >= 0)) return false;
          ws();
          unsigned char c = peek();
          if (c == ',') {
            ++s_;
            ws();
            continue;
          }
          if (c == '}') {
            ++s_;
            break;
          }
          return fail("expected ',' or '}'");
        }
      }
    } else {
      if (!value(scratch_, false)) return false;
      d.top = scratch_.t;
    }
    ws();
    if (s_ != e_) return fail("unexpected content after the document");
    return true;
  }
  const char* why() const { return why_ ? why_ : ""; }
  std::size_t where() const { return static_cast<std::size_t>(s_ - b_); }

 private:
  unsigned char peek() const { return s_ < e_ ? *s_ : 0; }
  void ws() {
    while (s_ < e_ && is_ws(*s_)) ++s_;
  }
  bool fail(const char* why) {
    why_ = why;
    return false;
  }

  // A string at s_ ('"'): validated, s_ moved past its closing quote; esc set when it has escapes.
  bool string(bool& esc) {
    ++s_;
    for (;;) {
      if (s_ >= e_) return fail("unterminated string");
      unsigned char c = *s_;
      if (c == '"') {
        ++s_;
        return true;
      }
      if (c == '\\') {
        esc = true;
        ++s_;
        if (s_ >= e_) return fail("unterminated string");
        c = *s_;
        if (c == 'u') {
          int cp = hex4(s_ + 1);
          if (cp < 0) return fail("invalid \\u escape");
          s_ += 5;
          if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("lone low surrogate");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!(s_ + 1 < e_ && s_[0] == '\\' && s_[1] == 'u')) return fail("high surrogate without a low one");
            int lo = hex4(s_ + 2);
            if (lo < 0xDC00 || lo > 0xDFFF) return fail("invalid low surrogate");
            s_ += 6;
          }
          continue;
        }
        if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't') {
          ++s_;
          continue;
        }
        return fail("invalid escape");
      }
      if (c < 0x20) return fail("control character in string");
      if (c < 0x80) {
        ++s_;
        continue;
      }
      int n = utf8_len(s_, e_);
      if (n == 0) return fail("invalid UTF-8");
      s_ += n;
    }
  }
  int hex4(const unsigned char* p) const {
    if (e_ - p < 4) return -1;
    int v = 0;
    for (int i = 0; i < 4; ++i) {
      int h = hexval(p[i]);
      if (h < 0) return -1;
      v = v * 16 + h;
    }
    return v;
  }
  // The content of the validated string [q, end) (quotes included) into out.
  static void decode(const unsigned char* q, const unsigned char* end, std::string& out) {
    const unsigned char* p = q + 1;
    end -= 1;
    while (p < end) {
      if (*p != '\\') {
        out += static_cast<char>(*p++);
        continue;
      }
      ++p;
      unsigned char c = *p++;
      switch (c) {
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          auto h = [](const unsigned char* x) {
            std::uint32_t v = 0;
            for (int i = 0; i < 4; ++i) v = v * 16 + static_cast<std::uint32_t>(hexval(x[i]));
            return v;
          };
          std::uint32_t cp = h(p);
          p += 4;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            std::uint32_t lo = h(p + 2);
            p += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: out += static_cast<char>(c); break;  // " \ /
      }
    }
  }

  bool number(JVal& v, bool keep) {
    const unsigned char* n0 = s_;
    bool neg = false, real = false;
    if (*s_ == '-') {
      neg = true;
      ++s_;
    }
    if (!is_digit(peek())) return fail("no digit after minus sign");
    const unsigned char* i0 = s_;
    if (*s_ == '0') {
      ++s_;
      if (is_digit(peek())) return fail("number with a leading zero");
    } else {
      while (is_digit(peek())) ++s_;
    }
    const unsigned char* i1 = s_;
    const unsigned char *f0 = s_, *f1 = s_;
    long long exp = 0;
    if (peek() == '.') {
      ++s_;
      f0 = s_;
      if (!is_digit(peek())) return fail("no digit after decimal point");
      while (is_digit(peek())) ++s_;
      f1 = s_;
      real = true;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++s_;
      bool eneg = false;
      if (peek() == '+' || peek() == '-') eneg = *s_++ == '-';
      if (!is_digit(peek())) return fail("no digit in exponent");
      while (is_digit(peek())) {
        if (exp < 1000000000) exp = exp * 10 + (*s_ - '0');
        ++s_;
      }
      if (eneg) exp = -exp;
      real = true;
    }
    if (!real && i1 - i0 <= 20) {
      unsigned __int128 mag = 0;
      for (const unsigned char* p = i0; p < i1; ++p) mag = mag * 10 + static_cast<unsigned>(*p - '0');
      unsigned __int128 lim = neg ? (static_cast<unsigned __int128>(1) << 63) : ~static_cast<std::uint64_t>(0);
      if (mag <= lim) {
        v.t = JT::integer;
        if (keep) v.i = neg ? -static_cast<Int>(mag) : static_cast<Int>(mag);
        return true;
      }
    }
    // a float: rejected when it rounds to infinity
    long long e10;
    if (!(i1 - i0 == 1 && *i0 == '0')) {
      e10 = static_cast<long long>(i1 - i0) - 1 + exp;
    } else {
      const unsigned char* p = f0;
      while (p < f1 && *p == '0') ++p;
      e10 = p == f1 ? -1000000000000LL : -static_cast<long long>(p - f0) - 1 + exp;
    }
    if (e10 > 308) return fail("number is infinity when parsed as double");
    if (e10 == 308) {
      double d = 0;
      auto r = std::from_chars(reinterpret_cast<const char*>(n0), reinterpret_cast<const char*>(s_), d);
      if (r.ec != std::errc() || std::isinf(d)) return fail("number is infinity when parsed as double");
    }
    v.t = JT::real;
    return true;
  }

  bool literal(const char* word, std::size_t n, JT t, JVal& v) {
    if (static_cast<std::size_t>(e_ - s_) < n || std::memcmp(s_, word, n) != 0) return fail("invalid literal");
    s_ += n;
    v.t = t;
    return true;
  }

  bool scalar(JVal& v, bool keep) {
    switch (peek()) {
      case '"': {
        const unsigned char* q = s_;
        bool esc = false;
        if (!string(esc)) return false;
        v.t = JT::string;
        if (keep) {
          if (esc) {
            v.sdec = true;
            v.soff = static_cast<std::uint32_t>(doc_->dec.size());
            decode(q, s_, doc_->dec);
            v.slen = static_cast<std::uint32_t>(doc_->dec.size() - v.soff);
          } else {
            v.sdec = false;
            v.soff = static_cast<std::uint32_t>(q + 1 - b_);
            v.slen = static_cast<std::uint32_t>(s_ - q - 2);
          }
        }
        return true;
      }
      case 't': return literal("true", 4, JT::yes, v);
      case 'f': return literal("false", 5, JT::no, v);
      case 'n': return literal("null", 4, JT::null, v);
      default:
        if (peek() == '-' || is_digit(peek())) return number(v, keep);
        return fail("unexpected character");
    }
  }

  // Any value at s_; containers without recursion (no depth limit, like orjson).
  bool value(JVal& v, bool keep) {
    const unsigned char* v0 = s_;
    v.sdec = false;
    v.depth = 0;
    unsigned char c = peek();
    if (c != '{' && c != '[') {
      if (!scalar(v, keep)) return false;
    } else {
      v.t = c == '{' ? JT::object : JT::array;
      stack_.clear();
      std::uint32_t maxd = 0;
      for (;;) {
        // at the start of a value
        c = peek();
        bool done_value = true;
        if (c == '{' || c == '[') {
          ++s_;
          stack_.push_back(c);
          maxd = std::max(maxd, static_cast<std::uint32_t>(stack_.size()));
          ws();
          unsigned char close = c == '{' ? '}' : ']';
          if (peek() == close) {
            ++s_;
            stack_.pop_back();
          } else {
            done_value = false;
            if (c == '{' && !member_key()) return false;
          }
        } else {
          if (!scalar(scratch2_, false)) return false;
        }
        if (!done_value) continue;
        // after a value: close containers or go on to the next element
        bool next = false;
        while (!stack_.empty()) {
          ws();
          unsigned char top = stack_.back();
          unsigned char d = peek();
          if (d == ',') {
            ++s_;
            ws();
            if (top == '{' && !member_key()) return false;
            next = true;
            break;
          }
          if (d == (top == '{' ? '}' : ']')) {
            ++s_;
            stack_.pop_back();
            continue;
          }
          return fail(top == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
        }
        if (!next) break;
      }
      v.depth = maxd;
    }
    v.off = static_cast<std::uint32_t>(v0 - b_);
    v.len = static_cast<std::uint32_t>(s_ - v0);
    return true;
  }
  // "key" : (inside an object, at the key)
  bool member_key() {
    if (peek() != '"') return fail("expected a key");
    bool esc = false;
    if (!string(esc)) return false;
    ws();
    if (peek() != ':') return fail("expected ':'");
    ++s_;
    ws();
    return true;
  }

  const unsigned char *b_ = nullptr, *e_ = nullptr, *s_ = nullptr;
  Doc* doc_ = nullptr;
  const char* why_ = nullptr;
  std::vector<unsigned char> stack_;
  std::string key_;
  JVal scratch_, scratch2_;
};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
std::uint64_t hash128(Int v) {
  auto u = static_cast<unsigned __int128>(v);
  return mix(static_cast<std::uint64_t>(u) ^ mix(static_cast<std::uint64_t>(u >> 64)));
}

// A session: (rank, request, stream index, engine) when its events name their engine, else (rank, request, -1,
// role id) (audit.py: (rank, request, ident)).  A slot: (stream index, engine or -1, slot, 0).  A stream: (proc, -1)
// or (pid, file).  A cross-rank record: (request, role id).
struct Key {
  Int a, b, c = 0, d = 0;
  bool operator==(const Key& o) const { return a == o.a && b == o.b && c == o.c && d == o.d; }
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    return static_cast<std::size_t>(hash128(k.a) ^ (hash128(k.b) * 31) ^ (hash128(k.c) * 961) ^ (hash128(k.d) * 29791));
  }
};

}  // namespace

bool json_valid(const char* p, std::size_t n, std::string* why) {
  Parser ps;
  Doc d;
  bool ok = ps.parse(p, n, d);
  if (!ok && why) *why = std::string(ps.why()) + " at column " + std::to_string(ps.where() + 1);
  return ok;
}

bool too_deep(const char* p, std::size_t n, std::int64_t max_depth) noexcept {
  std::int64_t depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < n; ++i) {
    const char c = p[i];
    if (in_string) {
      if (c == '\\') ++i;  // escapes the next byte, whatever it is
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

bool is_blank(const char* p, std::size_t n) {
  auto s = reinterpret_cast<const unsigned char*>(p);
  std::size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20)) {
      ++i;
      continue;
    }
    std::size_t left = n - i;
    if (c == 0xC2 && left >= 2 && (s[i + 1] == 0x85 || s[i + 1] == 0xA0)) {
      i += 2;
      continue;
    }
    if (left >= 3) {
      unsigned char c1 = s[i + 1], c2 = s[i + 2];
      bool sp = (c == 0xE1 && c1 == 0x9A && c2 == 0x80) ||                                  // U+1680
                (c == 0xE2 && c1 == 0x80 && (c2 <= 0x8A || c2 == 0xA8 || c2 == 0xA9 || c2 == 0xAF) &&
                 c2 >= 0x80) ||                                                               // U+2000-200A, 2028/9, 202F
                (c == 0xE2 && c1 == 0x81 && c2 == 0x9F) ||                                  // U+205F
                (c == 0xE3 && c1 == 0x80 && c2 == 0x80);                                    // U+3000
      if (sp) {
        i += 3;
        continue;
      }
    }
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// The replay
// ------------------------------------------------------------------------------------------------

namespace {

enum Into : std::uint8_t { into_active, into_terminal, into_final };
enum SlotStatus : std::uint8_t { slot_held, slot_poisoned, slot_quarantined };
const char* slot_status_name(SlotStatus s) {
  switch (s) {
    case slot_held: return "held";
    case slot_poisoned: return "poisoned";
    case slot_quarantined: return "quarantined";
  }
  return "?";
}

// The fields a folded session keeps as its tombstone.
struct Core {
  bool deferred = false;
  Int notices = 0, term_results = 0;
  std::uint32_t file = 0;
  Int last_line = 0, defer_line = 0, notice_line = 0;
  // the files of those lines (a session's lines may span files: a rotated log), `file` being its advertise's
  std::uint32_t last_file = 0, defer_file = 0, notice_file = 0;
};

struct Session {
  Core c;
  std::vector<Kind> kinds;  // violation kinds touching it, first marked first (empty: None)
  int state = 0;
  Int entered = 0, start = 0;
  std::string role;
  std::uint32_t role_depth = 0;
  Int slot = -1;
  Int stream = 0, engine = -1;  // its stream's index; the `engine` of its creating event (-1: absent)
  int outcome = -1;
  Int line = 0;
  std::vector<std::pair<int, Int>> hist;  // (state, t entered)
  std::uint64_t order = 0;                // creation order (Python's dict order)
  bool adopted = false;                   // first seen mid-life: its deferral may precede the log
};

struct Tomb {
  Core c;
  Key key;
  bool awaiting = false;  // in Impl::awaiting (evicted from the window, its deferred terminate awaiting its notice)
};

struct SlotRec {
  SlotStatus status;
  Key owner;  // the owning session's key (when owner_has_req)
  bool owner_has_req;
  Int owner_req;
  std::uint32_t file;
  Int line;
  bool has_gen;  // the lease's generation was an int
  Int gen;
};

struct Miss {
  std::uint32_t file;
  Int line, rank;
};

// A run of awaited seqs [first, end) (keyed by first), with where its loss was seen (Auditor._seq_mismatch)
struct MissRun {
  Int end;
  Miss m;
};

struct StreamSt {
  Int pid, next, max_t, bias, first;
  std::uint32_t file;
  // runs of awaited seqs, never adjacent (the seq before a run was seen): one node per run, not per seq (a gap of 4096
  // lines on every line, a sampled log, cost 4096 nodes per line: 100 k lines 48 s); nmissing: the seqs in them
  std::map<Int, MissRun> missing;
  Int nmissing = 0;
  bool head = false;  // seq 0 seen
  bool has_proc = false;
  Int proc = 0;
};
// A stream that began at most this far past seq 0 and meets a seq before its first within this many lines is
// reading its head out of order (two threads logging at start), not restarting (audit.py _HEAD_REORDER).
constexpr Int kHeadReorder = 64;

struct FedFile {  // audit.py Auditor._fed's entries: what the reads of one file found
  Int lines = 0;  // its last line number
  bool events = false, unread = false;
};

struct XRec {  // audit.py Auditor.xrank's entries
  int outcome;
  Int rank;                // the first rank that reported this lifetime of the request
  std::vector<Int> more;   // the others (empty, unallocated, in a one-rank log)
  bool reported;
  std::uint32_t file;
  Int line;
  std::uint64_t gen;       // its entry in xorder
};

struct Item {
  enum Type : std::uint8_t { event, too_long, too_deep, not_json, unreadable } type;
  Int line;
  bool has_t = false;
  Int t = 0;
  std::string text;
  Doc doc;
};

struct Source {
  std::uint32_t file = 0;
  std::string carry;       // the start of a line whose end has not arrived
  bool skipping = false;   // inside a line over max_line: dropped up to its newline
  bool eof = false;
  Int lineno = 0;          // complete lines seen
  std::uint64_t events = 0;  // events replayed from this source (Auditor._fed)
  bool unread = false;     // a read failed
  std::string pending;     // merge mode: the last chunk fed; bytes from `pos` on are not split into lines yet
  std::size_t pos = 0;
  std::deque<Item> queue;  // merge mode: parsed lines not yet replayed (<= kQueue; opt.lookahead at the start)
  std::size_t scanned = 0; // merge mode: queue items searched for the first time
  bool first_known = false, has_first = false;
  Int first = 0, last_key = 0;
  bool has_proc = false;   // the event that gave `first` had an int proc: `proc`
  Int proc = 0;
  bool head = false;       // an item of this source is in the merge heap
};

constexpr std::size_t kQueue = 64;  // merge mode: items parsed ahead per source once the merge runs

struct HeapEntry {
  Int k;
  std::size_t src;
  Int line;
  bool operator>(const HeapEntry& o) const {
    if (k != o.k) return k > o.k;
    if (src != o.src) return src > o.src;
    return line > o.line;
  }
};

struct SlowItem {
  Int life;
  std::uint64_t tie;
  Summary sum;
};
bool slow_less(const SlowItem& x, const SlowItem& y) {  // heap "greater" => min-heap by (life, tie)
  return x.life != y.life ? x.life > y.life : x.tie > y.tie;
}

}  // namespace

struct Auditor::Impl {
  Options opt;
  // the table, shaped for the replay
  int move_dst[kNumStates][kNumEvents];  // the state a moving row lands on, -1: no moving row
  int move_out[kNumStates][kNumEvents];  // a moving row's outcome (audit index), -1: it sets none (keeps the session's)
  Into into[kNumStates];
  int tis_index[kNumStates];  // histogram of time in the state, -1 for final states
  std::vector<std::pair<int, int>> edge_rows;  // (src, event) of each moving row, table order
  int edge_of[kNumStates][kNumEvents];
  std::vector<std::uint64_t> edge_count;
  std::uint64_t created = 0;
  int st_quiesced = -1, st_poisoned = -1;
  int tr_deferred = -1, tr_terminated = -1, tr_already_deferred = -1;
  std::string digest = kTableDigest;
  std::string terminal_list;  // "Quiesced/Poisoned"
  std::string final_list;     // "Terminated"

  // state
  Parser parser;
  Doc doc;
  std::int64_t lines = 0;
  std::uint64_t requests = 0, terminated = 0;
  std::uint64_t event_counts[kNumLogEvents] = {};
  std::uint64_t counts[kNumKinds] = {};
  std::vector<Kind> count_order;
  std::vector<Finding> findings;
  std::vector<Histogram> tis;
  std::vector<int> tis_states;
  Histogram lifetime;
  std::vector<std::uint64_t> outcomes;
  std::vector<Edge> illegal_edges;
  std::map<std::pair<int, int>, std::size_t> illegal_index;  // (src+1, event*64+dst) -> index
  std::vector<std::pair<std::pair<int, int>, std::uint64_t>> late, rejected;
  std::vector<SlowItem> slowest;
  std::uint64_t tiebreak = 0;
  std::vector<Summary> violating;
  std::vector<StreamSt> streams;
  std::unordered_map<Key, std::size_t, KeyHash> stream_index;
  std::unordered_map<Key, Session, KeyHash> live;
  std::uint64_t session_order = 0;
  std::list<Tomb> tomb_order;
  // Tombstones the window evicted while their deferred terminate awaited its TerminateNow (Auditor._awaiting),
  // oldest first, up to opt.window of them: spliced from tomb_order, still in `tombs`, not counted in the window.
  std::list<Tomb> awaiting;
  std::unordered_map<Key, std::list<Tomb>::iterator, KeyHash> tombs;
  std::unordered_map<Key, SlotRec, KeyHash> slots;
  // Every terminal outcome, by (request, role), oldest first: xorder holds (key, gen) in insertion order and
  // an entry is live while xmap[key].gen is its gen (a request reported again by the same rank is erased and
  // inserted anew: its old entry goes dead).  Python's dict order, without a list node per outcome.
  std::deque<std::pair<Key, std::uint64_t>> xorder;
  std::unordered_map<Key, XRec, KeyHash> xmap;
  std::uint64_t xgen = 0;
  std::set<Int> ranks;
  std::unordered_set<std::string> bad_tables;
  std::map<std::uint32_t, FedFile> fed;  // every file fed, by number (Python numbers a name given twice once)

  // input
  std::vector<Source> srcs;
  bool merging = false, started = false, relative = false;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, std::greater<HeapEntry>> heap;
  std::uint32_t cur_file = 0;
  Source* cur_src = nullptr;  // the source of the line being replayed
  const char* base = nullptr;  // the line being replayed (doc's offsets point into it)
  const Doc* d = nullptr;
  // the event being replayed: its stream's index, its `engine` (-1: absent), its role (0 sender, 1 receiver, 2 null)
  Int cur_stream = 0, cur_engine = -1;
  // lifecycle.log_level lines saying an engine's INFO lines are filtered out from there on, until one says they are
  // written again, in the order they came (audit.py Auditor._filtered, a dict: the same order)
  struct Filtered {
    Int stream, engine, seq, line, rank, pid;
    std::uint32_t file;
    std::size_t stretch;  // its entry in `stretches`
  };
  std::vector<Filtered> filtered;
  // the seqs between which an engine's INFO lines were filtered out (audit.py: [first, last, pid, engine]), shared by
  // the sessions each one set aside
  struct Stretch {
    bool has_first, has_last;
    Int first, last, pid, engine;
  };
  std::vector<Stretch> stretches;
  // Sessions live when their engine's INFO lines were filtered out, not seen since (Auditor._unseen): their next line
  // is adopted; never seen again, they are `unjudged`, not leaks
  struct Unseen {
    Session s;
    std::size_t stretch;
  };
  std::unordered_map<Key, Unseen, KeyHash> unseen;
  int cur_role = 2;

  explicit Impl(const Options& o) : opt(o) {
    if (opt.window < 1) throw InvalidArgumentError("window", "must be >= 1");
    if (opt.top < 1) throw InvalidArgumentError("top", "must be >= 1");
    if (opt.max_line < 0) throw InvalidArgumentError("max_line", "must be >= 0");
    if (opt.max_tables < 0) throw InvalidArgumentError("max_tables", "must be >= 0");
    if (opt.max_depth < 0) throw InvalidArgumentError("max_depth", "must be >= 0");
    if (opt.lookahead < 1) throw InvalidArgumentError("lookahead", "must be >= 1");
    xmap.reserve(static_cast<std::size_t>(std::min<Int>(static_cast<Int>(opt.window), Int{1} << 16)));
    std::vector<std::pair<int, std::pair<int, int>>> rows;  // (table line, (src, event))
    for (int s = 0; s < kNumStates; ++s) {
      into[s] = kFinal[s] ? into_final : kTerminal[s] ? into_terminal : into_active;
      tis_index[s] = -1;
      if (!kFinal[s]) {
        tis_index[s] = static_cast<int>(tis.size());
        tis.emplace_back();
        tis_states.push_back(s);
      }
      for (int e = 0; e < kNumEvents; ++e) {
        const Cell& c = kTable[s][e];
        move_dst[s][e] = c.action == Action::Move ? static_cast<int>(c.dst) : -1;
        move_out[s][e] = static_cast<int>(c.outcome) - 1;  // Outcome::none is 0
        edge_of[s][e] = -1;
        if (c.action == Action::Move) rows.push_back({static_cast<int>(c.line), {s, e}});
      }
    }
    std::sort(rows.begin(), rows.end());
    for (auto& r : rows) {
      edge_of[r.second.first][r.second.second] = static_cast<int>(edge_rows.size());
      edge_rows.push_back(r.second);
    }
    edge_count.assign(edge_rows.size(), 0);
    outcomes.assign(static_cast<std::size_t>(num_outcomes()), 0);
    st_quiesced = state_id("Quiesced");
    st_poisoned = state_id("Poisoned");
    for (int i = 0; i < kNumTerminateResults; ++i) {
      if (std::strcmp(kTerminateResultNames[i], "Deferred") == 0) tr_deferred = i;
      if (std::strcmp(kTerminateResultNames[i], "Terminated") == 0) tr_terminated = i;
      if (std::strcmp(kTerminateResultNames[i], "AlreadyDeferred") == 0) tr_already_deferred = i;
    }
    for (int s = 0; s < kNumStates; ++s) {
      if (!kTerminal[s]) continue;
      if (!terminal_list.empty()) terminal_list += '/';
      terminal_list += kStateNames[s];
    }
    for (int s = 0; s < kNumStates; ++s) {
      if (!kFinal[s]) continue;
      if (!final_list.empty()) final_list += '/';
      final_list += kStateNames[s];
    }
  }

  // ---------------------------------------------------------------- names
  static int lookup(std::string_view v, const char* const* names, int n) {
    for (int i = 0; i < n; ++i)
      if (v.size() == std::char_traits<char>::length(names[i]) && v == names[i]) return i;
    return -1;
  }
  // the same for the names looked up per line, their lengths computed once
  struct Names {
    std::vector<std::string_view> v;
    Names(const char* const* names, int n) {
      for (int i = 0; i < n; ++i) v.emplace_back(names[i]);
    }
    int find(std::string_view x) const {
      for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i].size() == x.size() && std::memcmp(v[i].data(), x.data(), x.size()) == 0) return static_cast<int>(i);
      return -1;
    }
  };
  const Names state_names{kStateNames, kNumStates}, event_names{kEventNames, kNumEvents},
      outcome_names{kOutcomeNames + 1, kNumOutcomes - 1}, log_event_names{kLogEventNames, kNumLogEvents};
  static int state_id(std::string_view v) { return lookup(v, kStateNames, kNumStates); }
  const JVal& f(K k) const { return d->f[k]; }
  std::string_view sv(const JVal& v) const {
    return v.sdec ? std::string_view(d->dec.data() + v.soff, v.slen) : std::string_view(base + v.soff, v.slen);
  }
  // the id of a table name held by field k (a JSON string), -1 otherwise
  int name_of(K k, const Names& names) const {
    const JVal& v = f(k);
    return v.t == JT::string ? names.find(sv(v)) : -1;
  }
  int state_of(K k) const { return name_of(k, state_names); }
  int event_of(K k) const { return name_of(k, event_names); }
  int outcome_of(K k) const { return name_of(k, outcome_names); }
  static bool is_null(const JVal& v) { return v.t == JT::null || v.t == JT::missing; }
  // The common keys every event carries (schemas/events.schema.json): a role of the table's (or null), and
  // this schema's version.
  bool good_role() const {
    const JVal& v = f(k_role);
    return v.t == JT::null || (v.t == JT::string && (sv(v) == kRoleNames[0] || sv(v) == kRoleNames[1]));
  }
  bool good_schema() const {
    const JVal& v = f(k_schema);
    return v.t == JT::string && sv(v) == kEventsSchema;
  }
  std::string raw(K k) const {
    const JVal& v = f(k);
    return v.t == JT::missing ? std::string("null") : std::string(base + v.off, v.len);
  }
  Piece P(std::string s) const { return Piece{Op::text, std::move(s), 0}; }
  Piece J(Op op, K k) const { return Piece{op, raw(k), f(k).depth}; }
  static Piece F(std::uint32_t file) { return Piece{Op::file, std::to_string(file), 0}; }
  // A message citing another line: "line N" in the finding's own file `own`, else "FILE:N" (a session's lines may
  // span files: a rotated log) (audit._at)
  std::vector<Piece> cite(std::string before, std::uint32_t file, Int line, std::uint32_t own,
                          const std::string& after) const {
    if (file == own) return {P(before + "line " + to_string(line) + after)};
    return {P(std::move(before)), F(file), P(":" + to_string(line) + after)};
  }
  static const char* tname(const JVal& v) {  // audit._tname
    switch (v.t) {
      case JT::missing:
      case JT::null: return "null";
      case JT::yes:
      case JT::no: return "bool";
      case JT::integer: return "int";
      case JT::real: return "float";
      case JT::string: return "str";
      case JT::array: return "list";
      case JT::object: return "dict";
    }
    return "?";
  }
  static Extra XI(const char* key, Int v) {
    Extra x{Extra::integer, key, v, {}};
    return x;
  }
  static Extra XS(const char* key, std::string v) {
    Extra x{Extra::string, key, 0, {}};
    x.s[0] = std::move(v);
    return x;
  }
  static Extra XN(const char* key) { return Extra{Extra::none, key, 0, {}}; }
  static Extra XF(const char* key, std::uint32_t file) { return Extra{Extra::file, key, file, {}}; }

  // ---------------------------------------------------------------- findings
  void count(Kind k) {
    auto i = static_cast<int>(k);
    if (counts[i]++ == 0) count_order.push_back(k);
  }
  // Count a finding; the finding to fill in when it is kept (Auditor._find), else nullptr.
  Finding* find(Kind k, Int line, const Int* rank, const Int* request, std::uint32_t file) {
    count(k);
    if (k != Kind::table_mismatch && static_cast<std::int64_t>(counts[static_cast<int>(k)]) > opt.keep_findings)
      return nullptr;
    findings.push_back(Finding{k, file, line, rank != nullptr, request != nullptr, rank ? *rank : 0,
                               request ? *request : 0, {}, {}});
    return &findings.back();
  }
  Finding* find(Kind k, Int line, const Int* rank = nullptr, const Int* request = nullptr) {
    return find(k, line, rank, request, cur_file);
  }
  static void mark(Session& s, Kind k) {
    if (std::find(s.kinds.begin(), s.kinds.end(), k) == s.kinds.end()) s.kinds.push_back(k);
  }

  // ---------------------------------------------------------------- input
  void begin(const std::vector<std::uint32_t>& files) {
    if (files.empty()) throw InvalidArgumentError("files", "a group needs at least one source");
    if (!srcs.empty()) throw InvalidArgumentError("files", "the previous group has not ended");
    srcs.assign(files.size(), Source{});
    for (std::size_t i = 0; i < files.size(); ++i) srcs[i].file = files[i];
    merging = files.size() > 1;
    started = relative = false;
    heap = {};
    cur_file = files[0];
  }
  Source& src(std::size_t i) {
    if (i >= srcs.size()) throw InvalidArgumentError("source", "no such source in the current group");
    return srcs[i];
  }
  void feed(std::size_t i, const char* p, std::size_t n) {
    Source& s = src(i);
    if (s.eof) throw InvalidArgumentError("source", "fed after its end");
    if (!merging) {  // every line replayed at once
      split(i, s, p, p + n, SIZE_MAX);
      return;
    }
    // Merge mode: the chunk is kept as bytes and split into parsed items only as the merge needs them
    // (a parsed item is ~1 KiB, a line can be 2 bytes: a chunk split at once could take 500x its size).
    if (s.pos < s.pending.size()) {
      s.pending.erase(0, s.pos);
      s.pending.append(p, n);
    } else {
      s.pending.assign(p, n);
    }
    s.pos = 0;
  }
  // Merge mode: split more of source i's pending bytes into queued items, until `limit` are queued; false
  // when no pending bytes are left.
  bool fill(std::size_t i, std::size_t limit) {
    Source& s = srcs[i];
    if (s.pos >= s.pending.size()) return false;
    const char* p = s.pending.data() + s.pos;
    split(i, s, p, s.pending.data() + s.pending.size(), limit);
    s.pos = static_cast<std::size_t>(p - s.pending.data());
    if (s.pos >= s.pending.size()) {
      s.pending.clear();
      s.pos = 0;
    }
    return true;
  }
  // Split [p, e) into lines (the first may have begun in s.carry) and hand each to one_line/too_long; a
  // line left unfinished goes to s.carry.  Stops early, p at the next line, once `limit` items are queued.
  void split(std::size_t i, Source& s, const char*& p, const char* e, std::size_t limit) {
    const auto max_line = static_cast<std::size_t>(opt.max_line);
    if (s.skipping) {
      auto nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(e - p)));
      if (nl == nullptr) {
        p = e;
        return;
      }
      s.skipping = false;
      too_long(i, s);
      p = nl + 1;
    }
    while (p < e && s.queue.size() < limit) {
      auto nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(e - p)));
      if (nl == nullptr) {
        auto rest = static_cast<std::size_t>(e - p);
        if (s.carry.size() + rest > max_line) {
          s.carry.clear();
          s.carry.shrink_to_fit();
          s.skipping = true;
        } else {
          s.carry.append(p, rest);
        }
        p = e;
        return;
      }
      if (!s.carry.empty()) {
        if (s.carry.size() + static_cast<std::size_t>(nl - p) > max_line) {
          s.carry.clear();
          too_long(i, s);
        } else {
          s.carry.append(p, static_cast<std::size_t>(nl - p));
          std::string line;
          line.swap(s.carry);
          one_line(i, s, line.data(), line.size());
          s.carry.swap(line);
          s.carry.clear();
        }
      } else if (static_cast<std::size_t>(nl - p) > max_line) {
        too_long(i, s);
      } else {
        one_line(i, s, p, static_cast<std::size_t>(nl - p));
      }
      p = nl + 1;
    }
  }
  void end(std::size_t i) {
    Source& s = src(i);
    if (s.eof) return;
    fill(i, SIZE_MAX);  // (run() asks for input only when nothing is pending: a no-op then)
    if (s.skipping) {
      too_long(i, s);
    } else if (!s.carry.empty() && !is_blank(s.carry.data(), s.carry.size())) {
      std::string line;
      line.swap(s.carry);
      one_line(i, s, line.data(), line.size());
    }
    s.carry.clear();
    s.skipping = false;
    s.eof = true;
  }
  void unreadable(std::size_t i, const std::string& why) {
    Source& s = src(i);
    if (s.eof) return;
    fill(i, SIZE_MAX);
    s.carry.clear();
    s.skipping = false;
    s.eof = true;
    s.unread = true;
    std::string msg = "cannot read further: " + why;
    if (!merging) {
      cur_file = s.file;
      if (Finding* g = find(Kind::unreadable, s.lineno + 1)) g->message = {P(msg)};
      return;
    }
    Item it{Item::unreadable, s.lineno + 1, false, 0, std::move(msg), {}};
    s.queue.push_back(std::move(it));
  }
  void too_long(std::size_t, Source& s) {
    ++s.lineno;
    ++lines;
    if (!merging) {
      cur_file = s.file;
      report_too_long(s.lineno);
      return;
    }
    s.queue.push_back(Item{Item::too_long, s.lineno, false, 0, {}, {}});
  }
  void report_too_long(Int line) {
    if (Finding* g = find(Kind::malformed, line))
      g->message = {P("line longer than " + std::to_string(opt.max_line) + " bytes; skipped")};
  }
  void report_too_deep(Int line) {
    if (Finding* g = find(Kind::malformed, line))
      g->message = {P("not JSON: nested deeper than " + std::to_string(opt.max_depth) + " levels")};
  }
  bool deep(const char* p, std::size_t n) const {
    return static_cast<std::int64_t>(n) > opt.max_depth && too_deep(p, n, opt.max_depth);
  }
  void report_not_json(Int line, const char* p, std::size_t n, const std::string& why) {
    if (Finding* g = find(Kind::malformed, line)) g->message = {Piece{Op::not_json, std::string(p, n), 0}, P(why)};
  }
  void one_line(std::size_t, Source& s, const char* p, std::size_t n) {
    ++s.lineno;
    ++lines;
    if (!merging) {
      cur_file = s.file;
      if (deep(p, n)) {  // never handed to a parser (orjson, the reference's, would overflow its stack)
        report_too_deep(s.lineno);
        return;
      }
      if (!parser.parse(p, n, doc)) {
        if (is_blank(p, n)) {
          --lines;
        } else {
          report_not_json(s.lineno, p, n, std::string(parser.why()) + " at column " + std::to_string(parser.where() + 1));
        }
        return;
      }
      base = p;
      d = &doc;
      cur_src = &s;
      event(s.lineno);
      return;
    }
    s.queue.emplace_back();
    Item& it = s.queue.back();
    it.line = s.lineno;
    if (deep(p, n)) {
      it.type = Item::too_deep;
      return;
    }
    if (!parser.parse(p, n, it.doc)) {
      if (is_blank(p, n)) {
        --lines;
        s.queue.pop_back();
        return;
      }
      it.type = Item::not_json;
      it.text = std::string(parser.why()) + " at column " + std::to_string(parser.where() + 1);
      it.text.insert(0, 1, '\0');
      it.text.insert(0, p, n);  // raw line, NUL, the reader's message
      return;
    }
    it.type = Item::event;
    it.text.assign(p, n);
    const JVal& t = it.doc.f[k_t];
    if (it.doc.top == JT::object && t.t == JT::integer) {
      it.has_t = true;
      it.t = t.i;
    }
  }

  // Merge mode: replay while every source has its next item; the source to read next, or -1.
  long run() {
    if (srcs.empty()) return -1;
    if (!merging) {
      if (!srcs[0].eof) return 0;
      end_group();
      return -1;
    }
    if (!started) {
      // each source's first timestamp, looked for in its first opt.lookahead items (Auditor._feed_merged)
      const auto within = static_cast<std::size_t>(opt.lookahead);
      for (std::size_t i = 0; i < srcs.size(); ++i) {
        Source& s = srcs[i];
        while (!s.first_known) {
          while (!s.first_known && s.scanned < std::min(s.queue.size(), within)) {
            const Item& it = s.queue[s.scanned++];
            if (it.has_t) {
              s.first_known = s.has_first = true;
              s.first = it.t;
              const JVal& p = it.doc.f[k_proc];
              s.has_proc = p.t == JT::integer;
              s.proc = p.i;
            }
          }
          if (s.first_known) break;
          if (s.scanned >= within || (!fill(i, within) && s.eof)) {
            s.first_known = true;  // none
          } else if (s.scanned >= s.queue.size() && s.pos >= s.pending.size() && !s.eof) {
            return static_cast<long>(i);
          }
        }
      }
      bool any = false;
      Int lo = 0, hi = 0;
      for (auto& s : srcs) {
        if (!s.has_first) continue;
        if (!any || s.first < lo) lo = s.first;
        if (!any || s.first > hi) hi = s.first;
        any = true;
      }
      relative = any && hi - lo > static_cast<Int>(3600) * 1000000000;
      if (relative) {  // the files of one process (one proc: a rotated log) have one clock: the earliest start
        std::map<Int, Int> start;
        for (const auto& s : srcs) {
          if (!s.has_first || !s.has_proc) continue;
          auto [at, fresh] = start.emplace(s.proc, s.first);
          if (!fresh && s.first < at->second) at->second = s.first;
        }
        for (auto& s : srcs)
          if (s.has_first && s.has_proc) s.first = start[s.proc];
      }
      started = true;
    }
    for (;;) {
      for (std::size_t i = 0; i < srcs.size(); ++i) {
        Source& s = srcs[i];
        if (s.head) continue;
        if (s.queue.empty()) fill(i, kQueue);
        if (!s.queue.empty()) {
          push(i);
        } else if (!s.eof) {
          return static_cast<long>(i);
        }
      }
      if (heap.empty()) break;
      HeapEntry top = heap.top();
      heap.pop();
      Source& s = srcs[top.src];
      s.head = false;
      Item it = std::move(s.queue.front());
      s.queue.pop_front();
      cur_file = s.file;
      cur_src = &s;
      replay(it);
      // only this source lacks a head now: get it (or its end) before the next pop
      if (s.queue.empty()) fill(top.src, kQueue);
      if (!s.queue.empty()) {
        push(top.src);
      } else if (!s.eof) {
        return static_cast<long>(top.src);
      }
    }
    end_group();
    return -1;
  }
  // The group is done: note what each file's reads found (Auditor._fed_file).
  void end_group() {
    for (const Source& s : srcs) {
      FedFile& r = fed[s.file];
      r.lines = std::max(r.lines, s.lineno);
      r.events = r.events || s.events != 0;
      r.unread = r.unread || s.unread;
    }
    srcs.clear();
    cur_src = nullptr;
  }
  void push(std::size_t i) {
    Source& s = srcs[i];
    const Item& it = s.queue.front();
    Int k;
    if (!it.has_t) {
      k = s.last_key;
    } else {
      k = it.t;
      if (relative && s.has_first) k -= s.first;
    }
    s.last_key = k;
    heap.push(HeapEntry{k, i, it.line});
    s.head = true;
  }
  void replay(Item& it) {
    switch (it.type) {
      case Item::event:
        base = it.text.data();
        d = &it.doc;
        event(it.line);
        return;
      case Item::too_long: report_too_long(it.line); return;
      case Item::too_deep: report_too_deep(it.line); return;
      case Item::not_json: {
        std::size_t z = it.text.rfind('\0');
        std::string why = it.text.substr(z + 1);
        report_not_json(it.line, it.text.data(), z, why);
        return;
      }
      case Item::unreadable:
        if (Finding* g = find(Kind::unreadable, it.line)) g->message = {P(it.text)};
        return;
    }
  }

  // ---------------------------------------------------------------- the hot path (Auditor.event)
  void event(Int line) {
    if (d->top != JT::object) {
      bad_common(line);
      return;
    }
    const JVal &name = f(k_event), &vr = f(k_rank), &vs = f(k_seq), &vp = f(k_pid), &vt = f(k_t);
    if (name.t != JT::string || vr.t != JT::integer || vs.t != JT::integer || vp.t != JT::integer ||
        vt.t != JT::integer || vr.i < 0 || vs.i < 0 || vp.i < 0 || !good_role() || !good_schema()) {
      bad_common(line);
      return;
    }
    const JVal &vproc = f(k_proc), &veng = f(k_engine);  // optional (older logs lack them)
    if ((!is_null(vproc) && (vproc.t != JT::integer || vproc.i < 0)) ||
        (!is_null(veng) && (veng.t != JT::integer || veng.i < 0))) {
      bad_common(line);
      return;
    }
    const Int rank = vr.i, seq = vs.i, pid = vp.i, t = vt.i;
    const JVal& vq = f(k_request);
    if (!is_null(vq) && vq.t != JT::integer) {
      if (Finding* g = find(Kind::malformed, line, &rank))
        g->message = {P(std::string("'request' must be an int or null, got ") + tname(vq))};
      return;
    }
    const bool has_req = vq.t == JT::integer;
    const Int req = vq.i;
    const JVal& tbl = f(k_table);
    if (!(tbl.t == JT::string && sv(tbl) == digest)) table_mismatch(line, rank);
    int h = log_event_names.find(sv(name));
    if (h >= 0) {
      ++event_counts[h];
      ++cur_src->events;
    }
    ranks.insert(rank);
    // per-process sequence: keyed by proc; without it by (file, pid) (processes in different files may share a pid)
    const bool has_proc = vproc.t == JT::integer;
    const Key sk = has_proc ? Key{vproc.i, -1} : Key{pid, static_cast<Int>(cur_file)};
    auto si = stream_index.find(sk);
    if (si == stream_index.end()) {
      cur_stream = static_cast<Int>(streams.size());
      stream_index.emplace(sk, streams.size());
      streams.push_back(StreamSt{pid, seq + 1, t, -seq, seq, cur_file, {}, 0, seq == 0, has_proc, has_proc ? vproc.i : 0});
      if (seq != 0) {
        if (Finding* g = find(Kind::stream_start, line, &rank))
          g->message = {P("pid " + to_string(pid) + ": stream starts at seq " + to_string(seq) +
                          ", not 0 (rotated log?)")};
      }
    } else {
      cur_stream = static_cast<Int>(si->second);
      StreamSt& st = streams[si->second];
      if (t > st.max_t) st.max_t = t;
      if (seq == st.next) {
        st.next = seq + 1;
      } else {
        seq_mismatch(st, seq, line, rank);
      }
    }
    cur_engine = veng.t == JT::integer ? veng.i : -1;
    {
      const JVal& vrole = f(k_role);
      cur_role = vrole.t == JT::string ? (sv(vrole) == kRoleNames[0] ? 0 : 1) : 2;  // (good_role() held)
    }
    const Int* rq = has_req ? &req : nullptr;
    switch (h) {
      case -1:
        if (Finding* g = find(Kind::malformed, line, &rank, rq))
          g->message = {P("unknown event name "), Piece{Op::name80, raw(k_event), 0}};
        return;
      case ev_transition: transition(has_req, req, rank, t, line); return;
      case ev_cancel: cancel(rq, rank, line); return;
      case ev_terminate: terminate_result(has_req, req, rank, line); return;
      case ev_terminate_now: terminate_now(has_req, req, rank, line); return;
      case ev_callback_error:
        if (Finding* g = find(Kind::callback_error, line, &rank, rq))
          g->message = {P("on_terminate raised "), J(Op::repr, k_error)};
        return;
      case ev_slot_quarantined:
      case ev_buffer_recovered: slot_event(h, has_req, req, rank, line); return;
      case ev_late_event:
      case ev_illegal_transition: late_or_rejected(h, rq, rank, line); return;
      case ev_health:
        if (f(k_healthy).t == JT::no) {
          if (Finding* g = find(Kind::unhealthy, line, &rank))
            g->message = {P("engine unhealthy: "), J(Op::reasons, k_reasons)};
        }
        return;
      case ev_collective_desync:
        if (Finding* g = find(Kind::collective_desync, line, &rank))
          g->message = {P("collective #"), J(Op::str, k_seq_no), P(" diverged in "), J(Op::str, k_field),
                        P(": sites "), J(Op::str, k_sites)};
        return;
      case ev_log_level: log_level(rank, pid, seq, line); return;
      default: return;
    }
  }

  // audit.py Auditor._log_level
  void log_level(Int rank, Int pid, Int seq, Int line) {
    const JT v = f(k_info_filtered).t;
    if (v != JT::yes && v != JT::no) {
      if (Finding* g = find(Kind::malformed, line, &rank))
        g->message = {P("lifecycle.log_level: 'info_filtered' must be a bool")};
      return;
    }
    auto it = std::find_if(filtered.begin(), filtered.end(),
                           [&](const Filtered& x) { return x.stream == cur_stream && x.engine == cur_engine; });
    if (v == JT::yes) {
      // (a second one, two threads logging the change: the first seq holds)
      if (it == filtered.end()) {
        stretches.push_back(Stretch{true, false, seq, 0, pid, cur_engine});
        filtered.push_back(Filtered{cur_stream, cur_engine, seq, line, rank, pid, cur_file, stretches.size() - 1});
        it = std::prev(filtered.end());
      }
      cut(cur_stream, cur_engine, rank, it->stretch, "from seq " + to_string(seq));
      return;
    }
    const bool off = it != filtered.end();
    const Int first = off ? it->seq : 0;
    std::size_t st = 0;
    if (off) {
      st = it->stretch;
      filtered.erase(it);
    }
    find_filtered(pid, cur_engine, off ? &first : nullptr, &seq, line, rank, cur_file);
    if (off) {
      stretches[st].has_last = true;
      stretches[st].last = seq;
    } else {
      stretches.push_back(Stretch{false, true, 0, seq, pid, cur_engine});
      st = stretches.size() - 1;
    }
    cut(cur_stream, cur_engine, rank, st, "up to seq " + to_string(seq));
  }
  // audit.py _filtered_span
  static std::string filtered_span(const Int* first, const Int* last) {
    if (first == nullptr) return "up to seq " + to_string(*last) + " (where it began is not in the log)";
    return "from seq " + to_string(*first) + " to " + (last ? "seq " + to_string(*last) : "the end of the log");
  }
  static std::string who(Int pid, Int engine) {
    return "pid " + to_string(pid) + (engine >= 0 ? ", engine " + to_string(engine) : std::string());
  }
  // audit.py Auditor._cut: the engine's live sessions set aside, its tombstones judged as far as they can be and
  // dropped, its slots forgotten (without `engine` keys, the engine is the one of the line's rank, `erank`)
  void cut(Int stream, Int engine, Int erank, std::size_t st, const std::string& span) {
    for (auto i = live.begin(); i != live.end();) {
      if (i->second.stream == stream && i->second.engine == engine && (engine >= 0 || i->first.a == erank)) {
        unseen.insert_or_assign(i->first, Unseen{std::move(i->second), st});
        i = live.erase(i);
      } else {
        ++i;
      }
    }
    // (Python's dict order: the awaiting ones were folded before every one in tomb_order; logs without `engine`
    // key sessions by rank and role, with no stream)
    auto mine = [&](const Key& k) { return engine >= 0 ? k.c == stream && k.d == engine : k.c == -1 && k.a == erank; };
    const std::string w = who(stretches[st].pid, engine);
    for (std::list<Tomb>* l : {&awaiting, &tomb_order}) {
      for (auto i = l->begin(); i != l->end();) {
        if (!mine(i->key)) {
          ++i;
          continue;
        }
        const Tomb tomb = *i;
        i = l->erase(i);
        tombs.erase(tomb.key);
        const Core& c = tomb.c;
        if (c.deferred && c.notices == 0) {
          const Int rank = tomb.key.a, req = tomb.key.b;
          if (Finding* g = find(Kind::unjudged, c.defer_line != 0 ? c.defer_line : c.last_line, &rank, &req,
                                c.defer_line != 0 ? c.defer_file : c.last_file)) {
            g->message = {P(w + ": deferred termination's delivery not judged: INFO lines filtered out by level " +
                            span + ", where its TerminateNow may be")};
            g->extra = {engine >= 0 ? XI("engine", engine) : XN("engine")};
          }
        } else {
          check_tomb(tomb);
        }
      }
    }
    for (auto i = slots.begin(); i != slots.end();) {
      if (i->first.a == stream && i->first.b == engine)
        i = slots.erase(i);
      else
        ++i;
    }
  }
  // audit.py Auditor._find_filtered: first null, its start not logged; last null, to the end of the log
  void find_filtered(Int pid, Int engine, const Int* first, const Int* last, Int line, Int rank, std::uint32_t file) {
    Finding* g = find(Kind::log_filtered, line, &rank, nullptr, file);
    if (g == nullptr) return;
    g->message = {P(who(pid, engine) + ": INFO lines filtered out by level " + filtered_span(first, last) +
                    ": the log is incomplete there")};
    g->extra = {engine >= 0 ? XI("engine", engine) : XN("engine"), first ? XI("first", *first) : XN("first"),
                last ? XI("last", *last) : XN("last")};
  }

  void table_mismatch(Int line, Int rank) {
    // one candidate per value as told apart here; Python dedups by its own == and counts
    const JVal& v = f(k_table);
    std::string key;
    switch (v.t) {
      case JT::missing:
      case JT::null: key = "n"; break;
      case JT::yes: key = "t"; break;
      case JT::no: key = "f"; break;
      case JT::integer: key = "i" + to_string(v.i); break;
      case JT::string: key = "s"; key += sv(v); break;
      default: key = std::string(1, static_cast<char>('0' + static_cast<int>(v.t))) + std::string(base + v.off, v.len);
    }
    // Remembered up to max_tables values (a value can be a whole line long); past that, a value not
    // remembered is a candidate on every line, and Python's dedup (same bound) decides exactly as the
    // reference: a value remembered here was remembered there too, so skipping it is what it would do.
    if (key.size() > 257) {  // a long value (up to a whole line) is remembered by its hash, as audit.py does
      key = "h" + to_string(static_cast<Int>(key.size())) + ":" + to_string(static_cast<Int>(std::hash<std::string>{}(key) >> 1));
    }
    if (bad_tables.count(key) != 0) return;
    if (static_cast<std::int64_t>(bad_tables.size()) < opt.max_tables) bad_tables.insert(std::move(key));
    if (Finding* g = find(Kind::table_mismatch, line, &rank))
      g->message = {P("event logged with table "), J(Op::repr, k_table), P("; auditing with " + digest)};
  }

  void bad_common(Int line) {
    if (d->top != JT::object) {
      const char* tn = "?";
      switch (d->top) {
        case JT::missing:
        case JT::null: tn = "NoneType"; break;
        case JT::yes:
        case JT::no: tn = "bool"; break;
        case JT::integer: tn = "int"; break;
        case JT::real: tn = "float"; break;
        case JT::string: tn = "str"; break;
        case JT::array: tn = "list"; break;
        case JT::object: tn = "dict"; break;
      }
      if (Finding* g = find(Kind::malformed, line)) g->message = {P(std::string("not a JSON object but ") + tn)};
      return;
    }
    std::string probs;
    const std::pair<K, JT> want[] = {{k_event, JT::string}, {k_rank, JT::integer}, {k_seq, JT::integer},
                                     {k_pid, JT::integer}, {k_t, JT::integer}};
    auto add = [&probs](const std::string& p) {
      if (!probs.empty()) probs += "; ";
      probs += p;
    };
    for (auto& w : want) {
      const JVal& v = f(w.first);
      if (v.t == JT::missing) {
        add(std::string("missing '") + kKeyNames[w.first] + "'");
      } else if (v.t != w.second) {
        add(std::string("'") + kKeyNames[w.first] + "' must be " + (w.second == JT::string ? "str" : "int") +
            ", got " + tname(v));
      } else if (w.second == JT::integer && w.first != k_t && v.i < 0) {
        add(std::string("'") + kKeyNames[w.first] + "' must be >= 0");
      }
    }
    if (f(k_role).t == JT::missing) {
      add("missing 'role'");
    } else if (!good_role()) {
      add("'role' must be 'sender', 'receiver' or null");
    }
    if (f(k_schema).t == JT::missing) {
      add("missing 'schema'");
    } else if (!good_schema()) {
      add(std::string("'schema' must be '") + kEventsSchema + "'");
    }
    for (K k : {k_proc, k_engine}) {  // optional
      const JVal& v = f(k);
      if (is_null(v)) continue;
      if (v.t != JT::integer) {
        add(std::string("'") + kKeyNames[k] + "' must be int or null, got " + tname(v));
      } else if (v.i < 0) {
        add(std::string("'") + kKeyNames[k] + "' must be >= 0");
      }
    }
    const JVal &vr = f(k_rank), &vq = f(k_request);
    const Int* rank = vr.t == JT::integer ? &vr.i : nullptr;
    const Int* req = vq.t == JT::integer ? &vq.i : nullptr;
    if (Finding* g = find(Kind::malformed, line, rank, req)) g->message = {P(probs)};
  }

  void seq_mismatch(StreamSt& st, Int seq, Int line, Int rank) {
    const Int expected = st.next;
    if (seq > expected) {
      Int n = seq - expected;
      if (n <= 4096) {
        st.missing.emplace_hint(st.missing.end(), expected, MissRun{seq, Miss{cur_file, line, rank}});
        st.nmissing += n;
        if (st.nmissing > 8192) flush_missing(st, 4096);
      } else if (Finding* g = find(Kind::seq_gap, line, &rank)) {
        g->message = {P("pid " + to_string(st.pid) + ": " + to_string(n) + " line(s) lost (seq " + to_string(expected) +
                        ".." + to_string(seq - 1) + ")")};
        g->extra = {XI("pid", st.pid), XI("first", expected), XI("last", seq - 1)};
      }
      st.next = seq + 1;
    } else if (!st.head && seq < st.first && st.first <= kHeadReorder && expected - st.first <= kHeadReorder) {
      st.head = true;  // the head, out of order: the other seqs before the stream's first one are awaited
      const Miss m{cur_file, line, rank};
      if (seq > 0) st.missing.emplace(0, MissRun{seq, m});
      if (seq + 1 < st.first) st.missing.emplace(seq + 1, MissRun{st.first, m});
      st.nmissing += st.first - 1;
    } else if (auto it = run_of(st, seq); it != st.missing.end()) {
      // a line written out of order (two threads emitting): not lost
      const Int a = it->first, b = it->second.end;
      const Miss m = it->second.m;
      if (seq + 1 < b) st.missing.emplace_hint(std::next(it), seq + 1, MissRun{b, m});
      if (seq == a) {
        st.missing.erase(it);
      } else {
        it->second.end = seq;
      }
      --st.nmissing;
    } else if (seq == 0) {
      st.head = true;
      flush_missing(st, 0);
      st.next = 1;
      if (Finding* g = find(Kind::stream_start, line, &rank)) {
        g->message = {P("pid " + to_string(st.pid) + ": seq restarts at 0 after seq " + to_string(expected - 1) +
                        " (a second run appended, or the same log given twice?)")};
      }
    } else if (Finding* g = find(Kind::seq_gap, line, &rank)) {
      g->message = {P("pid " + to_string(st.pid) + ": seq " + to_string(seq) + " repeated or out of order (expected " +
                      to_string(expected) + ")")};
      g->extra = {XI("pid", st.pid), XI("first", seq), XI("last", seq)};
    }
    st.bias += 1 + expected - st.next;
  }

  // The run holding seq, or end().
  static std::map<Int, MissRun>::iterator run_of(StreamSt& st, Int seq) {
    auto it = st.missing.upper_bound(seq);
    if (it == st.missing.begin()) return st.missing.end();
    --it;
    return seq < it->second.end ? it : st.missing.end();
  }

  // Report the awaited seqs as lost, all but the `keep` highest: one finding per run.
  void flush_missing(StreamSt& st, Int keep) {
    Int drop = st.nmissing - keep;
    auto it = st.missing.begin();
    while (drop > 0) {
      const Int a = it->first;
      Int b = it->second.end;
      const Miss m = it->second.m;
      if (b - a > drop) {  // the run's highest seqs are kept
        b = a + drop;
        st.missing.emplace_hint(std::next(it), b, MissRun{it->second.end, m});
      }
      it = st.missing.erase(it);
      std::string what = a == b - 1 ? "seq " + to_string(a) : "seq " + to_string(a) + ".." + to_string(b - 1);
      if (Finding* g = find(Kind::seq_gap, m.line, &m.rank, nullptr, m.file)) {
        g->message = {P("pid " + to_string(st.pid) + ": " + to_string(b - a) + " line(s) lost (" + what + ")")};
        g->extra = {XI("pid", st.pid), XI("first", a), XI("last", b - 1)};
      }
      drop -= b - a;
      st.nmissing -= b - a;
    }
  }

  // ---------------------------------------------------------------- transitions
  // The key of the session an event about (rank, req) belongs to (audit.py: (rank, request, ident)).
  Key session_key(Int rank, Int req, int role) const {
    return cur_engine >= 0 ? Key{rank, req, cur_stream, cur_engine} : Key{rank, req, -1, role};
  }
  // The live session, or with `tombs` the tombstone, an event about req refers to (Auditor._session): by its
  // key, or for a null role and no engine, the first of the roles null, sender, receiver that has one; for a
  // TerminateNow (`notice`), the first of those deferred and not yet delivered, a Terminated one (a tombstone)
  // first, if any.
  // `tomb` (if given) is set to the tombstone picked, or nullptr.
  Core* session_of(Int rank, Int req, bool with_tombs, Session*& s, bool notice = false, Tomb** tomb = nullptr) {
    static const int kNullRoleLookup[3] = {2, 0, 1};
    const bool any = cur_engine < 0 && cur_role == 2;
    Core* found[3] = {nullptr, nullptr, nullptr};
    Session* found_s[3] = {nullptr, nullptr, nullptr};
    Tomb* found_t[3] = {nullptr, nullptr, nullptr};
    int n = 0;
    for (int i = 0; i < (any ? 3 : 1); ++i) {
      Key key = session_key(rank, req, any ? kNullRoleLookup[i] : cur_role);
      auto it = live.find(key);
      if (it != live.end()) {
        found_s[n] = &it->second;
        found[n++] = &it->second.c;
      } else if (with_tombs) {
        auto ti = tombs.find(key);
        if (ti != tombs.end()) {
          found_t[n] = &*ti->second;
          found[n++] = &ti->second->c;
        }
      }
    }
    int pick = n > 0 ? 0 : -1;
    if (notice && any) {
      int waiting = -1;
      for (int i = 0; i < n; ++i) {
        if (found[i]->deferred && found[i]->notices == 0) {
          if (found_s[i] == nullptr) {
            waiting = i;
            break;
          }
          if (waiting < 0) waiting = i;
        }
      }
      if (waiting >= 0) pick = waiting;
    }
    if (pick < 0) return nullptr;
    s = found_s[pick];
    if (tomb != nullptr) *tomb = found_t[pick];
    return found[pick];
  }
  static Key slot_key(Int stream, Int engine, Int slot) { return Key{stream, engine, slot, 0}; }

  void transition(bool has_req, Int req, Int rank, Int t, Int line) {
    const int frm = state_of(k_from), trig = event_of(k_trigger), to = state_of(k_to);
    const JVal& vo = f(k_outcome);
    const int outcome = outcome_of(k_outcome);
    const bool outcome_ok = is_null(vo) || outcome >= 0;
    Key key = session_key(rank, req, cur_role);
    Session* s = nullptr;
    if (has_req) {
      auto it = live.find(key);
      if (it != live.end()) s = &it->second;
    }
    int into_to;
    Histogram* h = nullptr;
    int e = (s != nullptr && frm >= 0 && frm == s->state && trig >= 0) ? edge_of[frm][trig] : -1;
    // the logged outcome is the session's after the move: the row's, or the one it had
    if (e >= 0 && to == move_dst[frm][trig] && outcome_ok &&
        outcome == (move_out[frm][trig] >= 0 ? move_out[frm][trig] : s->outcome)) {
      ++edge_count[static_cast<std::size_t>(e)];
      h = &tis[static_cast<std::size_t>(tis_index[frm])];
    } else {
      s = check_transition(key, has_req, s, frm, trig, to, outcome_ok, outcome, t, line);
      if (s == nullptr) return;
      int ti = tis_index[s->state];
      h = ti >= 0 ? &tis[static_cast<std::size_t>(ti)] : nullptr;
    }
    into_to = into[to];
    if (h != nullptr) {
      Int dt = t - s->entered;
      h->add(dt > 0 ? dt : 0);
    }
    s->state = to;
    s->entered = t;
    s->c.last_line = line;
    s->c.last_file = cur_file;
    s->hist.emplace_back(to, t);
    if (outcome >= 0) s->outcome = outcome;
    const bool deferred = f(k_deferred).t == JT::yes;
    if (deferred) {
      s->c.deferred = true;
      if (into_to != into_final)
        deferred_order(s, line, rank, req,
                       std::string(kStateNames[frm]) + " --" + kEventNames[trig] + "--> " + kStateNames[to] +
                           " marked deferred: only the deferred retry's move to " + final_list + " is");
    }
    if (into_to == into_terminal) {
      if (outcome >= 0) {
        ++outcomes[static_cast<std::size_t>(outcome)];
        xrank(*s, req, rank, outcome, line);
      }
      if (to != st_quiesced && s->slot >= 0) {
        auto sl = slots.find(slot_key(s->stream, s->engine, s->slot));
        if (sl != slots.end() && owned_by(sl->second, key)) sl->second.status = slot_poisoned;
      }
    } else if (into_to == into_final) {
      if (deferred != (s->c.defer_line != 0) && !(deferred && s->adopted)) {
        if (deferred)
          deferred_order(s, line, rank, req,
                         std::string("deferred ") + kStateNames[to] +
                             " transition with no Deferred terminate before it");
        else
          deferred_order(s, line, rank, req,
                         cite(std::string(kStateNames[to]) + " transition not marked deferred, though terminate() was "
                                                             "deferred at ",
                              s->c.defer_file, s->c.defer_line, cur_file, " (the deferred retry is that transition)"));
      }
      fold(key, t);
    }
  }

  // A deferral's records in an order the engine never logs them in (Auditor._deferred_order).
  void deferred_order(Session* s, Int line, Int rank, Int req, std::vector<Piece> message) {
    if (Finding* g = find(Kind::deferred_order, line, &rank, &req)) g->message = std::move(message);
    if (s != nullptr) mark(*s, Kind::deferred_order);
  }
  void deferred_order(Session* s, Int line, Int rank, Int req, std::string message) {
    deferred_order(s, line, rank, req, std::vector<Piece>{P(std::move(message))});
  }

  static bool owned_by(const SlotRec& r, const Key& key) { return r.owner_has_req && r.owner == key; }

  Session* check_transition(const Key& key, bool has_req, Session* s, int frm, int trig, int to, bool outcome_ok,
                            int outcome, Int t, Int line) {
    const Int rank = key.a, req = key.b;
    const bool frm_null = is_null(f(k_from));
    const bool well_formed = has_req && (frm_null || frm >= 0) && trig >= 0 && to >= 0 && outcome_ok;
    if (!well_formed) {
      malformed_transition(has_req, req, rank, frm_null, frm, trig, to, line);
      return nullptr;
    }
    if (frm_null) {
      create(key, s, to, trig, outcome, t, line);
      return nullptr;
    }
    if (s == nullptr) {
      auto ti = tombs.find(key);
      if (ti != tombs.end()) {
        if (kFinal[to]) {
          Int first = ti->second->c.last_line;
          if (Finding* g = find(Kind::double_termination, line, &rank, &req)) {
            g->message = cite(std::string("second transition to ") + kStateNames[to] + " (first terminated at ",
                              ti->second->c.last_file, first, cur_file, ")");
            g->extra = {XI("first_line", first)};
          }
        } else {
          illegal(frm, trig, to, line, rank, req, nullptr, "transition after the final state");
        }
        return nullptr;
      }
      // (or live when its engine's INFO lines were filtered out: Auditor._cut)
      auto u = unseen.empty() ? unseen.end() : unseen.find(key);
      if (Finding* g = find(Kind::adopted_session, line, &rank, &req))
        g->message = {P(u == unseen.end()
                            ? std::string("first seen in state ") + kStateNames[frm] + " (advertise not in the log)"
                            : std::string("seen again in state ") + kStateNames[frm] +
                                  " after its engine's INFO lines were filtered out by level (last seen in state " +
                                  kStateNames[u->second.s.state] + ")")};
      s = &new_session(key, frm, t, line);
      s->adopted = true;
      s->outcome = outcome;  // unknown before this line: a row without an outcome logs the one it had
    }
    const int cur = s->state;
    const int dst = move_dst[frm][trig];
    if (cur != frm || dst != to) {
      if (kFinal[to] && !kTerminal[frm] && dst < 0) {
        if (Finding* g = find(Kind::terminated_before_terminal, line, &rank, &req))
          g->message = {P(std::string(kStateNames[frm]) + " --" + kEventNames[trig] + "--> " + kStateNames[to] +
                          ": terminated before reaching a terminal state (" + terminal_list + ")")};
        mark(*s, Kind::terminated_before_terminal);
        count_illegal(frm, trig, to);
      } else if (cur != frm && dst == to) {
        illegal(frm, trig, to, line, rank, req, s,
                std::string("replayed state is ") + kStateNames[cur] + ", the log says " + kStateNames[frm]);
      } else {
        illegal(frm, trig, to, line, rank, req, s,
                dst < 0 ? std::string("not in the table")
                        : std::string("the table says ") + kStateNames[frm] + " + " + kEventNames[trig] + " = " +
                              kStateNames[dst]);
      }
    } else {
      ++edge_count[static_cast<std::size_t>(edge_of[frm][trig])];
      const int row = move_out[frm][trig], want = row >= 0 ? row : s->outcome;
      if (outcome != want) {
        const char* w = want >= 0 ? outcome_name(want) : "None";
        illegal(frm, trig, to, line, rank, req, s,
                std::string("outcome ") + (outcome >= 0 ? outcome_name(outcome) : "None") +
                    (row >= 0 ? std::string(", but the table says ") + kStateNames[frm] + " + " + kEventNames[trig] +
                                    " = " + kStateNames[to] + " / " + w
                              : std::string(", but the session's outcome is ") + w + " and this row sets none"),
                false);
      }
    }
    return s;
  }

  void malformed_transition(bool has_req, Int req, Int rank, bool frm_null, int frm, int trig, int to, Int line) {
    const Int* rq = has_req ? &req : nullptr;
    if (!has_req || to < 0 || trig < 0 || (!frm_null && frm < 0)) {
      if (Finding* g = find(Kind::malformed, line, &rank, rq))
        g->message = {P("lifecycle.transition: bad request/from_state/to_state/trigger "), J(Op::short_repr, k_request),
                      P("/"), J(Op::short_repr, k_from), P("/"), J(Op::short_repr, k_to), P("/"),
                      J(Op::short_repr, k_trigger)};
    } else if (Finding* g = find(Kind::malformed, line, &rank, rq)) {
      g->message = {P("lifecycle.transition: unknown outcome "), J(Op::short_repr, k_outcome)};
    }
  }

  void create(const Key& key, Session* s, int to, int trig, int outcome, Int t, Int line) {
    const Int rank = key.a, req = key.b;
    const int ce = static_cast<int>(kCreateEvent), init = static_cast<int>(kInitialState);
    if (trig != ce || to != init) {
      illegal(-1, trig, to, line, rank, req, s,
              std::string("creating event must be ") + kEventNames[ce] + " -> " + kStateNames[init]);
      return;
    }
    if (s != nullptr) {
      illegal(-1, trig, to, line, rank, req, s,
              std::string("advertise of a live session (state ") + kStateNames[s->state] + ")");
      return;
    }
    auto ti = tombs.find(key);
    if (ti != tombs.end()) {
      Tomb tomb = *ti->second;
      (tomb.awaiting ? awaiting : tomb_order).erase(ti->second);
      tombs.erase(ti);
      check_tomb(tomb);
    }
    ++created;
    Session& ns = new_session(key, to, t, line);
    if (outcome >= 0) {  // the creating row sets none (spec.py checks the table for it)
      illegal(-1, trig, to, line, rank, req, &ns,
              std::string("outcome ") + outcome_name(outcome) + ", but a session starts without one", false);
    }
    if (ns.slot >= 0) lease(ns, key, ns.slot, line);
  }

  Session& new_session(const Key& key, int state, Int t, Int line) {
    const JVal& slot = f(k_slot);
    const JVal& role = f(k_role);
    if (!unseen.empty()) unseen.erase(key);  // (seen again: judged from here on)
    Session& s = live[key];
    s = Session{};
    s.c.file = s.c.last_file = cur_file;
    s.c.last_line = line;
    s.state = state;
    s.entered = s.start = t;
    s.role = raw(k_role);
    s.role_depth = role.depth;
    s.slot = slot.t == JT::integer && slot.i >= 0 ? slot.i : -1;
    s.stream = cur_stream;
    s.engine = cur_engine;
    s.line = line;
    s.hist.reserve(6);
    s.hist.emplace_back(state, t);
    s.order = session_order++;
    ++requests;
    return s;
  }

  void count_illegal(int frm, int trig, int to) {
    auto k = std::make_pair(frm + 1, trig * 64 + to);
    auto it = illegal_index.find(k);
    if (it == illegal_index.end()) {
      illegal_index.emplace(k, illegal_edges.size());
      illegal_edges.push_back(Edge{frm, trig, to, 1});
    } else {
      ++illegal_edges[it->second].count;
    }
  }

  // count: the move is not in the table, so it joins illegal_edges (a row's move with the wrong outcome is counted
  // on its row)
  void illegal(int frm, int trig, int to, Int line, Int rank, Int req, Session* s, const std::string& why,
               bool count = true) {
    if (count) count_illegal(frm, trig, to);
    if (Finding* g = find(Kind::illegal_transition, line, &rank, &req))
      g->message = {P(std::string(frm >= 0 ? kStateNames[frm] : "*") + " --" + kEventNames[trig] + "--> " +
                      kStateNames[to] + ": " + why)};
    if (s != nullptr) mark(*s, Kind::illegal_transition);
  }

  void lease(Session& s, const Key& key, Int slot, Int line) {
    const Int rank = key.a, req = key.b;
    Key sk = slot_key(cur_stream, cur_engine, slot);
    auto it = slots.find(sk);
    if (it != slots.end()) {
      const SlotRec& prev = it->second;
      std::string owner = prev.owner_has_req ? to_string(prev.owner_req) : std::string("None");
      if (Finding* g = find(Kind::slot_reuse, line, &rank, &req)) {
        if (prev.status == slot_held) {
          g->message = cite("slot " + to_string(slot) + " leased while still held by live request " + owner + " (",
                            prev.file, prev.line, cur_file, ")");
        } else {
          g->message = {P("slot " + to_string(slot) + " leased again after it was " + slot_status_name(prev.status) +
                          " by request " + owner + " at "),
                        F(prev.file), P(":" + to_string(prev.line) + " with no buffer_recovered")};
        }
        g->extra = {XI("slot", slot), prev.owner_has_req ? XI("previous_request", prev.owner_req) : XN("previous_request"),
                    XI("previous_line", prev.line), XS("previous_status", slot_status_name(prev.status))};
      }
      mark(s, Kind::slot_reuse);
    }
    const JVal& gen = f(k_generation);  // (of the advertise being replayed)
    slots[sk] = SlotRec{slot_held, key, true, req, cur_file, line, gen.t == JT::integer, gen.i};
  }

  // Auditor._xrank: the same request and role (the event's) on other ranks.
  void xrank(Session& s, Int req, Int rank, int outcome, Int line) {
    const Key xk{req, cur_role};
    auto it = xmap.find(xk);
    const bool again = it != xmap.end() &&
                       (it->second.rank == rank ||
                        std::find(it->second.more.begin(), it->second.more.end(), rank) != it->second.more.end());
    if (it == xmap.end() || again) {
      if (again) {  // this rank reports the request again: a new lifetime of it
        xmap.erase(it);
      } else if (static_cast<Int>(xmap.size()) >= static_cast<Int>(opt.window)) {
        for (;;) {  // the oldest live entry
          const auto [k, g] = xorder.front();
          xorder.pop_front();
          auto old = xmap.find(k);
          if (old != xmap.end() && old->second.gen == g) {
            xmap.erase(old);
            break;
          }
        }
        if (ranks.size() > 1) count(Kind::window_evicted);
      }
      xmap.emplace(xk, XRec{outcome, rank, {}, false, cur_file, line, ++xgen});
      xorder.emplace_back(xk, xgen);
      if (xorder.size() > 2 * xmap.size() + 64) {  // dead entries: keep xorder within twice the live ones
        std::deque<std::pair<Key, std::uint64_t>> live;
        for (const auto& e : xorder) {
          auto f = xmap.find(e.first);
          if (f != xmap.end() && f->second.gen == e.second) live.push_back(e);
        }
        xorder.swap(live);
      }
      return;
    }
    XRec& x = it->second;
    x.more.push_back(rank);
    if (x.outcome != outcome && !x.reported) {
      x.reported = true;
      if (Finding* g = find(Kind::rank_disagreement, line, &rank, &req)) {
        g->message = {P("rank " + to_string(rank) + " says " + outcome_name(outcome) + ", rank " + to_string(x.rank) +
                        " said " + outcome_name(x.outcome) + " ("),
                      F(x.file), P(":" + to_string(x.line) + ")")};
        Extra o{Extra::outcomes, "outcomes", 0, {}};
        o.s[0] = to_string(x.rank);
        o.s[1] = outcome_name(x.outcome);
        o.s[2] = to_string(rank);
        o.s[3] = outcome_name(outcome);
        g->extra = {o, XI("other_line", x.line), XF("other_file", x.file)};
      }
      mark(s, Kind::rank_disagreement);
    }
  }

  // ---------------------------------------------------------------- other events
  void cancel(const Int* rq, Int rank, Int line) {
    const JVal& r = f(k_result);
    const int res = r.t == JT::string ? lookup(sv(r), kCancelResultNames, kNumCancelResults) : -1;
    if (res >= 0) {
      check_result(Event::cancel, res, rq, rank, line);
      return;
    }
    if (Finding* g = find(Kind::malformed, line, &rank, rq))
      g->message = {P("lifecycle.cancel: unknown result "), J(Op::repr, k_result)};
  }

  // A result checked against the state the line logs (the session's before the call; null for NotFound, not
  // checked): the row's result, or the engine's three runtime refinements (Auditor._results: the same, in the
  // same order); on a row that moves nothing (.stay), that state against the live session's as replayed
  // (Auditor._check_result).
  void check_result(Event ev, int res, const Int* rq, Int rank, Int line) {
    const int st = state_of(k_state);
    if (st < 0) return;
    const Cell& c = kTable[st][static_cast<int>(ev)];
    if (c.result == 0xff) return;
    const bool cancel = ev == Event::cancel;
    const char* const* names = cancel ? kCancelResultNames : kTerminateResultNames;
    // a second deferral returns AlreadyDeferred; a cancel that moves while unhealthy BackendUnhealthy; a cancel
    // that moves into a terminal state while its terminate is deferred CancelledDeferred
    int also[2] = {-1, -1};
    const bool cancel_moves = cancel && c.action == Action::Move;
    if (c.action == Action::Defer) {
      also[0] = static_cast<int>(TerminateResult::AlreadyDeferred);
    } else if (cancel_moves && c.result == static_cast<std::uint8_t>(CancelResult::CancelRequestedInFlight)) {
      also[0] = static_cast<int>(CancelResult::BackendUnhealthy);
    }
    if (cancel_moves && kTerminal[static_cast<int>(c.dst)]) also[1] = static_cast<int>(CancelResult::CancelledDeferred);
    if (res != c.result && res != also[0] && res != also[1]) {
      if (Finding* g = find(Kind::wrong_result, line, &rank, rq)) {
        std::string gives = names[c.result];
        for (const int a : also)
          if (a >= 0) gives += std::string(" or ") + names[a];
        g->message = {P(std::string(cancel ? "cancel" : "terminate") + "() returned " + names[res] + " in state " +
                        kStateNames[st] + "; the table gives " + gives)};
      }
    }
    // the live session is in the row's state: the one logged on a .stay row, the destination on a moving row
    // (logged right after the call's moves; none live when the move ended it) (Auditor._check_result)
    const bool moves = c.action == Action::Move;
    const int want = moves ? static_cast<int>(c.dst) : st;
    Session* s = nullptr;
    if ((c.action == Action::Stay || moves) && rq != nullptr && session_of(rank, *rq, false, s) != nullptr &&
        s->state != want) {
      if (Finding* g = find(Kind::result_state_mismatch, line, &rank, rq))
        g->message = cite(std::string(cancel ? "cancel" : "terminate") + "() returned " + names[res] + " in state " +
                              kStateNames[st] + ", but the session is " + kStateNames[s->state] + " (since ",
                          s->c.last_file, s->c.last_line, cur_file,
                          std::string(")") +
                              (moves ? std::string(", not ") + kStateNames[want] + ", where the call moves it" : ""));
      mark(*s, Kind::result_state_mismatch);
    }
  }

  void late_or_rejected(int h, const Int* rq, Int rank, Int line) {
    const int trig = event_of(k_trigger), state = state_of(k_state);
    if (trig < 0 || state < 0) {
      if (Finding* g = find(Kind::malformed, line, &rank, rq))
        g->message = {P(std::string(kLogEventNames[h]) + ": bad trigger/state "), J(Op::repr, k_trigger), P("/"),
                      J(Op::repr, k_state)};
      return;
    }
    // a late record needs a .late cell, a rejected one an illegal cell (Auditor._late_or_rejected)
    const Cell& cell = kTable[state][trig];
    const bool is_late = h == ev_late_event;
    if (cell.action != (is_late ? Action::Late : Action::Illegal)) {
      const char* dst = cell.action == Action::Move    ? kStateNames[static_cast<int>(cell.dst)]
                        : cell.action == Action::Stay  ? ".stay"
                        : cell.action == Action::Late  ? ".late"
                        : cell.action == Action::Defer ? ".defer"
                                                       : nullptr;
      if (Finding* g = find(Kind::misclassified_event, line, &rank, rq))
        g->message = {P(std::string(is_late ? "late " : "engine rejected ") + kEventNames[trig] + " in state " +
                        kStateNames[state] + ", but the table says " +
                        (dst != nullptr ? std::string(kStateNames[state]) + " + " + kEventNames[trig] + " = " + dst
                                        : std::string("it is illegal")))};
    } else if (rq != nullptr) {  // queued in causal order: the state is the live session's, as replayed
      Session* s = nullptr;
      if (session_of(rank, *rq, false, s) != nullptr && s->state != state) {
        if (Finding* g = find(Kind::misclassified_event, line, &rank, rq))
          g->message = cite(std::string(is_late ? "late " : "engine rejected ") + kEventNames[trig] + " in state " +
                                kStateNames[state] + ", but the session is " + kStateNames[s->state] + " (since ",
                            s->c.last_file, s->c.last_line, cur_file, ")");
        mark(*s, Kind::misclassified_event);
      }
    }
    auto& table = is_late ? late : rejected;
    auto k = std::make_pair(state, trig);
    auto it = std::find_if(table.begin(), table.end(), [&](const auto& x) { return x.first == k; });
    if (it == table.end()) {
      table.push_back({k, 1});
    } else {
      ++it->second;
    }
    if (h != ev_late_event) {
      if (Finding* g = find(Kind::rejected_event, line, &rank, rq))
        g->message = {P(std::string("engine rejected ") + kEventNames[trig] + " in state " + kStateNames[state] +
                        " (illegal call)")};
    }
  }

  void slot_event(int h, bool has_req, Int req, Int rank, Int line) {
    const JVal& slot = f(k_slot);
    if (slot.t != JT::integer || f(k_generation).t != JT::integer) {
      if (Finding* g = find(Kind::malformed, line, &rank, has_req ? &req : nullptr))
        g->message = {P(std::string(kLogEventNames[h]) + ": slot/generation must be ints")};
      return;
    }
    Key k = slot_key(cur_stream, cur_engine, slot.i);
    const Int gen = f(k_generation).i;
    if (h == ev_buffer_recovered) {
      // evidence frees a quarantined slot's lease of its own generation only, never a live hold (Auditor._slot_event)
      auto it = slots.find(k);
      if (it != slots.end() && it->second.status == slot_quarantined && (!it->second.has_gen || it->second.gen == gen))
        slots.erase(it);
    } else {
      slots[k] = SlotRec{slot_quarantined, session_key(rank, req, cur_role), has_req, req, cur_file, line, true, gen};
    }
  }

  void terminate_result(bool has_req, Int req, Int rank, Int line) {
    const JVal& vr = f(k_result);
    int r = vr.t == JT::string ? lookup(sv(vr), kTerminateResultNames, kNumTerminateResults) : -1;
    if (r < 0 || !has_req) {
      if (Finding* g = find(Kind::malformed, line, &rank))
        g->message = {P("lifecycle.terminate: bad result/request "), J(Op::short_repr, k_result), P("/"),
                      J(Op::short_repr, k_request)};
      return;
    }
    check_result(Event::terminate, r, &req, rank, line);
    if (r == tr_deferred || r == tr_already_deferred) {
      Session* s = nullptr;
      Core* c = session_of(rank, req, true, s);
      if (c != nullptr && s == nullptr) {  // (a tombstone)
        deferred_order(nullptr, line, rank, req,
                       cite(std::string("terminate() returned ") + kTerminateResultNames[r] +
                                " after the session was " + final_list + " (",
                            c->last_file, c->last_line, cur_file, ")"));
        return;
      }
      if (c == nullptr) {
        if (r == tr_deferred) {
          if (Finding* g = find(Kind::orphan_event, line, &rank, &req))
            g->message = {P("terminate deferred for a request with no live session")};
        }
        return;
      }
      const Int first = c->defer_line;
      if (r == tr_already_deferred) {
        if (first == 0 && !s->adopted)
          deferred_order(s, line, rank, req, "terminate() returned AlreadyDeferred with no Deferred before it");
        return;
      }
      if (first != 0) {
        deferred_order(s, line, rank, req,
                       cite("terminate() returned Deferred twice (first at ", c->defer_file, first, cur_file,
                            "): a deferred session answers AlreadyDeferred"));
      } else if (kTerminal[s->state]) {
        deferred_order(s, line, rank, req, std::string("terminate() returned Deferred while the session was already ") +
                                               kStateNames[s->state] + ", where the deferred retry had run");
      }
      c->deferred = true;
      if (first == 0) {
        c->defer_line = line;
        c->defer_file = cur_file;
      }
    } else if (r == tr_terminated) {
      Session* s = nullptr;
      Core* c = session_of(rank, req, true, s);
      if (c == nullptr) {  // (as a Deferred one is: it was ignored)
        if (Finding* g = find(Kind::orphan_event, line, &rank, &req))
          g->message = {P("terminate returned Terminated for a request with no session in the window")};
        return;
      }
      c->term_results += 1;
      if (c->term_results == 2) {
        if (Finding* g = find(Kind::double_termination, line, &rank, &req))
          g->message = {P("terminate() returned Terminated twice")};
        if (s != nullptr) mark(*s, Kind::double_termination);
      } else if (c->deferred) {  // the deferred retry releases it (on_terminate): the engine answers AlreadyTerminated
        if (Finding* g = find(Kind::double_termination, line, &rank, &req))
          g->message = {P("terminate() returned Terminated for a session whose termination was deferred (its "
                          "TerminateNow releases it)")};
        if (s != nullptr) mark(*s, Kind::double_termination);
      }
    }
  }

  void terminate_now(bool has_req, Int req, Int rank, Int line) {
    if (!has_req) {
      if (Finding* g = find(Kind::malformed, line, &rank))
        g->message = {P("lifecycle.terminate_now needs an int request")};
      return;
    }
    Session* s = nullptr;
    Tomb* tomb = nullptr;
    Core* c = session_of(rank, req, true, s, true, &tomb);
    if (c == nullptr) {
      if (Finding* g = find(Kind::orphan_event, line, &rank, &req))
        g->message = {P("TerminateNow for a request with no session in the window")};
      return;
    }
    if (tomb != nullptr && tomb->awaiting) {
      // evicted from the window, awaiting this notice: back into the window, delivered, as the newest tombstone
      // (forgotten, a second release of it, a notice or a Terminated result, was only an orphan warning)
      auto it = tombs.find(tomb->key)->second;
      it->awaiting = false;
      tomb_order.splice(tomb_order.end(), awaiting, it);
      evict_over_window();
    } else if (s != nullptr)  // live: the engine logs the notice after the deferred move to the final state
      deferred_order(s, line, rank, req, std::string("TerminateNow while the session is still ") +
                                             kStateNames[s->state] + ", before its deferred " + final_list +
                                             " transition");
    c->notices += 1;
    if (c->notices == 1) {
      c->notice_line = line;
      c->notice_file = cur_file;
    } else if (c->notices == 2) {
      if (Finding* g = find(Kind::deferred_delivery, line, &rank, &req)) {
        g->message = {P("deferred termination delivered twice (TerminateNow #2)")};
        g->extra = {XI("deliveries", 2)};
      }
      if (s != nullptr) mark(*s, Kind::deferred_delivery);
    }
  }

  // ---------------------------------------------------------------- folding and tombstones
  Summary summary(const Key& key, const Session& s, Int t_end, bool ended) const {
    Summary r{key.a, key.b, s.role, s.role_depth, s.c.file, s.line, s.start, std::max(t_end, s.start), s.outcome,
              s.state, {}, s.kinds, ended};
    for (std::size_t i = 0; i + 1 < s.hist.size(); ++i)
      r.segments.push_back({s.hist[i].first, {s.hist[i].second, s.hist[i + 1].second}});
    if (!ended) {
      const auto& last = s.hist.back();
      r.segments.push_back({last.first, {last.second, std::max(t_end, last.second)}});
    }
    return r;
  }

  void fold(const Key& key, Int t) {
    auto it = live.find(key);
    Session s = std::move(it->second);
    live.erase(it);
    ++terminated;
    Int life = t - s.start;
    if (life < 0) life = 0;
    lifetime.add(life);
    const int frm = s.hist.size() >= 2 ? s.hist[s.hist.size() - 2].first : -1;
    if (s.slot >= 0) {
      auto sl = slots.find(slot_key(s.stream, s.engine, s.slot));
      if (sl != slots.end() && owned_by(sl->second, key)) {
        if (frm == st_poisoned || sl->second.status == slot_poisoned) {
          sl->second.status = slot_quarantined;
        } else {
          slots.erase(sl);
        }
      }
    }
    if (!s.kinds.empty()) {
      if (static_cast<std::int64_t>(violating.size()) < opt.keep_violating) violating.push_back(summary(key, s, t, true));
    } else if (static_cast<std::int64_t>(slowest.size()) < opt.top || life > slowest.front().life) {
      ++tiebreak;
      SlowItem item{life, tiebreak, summary(key, s, t, true)};
      if (static_cast<std::int64_t>(slowest.size()) < opt.top) {
        slowest.push_back(std::move(item));
        std::push_heap(slowest.begin(), slowest.end(), slow_less);
      } else {
        std::pop_heap(slowest.begin(), slowest.end(), slow_less);
        slowest.back() = std::move(item);
        std::push_heap(slowest.begin(), slowest.end(), slow_less);
      }
    }
    tomb_order.push_back(Tomb{s.c, key});
    tombs[key] = std::prev(tomb_order.end());
    evict_over_window();
  }

  // Check and forget the oldest tombstone once the window is over (Auditor._evict_tomb), or keep it aside while its
  // deferred terminate awaits its notice.
  void evict_over_window() {
    if (static_cast<std::int64_t>(tombs.size() - awaiting.size()) <= opt.window) return;
    auto old = tomb_order.begin();
    if (old->c.deferred && old->c.notices == 0) {
      await_notice(old);
      return;
    }
    Tomb gone = *old;
    tomb_order.pop_front();
    tombs.erase(gone.key);
    if (gone.c.notices != 0) check_tomb(gone);
  }

  // Keep an evicted tombstone whose deferred terminate awaits its TerminateNow (Auditor._await_notice): moved to
  // `awaiting` (its map entry stays valid); past opt.window of them, forget the oldest unchecked.
  void await_notice(std::list<Tomb>::iterator it) {
    it->awaiting = true;
    awaiting.splice(awaiting.end(), tomb_order, it);
    if (static_cast<std::int64_t>(awaiting.size()) <= opt.window) return;
    Tomb old = awaiting.front();
    awaiting.pop_front();
    tombs.erase(old.key);
    const Int rank = old.key.a, req = old.key.b;
    const Core& c = old.c;
    if (Finding* g = find(Kind::delivery_unchecked, c.defer_line != 0 ? c.defer_line : c.last_line, &rank, &req,
                          c.defer_line != 0 ? c.defer_file : c.last_file)) {
      g->message = {P("deferred termination's delivery not checked: evicted from the window, then from the " +
                      to_string(opt.window) + " tombstones awaiting their TerminateNow (--window)")};
    }
  }

  void check_tomb(const Tomb& tomb) {
    const Int rank = tomb.key.a, req = tomb.key.b;
    const Core& c = tomb.c;
    if (c.deferred && c.notices == 0) {
      if (Finding* g = find(Kind::deferred_delivery, c.defer_line != 0 ? c.defer_line : c.last_line, &rank, &req,
                            c.defer_line != 0 ? c.defer_file : c.last_file)) {
        g->message = {P("deferred termination never delivered (no TerminateNow)")};
        g->extra = {XI("deliveries", 0)};
      }
    } else if (!c.deferred && c.notices != 0) {
      if (Finding* g = find(Kind::deferred_delivery, c.notice_line, &rank, &req, c.notice_file)) {
        g->message = {P("TerminateNow delivered for a termination that was never deferred")};
        g->extra = {XI("deliveries", c.notices)};
      }
    }
  }

  // ---------------------------------------------------------------- end of input
  Result finish(const std::vector<std::int64_t>& file_order) {
    if (!srcs.empty()) throw InvalidArgumentError("finish", "a group of sources has not ended");
    // a file read to its end without one event: nothing audited there (Auditor.finish)
    for (const auto& [file, r] : fed) {
      if (r.events || r.unread) continue;
      if (Finding* g = find(Kind::no_events, 0, nullptr, nullptr, file)) {
        g->message = {P("no lifecycle events in "), F(file),
                      P(" (" + to_string(r.lines) + (r.lines == 1 ? " line" : " lines") + "): nothing to audit")};
        g->extra = {XI("lines", r.lines)};
      }
    }
    for (auto& st : streams) flush_missing(st, 0);
    for (const Filtered& x : filtered) {
      find_filtered(x.pid, x.engine, &x.seq, nullptr, x.line, x.rank, x.file);
      cut(x.stream, x.engine, x.rank, x.stretch, "from seq " + to_string(x.seq) + " to the end of the log");
    }
    filtered.clear();
    for (const Tomb& tomb : awaiting) check_tomb(tomb);  // (folded before every one in tomb_order)
    for (const Tomb& tomb : tomb_order) check_tomb(tomb);
    tombs.clear();
    awaiting.clear();
    tomb_order.clear();
    auto rank_of = [&](std::uint32_t file) -> std::int64_t {
      return file < file_order.size() ? file_order[file] : static_cast<std::int64_t>(file);
    };
    {
      std::vector<std::pair<const Key*, Unseen*>> aside;
      for (auto& kv : unseen) aside.push_back({&kv.first, &kv.second});
      std::sort(aside.begin(), aside.end(), [&](const auto& x, const auto& y) {
        auto fx = rank_of(x.second->s.c.file), fy = rank_of(y.second->s.c.file);
        if (fx != fy) return fx < fy;
        if (x.second->s.line != y.second->s.line) return x.second->s.line < y.second->s.line;
        return x.second->s.order < y.second->s.order;
      });
      for (auto& [key, u] : aside) {
        Session& s = u->s;
        const Stretch& x = stretches[u->stretch];
        const Int rank = key->a, req = key->b;
        const char* state = kStateNames[s.state];
        if (Finding* g = find(Kind::unjudged, s.line, &rank, &req, s.c.file)) {
          const std::string span = filtered_span(x.has_first ? &x.first : nullptr, x.has_last ? &x.last : nullptr);
          g->message = cite(who(x.pid, x.engine) + ": live in state " + state + " (", s.c.last_file, s.c.last_line,
                            s.c.file, ") when INFO lines were filtered out by level " + span +
                                          ", not seen after: not judged (it may have ended there)");
          g->extra = {x.engine >= 0 ? XI("engine", x.engine) : XN("engine"),
                      x.has_first ? XI("first", x.first) : XN("first"), x.has_last ? XI("last", x.last) : XN("last"),
                      XS("last_state", state)};
        }
        if (!s.kinds.empty() && static_cast<std::int64_t>(violating.size()) < opt.keep_violating)
          violating.push_back(summary(*key, s, streams[static_cast<std::size_t>(s.stream)].max_t, false));
      }
      unseen.clear();
    }
    std::vector<std::pair<const Key*, Session*>> left;
    left.reserve(live.size());
    for (auto& kv : live) left.push_back({&kv.first, &kv.second});
    std::sort(left.begin(), left.end(), [&](const auto& x, const auto& y) {
      auto fx = rank_of(x.second->c.file), fy = rank_of(y.second->c.file);
      if (fx != fy) return fx < fy;
      if (x.second->line != y.second->line) return x.second->line < y.second->line;
      return x.second->order < y.second->order;
    });
    Result res;
    for (auto& [key, sp] : left) {
      Session& s = *sp;
      const Int rank = key->a, req = key->b;
      Int pid_t = streams[static_cast<std::size_t>(s.stream)].max_t;
      Int age = pid_t - s.start;
      if (age < 0) age = 0;
      const char* state = kStateNames[s.state];
      if (s.c.deferred && kTerminal[s.state] && s.c.notices == 0) {
        if (Finding* g = find(Kind::deferred_delivery, s.c.defer_line != 0 ? s.c.defer_line : s.c.last_line, &rank,
                              &req, s.c.defer_line != 0 ? s.c.defer_file : s.c.last_file)) {
          g->message = {P(std::string("deferred termination never delivered; session still ") + state)};
          g->extra = {XI("deliveries", 0)};
        }
        mark(s, Kind::deferred_delivery);
      }
      if (age >= opt.leak_age_ns && opt.leak_age_ns >= 0) {
        if (Finding* g = find(Kind::leak, s.line, &rank, &req, s.c.file)) {
          g->message = cite(std::string("never terminated: last state ") + state + " (", s.c.last_file, s.c.last_line,
                            s.c.file, "), age ");
          g->message.push_back(Piece{Op::seconds, to_string(age), 0});
          g->message.push_back(P("s at end of log"));
          g->extra = {XS("last_state", state), XI("age_ns", age), XI("last_line", s.c.last_line)};
        }
        mark(s, Kind::leak);
      } else if (Finding* g = find(Kind::live, s.line, &rank, &req, s.c.file)) {
        g->message = {P(std::string("still ") + state + " at end of log, age "), Piece{Op::seconds, to_string(age), 0},
                      P("s")};
        g->extra = {XS("last_state", state), XI("age_ns", age)};
      }
      if (!s.kinds.empty() && static_cast<std::int64_t>(violating.size()) < opt.keep_violating)
        violating.push_back(summary(*key, s, pid_t, false));
    }
    res.live = left.size();
    res.lines = lines;
    for (auto n : event_counts) res.events += n;
    res.requests = requests;
    res.terminated = terminated;
    for (Kind k : count_order) res.counts.push_back({k, counts[static_cast<int>(k)]});
    res.time_in_state = tis;
    res.tis_states = tis_states;
    res.lifetime = lifetime;
    res.outcomes = outcomes;
    res.event_counts.assign(event_counts, event_counts + kNumLogEvents);
    if (created != 0) res.edges.push_back(Edge{-1, static_cast<int>(kCreateEvent), static_cast<int>(kInitialState), created});
    for (std::size_t i = 0; i < edge_rows.size(); ++i) {
      if (edge_count[i] == 0) continue;
      auto [s, e] = edge_rows[i];
      res.edges.push_back(Edge{s, e, move_dst[s][e], edge_count[i]});
    }
    res.illegal_edges = illegal_edges;
    res.late = late;
    res.rejected = rejected;
    std::sort(slowest.begin(), slowest.end(), [](const SlowItem& x, const SlowItem& y) {
      return x.life != y.life ? x.life > y.life : x.tie < y.tie;
    });
    for (auto& x : slowest) res.slowest.push_back(x.sum);
    res.violating = violating;
    for (auto& st : streams)
      res.streams.push_back(Stream{st.pid, st.bias + st.next, st.next, st.first, st.file, st.has_proc, st.proc});
    res.ranks.assign(ranks.begin(), ranks.end());
    return res;
  }
};

Auditor::Auditor(const Options& opt) : impl_(std::make_unique<Impl>(opt)) {}
Auditor::~Auditor() = default;
void Auditor::begin(const std::vector<std::uint32_t>& files) { impl_->begin(files); }
void Auditor::feed(std::size_t src, const char* data, std::size_t n) { impl_->feed(src, data, n); }
void Auditor::end(std::size_t src) { impl_->end(src); }
void Auditor::unreadable(std::size_t src, const std::string& why) { impl_->unreadable(src, why); }
long Auditor::run() { return impl_->run(); }
std::vector<Finding> Auditor::take_findings() {
  std::vector<Finding> out;
  out.swap(impl_->findings);
  return out;
}
Result Auditor::finish(const std::vector<std::int64_t>& file_order) { return impl_->finish(file_order); }

}  // namespace lifecycle::audit
