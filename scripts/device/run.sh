#!/usr/bin/env bash
# The device check (on the machine with the GPU; prepared by scripts/device/prepare.sh). Logs go to $OUT.
# Every step has the exit code it must give (the controls must fail); the script exits 1 when one differs,
# or when the time budget (BUDGET s, default 540: one device command may run 600) ran out before a step.
# DEVICE=cpu runs the same steps on CPU tensors, as a dry run where there is no GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/device-out}
DEV=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT" /tmp/nx
rm -f "$OUT"/*.log  # a step that does not run leaves no earlier log behind
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 3
tar -xJf .whl/nixl_trim.tar.xz -C /tmp/nx || exit 4
export PYTHONPATH=/tmp/site:/tmp/nx/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
bad=()
step() {  # name, expected exit code, limit (s), command...: runs it within what is left of the budget
  local name=$1 want=$2 limit=$3 rc left=$((BUDGET - SECONDS)); shift 3
  if [ "$left" -lt 20 ]; then echo "== $name: not run (budget spent)"; bad+=("$name:not-run"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc (want $want; $*)"
  [ "$rc" = "$want" ] || bad+=("$name:rc=$rc")
  grep -v -E '^[EWI][0-9]{4} ' "$OUT/$name.log" | grep -E "cases passed|FAILED|wedged|failure|Fatal|met|MISS|runtime" |
    tail -6 | cut -c1-200
}
step check 0 150 python3 scripts/device_check.py --device "$DEV"
step control-corrupt 1 90 python3 scripts/device_check.py --device "$DEV" --corrupt-one
step control-drop 1 90 python3 scripts/device_check.py --device "$DEV" --drop-notes
D=(python3 -m lifecycle demo --quiet --device "$DEV")
step demo 0 90 "${D[@]}" --requests 5000 --cancel-fraction 0.5 --faults delay,error,disconnect,drop-notif --seed 7 --out /tmp/d1
step demo-write 0 60 "${D[@]}" --mode write --requests 2000 --faults delay,error,drop-notif --seed 3 --out /tmp/d2
for seed in 5 6 7 8; do
  step "kill-peer-$seed" 0 45 "${D[@]}" --faults kill-peer --requests 2000 --seed "$seed" --out "/tmp/k$seed"
done
step kill-peer-write 0 45 "${D[@]}" --faults kill-peer --mode write --requests 2000 --seed 5 --out /tmp/kw
# which protocol UCX picked for each operation ("software emulation" is the one to avoid: docs/transport.md)
step proto 0 60 env UCX_PROTO_INFO=y "${D[@]}" --requests 200 --seed 1 --out /tmp/dp
grep -A5 -E "remote memory (read|write) by" "$OUT/proto.log" | grep -oE "(read|write) by [^|]*|[0-9.]+inf \| [^|]*\|[^|]*" |
  paste - - | sort | uniq -c
step bench 0 200 python3 benchmarks/bench_nixl.py --sizes 4,64
if [ ${#bad[@]} -gt 0 ]; then echo "FAILED: ${bad[*]}"; exit 1; fi
echo "all steps gave the exit codes they must (${SECONDS}s)"
