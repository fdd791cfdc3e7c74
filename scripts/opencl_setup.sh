#!/usr/bin/env bash
# Install the OpenCL stack that lets Theano's GPU backend (gpuarray) run on this machine's CPU,
# so the GPU code path of gpu_ver is built and tested without a GPU (docs/GPU.md):
#   pocl-opencl-icd  an OpenCL device on the CPU (pocl)
#   libgpuarray3/-dev  libgpuarray 0.7.6, the library under Theano's gpuarray backend
#   libclblast1/-dev   OpenCL BLAS; libgpuarray dlopens the unversioned libclblast.so (-dev has it)
#   python3-pygpu      pygpu 0.7.6: Debian's package cannot be installed into a venv, so its files are
#                      extracted with dpkg -x and copied into .venv's site-packages (it needs mako, six)
# Needs root and Debian's apt. Where either is missing it says so and exits 0: the GPU-path tests
# then skip with the reason, and the rest of the suite runs. HPO_OPENCL=0 skips it on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
say() { echo "opencl_setup: $*" >&2; }
if [ "${HPO_OPENCL:-1}" = "0" ]; then say "HPO_OPENCL=0: not installing the OpenCL stack"; exit 0; fi
if [ ! -x "$VENV/bin/python" ]; then say "no venv at $VENV (run scripts/setup.sh first)"; exit 1; fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if "$VENV/bin/python" -c 'import pygpu.gpuarray as g; assert g.count_devices("opencl", 0) > 0' >/dev/null 2>&1; then
  exit 0  # already installed and an OpenCL device is visible
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  say "not root or no apt-get: OpenCL stack not installed; the GPU-path tests will skip"; exit 0
fi
PKGS="pocl-opencl-icd ocl-icd-libopencl1 libgpuarray3 libgpuarray-dev libclblast1 libclblast-dev"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends $PKGS >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q --no-install-recommends $PKGS >/dev/null || {
    say "apt-get could not install $PKGS; the GPU-path tests will skip"; exit 0; }
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q python3-pygpu >/dev/null 2>&1) || {
  apt-get update -q >/dev/null 2>&1 || true
  (cd "$tmp" && apt-get download -q python3-pygpu >/dev/null) || {
    say "could not download python3-pygpu; the GPU-path tests will skip"; exit 0; }
}
dpkg -x "$tmp"/python3-pygpu_*.deb "$tmp/x"
src="$tmp/x/usr/lib/python3/dist-packages"
rm -rf "$SITE/pygpu" "$SITE"/pygpu-*.egg-info
cp -r "$src/pygpu" "$src"/pygpu-*.egg-info "$SITE/"
rm -rf "$SITE/pygpu/tests"
"$VENV/bin/python" -m pip install -q "mako>=1.1" "six>=1.16" >/dev/null 2>&1
"$VENV/bin/python" -c 'import pygpu, pygpu.gpuarray as g; print("opencl_setup: pygpu", pygpu.__version__, "sees", g.count_devices("opencl", 0), "OpenCL device(s) on platform 0")' >&2
