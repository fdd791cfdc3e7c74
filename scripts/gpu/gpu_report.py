#!/usr/bin/env python3
"""Driver of the one-shot GPU check (see scripts/gpu/README.md).

Standard library only; runs under any Python >= 3.8 (on the GPU machine: its
own ``python3``, 3.12 with PyTorch). Subcommands:

``run``    link the CUDA libraries under their unversioned names, build the
           environment of the bundled Python 3.11, run each part with its own
           time limit inside a total budget, write ``gpu_report.json`` and one
           log per part, print a table last. Called by run_on_gpu.sh.
``smoke``  pygpu/Theano smoke test (gemm, conv2d forward+backward against a
           float64 NumPy reference); runs inside the bundled Python 3.11.
``table``  re-print the table of a ``gpu_report.json``.

Parts are given as commands whose first word names the interpreter: ``py311``
(the bundled Python 3.11, with the project on PYTHONPATH), ``py3`` (the
machine's python3) or ``py3+repo`` (the machine's python3 with the pure-Python
wheels autograd and tqdm and the project on PYTHONPATH: e.g. a float64 CPU
reference through cpu_ver, whose autograd.scipy needs the scipy that the
machine has and the bundle lacks). They are read from the environment (``HPO_CMD_<PART>``,
``HPO_T_<PART>`` = time limit in seconds), with the defaults below.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

# name, default command, default time limit (s), needs a GPU
PARTS = [
    ("info", "py311 -m gpu_ver info --json", 90, False),
    ("smoke", "py311 scripts/gpu/gpu_report.py smoke --device cuda", 90, True),
    ("crosscheck", "py311 -m gpu_ver crosscheck --device cuda --floatX float32 --overwrite "
                   "--out /tmp/hpo_gpu/runs/crosscheck", 90, True),
    ("devcheck", "py311 -m gpu_ver devcheck --device cuda --floatX float32 --overwrite "
                 "--out /tmp/hpo_gpu/runs/devcheck", 150, True),
    ("torch_densenet", "py3 scripts/gpu/torch_densenet.py --device cuda --depth 40 --batch 64", 60, True),
    ("drmad", "py311 -m gpu_ver drmad --device cuda --floatX float32 --overwrite --out /tmp/hpo_gpu/runs/drmad",
     90, True),
    ("densenet", "py311 benchmarks/densenet.py --device cuda --floatX float32 --depth 40 --batch 64", 180, True),
    # the same again: its compile times are the cached ones (function cache + Theano's module cache)
    ("densenet_cached", "py311 benchmarks/densenet.py --device cuda --floatX float32 --depth 40 --batch 64",
     120, True),
]
# unversioned name libgpuarray dlopens -> regex of acceptable real names (first match wins)
CUDA_LIBS = {
    "libcuda.so": r"^libcuda\.so(\.1)?(\.[0-9.]+)?$",
    "libnvrtc.so": r"^libnvrtc\.so(\.[0-9]+)+$",
    "libcublas.so": r"^libcublas\.so(\.[0-9]+)+$",
}
SYSTEM_LIB_DIRS = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
                   "/usr/lib64", "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
MAX_OUT_FILES = 8


# --------------------------------------------------------------------------- library linking
def _bad_dir(path: str) -> bool:
    """Stub libraries (link-time only) and compat folders must never be dlopened."""
    parts = set(path.split(os.sep))
    return bool(parts & {"stubs", "stub"})


def _version_key(name: str):
    nums = [int(n) for n in re.findall(r"\d+", name.split(".so", 1)[1])] if ".so" in name else []
    return nums


def ldconfig_paths(text: str) -> list:
    """Paths listed by ``ldconfig -p`` output ``text`` (x86-64 entries)."""
    out = []
    for line in text.splitlines():
        if "=>" in line and ("x86-64" in line or "x86_64" in line or "(libc6)" not in line):
            out.append(line.rsplit("=>", 1)[1].strip())
    return out


def nvidia_wheel_lib_dirs(nvidia_roots) -> list:
    """``lib`` folders of PyTorch's nvidia-* wheels: nvidia/*/lib and nvidia/*/*/lib (CUDA 13: nvidia/cu13/lib)."""
    dirs = []
    for root in nvidia_roots:
        for pat in ("*/lib", "*/*/lib", "lib"):
            dirs += sorted(d for d in glob.glob(os.path.join(root, pat)) if os.path.isdir(d))
    return dirs


