"""Prints the requirement pyproject.toml gives for a package (its dependencies and every extra), so that
the scripts that install one keep no copy of its pin.  Exits 1 (on stderr) when pyproject names none.

    python scripts/requirement.py nvidia-cuda-runtime-cu12    # -> nvidia-cuda-runtime-cu12>=12,<13
"""

import re
import sys
import tomllib
from pathlib import Path


def main(name: str) -> int:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = project.get("dependencies", []) + [r for rs in project.get("optional-dependencies", {}).values() for r in rs]
    for req in reqs:
        if re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] == name:
            print(req)
            return 0
    print(f"requirement.py: pyproject.toml names no requirement for {name!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
