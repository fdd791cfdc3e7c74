"""``python -m gpu_ver crosscheck``: ``gpu_ver.crosscheck`` (the same MLP problem through
both backends), its table and ``results.json``; exit status 1 if a figure misses its target.
"""
from __future__ import annotations

from shared.cli import config_of, record_argv


def add_crosscheck_arguments(p):
    p.add_argument("--iters", type=int, default=30, help="training steps T")
    p.add_argument("--layers", default="64,20,10", help="MLP sizes (digits: 64 inputs, 10 classes)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "softplus"))
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--dataset", default="digits", choices=("digits", "synthetic"),
                   help="digits (scikit-learn) or synthetic Gaussian clusters (no scikit-learn needed)")
    p.add_argument("--no-adaptive", action="store_true", help="skip gpu_ver.online.crosscheck_adaptive")


def run_crosscheck(args) -> int:
    from gpu_ver.crosscheck import crosscheck, print_table, verdict  # noqa: PLC0415 (imports cpu_ver lazily)
    from shared import records  # noqa: PLC0415
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    layers = parse_layers(args.layers)
    metrics, timings = crosscheck(args.seed, args.iters, layers, args.activation, args.batch,
                                  adaptive=not args.no_adaptive, dataset=args.dataset)
    print_table(metrics)
    out = args.out or records.default_run_dir("crosscheck")
    records.write_results(out, record_argv("gpu_ver", args), {**config_of(args), "floatX": metrics["dtype"]},
                          metrics, timings)
    print(f"results: {out}/{records.RESULTS_FILE}")
    return 0 if all(ok for *_, ok in verdict(metrics)) else 1
