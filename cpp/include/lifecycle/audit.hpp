// Native replay of structured lifecycle logs: the hot path of `lifecycle audit`.
//
// Theory of operation
// -------------------
// lifecycle/audit.py's `Auditor` is the reference implementation; this is the same replay, line for line,
// over the compiled table (table_gen.hpp), plus a strict JSON reader that accepts exactly what orjson
// accepts.  Python keeps the file handling: it feeds raw chunks (any size, lines may span chunks) into a
// group of sources (one file: replayed in order; several: merged by t_mono_ns exactly as
// `Auditor._feed_merged` does) and calls run() whenever a source may need input.  Memory is bounded by
// the live requests, the windows and a chunk (plus max_line) per source: a merged source keeps its last
// chunk as bytes and holds at most 64 parsed lines (Options::lookahead while its first timestamp is
// looked for), whatever the files hold.
//
// Everything that needs Python's repr()/str() of a JSON value (finding messages, the role of a request,
// orjson's error text for a malformed line) is not formatted here: a finding carries message *pieces*,
// some of them raw JSON text with the formatting the Python replay applies to the parsed value, and the
// Python side formats them.  Table-mismatch findings are emitted once per distinct table value (as this
// side tells values apart, a finer split than Python's ==): Python deduplicates and counts them.
//
// JSON integers are what orjson reads: [-2^63, 2^64) is an int, a wider integer literal is a float.
// They are held as 128-bit ints so that sums and differences never overflow, like Python's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lifecycle::audit {

using Int = __int128;

std::string to_string(Int v);

struct Options {
  std::int64_t window = 8192;       // terminated sessions remembered (>= 1)
  std::int64_t top = 20;            // slowest requests kept (>= 1)
  std::int64_t keep_findings = 1000;
  std::int64_t keep_violating = 50;
  Int leak_age_ns = 0;
  std::int64_t max_line = 1 << 20;  // longer lines are reported, not parsed (>= 0)
  std::int64_t max_depth = 512;     // lines nesting brackets deeper (outside strings) are reported (>= 0)
  std::int64_t lookahead = 4096;    // merge: a file's first timestamp is looked for in its first items (>= 1)
  std::int64_t max_tables = 64;     // distinct mismatched `table` values remembered (reported once each); >= 0
};

// Whether brackets outside strings nest deeper than max_depth anywhere in [p, p + n): a backslash in a
// string escapes the next byte, an unterminated string runs to the end (lifecycle/audit.py _too_deep).
bool too_deep(const char* p, std::size_t n, std::int64_t max_depth) noexcept;

// Finding kinds, in lifecycle/audit.py's VIOLATION_KINDS + WARNING_KINDS order.
enum class Kind : std::uint8_t {
  malformed, unreadable, illegal_transition, terminated_before_terminal, leak, double_termination, wrong_result,
  result_state_mismatch, misclassified_event, deferred_delivery, deferred_order, slot_reuse, rank_disagreement,
  seq_gap, collective_desync, no_events,
  rejected_event, callback_error, unhealthy, stream_start, adopted_session, orphan_event, table_mismatch, live,
  window_evicted, delivery_unchecked, log_filtered, unjudged,
};
inline constexpr int kNumKinds = 28;
// The events' schema version (every line's "schema"); lifecycle.audit.SCHEMA_ID and lifecycle.engine.SCHEMA
// are checked against it (_core.EVENTS_SCHEMA) by tests/test_audit.py.
inline constexpr const char* kEventsSchema = "kv-lifecycle.events/1";
const char* kind_name(Kind k);

// How Python turns a piece's text into message text.
enum class Op : std::uint8_t {
  text,        // the text itself
  repr,        // audit._rl(json.loads(text)): repr cut to audit._MAX_QUOTED characters
  short_repr,  // audit._r(json.loads(text)): repr cut to 60 characters
  str,         // audit._cut(str(json.loads(text))): cut to audit._MAX_QUOTED characters
  name80,      // repr(json.loads(text)[:80]) (text is a JSON string)
  reasons,     // audit._health_reasons: "; ".join(map(str, reasons)), cut to audit._MAX_QUOTED characters
  not_json,    // f"not JSON: {orjson's error}" for the raw line `text`
  file,        // the name of file number `text`
  seconds,     // f"{int(text) / 1e9:.3f}"
};
struct Piece {
  Op op;
  std::string text;
  std::uint32_t depth = 0;  // nesting depth of a JSON value (Python refuses to format absurd depths)
};

