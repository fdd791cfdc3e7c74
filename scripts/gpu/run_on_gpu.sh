#!/bin/bash
# One-shot GPU check of gpu_ver, run ON the GPU machine from the repository root:
#   bash scripts/gpu/run_on_gpu.sh [bundle-dir] [out-dir]       (defaults: gpu_bundle, $OUT or /tmp/hpo_gpu_out)
# Unpacks the bundle made by scripts/gpu/prepare.sh under $HPO_GPU_WORK (default /tmp/hpo_gpu; never into /),
# links libcuda.so / libnvrtc.so / libcublas.so, starts the bundled Python 3.11 and runs each part with its own
# time limit inside a total budget, going on after a failure. Writes gpu_report.json + one log per part
# (<= 8 files) into the out folder and prints a table last. Without a GPU the GPU parts are skipped with the
# reason (HPO_CPU_FALLBACK=1: run them with --device cpu instead). Exit status 0 unless the set-up failed.
#
# The parts: edit the commands here (first word: py311 = bundled Python 3.11 with the repo on PYTHONPATH,
# py3 = the machine's python3 with PyTorch, py3+repo = the same with autograd/tqdm and the repo on PYTHONPATH)
# or override them from the environment; an empty command skips. Parts print figures as JSON lines.
export HPO_CMD_INFO=${HPO_CMD_INFO-"py311 -m gpu_ver info --json"}
export HPO_CMD_SMOKE=${HPO_CMD_SMOKE-"py311 scripts/gpu/gpu_report.py smoke --device cuda"}
export HPO_CMD_CROSSCHECK=${HPO_CMD_CROSSCHECK-"py311 -m gpu_ver crosscheck --device cuda --floatX float32 --dataset synthetic --overwrite --out /tmp/hpo_gpu/runs/crosscheck"}
export HPO_CMD_TORCH_DENSENET=${HPO_CMD_TORCH_DENSENET-"py3 scripts/gpu/torch_densenet.py --device cuda --depth 40 --batch 64 --steps 30"}
export HPO_CMD_DRMAD=${HPO_CMD_DRMAD-"py311 -m gpu_ver drmad --device cuda --floatX float32 --model densenet --dataset synthetic-images --depth 7 --growth 12 --image-size 16 --iters 10 --batch 32 --meta-iters 2 --no-progress --overwrite --out /tmp/hpo_gpu/runs/drmad"}
export HPO_CMD_DENSENET=${HPO_CMD_DENSENET-"py311 benchmarks/densenet.py --worker train --device cuda --depth 40 --growth 12 --batch 64 --size 32 --steps 10"}
# time limits per part (seconds) and the whole budget, unpacking included
export HPO_T_INFO=${HPO_T_INFO:-60} HPO_T_SMOKE=${HPO_T_SMOKE:-60} HPO_T_CROSSCHECK=${HPO_T_CROSSCHECK:-100}
export HPO_T_TORCH_DENSENET=${HPO_T_TORCH_DENSENET:-60} HPO_T_DRMAD=${HPO_T_DRMAD:-150} HPO_T_DENSENET=${HPO_T_DENSENET:-200}
BUDGET=${HPO_BUDGET_S:-500}

set -u
START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
B=$(cd "${1:-gpu_bundle}" 2>/dev/null && pwd) || { echo "run_on_gpu: no bundle folder ${1:-gpu_bundle}" >&2; exit 2; }
O=${2:-${OUT:-/tmp/hpo_gpu_out}}
W=${HPO_GPU_WORK:-/tmp/hpo_gpu}
case "$W" in /|/usr|/usr/*|/opt|/lib*|/etc*) echo "run_on_gpu: refusing to unpack into $W" >&2; exit 2;; esac
mkdir -p "$O" "$W"
SETUP_LOG=$O/setup.log

deb_x() {  # dpkg -x, or the same in Python where dpkg is missing
  if command -v dpkg >/dev/null; then dpkg -x "$1" "$2"
  else python3 "$ROOT/scripts/gpu/gpu_report.py" unpack-deb "$1" "$2"; fi
}

unpack() {  # idempotent: a stamp per archive
  local f
  mkdir -p "$W/py" "$W/site" "$W/site3" "$W/fallback" "$W/stamps"
  for f in "$B"/debs/*.deb; do
    [ -e "$W/stamps/$(basename "$f")" ] && continue
    deb_x "$f" "$W/py" && touch "$W/stamps/$(basename "$f")" || echo "unpack FAILED: $f"
  done
  for f in "$B"/fallback/*.deb; do
    [ -e "$f" ] || continue
    [ -e "$W/stamps/$(basename "$f")" ] && continue
    deb_x "$f" "$W/fallback" && touch "$W/stamps/$(basename "$f")" || echo "unpack FAILED: $f"
  done
  # pip is absent for 3.11 there: a wheel is a zip, unpacked into site/
  local PYZ
  PYZ=$(command -v python3 || echo "$W/py/usr/bin/python3.11")
  for f in "$B"/wheels/*.whl; do
    [ -e "$W/stamps/$(basename "$f")" ] && continue
    "$PYZ" -m zipfile -e "$f" "$W/site" && touch "$W/stamps/$(basename "$f")" || echo "unpack FAILED: $f"
    case "$(basename "$f")" in  # pure-python wheels also for the machine's python3 (py3+repo parts)
      autograd-*|tqdm-*) "$PYZ" -m zipfile -e "$f" "$W/site3" || echo "unpack FAILED: $f (site3)";;
    esac
  done
}

{
  echo "run_on_gpu: $(date -u +%FT%TZ) repo=$ROOT bundle=$B work=$W out=$O budget=${BUDGET}s"
  command -v dpkg >/dev/null || echo "run_on_gpu: dpkg missing: unpacking the .deb files in Python"
  t0=$(date +%s); unpack; echo "run_on_gpu: unpacked in $(( $(date +%s) - t0 ))s"
  PY311=$W/py/usr/bin/python3.11
  echo "--- bundled python: $PY311"
  LD_LIBRARY_PATH=$W/py/usr/lib:$W/py/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-} \
    "$PY311" -c 'import sys; print("python", sys.version.split()[0], sys.prefix)' 2>&1
  ldd "$PY311" 2>&1 | grep -i "not found" && echo "(missing libraries above; fallback/ may provide them)"
  echo "--- machine"; nvidia-smi -L 2>&1 | head -4; command -v g++ c++ nvcc python3 2>&1
  ls -d /usr/local/cuda/include/cuda.h 2>&1
} > "$SETUP_LOG" 2>&1
cat "$SETUP_LOG"

DRIVER_PY=$(command -v python3 || echo "$W/py/usr/bin/python3.11")
FB=""; [ "${HPO_CPU_FALLBACK:-0}" = 1 ] && FB=--cpu-fallback
cd "$ROOT" || exit 2
PYTHONPATH= "$DRIVER_PY" scripts/gpu/gpu_report.py run --work "$W" --out "$O" --repo "$ROOT" \
  --budget "$BUDGET" --start "$START" $FB
rc=$?
echo "run_on_gpu: done in $(( $(date +%s) - START ))s (driver rc=$rc); results in $O"
exit $rc
