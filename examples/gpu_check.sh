#!/usr/bin/env bash
# One command for a lent GPU (H100/H200, no network): environment, GPU tests, benchmark, all as
# JSON (+ PNG where matplotlib exists) in OUTDIR, time-boxed per step (default budget 480 s).
#
#   bash examples/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS] [--shapes 0,4] [--steps a,b] [--workers N] [--plan]
#
# --dry-run: the same steps on CPU under the Triton interpreter at tiny shapes (what CI runs).
# The package runs from this checkout (PYTHONPATH), no install needed. Wheels to carry in .whl/
# (an ignored path; all pure Python; used only where the module is missing, never a dependency):
#   pip download liger-kernel==0.8.5 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0 \
#       packaging==26.2 --no-deps -d .whl
# Details of the steps, the time shares and the statuses: examples/gpu_check.py.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash examples/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS] [--shapes 0,4]" >&2
  exit 2
fi
OUT="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# Carried pure-Python wheels in .whl/ (liger-kernel, the optional comparator; pytest and its
# dependencies, in case the GPU image lacks them): each one whose module is not importable is
# installed without network into a temporary folder put on PYTHONPATH. Installed packages win.
WHEEL_DIR=""
cleanup() { [ -n "$WHEEL_DIR" ] && rm -rf "$WHEEL_DIR"; }
trap cleanup EXIT
shopt -s nullglob
for whl in "$ROOT"/.whl/*.whl; do
  name="$(basename "$whl")"; mod="${name%%-*}"; mod="$(echo "$mod" | tr 'A-Z.-' 'a-z__')"
  "$PY" -c "import $mod" >/dev/null 2>&1 && continue
  [ -n "$WHEEL_DIR" ] || WHEEL_DIR="$(mktemp -d)"
  # a pure-Python wheel is a zip: unpacking it is the fallback where pip is missing
  if PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
       --target "$WHEEL_DIR" "$whl" >/dev/null 2>&1 || "$PY" -m zipfile -e "$whl" "$WHEEL_DIR"; then
    echo "[gpu_check.sh] $mod from carried wheel $name"
  else
    echo "[gpu_check.sh] could not install $name" >&2
  fi
done
[ -n "$WHEEL_DIR" ] && export PYTHONPATH="$PYTHONPATH:$WHEEL_DIR"

# Budget for the outer guard: the driver time-boxes every step itself; this only catches a driver
# that hangs (it then leaves OUTDIR/gpu_check.json as written after the last finished step).
budget=480
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --dry-run) [ "$budget" = 480 ] && budget=1500 ;;
    --budget) budget="${args[$((i + 1))]:-$budget}" ;;
    --budget=*) budget="${args[$i]#--budget=}" ;;
  esac
done
guard=$(( ${budget%.*} + 60 ))

start=$(date +%s)
timeout --signal=TERM --kill-after=20 "$guard" "$PY" "$ROOT/examples/gpu_check.py" "$OUT" "$@"
rc=$?
echo "[gpu_check.sh] finished in $(( $(date +%s) - start )) s, exit status $rc; results in $OUT/gpu_check.json"
exit $rc