def find_cuda_libs(lib_dirs, ldconfig_text: str = "") -> dict:
    """Map each unversioned name of CUDA_LIBS to a real file, or None.

    ``ldconfig -p`` entries come first (the driver's libcuda.so.1 is registered
    there), then ``lib_dirs`` in order. Stub folders are skipped. Among several
    candidates in one place the highest version wins.
    """
    candidates = [p for p in ldconfig_paths(ldconfig_text)]
    for d in lib_dirs:
        if not os.path.isdir(d) or _bad_dir(d):
            continue
        candidates += sorted(glob.glob(os.path.join(d, "lib*.so*")))
    found = {}
    for uname, rx in CUDA_LIBS.items():
        pick = None
        matches = [p for p in candidates if re.match(rx, os.path.basename(p))
                   and not _bad_dir(os.path.dirname(p)) and os.path.exists(p)]
        if matches:
            # earliest source wins; within the same folder, the highest version
            first_dir = os.path.dirname(matches[0])
            same = [p for p in matches if os.path.dirname(p) == first_dir]
            pick = max(same, key=lambda p: _version_key(os.path.basename(p)))
        found[uname] = pick
    return found


def link_cuda_libs(found: dict, link_dir: str) -> dict:
    """Create ``link_dir/<unversioned name>`` symlinks to the files in ``found``; return what was linked."""
    os.makedirs(link_dir, exist_ok=True)
    linked = {}
    for uname, target in found.items():
        dst = os.path.join(link_dir, uname)
        if os.path.lexists(dst):
            os.remove(dst)
        if target:
            os.symlink(os.path.realpath(target), dst)
            linked[uname] = os.path.realpath(target)
    return linked


def find_cuda_include(dirs) -> str | None:
    """First folder among ``dirs`` (globs allowed) that holds cuda.h."""
    for pat in dirs:
        for d in sorted(glob.glob(pat)):
            if os.path.isfile(os.path.join(d, "cuda.h")):
                return d
    return None


def machine_nvidia_roots() -> list:
    """Folders of the ``nvidia`` namespace package of the machine's python3 (PyTorch's CUDA wheels)."""
    roots = []
    code = "import nvidia, os; print('\\n'.join(list(nvidia.__path__)))"
    for py in dict.fromkeys(["python3", sys.executable]):
        try:
            r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=30,
                               env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
            roots += [l for l in r.stdout.split("\n") if l.strip()]
        except Exception:
            pass
    for pat in ("/opt/*/.venv/lib/python3*/site-packages/nvidia", "/usr/local/lib/python3*/dist-packages/nvidia",
                "/usr/lib/python3/dist-packages/nvidia"):
        roots += glob.glob(pat)
    return list(dict.fromkeys(os.path.realpath(r) for r in roots if os.path.isdir(r)))


def missing_system_libs(names, ldconfig_text: str) -> list:
    """Which sonames in ``names`` the machine's loader cache lacks."""
    have = {os.path.basename(p) for p in ldconfig_paths(ldconfig_text)}
    have |= {os.path.basename(p) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
             for p in glob.glob(os.path.join(d, "lib*.so*"))}
    return [n for n in names if n not in have]


# --------------------------------------------------------------------------- .deb without dpkg
def extract_deb(path: str, dest: str) -> list:
    """``dpkg -x path dest`` in Python (for a machine without dpkg): the data.tar.* member of the ar archive.

    Returns the member names extracted. Handles data.tar.xz/.gz/.bz2/uncompressed (not .zst).
    """
    import io
    import tarfile
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path}: not an ar archive")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise ValueError(f"{path}: no data.tar member")
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                break
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        members = tf.getmembers()
        kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tf.extractall(dest, **kw)
    return [m.name for m in members]


