#!/usr/bin/env python3
"""Standalone PyTorch DenseNet-40 timing, the baseline beside benchmarks/densenet.py.

Runs with the GPU machine's own python3 (3.12 + PyTorch); PyTorch is never a
dependency of the project. DenseNet (Huang et al. 2017), CIFAR layout: 3x32x32
inputs, 10 classes, growth rate 12, three dense blocks of (depth-4)/3 layers
BN-ReLU-Conv3x3, transitions BN-ReLU-Conv1x1-AvgPool2, then BN-ReLU, global
average pooling and a linear layer; no bottleneck, no compression, no dropout.

Times one SGD training step (forward, cross-entropy, backward, update) on
random data in float32, batch 64 by default: median over ``--steps`` after
``--warmup`` steps, with CUDA synchronisation. Two settings: ``strict_fp32``
(TF32 off for matmuls and convolutions: what Theano's float32 kernels do) and
``default`` (PyTorch's defaults: TF32 convolutions, cudnn.benchmark off). Also
a Hessian-vector product (double backward), the core operation of DrMAD's
reverse pass. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def build(depth: int, growth: int = 12, classes: int = 10):
    import torch.nn as nn
    import torch

    if (depth - 4) % 3:
        raise SystemExit(f"depth must be 3n+4, got {depth}")
    n = (depth - 4) // 3

    class Layer(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.bn = nn.BatchNorm2d(cin)
            self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)

    layers, c = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
    for b in range(3):
        for _ in range(n):
            layers.append(Layer(c))
            c += growth
        if b < 2:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(2)]
    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def time_steps(fn, steps, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--depth", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-hvp", action="store_true")
    a = ap.parse_args(argv)
    res = {"framework": "pytorch", "depth": a.depth, "batch": a.batch, "dtype": "float32", "device": a.device}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        res.update(error=f"ImportError: {e}")
        print(json.dumps(res))
        print(f"ImportError: {e}", file=sys.stderr)
        return 1
    res["torch"] = torch.__version__
    if a.device == "cuda" and not torch.cuda.is_available():
        res.update(error="RuntimeError: torch.cuda.is_available() is False")
        print(json.dumps(res))
        return 1
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.device == "cuda":
        res["devname"] = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    model = build(a.depth).to(dev)
    res["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    settings = {"strict_fp32": False, "default": None}
    for name, tf32 in settings.items():
        if a.device == "cuda":
            if tf32 is None:
                torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's defaults
                torch.backends.cudnn.allow_tf32 = True
            else:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
        med, best = time_steps(step, a.steps, a.warmup, sync)
        res[f"step_ms_{name}"] = round(med * 1e3, 3)
        res[f"images_per_s_{name}"] = round(a.batch / med, 1)
        print(f"{name}: step {med * 1e3:.2f} ms (best {best * 1e3:.2f}), {a.batch / med:.0f} images/s", flush=True)
    res["images_per_s"] = res["images_per_s_strict_fp32"]
    res["step_ms"] = res["step_ms_strict_fp32"]
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if not a.no_hvp:
        try:
            params = [p for p in model.parameters()]
            v = [torch.randn_like(p) for p in params]

            def hvp():
                loss = F.cross_entropy(model(x), y)
                g = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
                return torch.autograd.grad(dot, params)

            med, _ = time_steps(hvp, max(5, a.steps // 3), 2, sync)
            res["hvp_ms"] = round(med * 1e3, 3)
            print(f"hvp: {med * 1e3:.2f} ms", flush=True)
        except Exception as e:  # report, don't fail the throughput figure
            res["hvp_error"] = f"{type(e).__name__}: {e}"
    if a.device == "cuda":
        res["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
