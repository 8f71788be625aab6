#!/usr/bin/env bash
# The device check (on the machine with the GPU; prepared by scripts/device/prepare.sh). Logs go to $OUT.
# DEVICE=cpu runs the same steps on CPU tensors, as a dry run where there is no GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/device-out}
DEV=${DEVICE:-cuda}
mkdir -p "$OUT" /tmp/nx
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 3
tar -xJf .whl/nixl_trim.tar.xz -C /tmp/nx || exit 4
export PYTHONPATH=/tmp/site:/tmp/nx/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # name, timeout, command...: prints the exit code and the log's last lines
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? ($*)"
  grep -v -E '^[EWI][0-9]{4} ' "$OUT/$name.log" | grep -E "cases passed|ok \(|FAILED|wedged|failure|Fatal|met|MISS|runtime" | tail -8 | cut -c1-200
}
step check 200 python3 scripts/device_check.py --device "$DEV"
step control-corrupt 120 python3 scripts/device_check.py --device "$DEV" --corrupt-one
step control-drop 120 python3 scripts/device_check.py --device "$DEV" --drop-notes
D=(python3 -m lifecycle demo --quiet --device "$DEV")
step demo 150 "${D[@]}" --requests 5000 --cancel-fraction 0.5 --faults delay,error,disconnect,drop-notif --seed 7 --out /tmp/d1
step demo-write 120 "${D[@]}" --mode write --requests 2000 --faults delay,error,drop-notif --seed 3 --out /tmp/d2
for seed in 5 6 7 8; do
  step "kill-peer-$seed" 120 "${D[@]}" --faults kill-peer --requests 2000 --seed "$seed" --out "/tmp/k$seed"
done
step kill-peer-write 120 "${D[@]}" --faults kill-peer --mode write --requests 2000 --seed 5 --out /tmp/kw
# which protocol UCX picked for each operation ("software emulation" is the one to avoid: docs/transport.md)
step proto 90 env UCX_PROTO_INFO=y "${D[@]}" --requests 200 --seed 1 --out /tmp/dp
grep -A5 -E "remote memory (read|write) by" "$OUT/proto.log" | grep -oE "(read|write) by [^|]*|[0-9.]+inf \| [^|]*\|[^|]*" |
  paste - - | sort | uniq -c
step bench 300 python3 benchmarks/bench_nixl.py
