"""``lifecycle`` command line: spec check, diagram, audit, example, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def _spec_check(argv: list[str]) -> int:
    from . import spec
    from .audit import _write_text

    p = argparse.ArgumentParser(prog="lifecycle spec check", description="Validate a lifecycle table file.")
    p.add_argument("file", nargs="?", help="table file (default: the repository's, else the compiled one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    a = p.parse_args(argv)
    if a.file is None:
        a.file = str(spec.default_table_path()) if spec.default_table_path().exists() else None
    if a.file is None:  # an installed wheel: check the table compiled into lifecycle._core
        s = spec.load_default()
        print(json.dumps({"file": s.path, "ok": True, "violations": [], "digest": s.digest}) if a.json
              else f"{s.path}: ok ({len(s.states)} states, {len(s.events)} events, {len(s.rows)} rows, digest {s.digest})")
        return 0
    violations = spec.check_file(a.file)
    if a.json:
        out = {"file": a.file, "ok": not violations, "violations": [v.as_dict() for v in violations]}
        if not violations:
            out["digest"] = spec.load(a.file).digest
        print(json.dumps(out, indent=2))
    elif violations:  # (_write_text: a file name that is not UTF-8 raised UnicodeEncodeError under a strict stdout)
        _write_text("".join(f"{v}\n" for v in violations))
        print(f"{len(violations)} violation(s) in {a.file}", file=sys.stderr)
    else:
        s = spec.load(a.file)
        _write_text(f"{a.file}: ok ({len(s.states)} states, {len(s.events)} events, {len(s.rows)} rows, digest {s.digest})\n")
    return 1 if violations else 0


def _delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(f"lifecycle.{module}")
    return int(getattr(mod, func)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; bad input that reaches the library (InvalidArgument: an option, a bad environment
    variable) ends it with exit status 2 and its message on stderr, not a traceback.  Other errors keep
    their tracebacks: they are bugs or failures to see whole."""
    from .errors import InvalidArgument

    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:  # started with stdout closed (`lifecycle ... >&-`): Python leaves it None, and every
        # print was silently dropped before the flush below raised AttributeError with a traceback
        print(f"lifecycle {argv[0] if argv else ''}: error: standard output is closed, so nothing could be printed "
              "(redirect it instead, e.g. >/dev/null)", file=sys.stderr)
        return 2
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # (here, so a closed pipe raises inside the try and not at exit)
    except InvalidArgument as exc:
        print(f"lifecycle {argv[0] if argv else ''}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (the demo's SIGTERM / SIGHUP too: they carry signum): no traceback
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"lifecycle {argv[0] if argv else ''}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # the reader went away (`lifecycle audit --json ... | head -1`): no traceback; what is still buffered goes
        # to devnull, so the interpreter's own flush at exit does not fail again; the status a shell shows
        # for a writer killed by SIGPIPE
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a descriptor (a test's capture)
            pass
        return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    commands = {
        "spec": "spec check [FILE] [--json]: validate a lifecycle table (default: the repository's)",
        "diagram": "diagram --format mermaid|dot|svg [--out F] [--counts-from LOG]",
        "audit": "audit LOG... [--json] [--html OUT]: replay request lifetimes from JSON logs",
        "example": "example: drive the engine through its lifecycle and print health + diagram",
        "demo": "demo: disaggregated KV-transfer run over real NIXL with a cancellation storm",
        "bench": "bench: run the benchmark suites and print one table",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        unknown = bool(argv) and argv[0] not in ("-h", "--help")
        out = sys.stderr if unknown else sys.stdout
        if unknown:
            print(f"lifecycle: unknown command {argv[0]!r}", file=out)
        print("usage: lifecycle COMMAND ...\n\ncommands:", file=out)
        for name, doc in commands.items():
            print(f"  {doc}", file=out)
        return 2 if unknown else 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "spec":
        if not rest or rest[0] != "check":
            print("usage: lifecycle spec check [FILE] [--json]", file=sys.stderr)
            return 2
        return _spec_check(rest[1:])
    if cmd == "diagram":
        return _delegate("diagram", "main_diagram", rest)
    if cmd == "audit":
        return _delegate("audit", "main_audit", rest)
    if cmd == "example":
        return _delegate("example", "main", rest)
    if cmd == "demo":
        return _delegate("demo", "main", rest)
    if cmd == "bench":
        return _delegate("bench", "main", rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