struct Extra {
  enum Type : std::uint8_t { integer, none, string, file, outcomes } type;
  std::string key;
  Int i = 0;
  std::string s[4];  // string: s[0]; outcomes: {s[0]: s[1], s[2]: s[3]}
};

struct Finding {
  Kind kind;
  std::uint32_t file;
  Int line;
  bool has_rank = false, has_request = false;
  Int rank = 0, request = 0;
  std::vector<Piece> message;
  std::vector<Extra> extra;
};

// audit.LogHistogram's data: buckets[b] values fell in log-linear bucket b.
struct Histogram {
  std::vector<std::uint64_t> buckets;
  Int max = 0, total = 0;
  std::uint64_t count = 0;
  Histogram() : buckets(2048, 0) {}
  void add(Int v);
};

struct Summary {
  Int rank, request;
  std::string role;  // raw JSON text ("null" when absent)
  std::uint32_t role_depth = 0;
  std::uint32_t file;
  Int line, start, end;
  int outcome;  // index into the outcome names (without "none"), -1 for none
  int final_state;
  std::vector<std::pair<int, std::pair<Int, Int>>> segments;  // (state, (t_start, t_end))
  std::vector<Kind> kinds;
  bool ended;
};

struct Stream {  // one per proc, or per (file, pid) for lines without proc
  Int pid, events, next_seq, first_seq;
  std::uint32_t file;
  bool has_proc;
  Int proc;
};

struct Edge {
  int src;  // -1: the creating edge (no source state)
  int event, dst;
  std::uint64_t count;
};

struct Result {
  std::int64_t lines = 0;
  std::uint64_t events = 0, requests = 0, terminated = 0, live = 0;
  std::vector<std::pair<Kind, std::uint64_t>> counts;  // in order of first occurrence
  std::vector<Histogram> time_in_state;                 // one per non-final state, table order
  std::vector<int> tis_states;
  Histogram lifetime;
  std::vector<std::uint64_t> outcomes;      // per outcome name
  std::vector<std::uint64_t> event_counts;  // per event name (kEventNames of the log format)
  std::vector<Edge> edges, illegal_edges;   // edges: the creating edge first, then rows in table order
  std::vector<std::pair<std::pair<int, int>, std::uint64_t>> late, rejected;  // ((state, event), n)
  std::vector<Summary> slowest, violating;
  std::vector<Stream> streams;
  std::vector<Int> ranks;
};

// Names the result's indices refer to.
extern const char* const kLogEventNames[12];
int num_outcomes();
const char* outcome_name(int i);

class Auditor {
 public:
  explicit Auditor(const Options& opt);
  ~Auditor();
  Auditor(const Auditor&) = delete;
  Auditor& operator=(const Auditor&) = delete;

  // Start a group of sources, file numbers as Python numbers its paths.  One source is replayed in line
  // order; several are merged by time.  A group ends when run() returns -1.
  void begin(const std::vector<std::uint32_t>& files);
  void feed(std::size_t src, const char* data, std::size_t n);
  void end(std::size_t src);                               // end of input
  void unreadable(std::size_t src, const std::string& why);  // a read failed: report, then end
  // Replay what can be replayed; the source that needs input next, or -1 when the group is done.
  long run();
  std::vector<Finding> take_findings();
  Result finish(const std::vector<std::int64_t>& file_order);  // file_order[f]: rank of file f's name

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The strict JSON reader on its own (tests): true when orjson would parse `p[0..n)`.
bool json_valid(const char* p, std::size_t n, std::string* why = nullptr);
// Whitespace only, as Python's str.strip() sees the line decoded with surrogateescape.
bool is_blank(const char* p, std::size_t n);

}  // namespace lifecycle::audit
