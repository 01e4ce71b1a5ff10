#!/usr/bin/env bash
# Run the whole suite (scripts/test.sh) N times (default 3), each on a fresh clone of HEAD,
# while two busy-loop processes keep both cores of this machine busy: a guarantee that holds
# only on an idle machine is a race. For developers; users never need it.
# Extra arguments go to scripts/test.sh (e.g. -x). Prints one line per run: result, pass
# count, wall time; exits non-zero if any run failed. Logs stay in $OUT (printed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
OUT=$(mktemp -d "${TMPDIR:-/tmp}/qp-loaded-XXXXXX")
hogs=()
for _ in 1 2; do python3 -c 'while True: pass' & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
failed=0
for n in $(seq 1 "$runs"); do
  clone="$OUT/clone-$n"
  git clone -q . "$clone"
  started=$(date +%s)
  (cd "$clone" && scripts/test.sh -p no:cacheprovider "$@") >"$OUT/run-$n.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - started ))
  summary=$(grep -E '^=+ .*(passed|failed).* in ' "$OUT/run-$n.log" | tail -1 | tr -d '=')
  echo "run $n: exit $rc,${summary:- no pytest summary}, wall ${took} s"
  [ "$rc" -eq 0 ] || failed=1
  rm -rf "$clone/.venv"
done
echo "logs: $OUT"
exit $failed