# --------------------------------------------------------------------------- output parsing
def parse_figures(text: str) -> dict:
    """Figures a part printed: every JSON object that starts a line (one-line or indented over
    several lines, optionally after ``RESULT ``), merged with later ones winning; else the
    ``key: value`` / ``key = value`` / ``key  value`` lines."""
    figs, kv = {}, {}
    dec = json.JSONDecoder()
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for l in lines:
        offsets.append(pos)
        pos += len(l)
    skip_until = -1
    for i, line in enumerate(lines):
        if offsets[i] < skip_until:
            continue
        s = line.strip()
        lead = len(line) - len(line.lstrip())
        if s.startswith("RESULT "):
            lead += len("RESULT ")
            s = s[len("RESULT "):].lstrip()
            lead = line.index("{") if "{" in line else lead
        if s.startswith("{"):
            try:
                obj, end = dec.raw_decode(text, offsets[i] + lead)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                figs.update(obj)
                skip_until = end
                continue
        m = re.match(r"^([A-Za-z_][\w.()/-]{0,40}?)(?:\s*[:=]\s+|\s{2,})(\S.*)$", s)
        if m and not s.startswith(("WARNING", "ERROR", "Traceback", "File ", "$ ", "# ")):
            kv[m.group(1).strip()] = m.group(2).strip()
    return figs if figs else kv


