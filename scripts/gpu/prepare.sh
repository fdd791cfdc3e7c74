#!/bin/bash
# Assemble gpu_bundle/ (git-ignored) at the repository root: everything the GPU machine lacks to run
# gpu_ver (Theano-PyMC 1.1.2 on the gpuarray backend) with Python 3.11:
#   gpu_bundle/debs/*.deb      Debian bookworm: python3.11 + headers, libgpuarray3(-dev), python3-pygpu
#   gpu_bundle/fallback/*.deb  tiny system libraries, used there only if the machine lacks them
#   gpu_bundle/wheels/*.whl    cp311 wheels: numpy 1.23.5, theano-pymc (built from its sdist), autograd, ...
#   gpu_bundle/MANIFEST.txt    file list with sizes and sha256
# Idempotent: files already present are re-used. Prints the bundle size; fails if it exceeds
# HPO_BUNDLE_MAX_MIB (default 56). Needs: apt-get (bookworm sources, run `apt-get update` once), and a
# Python 3.11 with pip (default: .venv/bin/python, else python3.11).
# Usage: bash scripts/gpu/prepare.sh [bundle-dir]     (default: gpu_bundle at the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
B=${1:-$ROOT/gpu_bundle}
MAX_MIB=${HPO_BUNDLE_MAX_MIB:-56}
PY=${HPO_PREP_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3.11 || true); fi
fi
[ -n "$PY" ] || { echo "prepare: no Python 3.11 found (set HPO_PREP_PYTHON)" >&2; exit 1; }
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "prepare: $PY is not Python 3.11" >&2; exit 1; }

DEBS="python3.11 python3.11-minimal libpython3.11 libpython3.11-minimal libpython3.11-stdlib
      libpython3.11-dev python3.11-dev python3-distutils python3-lib2to3
      libgpuarray3 libgpuarray-dev python3-pygpu"
FALLBACK_DEBS="libexpat1 libffi8 zlib1g"
# name==version, for pip; wheels must be cp311 / pure-python, manylinux x86_64
WHEELS="numpy==1.23.5 autograd==${HPO_AUTOGRAD_VERSION:-1.9.1} filelock six tqdm mako markupsafe setuptools==68.2.2"  # setuptools: Theano imports pkg_resources
THEANO=theano-pymc==1.1.2

mkdir -p "$B/debs" "$B/fallback" "$B/wheels"

fetch_debs() {  # $1 = folder, rest = package names; skip those already there
  local dir=$1; shift
  local need=()
  for p in "$@"; do
    compgen -G "$dir/${p}_*.deb" >/dev/null || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "prepare: apt-get download ${need[*]}"
    (cd "$dir" && apt-get download "${need[@]}" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true)
  fi
  for p in "$@"; do
    compgen -G "$dir/${p}_*.deb" >/dev/null || { echo "prepare: missing $p.deb (run apt-get update?)" >&2; exit 1; }
  done
}
fetch_debs "$B/debs" $DEBS
fetch_debs "$B/fallback" $FALLBACK_DEBS

have_wheel() {  # $1 = distribution name (any case, - or _); a wheel's name is <dist>-<version>-...
  local n; n=$(echo "$1" | tr 'A-Z-' 'a-z_')
  ls "$B/wheels" 2>/dev/null | grep '\.whl$' | sed 's/-.*//' | tr 'A-Z-' 'a-z_' | grep -qx "$n"
}
for spec in $WHEELS; do
  name=${spec%%==*}
  have_wheel "$name" && continue
  echo "prepare: pip download $spec"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --abi cp311 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$B/wheels" "$spec"
done
if ! have_wheel theano_pymc; then
  echo "prepare: pip wheel $THEANO (from its sdist)"
  "$PY" -m pip wheel -q --no-deps -w "$B/wheels" "$THEANO"
fi
rm -f "$B/wheels"/*.tar.gz "$B/wheels"/*.zip

# One version per distribution (a re-run with another pin would leave two).
dups=$(ls "$B/wheels" | sed 's/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "prepare: several versions of: $dups in $B/wheels; delete the old ones" >&2; exit 1; }

(cd "$B" && find debs fallback wheels -type f | sort | while read -r f; do
   printf '%s %10d %s\n' "$(sha256sum "$f" | cut -c1-16)" "$(stat -c %s "$f")" "$f"; done) > "$B/MANIFEST.txt"
cat "$B/MANIFEST.txt"
bytes=$(du -sb "$B" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "prepare: bundle $B: $bytes bytes (~${mib} MiB; limit ${MAX_MIB} MiB)"
if [ "$bytes" -gt $(( MAX_MIB * 1048576 )) ]; then
  echo "prepare: FAIL bundle larger than ${MAX_MIB} MiB" >&2; exit 1
fi
# What travels to the device: the working tree (tracked + untracked-not-ignored files) plus the bundle.
if git -C "$ROOT" rev-parse >/dev/null 2>&1; then
  tree=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  total=$(( tree + bytes ))
  echo "prepare: working tree $tree bytes + bundle = $(( (total + 1048575) / 1048576 )) MiB of the device's 64 MiB"
  if [ "$total" -gt $(( 62 * 1048576 )) ]; then echo "prepare: FAIL working tree + bundle > 62 MiB" >&2; exit 1; fi
fi
echo "prepare: OK"
