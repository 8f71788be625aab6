#!/usr/bin/env bash
# Prepares, on this machine, what a device run carries (the device has Python 3.12 and torch but neither
# nixl nor structlog, and nothing can be fetched there): .whl/ (ignored by git) with the pure-Python
# wheels, nvidia-cuda-runtime-cu12 (nixl-cu12's UCX needs libcudart.so.12 for CUDA memory) and a trimmed
# nixl-cu12 (the 68 MB wheel is over the 64 MiB carry limit; kept: what libnixl_capi and the UCX plugin
# load, and UCX's CUDA and CMA modules), and the extension built for Python 3.12.  Then, with the tool:
#   run(command="bash scripts/device/run.sh", carry=[".whl", "lifecycle/_core.cpython-312-x86_64-linux-gnu.so"])
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PY312:-}" ]; then  # the device's Python: the first candidate that runs as 3.12 (a pyenv shim may not)
  for c in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "prepare.sh: no Python 3.12 here (the device's version): set PY312" >&2; exit 2; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
rm -rf .whl && mkdir .whl  # only this run's files: two versions of a wheel stop the install there
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dep() { "$PY312" scripts/requirement.py "$1"; }  # a pin from pyproject.toml; fails when there is none
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
structlog=$(dep structlog); transitions=$(dep transitions); cudart=$(dep nvidia-cuda-runtime-cu12); nixl=$(dep nixl-cu12)
dl .whl "$structlog" "$transitions" "$cudart"
dl "$tmp" "$nixl"
(cd "$tmp" && unzip -q nixl_cu12-*.whl -d x)
X=$tmp/x
roots=(.nixl_cu12.mesonpy.libs/libnixl_capi.so .nixl_cu12.mesonpy.libs/plugins/libplugin_UCX.so
       nixl_cu12.libs/ucx/libuct_cuda.so.0.0.0 nixl_cu12.libs/ucx/libucm_cuda.so.0.0.0 nixl_cu12.libs/ucx/libuct_cma.so.0.0.0)
mkdir -p "$tmp/t/site"
for f in $( (for r in "${roots[@]}"; do echo "$r"; ldd "$X/$r" | awk '/=>/ {print $3}' | grep "^$X/" |
             xargs -r realpath --relative-to="$X"; done) | sort -u); do
  mkdir -p "$tmp/t/site/$(dirname "$f")"
  cp -a "$X/$f" "$tmp/t/site/$f"
done
cp -a "$X/nixl_cu12" "$tmp/t/site/"  # find_spec("nixl_cu12") locates the libraries beside it
tar -cJf .whl/nixl_trim.tar.xz -C "$tmp/t" site
pybind11_dir=$(python3 -m pybind11 --cmakedir)
if ! { cmake -S . -B build/py312 -G Ninja -DPython_EXECUTABLE="$PY312" -Dpybind11_DIR="$pybind11_dir" \
         -DCMAKE_BUILD_TYPE=Release && cmake --build build/py312 -j2; } > "$tmp/build.log" 2>&1; then
  tail -30 "$tmp/build.log" >&2
  exit 1
fi
ls -la .whl lifecycle/_core.cpython-312-x86_64-linux-gnu.so
size=$(du -cb .whl lifecycle/_core.cpython-312-x86_64-linux-gnu.so | tail -1 | cut -f1)
echo "to carry: $((size >> 20)) MiB of the 64 MiB a device call takes with the working tree"
[ "$size" -lt $((56 << 20)) ] || { echo "prepare.sh: too much to carry" >&2; exit 1; }
