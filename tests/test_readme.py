"""README's embedding example runs as written (with the executor's parts stubbed)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


class _Once:
    def __init__(self, n):
        self.n = n

    def __bool__(self):
        self.n -= 1
        return self.n >= 0


def test_readme_embedding_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    freed: list[int] = []
    reports: list = []
    ns = {
        "kv_cache_manager": type("KV", (), {"free": staticmethod(freed.append)})(),
        "req_id": 1,
        "nbytes": 1024,
        "serving": _Once(3),
        "cancelled_by_client": iter([[1, 2], [], []]).__next__,
        "report": reports.append,
    }
    exec(compile(code, "README.md", "exec"), ns)
    engine = ns["engine"]
    # request 1 was in flight when cancelled: deferred, engine still owns it until evidence arrives
    assert freed == [2] and engine.state(1).value == "CancelRequested"
    engine.complete(1)  # the transport's DONE
    engine.poll()
    assert freed == [2, 1] and engine.state(1).value == "Terminated"
