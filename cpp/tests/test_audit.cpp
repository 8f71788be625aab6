// The native audit reader + replay: known JSON edge cases, blank lines, a clean log, and a seeded fuzz of
// mutated logs fed in random chunks (single source and merged).  Under ASan+UBSan (make test-sanitize)
// the fuzz is the memory-safety check; everywhere it checks that how the bytes are chunked never changes
// the result.  (Equality with the Python reference is tests/test_audit_native.py's job.)
//
//   AUDIT_FUZZ_SEED=<n> AUDIT_FUZZ_ITERS=<n> ./test_audit     # replay or extend a run
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "lifecycle/audit.hpp"
#include "lifecycle/errors.hpp"
#include "lifecycle/table_gen.hpp"

namespace au = lifecycle::audit;

namespace {

std::string line(const std::string& event, long req, long seq, long t, const std::string& rest) {
  return "{\"event\": \"" + event + "\", \"request\": " + (req < 0 ? std::string("null") : std::to_string(req)) +
         ", \"rank\": 0, \"role\": \"sender\", \"t_mono_ns\": " + std::to_string(t) + ", \"seq\": " +
         std::to_string(seq) + ", \"pid\": 7, \"table\": \"" + lifecycle::kTableDigest + "\", \"schema\": \"" +
         au::kEventsSchema + "\"" + rest + "}\n";
}

std::string tr(long req, long seq, long t, const char* from, const char* to, const char* trig, const char* outcome,
               long slot) {
  std::string f = from ? std::string("\"") + from + "\"" : "null";
  std::string o = outcome ? std::string("\"") + outcome + "\"" : "null";
  return line("lifecycle.transition", req, seq, t,
              ", \"from_state\": " + f + ", \"to_state\": \"" + to + "\", \"trigger\": \"" + trig + "\", \"outcome\": " +
                  o + ", \"slot\": " + std::to_string(slot) + ", \"generation\": 1, \"deferred\": false");
}

// A clean log: n requests, each advertise, expose, complete, terminate (result + transition).
std::string clean_log(int n, long t0 = 1000000) {
  std::string s;
  long seq = 0, t = t0;
  for (int r = 0; r < n; ++r) {
    s += tr(r, seq++, t += 1000, nullptr, "Advertised", "advertise", nullptr, r % 4);
    s += tr(r, seq++, t += 1000, "Advertised", "InFlight", "expose", nullptr, r % 4);
    if (r % 3 == 0) {
      s += tr(r, seq++, t += 1000, "InFlight", "Poisoned", "fail", "failed", r % 4);
    } else {
      s += tr(r, seq++, t += 1000, "InFlight", "Quiesced", "complete", "completed", r % 4);
    }
    s += line("lifecycle.terminate", r, seq++, t += 10, ", \"result\": \"Terminated\", \"state\": null");
    s += tr(r, seq++, t += 1000, r % 3 == 0 ? "Poisoned" : "Quiesced", "Terminated", "terminate",
            r % 3 == 0 ? "failed" : "completed", r % 4);
    if (r % 3 == 0) s += line("lifecycle.buffer_recovered", r, seq++, t += 10, ", \"slot\": " + std::to_string(r % 4) +
                              ", \"generation\": 1");
  }
  s += line("lifecycle.health", -1, seq++, t += 10, ", \"healthy\": false, \"reasons\": [\"x\", 1]");
  s += line("lifecycle.late_event", 1, seq++, t += 10, ", \"trigger\": \"complete\", \"state\": \"Terminated\"");
  return s;
}

std::string show(const au::Finding& f) {
  std::string s = std::string(au::kind_name(f.kind)) + " f" + std::to_string(f.file) + ":" + au::to_string(f.line);
  if (f.has_rank) s += " rank " + au::to_string(f.rank);
  if (f.has_request) s += " req " + au::to_string(f.request);
  for (auto& p : f.message) s += " |" + std::to_string(static_cast<int>(p.op)) + ":" + p.text;
  for (auto& x : f.extra) s += " {" + x.key + "=" + au::to_string(x.i) + x.s[0] + x.s[1] + x.s[2] + x.s[3] + "}";
  return s;
}

// Everything a result holds, as text (so two runs compare with ==).
std::string digest(au::Auditor& a, const au::Result& r, std::vector<au::Finding> fs) {
  for (auto& f : a.take_findings()) fs.push_back(f);
  std::string s = "lines " + std::to_string(r.lines) + " events " + std::to_string(r.events) + " requests " +
                  std::to_string(r.requests) + " terminated " + std::to_string(r.terminated) + " live " +
                  std::to_string(r.live) + "\n";
  for (auto& c : r.counts) s += std::string(au::kind_name(c.first)) + "=" + std::to_string(c.second) + " ";
  s += "\n";
  for (auto& f : fs) s += show(f) + "\n";
  for (auto& h : r.time_in_state) s += std::to_string(h.count) + "/" + au::to_string(h.total) + " ";
  s += std::to_string(r.lifetime.count) + "/" + au::to_string(r.lifetime.max) + "\n";
  // (appended piece by piece: GCC 12 warns falsely on `"!" + std::to_string(..)`, bug 105329)
  for (auto* es : {&r.edges, &r.illegal_edges}) {
    for (auto& e : *es) {
      s += es == &r.edges ? ' ' : '!';
      s += std::to_string(e.src);
      s += '>';
      s += std::to_string(e.dst);
      s += '=';
      s += std::to_string(e.count);
    }
  }
  for (auto& x : r.slowest) s += " slow " + au::to_string(x.request) + ":" + std::to_string(x.segments.size());
  for (auto& x : r.violating) s += " viol " + au::to_string(x.request) + ":" + x.role;
  for (auto& st : r.streams) s += " pid " + au::to_string(st.pid) + ":" + au::to_string(st.events);
  return s;
}

au::Options small_options() {
  au::Options o;
  o.window = 3;
  o.top = 2;
  o.keep_findings = 50;
  o.max_line = 600;
  o.lookahead = 2;
  return o;
}

// Feed `files` (merged when more than one), each cut into chunks of random size (0: whole).
std::string audit(const std::vector<std::string>& files, std::mt19937_64* rng, const au::Options& opt) {
  au::Auditor a(opt);
  std::vector<std::uint32_t> ids;
  for (std::uint32_t i = 0; i < files.size(); ++i) ids.push_back(i);
  std::vector<std::size_t> pos(files.size(), 0);
  std::vector<au::Finding> fs;
  if (!files.empty()) {
    a.begin(ids);
    for (long i; (i = a.run()) >= 0;) {
      auto k = static_cast<std::size_t>(i);
      const std::string& f = files[k];
      if (pos[k] >= f.size()) {
        a.end(k);
      } else {
        std::size_t n = rng ? std::uniform_int_distribution<std::size_t>(1, 97)(*rng) : f.size();
        n = std::min(n, f.size() - pos[k]);
        a.feed(k, f.data() + pos[k], n);
        pos[k] += n;
      }
      for (auto& g : a.take_findings()) fs.push_back(g);
    }
  }
  std::vector<std::int64_t> order;
  for (std::size_t i = 0; i < files.size(); ++i) order.push_back(static_cast<std::int64_t>(i));
  au::Result r = a.finish(order);
  return digest(a, r, fs);
}

const char* const kTokens[] = {
    "{", "}", "[", "]", "\"", ",", ":", "\\", "\\u0065", "\\ud800", "\\udc00", "null", "true", "false", "-0", "1e400",
    "18446744073709551616", "18446744073709551615", "-9223372036854775808", "1.5", "NaN", "\xff", "\xc3\xa9", "\xed\xa0\x80",
    "\x00", "\n", "\r", " ", "\t", "\xc2\xa0", "\"Terminated\"", "\"Poisoned\"", "\"lifecycle.terminate_now\"",
    "\"lifecycle.terminate\"", "\"Deferred\"", "\"result\": \"Deferred\", ", "\"deferred\": true, ", "\"seq\": 0, ",
    "\"request\": 3, ", "\"rank\": 1, ", "\"pid\": 8, ", "\"table\": [1], ", "\"from_state\": null, ",
    "\"t_mono_ns\": 99999999999999, ", "\"slot\": 2, ", "[[[[[[[[[[", "]]]]]]]]]]", "\"proc\": 5, ",
    "\"proc\": -1, ", "\"engine\": 1, ", "\"engine\": \"e\", ", "\"engine\": null, ", "\"role\": \"receiver\", ",
    "\"role\": null, ", "\"lifecycle.log_level\"", "\"info_filtered\": true, ", "\"info_filtered\": false, "};

std::string mutate(std::string s, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> ops(0, 7);
  int n = std::uniform_int_distribution<int>(0, 12)(rng);
  for (int i = 0; i < n && !s.empty(); ++i) {
    std::size_t at = std::uniform_int_distribution<std::size_t>(0, s.size() - 1)(rng);
    switch (ops(rng)) {
      case 0: s.erase(at, std::uniform_int_distribution<std::size_t>(1, 40)(rng)); break;
      case 1: s[at] = static_cast<char>(rng() & 0xff); break;
      case 2: {
        const char* tok = kTokens[rng() % (sizeof(kTokens) / sizeof(kTokens[0]))];
        s.insert(at, tok[0] == 0 ? std::string(1, '\0') : std::string(tok));
        break;
      }
      case 3: {  // repeat a line
        std::size_t b = s.rfind('\n', at), e = s.find('\n', at);
        b = b == std::string::npos ? 0 : b + 1;
        if (e != std::string::npos) s.insert(b, s.substr(b, e - b + 1));
        break;
      }
      case 4: {  // drop a line
        std::size_t b = s.rfind('\n', at), e = s.find('\n', at);
        b = b == std::string::npos ? 0 : b + 1;
        if (e != std::string::npos) s.erase(b, e - b + 1);
        break;
      }
      case 5: s.insert(at, std::string(std::uniform_int_distribution<std::size_t>(550, 1300)(rng), 'x')); break;
      case 6: s.resize(at); break;
      default: {  // a run of random bytes
        std::string junk(std::uniform_int_distribution<std::size_t>(1, 30)(rng), ' ');
        for (auto& c : junk) c = static_cast<char>(rng() & 0xff);
        s.insert(at, junk);
      }
    }
  }
  return s;
}

void test_json_edge_cases() {
  struct Case {
    const char* text;
    bool ok;
  };
  const Case cases[] = {
      {"{}", true}, {"[]", true}, {"1", true}, {"-0", true}, {"01", false}, {"1.", false}, {".5", false},
      {"1e400", false}, {"1e-400", true}, {"18446744073709551616", true}, {"NaN", false}, {"Infinity", false},
      {"\"\\ud800\"", false}, {"\"\\udc00\"", false}, {"\"\\ud800\\udc00\"", true}, {"\"\\x\"", false},
      {"\"\x01\"", false}, {"\"\x7f\"", true}, {"\"\xed\xa0\x80\"", false}, {"\"\xc0\x80\"", false},
      {"\"\xf4\x90\x80\x80\"", false}, {"\xef\xbb\xbf{}", false}, {"{\"a\":1,\"a\":2}", true}, {"{} x", false},
      {"{}\r", true}, {"\x0b{}", false}, {"[1,]", false}, {"{\"a\":1,}", false}, {"{1:2}", false}, {"", false},
      {" ", false}, {"tru", false}, {"true", true}, {"1.7976931348623157e308", true},
      {"1.7976931348623159e308", false}, {"[[[[[[[[]]]]]]]]", true}, {"[[[[[[[[]]]]]]]", false},
  };
  for (auto& c : cases) {
    std::string s(c.text);
    bool got = au::json_valid(s.data(), s.size());
    if (got != c.ok) std::fprintf(stderr, "json_valid(%s) = %d\n", c.text, got);
    CHECK(got == c.ok);
  }
  std::string deep(300000, '[');
  deep += std::string(300000, ']');
  CHECK(au::json_valid(deep.data(), deep.size()));  // no recursion, no depth limit
  deep.pop_back();
  CHECK(!au::json_valid(deep.data(), deep.size()));
}

void test_blank() {
  const char* blank[] = {"", " ", "\t\r\x0b\x0c", "\x1c\x1d\x1e\x1f", "\xc2\xa0", "\xc2\x85", "\xe3\x80\x80",
                         "\xe2\x80\x80\xe2\x80\x8a\xe2\x80\xa8\xe2\x80\xa9\xe2\x80\xaf\xe2\x81\x9f\xe1\x9a\x80"};
  const char* not_blank[] = {"x", "\xff", "\xe2\x80\x8b", "\xc2", "\xe3\x80", "\xed\xa0\x80", "\x00"};
  for (auto s : blank) CHECK(au::is_blank(s, std::char_traits<char>::length(s)));
  for (auto s : not_blank) CHECK(!au::is_blank(s, std::max<std::size_t>(std::char_traits<char>::length(s), 1)));
}

void test_clean_log_and_chunking() {
  std::string log = clean_log(12);
  std::string whole = audit({log}, nullptr, au::Options{});
  const std::string n = std::to_string(std::count(log.begin(), log.end(), '\n'));
  CHECK(whole.rfind("lines " + n + " events " + n + " requests 12 terminated 12 live 0\n", 0) == 0);
  CHECK(whole.find("unhealthy f0:" + std::to_string(std::stoi(n) - 1)) != std::string::npos);
  CHECK(whole.find("malformed") == std::string::npos);
  std::mt19937_64 rng(1);
  CHECK(audit({log}, &rng, au::Options{}) == whole);
  // a line of exactly max_line bytes is read; one byte more is reported
  au::Options o;
  std::size_t longest = 0, at = 0, lineno = 0;
  for (std::size_t b = 0, e; (e = log.find('\n', b)) != std::string::npos; b = e + 1) {
    ++lineno;
    if (e - b > longest) {
      longest = e - b;
      at = lineno;
    }
  }
  o.max_line = static_cast<std::int64_t>(longest);
  CHECK(audit({log}, &rng, o).find("malformed") == std::string::npos);
  o.max_line -= 1;
  std::string cut = audit({log}, &rng, o);
  CHECK(cut.find("malformed f0:" + std::to_string(at) + " |0:line longer than") != std::string::npos);
  // two ranks merged, one on a clock hours ahead
  std::string other = clean_log(5, 1000000 + 7200L * 1000000000L);
  std::string merged = audit({log, other}, nullptr, au::Options{});
  CHECK(merged == audit({log, other}, &rng, au::Options{}));
  // merged with a file of many short lines and no timestamps (held as bytes, parsed a few at a time), and
  // with first timestamps past the lookahead
  std::string tiny;
  for (int k = 0; k < 20000; ++k) tiny += k % 7 ? "{}\n" : "x\n";
  std::string three = audit({log, tiny, other}, nullptr, au::Options{});
  CHECK(three.rfind("lines " + std::to_string(std::stoi(n) + 20000 + static_cast<int>(std::count(other.begin(), other.end(), '\n'))), 0) == 0);
  CHECK(three == audit({log, tiny, other}, &rng, au::Options{}));
  au::Options la;
  la.lookahead = 1;
  std::string late_first = audit({"x\n" + log, other}, nullptr, la);
  CHECK(late_first == audit({"x\n" + log, other}, &rng, la));
  CHECK(late_first != audit({"x\n" + log, other}, nullptr, au::Options{}));  // log's first time unseen: not relative
}

// A file read to its end without one event is a no_events finding at line 0 (audit.py Auditor.finish), whatever
// the chunking; a file with events has none.
void test_no_events() {
  std::mt19937_64 rng(3);
  std::string log = clean_log(3);
  for (const char* empty : {"", "\n \n\t", "x\n{}\n"}) {
    std::string one = audit({empty}, nullptr, au::Options{});
    CHECK(one.find("\nno_events f0:0 |0:no lifecycle events in  |7:0 |0: (") != std::string::npos);
    CHECK(one == audit({empty}, &rng, au::Options{}));
    std::string two = audit({log, empty}, nullptr, au::Options{});
    CHECK(two.find("\nno_events f1:0 |0:no lifecycle events in  |7:1 |0: (") != std::string::npos);
    CHECK(two.find("no_events=1 ") != std::string::npos);
    CHECK(two == audit({log, empty}, &rng, au::Options{}));
  }
  CHECK(audit({""}, nullptr, au::Options{}).find("|0: (0 lines): nothing to audit {lines=0}") != std::string::npos);
  CHECK(audit({"\n\n"}, nullptr, au::Options{}).find("|0: (2 lines): nothing to audit {lines=2}") != std::string::npos);
  CHECK(audit({" \n"}, nullptr, au::Options{}).find("|0: (1 line): nothing to audit {lines=1}") != std::string::npos);
  CHECK(audit({log}, nullptr, au::Options{}).find("no_events") == std::string::npos);  // the control
  CHECK(audit({log, log}, &rng, au::Options{}).find("no_events") == std::string::npos);
}

void test_bad_api_use() {
  au::Options o;
  o.window = 0;
  bool threw = false;
  try {
    au::Auditor a(o);
  } catch (const lifecycle::InvalidArgumentError&) {
    threw = true;
  }
  CHECK(threw);
  au::Auditor a{au::Options{}};
  threw = false;
  try {
    a.feed(0, "x", 1);
  } catch (const lifecycle::InvalidArgumentError&) {
    threw = true;
  }
  CHECK(threw);
}

void fuzz() {
  const char* env_seed = std::getenv("AUDIT_FUZZ_SEED");
  const char* env_iters = std::getenv("AUDIT_FUZZ_ITERS");
  const std::uint64_t seed = env_seed ? std::strtoull(env_seed, nullptr, 10) : 20240611;
  const long iters = env_iters ? std::strtol(env_iters, nullptr, 10) : 3000;
  const std::string base = clean_log(8), base2 = clean_log(4, 5000000);
  // the clean log with the optional keys: one proc, its lines split between two engines
  std::string keyed;
  for (std::size_t b = 0, e; (e = base.find('\n', b)) != std::string::npos; b = e + 1) {
    std::string l = base.substr(b, e - b + 1);
    const std::size_t at = l.find("\"pid\": 7, ");
    if (at != std::string::npos) l.insert(at, "\"proc\": 9, \"engine\": " + std::to_string(b % 2) + ", ");
    keyed += l;
  }
  // the keyed log with engine 0's INFO lines filtered out for a stretch (lifecycle.log_level lines around it, the
  // lines in between dropped): its sessions set aside, adopted after it or unjudged, its tombstones and slots dropped
  std::string levelled;
  {
    long k = 0, seq = 1000;
    const long n = static_cast<long>(std::count(keyed.begin(), keyed.end(), '\n'));
    for (std::size_t b = 0, e; (e = keyed.find('\n', b)) != std::string::npos; b = e + 1, ++k) {
      const std::string l = keyed.substr(b, e - b + 1);
      if (k == n / 3 || k == 2 * n / 3)
        levelled += line("lifecycle.log_level", -1, seq++, 1000000 + k, std::string(", \"proc\": 9, \"engine\": 0, ") +
                         "\"info_filtered\": " + (k == n / 3 ? "true" : "false"));
      if (k > n / 3 && k < 2 * n / 3 && l.find("\"engine\": 0,") != std::string::npos) continue;
      levelled += l;
    }
    const std::string r = audit({levelled}, nullptr, au::Options{});
    CHECK(r.find("\nunjudged f0:") != std::string::npos);  // (not vacuous: sessions were set aside)
  }
  for (long it = 0; it < iters; ++it) {
    const std::uint64_t s = seed + static_cast<std::uint64_t>(it);
    std::mt19937_64 rng(s);
    std::vector<std::string> files{mutate(base, rng)};
    if (rng() % 3 == 0) files.push_back(mutate(base2, rng));
    if (rng() % 7 == 0) files.push_back(mutate(base, rng));
    if (rng() % 4 == 0) files.push_back(mutate(keyed, rng));
    if (rng() % 4 == 0) files.push_back(mutate(levelled, rng));
    au::Options o = rng() % 2 ? small_options() : au::Options{};
    std::string whole = audit(files, nullptr, o);
    std::string chunked = audit(files, &rng, o);
    if (whole != chunked) {
      std::fprintf(stderr, "audit fuzz: chunking changed the result; replay with AUDIT_FUZZ_SEED=%llu AUDIT_FUZZ_ITERS=1\n",
                   static_cast<unsigned long long>(s));
      std::fprintf(stderr, "--- whole\n%s\n--- chunked\n%s\n", whole.c_str(), chunked.c_str());
      CHECK(whole == chunked);
      return;
    }
    ++lctest::checks;
  }
  std::printf("audit fuzz: %ld iterations from seed %llu\n", iters, static_cast<unsigned long long>(seed));
}

}  // namespace

int main() {
  test_json_edge_cases();
  test_blank();
  test_clean_log_and_chunking();
  test_no_events();
  test_bad_api_use();
  fuzz();
  TEST_MAIN_END();
}