def failure_reason(text: str) -> str:
    """The most telling line of a failed part's output: the last exception line, else the last line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for l in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:", l) or l.startswith(("error:", "Error:", "FAIL")):
            return l[:300]
    return lines[-1][:300] if lines else "(no output)"


SUMMARY_KEYS = [  # (key, label) shown in the table when present among a part's figures
    ("device", "device"), ("gpu_present", "gpu"), ("backend", "backend"), ("devname", "card"),
    ("gpu_probe", "probe"),
    ("gemm_rel_err", "gemm err"), ("gemm_ms", "gemm ms"), ("conv_rel_err", "conv err"), ("conv_ms", "conv ms"),
    ("max_rel_err", "max rel err"), ("rel_err", "rel err"), ("passed", "pass"),
    ("images_per_s", "img/s"), ("images_per_s_strict_fp32", "img/s fp32"), ("images_per_s_default", "img/s default"),
    ("step_ms", "step ms"), ("hvp_ms", "hvp ms"), ("compile_s", "compile s"),
    ("hypergrad_norm", "|hypergrad|"), ("final_loss", "loss"),
]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def summarize(part: dict) -> str:
    if part.get("status") in ("skipped", "failed", "timeout") and part.get("reason"):
        return part["reason"]
    figs = part.get("figures") or {}
    flat = dict(figs)
    for v in figs.values():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat.setdefault(k2, v2)
    bits = [f"{label}={_fmt(flat[k])}" for k, label in SUMMARY_KEYS if k in flat]
    return ", ".join(bits) if bits else ", ".join(f"{k}={_fmt(v)}" for k, v in list(flat.items())[:4])


def format_table(report: dict) -> str:
    rows = [("part", "status", "secs", "figures / reason")]
    for p in report.get("parts", []):
        secs = p.get("seconds")
        rows.append((p["name"], p["status"], "-" if secs is None else f"{secs:.0f}", summarize(p)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = []
    env = report.get("environment", {})
    lines.append("== GPU report: {} | gpu={} | total {:.0f}s ==".format(
        env.get("gpu_name") or "no GPU found", env.get("gpu_present"), report.get("total_seconds", 0.0)))
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:>{w2}}  {r[3]}")
        if i == 0:
            lines.append("-" * (w0 + w1 + w2 + 6 + 40))
    counts = {}
    for p in report.get("parts", []):
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    lines.append("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


# --------------------------------------------------------------------------- running parts
def part_specs(environ) -> list:
    specs = []
    only = [s for s in environ.get("HPO_PARTS", "").replace(",", " ").split() if s]
    for name, cmd, limit, needs_gpu in PARTS:
        key = name.upper()
        c = environ.get(f"HPO_CMD_{key}", cmd).strip()
        t = float(environ.get(f"HPO_T_{key}", limit))
        skip = (only and name not in only) or not c
        specs.append({"name": name, "command": c, "limit": t, "needs_gpu": needs_gpu, "disabled": bool(skip)})
    return specs


def cpu_fallback_command(cmd: str) -> str:
    """The same command on the CPU: ``--device cuda`` -> ``--device cpu``."""
    return re.sub(r"(--device[ =])cuda\d*", r"\1cpu", cmd)


def run_part(argv, env, timeout, log_path, cwd) -> dict:
    """Run ``argv`` in its own process group; kill the group at ``timeout``. Output goes to ``log_path``."""
    t0 = time.time()
    status, rc = "ok", None
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(a) for a in argv) + f"\n# time limit {timeout:.0f}s\n")
        log.flush()
        try:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            return {"status": "failed", "rc": None, "seconds": time.time() - t0, "reason": f"cannot start: {e}"}
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode
    seconds = time.time() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    res = {"status": status, "rc": rc, "seconds": seconds, "figures": parse_figures(text)}
    if status == "ok" and rc != 0:
        res["status"] = "failed"
    if res["status"] == "timeout":
        res["reason"] = f"timed out after {timeout:.0f}s; last line: {failure_reason(text)}"
    elif res["status"] == "failed":
        res["reason"] = f"rc={rc}: {failure_reason(text)}"
    return res


def _sh(cmd, timeout=20) -> str:
    try:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except Exception as e:
        return f"({type(e).__name__}: {e})"


def build_env(prefix: str, site: str, repo: str, link_dir: str, extra_lib_dirs, cuda_inc, fallback_lib_dir,
              cache_dir: str, gpu: bool, base_env=None) -> dict:
    """Environment of the bundled Python 3.11 parts."""
    env = dict(os.environ if base_env is None else base_env)
    for k in ("PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(k, None)
    lib = [link_dir, f"{prefix}/usr/lib", f"{prefix}/usr/lib/x86_64-linux-gnu"] + list(extra_lib_dirs)
    if fallback_lib_dir:
        lib.append(fallback_lib_dir)
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = ":".join(list(dict.fromkeys(lib)) + ([old] if old else []))
    env["PYTHONPATH"] = f"{site}:{repo}"
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HPO_THEANO_CACHE"] = cache_dir
    # HPO_DEVICE / HPO_FLOATX are left as they are: each part names --device and --floatX itself, and
    # `info` keeps device auto so that it reports why no GPU is usable instead of failing.
    env.setdefault("HPO_BLAS_LDFLAGS", "")
    flags = [f"-I{prefix}/usr/include", f"-L{prefix}/usr/lib/x86_64-linux-gnu", f"-L{prefix}/usr/lib"]
    if cuda_inc:
        flags.append(f"-I{cuda_inc}")
    user = [f for f in env.get("THEANO_FLAGS", "").split(",") if f.strip() and not f.strip().startswith("gcc__cxxflags")]
    env["THEANO_FLAGS"] = ",".join(user + ["gcc__cxxflags=" + " ".join(flags)])
    return env


def gather_environment(gpu_name_cmd="nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader") -> dict:
    smi = _sh(gpu_name_cmd) if shutil.which("nvidia-smi") else ""
    return {
        "nvidia_smi": smi,
        "gpu_name": smi.split(",")[0].strip() if smi and "," in smi else None,
        "cxx": shutil.which("g++") or shutil.which("c++"),
        "nvcc": shutil.which("nvcc"),
        "machine_python3": _sh("python3 -c 'import sys; print(sys.version.split()[0], sys.executable)'"),
        "machine_torch": _sh("python3 -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -1"),
        "uname": _sh("uname -srm"),
        "os_release": _sh("grep PRETTY_NAME /etc/os-release"),
        "glibc": _sh("ldd --version 2>&1 | head -1"),
        "cpus": os.cpu_count(),
    }


def cmd_run(a) -> int:
    t_start = float(a.start or time.time())
    deadline = t_start + a.budget
    repo = os.path.abspath(a.repo)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    work = os.path.abspath(a.work)
    prefix, site = os.path.join(work, "py"), os.path.join(work, "site")
    link_dir, cache = os.path.join(work, "cudalinks"), os.path.join(work, "theano_cache")
    py311 = os.path.join(prefix, "usr", "bin", "python3.11")

    ldc = _sh("ldconfig -p") if shutil.which("ldconfig") or os.path.exists("/sbin/ldconfig") else ""
    nv_roots = machine_nvidia_roots()
    lib_dirs = [d for d in (os.environ.get("HPO_CUDA_LIB_DIRS", "").split(":")) if d] + SYSTEM_LIB_DIRS \
        + nvidia_wheel_lib_dirs(nv_roots)
    found = find_cuda_libs(lib_dirs, ldc)
    linked = link_cuda_libs(found, link_dir)
    real_dirs = list(dict.fromkeys(os.path.dirname(p) for p in linked.values()))
    cuda_inc = find_cuda_include(["/usr/local/cuda/include", "/usr/local/cuda/targets/x86_64-linux/include"]
                                 + [os.path.join(r, "*", "include") for r in nv_roots]
                                 + [os.path.join(r, "*", "*", "include") for r in nv_roots])
    # tiny system libraries the bundled Python links against, used only where the machine lacks them
    fb_src = os.path.join(work, "fallback")
    fb_dir = os.path.join(work, "fallback_links")
    os.makedirs(fb_dir, exist_ok=True)
    missing = missing_system_libs(["libexpat.so.1", "libffi.so.8", "libz.so.1"], ldc)
    for n in missing:
        for src in glob.glob(os.path.join(fb_src, "**", n), recursive=True):
            dst = os.path.join(fb_dir, n)
            if not os.path.lexists(dst):
                os.symlink(os.path.realpath(src), dst)
    env_info = gather_environment()
    # Lenient on purpose: any one sign of a GPU runs the GPU parts (a wrong "no" would waste the one run).
    signs = {"libcuda": bool(linked.get("libcuda.so")), "nvidia-smi": bool(env_info["gpu_name"]),
             "/dev/nvidiactl": os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))}
    gpu_reasons = [] if any(signs.values()) else [
        "no libcuda.so.1 (NVIDIA driver library) found", "nvidia-smi reports no GPU", "no /dev/nvidia* device"]
    gpu = not gpu_reasons
    env_info["gpu_signs"] = signs
    env_info.update({
        "gpu_present": gpu, "gpu_absent_reason": "; ".join(gpu_reasons) or None,
        "cuda_libs_found": found, "cuda_libs_linked": linked, "link_dir": link_dir,
        "cuda_include": cuda_inc, "nvidia_wheel_roots": nv_roots,
        "fallback_libs_used": missing, "py311": py311,
        "py311_ldd_missing": _sh(f"ldd {shlex.quote(py311)} | grep 'not found'") if os.path.exists(py311) else "absent",
    })
    env = build_env(prefix, site, repo, link_dir, real_dirs, cuda_inc, fb_dir if missing else None,
                    cache, gpu)
    env_info["theano_flags"] = env["THEANO_FLAGS"]
    env_info["ld_library_path"] = env["LD_LIBRARY_PATH"]
    env_info["python_path"] = env["PYTHONPATH"]
    machine_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    machine_env["PYTHONUNBUFFERED"] = "1"

    report = {"environment": env_info, "parts": [], "budget_s": a.budget,
              "mode": "gpu" if gpu else ("cpu-fallback" if a.cpu_fallback else "no-gpu")}
    print(f"[gpu_report] gpu={gpu} ({env_info['gpu_name'] or env_info['gpu_absent_reason']}); "
          f"linked {linked}; cuda.h in {cuda_inc}", flush=True)
    for spec in part_specs(os.environ):
        name = spec["name"]
        part = {"name": name, "command": spec["command"], "limit_s": spec["limit"]}
        report["parts"].append(part)
        if spec["disabled"]:
            part.update(status="skipped", reason="disabled (HPO_PARTS / empty command)")
            continue
        cmd = spec["command"]
        if spec["needs_gpu"] and not gpu:
            if not a.cpu_fallback:
                part.update(status="skipped", reason=f"no GPU: {env_info['gpu_absent_reason']}")
                continue
            cmd = cpu_fallback_command(cmd)
            part["command"] = cmd
            part["cpu_fallback"] = True
        remaining = deadline - time.time() - a.reserve
        timeout = min(spec["limit"], remaining)
        if timeout < a.min_part:
            part.update(status="skipped", reason=f"budget exhausted ({max(remaining, 0):.0f}s left)")
            continue
        words = shlex.split(cmd)
        if words and words[0] == "py311":
            argv, penv = [py311] + words[1:], env
        elif words and words[0] == "py3":
            argv, penv = ["python3"] + words[1:], machine_env
        elif words and words[0] == "py3+repo":  # machine python3 + pure-python wheels (autograd, tqdm) + repo
            argv, penv = ["python3"] + words[1:], dict(machine_env, PYTHONPATH=f"{work}/site3:{repo}")
        else:
            argv, penv = words, env
        print(f"[gpu_report] part {name} (limit {timeout:.0f}s): {cmd}", flush=True)
        res = run_part(argv, penv, timeout, os.path.join(out, f"{name}.log"), repo)
        part.update(res)
        print(f"[gpu_report]   -> {part['status']} in {part['seconds']:.0f}s: {summarize(part)}", flush=True)
    report["total_seconds"] = time.time() - t_start
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    n_files = sum(len(fs) for _, _, fs in os.walk(out))
    if n_files > MAX_OUT_FILES:
        merge_logs(out, [p["name"] for p in report["parts"]])
        n_files = sum(len(fs) for _, _, fs in os.walk(out))
    if n_files > MAX_OUT_FILES:
        print(f"[gpu_report] WARNING {n_files} files in {out} (only {MAX_OUT_FILES} come back)")
    print(format_table(report), flush=True)
    return 0


def merge_logs(out: str, names) -> None:
    """Put every part's log into one file, ``parts.log`` (in part order, each under a header),
    so that all logs come back when there are more parts than files that can."""
    with open(os.path.join(out, "parts.log"), "w") as dst:
        for name in names:
            path = os.path.join(out, f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as src:
                    dst.write(f"===== part {name} =====\n{src.read()}\n")
                os.remove(path)


def cmd_table(a) -> int:
    with open(a.json) as f:
        print(format_table(json.load(f)))
    return 0


# --------------------------------------------------------------------------- smoke test (bundled Python 3.11)
def cmd_smoke(a) -> int:
    """``smoke``: gpu_smoke.py beside this file (a module of its own, run by the bundled Python)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_smoke
    return gpu_smoke.cmd_smoke(a)


def cmd_unpack_deb(a) -> int:
    for deb in a.debs:
        extract_deb(deb, a.dest)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run all parts and write the report")
    r.add_argument("--work", required=True, help="folder where run_on_gpu.sh unpacked the bundle (py/, site/)")
    r.add_argument("--out", required=True, help="folder for gpu_report.json and the logs")
    r.add_argument("--repo", default=".", help="repository root (working directory of the parts)")
    r.add_argument("--budget", type=float, default=420.0, help="total seconds, counted from --start")
    r.add_argument("--start", type=float, default=None, help="epoch seconds when the whole run began")
    r.add_argument("--reserve", type=float, default=10.0, help="seconds kept back for the report")
    r.add_argument("--min-part", type=float, default=15.0, help="skip a part with less time than this")
    r.add_argument("--cpu-fallback", action="store_true",
                   help="without a GPU, run the GPU parts with --device cpu instead of skipping them")
    s = sub.add_parser("smoke", help="pygpu/Theano smoke test (bundled Python 3.11)")
    s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    s.add_argument("--batch", type=int, default=64)
    t = sub.add_parser("table", help="print the table of a gpu_report.json")
    t.add_argument("json")
    u = sub.add_parser("unpack-deb", help="dpkg -x DEB... DEST, for a machine without dpkg")
    u.add_argument("debs", nargs="+")
    u.add_argument("dest")
    a = ap.parse_args(argv)
    return {"run": cmd_run, "smoke": cmd_smoke, "table": cmd_table, "unpack-deb": cmd_unpack_deb}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
