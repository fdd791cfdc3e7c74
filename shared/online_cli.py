"""Helpers of the ``adaptive`` commands of both backends (``cpu_ver.cli.adaptive``,
``gpu_ver.cli.adaptive``): method options from the command line, the run folder and its
checkpoints, ``--hypers-from`` starting values, and the reported metrics.
"""
from __future__ import annotations

import numpy as np

from shared.cli import add_l2_on_argument, add_resume_argument, option_identity, prepare_run_folder
from shared.errors import ConfigError
from shared.online_spec import GRANULARITIES


def method_kwargs(args) -> dict:
    """Constructor options of ``args.method`` from the ``adaptive`` command-line options
    (the same options in both backends)."""
    m = args.method
    if m in ("hd", "sgdn-hd", "adam-hd"):
        return dict(lr=args.lr, beta=args.beta, granularity=args.granularity, log_space=args.log_space,
                    momentum=args.momentum, l2=args.l2, clip=args.clip)
    if m == "almeida":
        return dict(lr=args.lr, beta=args.beta, l2=args.l2, clip=args.clip)
    if m == "idbd":
        return dict(lr=args.lr, theta=args.theta, trace_decay=1.0 if args.trace_decay is None else args.trace_decay,
                    curvature=args.curvature, l2=args.l2, clip=args.clip)
    if m == "smd":
        return dict(lr=args.lr, mu=args.mu, lam=0.99 if args.trace_decay is None else args.trace_decay,
                    l2=args.l2, clip=args.clip)
    common = dict(l2_init=args.l2_init, l2_groups=args.l2_groups, meta_lr=args.meta_lr,
                  every=args.hyper_every, at=args.hyper_at, clip=args.clip, meta_opt=args.meta_opt,
                  l2_on=l2_coverage(args))
    if m == "t1t2":
        return dict(lr=args.lr, **common)
    return dict(lr=args.lr, beta=args.beta, lr_granularity="param", **common)


def l2_coverage(args) -> str:
    """The run's ``--l2-on`` (``all`` for arguments built without it)."""
    return getattr(args, "l2_on", "all")


def covered_l2(kw: dict, args, layout) -> dict:
    """``kw`` with its fixed ``l2`` (the learning-rate methods and the baselines) set to 0 on the
    parameters that ``--l2-on`` leaves out (``shared.coverage.apply``); T1-T2 and combined
    take ``l2_on`` themselves."""
    from shared.coverage import apply  # noqa: PLC0415

    if "l2" in kw and l2_coverage(args) != "all":
        kw = dict(kw, l2=apply(kw["l2"], layout, l2_coverage(args)))
    return kw


# ---------------------------------------------------------------------------
# Checkpoints of the ``adaptive`` commands (both backends)

CHECKPOINTS = {"adaptive": "checkpoint-adaptive.npz", "baseline": "checkpoint-baseline.npz"}
# Options that do not change what a run computes (a resumed run may change them).
RUN_ONLY = ("out", "resume", "overwrite", "stop_after", "checkpoint_every", "progress", "device", "command")


def run_identity(args, kind: str, **described) -> dict:
    """What a checkpoint must match to be resumed: ``kind``, every option of ``args`` that
    changes the run (all but ``RUN_ONLY``), and ``described`` (model, data, floatX ...)."""
    opts = option_identity({k: v for k, v in vars(args).items()
                            if k not in RUN_ONLY and not k.startswith("_") and not callable(v)})
    return {"kind": kind, **opts, **described}   # one key per option: a refusal names it


def check_checkpoint_options(args) -> None:
    if args.checkpoint_every < 0 or (args.stop_after is not None and args.stop_after < 0):
        raise ConfigError("--checkpoint-every and --stop-after must be >= 0")


def resolve_run_dir(args):
    """The run folder, made: ``--resume``'s (which must hold the adaptive run's checkpoint),
    or ``--out`` (default runs/adaptive-<time>), which must not hold another run
    (``shared.cli.prepare_run_folder``; the command line has resolved it already, and
    resolving again gives the same folder)."""
    from shared.records import make_run_dir

    return make_run_dir(prepare_run_folder(args, "adaptive", CHECKPOINTS["adaptive"]))


def resume_command(prog: str, args, run_dir):
    """The command that continues the adaptive run in ``run_dir`` after an interruption:
    the one that was run (``prog`` plus ``args._argv``, which the command-line entries
    set) with ``--resume run_dir``; None for arguments built in code (no command line)."""
    from shared.interrupt import resume_argv

    argv = getattr(args, "_argv", None)
    return None if argv is None else resume_argv([*prog.split(), *argv], ["--resume", run_dir])


def add_method_arguments(a) -> None:
    """The online methods' own options, the same in both backends' ``adaptive`` commands
    (``a`` is a parser's ``add_argument``); what each option means for each method is in
    ``shared.online_spec``."""
    a("--beta", type=float, default=1e-3, help="hypergradient step for hd/sgdn-hd/adam-hd/almeida/combined "
                                               "(default 1e-3; log space and combined follow alpha dL/dalpha, "
                                               "so use a larger beta there)")
    a("--granularity", default="global", choices=GRANULARITIES,
      help="learning rates per global|block|unit|param (HD methods; default global)")
    a("--log-space", action="store_true", help="HD: adapt log alpha instead of alpha")
    a("--momentum", type=float, default=0.9, help="momentum for sgdn-hd and its baseline (default 0.9)")
    a("--l2", type=float, default=0.0, help="fixed L2 strength for the learning-rate methods (default 0)")
    a("--theta", type=float, default=1.0, help="IDBD meta step size (default 1)")
    a("--mu", type=float, default=10.0, help="SMD meta step size (default 10)")
    a("--trace-decay", type=float, default=None,
      help="IDBD trace decay (default 1) / SMD lambda (default 0.99), in [0, 1]")
    a("--curvature", default="diag", choices=("diag", "hvp"), help="IDBD trace: diagonal approximation or HVP")
    a("--l2-init", type=float, default=1e-4, help="T1-T2 initial L2 strength (default 1e-4)")
    a("--l2-groups", default="block", choices=GRANULARITIES, help="T1-T2 L2 strengths per ... (default block)")
    add_l2_on_argument(a)
    a("--meta-lr", type=float, default=2e-2, help="T1-T2 meta step (Adam on log L2; default 2e-2)")
    a("--meta-opt", default="adam", choices=("adam", "sgd"), help="T1-T2 meta optimiser (default adam)")
    a("--hyper-every", type=int, default=1, help="T1-T2: one hyper step every N weight steps (default 1)")
    a("--hyper-at", default="next", choices=("next", "current"),
      help="T1-T2: validation gradient at w_t+1 (exact) or w_t (original)")
    a("--clip", type=float, default=None, help="clip hypergradients elementwise to +-CLIP (default off)")
    a("--eval-every", type=int, default=10, help="log curves every N steps (default 10)")


def add_run_arguments(parser) -> None:
    """The adaptive commands' run options, the same in both backends: ``--overwrite`` and
    ``--hypers-from`` (each unless the parser has it already) and the checkpoint options."""
    from shared.cli import add_overwrite_argument  # noqa: PLC0415

    a, have = parser.add_argument, parser._option_string_actions
    if "--overwrite" not in have:
        add_overwrite_argument(a)
    if "--hypers-from" not in have:
        a("--hypers-from", default=None, metavar="RUN_DIR|FILE",
          help="start from the learning rate and L2 (at step 0) that a run saved (RUN_DIR/hypers.json, or a "
               "hypers.npz/json file) for this layout and --steps")
    add_checkpoint_arguments(a)


def add_checkpoint_arguments(add) -> None:
    """``--checkpoint-every``, ``--resume``, ``--stop-after`` (``add``: a parser's add_argument)."""
    add("--checkpoint-every", type=int, default=0,
        help="steps between checkpoints (default 0: at the end of each run and when interrupted)")
    add_resume_argument(add)
    add("--stop-after", type=int, default=None,
        help="stop once this many steps are done, counting the adaptive run's then the baseline's "
             "(leaves checkpoints to --resume from)")


def stop_for_baseline(stop_after, steps):
    """The baseline run's ``stop_after`` given the command's (None: run it whole)."""
    return None if stop_after is None else stop_after - steps


# ---------------------------------------------------------------------------
# ``--hypers-from`` for the ``adaptive`` commands (both backends)

def _per_param_lr(method: str, granularity: str) -> bool:
    """Whether ``method`` starts from one learning rate per parameter (else from one value)."""
    return method in ("idbd", "smd", "combined") or (method in ("hd", "sgdn-hd", "adam-hd")
                                                      and granularity == "param")


def start_from_hypers(args, layout) -> dict:
    """The starting learning rate and L2 that ``--hypers-from`` gives ``args.method``:
    constructor keywords (``lr``, and ``l2`` or ``l2_init``) that replace those of
    ``method_kwargs(args)``; ``{}`` without ``--hypers-from``.

    The saved file must be for this layout and ``--steps`` training steps
    (``shared.hyperparams.load_for_run``). A method starts from its hyperparameters'
    values at step 0, expanded to one value per parameter; a value the same for every
    parameter is passed as a scalar, otherwise the method must take one per parameter
    (``--granularity param`` for HD, IDBD, SMD, combined; ``--l2-groups param`` for
    T1-T2's L2), or the file is refused, naming the group."""
    source = getattr(args, "hypers_from", None)
    if not source:
        return {}
    from shared.coverage import mask as coverage_mask
    from shared.hyperparams import load_for_run

    h = load_for_run(source, layout, args.steps, steps_option="--steps", l2_on=l2_coverage(args))
    m = args.method
    out = {}
    for name in ("lr", "l2"):
        if name not in h:
            continue
        a = h.with_cover({}).per_param(name, 0)       # values also where the coverage sets 0 (unused)
        cmask = coverage_mask(layout, h.coverage(name))
        cov = np.ones(a.size, bool) if cmask is None else cmask > 0
        first = a[cov][0] if np.any(cov) else (a[0] if a.size else 0.0)
        if a.size and np.all(a[cov] == first):
            out[name] = float(first)              # one value on the covered parameters
            continue
        if name == "lr":
            takes = _per_param_lr(m, getattr(args, "granularity", "global"))
            how = "--granularity param" if m in ("hd", "sgdn-hd", "adam-hd") else "a method with per-parameter rates"
        else:
            takes = m not in ("t1t2", "combined") or args.l2_groups == "param"
            how = "--l2-groups param"
        if not takes:
            raise ConfigError(f"--hypers-from {source}: its {name!r} differs between parameters at step 0 "
                              f"(shape {h.group(name).shape!r}); {m} with these options starts from one value "
                              f"(use {how})")
        out[name] = a
    if "l2" in out and m in ("t1t2", "combined"):
        out["l2_init"] = out.pop("l2")
    return out


def jsonable_start(start: dict) -> dict:
    """``start_from_hypers``'s values for results.json (lists for arrays)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in start.items()}


def kwargs_from_start(args, start: dict, layout=None) -> dict:
    """``method_kwargs(args)`` with the starting values ``start_from_hypers`` found, and a fixed
    L2 covering what ``--l2-on`` says (``covered_l2``; needs ``layout``)."""
    kw = method_kwargs(args)
    kw.update({k: v for k, v in start.items() if k in kw})
    return kw if layout is None else covered_l2(kw, args, layout)


def baseline_kwargs(args, start=None, layout=None) -> dict:
    """Options of the plain optimiser run beside ``args.method``: the same starting learning
    rate (when it is one value) and L2 as the adaptive run, on the parameters ``--l2-on``
    covers (``covered_l2``; needs ``layout``)."""
    start = start or {}
    l2 = args.l2_init if args.method in ("t1t2", "combined") else args.l2
    l2 = start.get("l2_init", start.get("l2", l2))
    lr = start["lr"] if np.ndim(start.get("lr", 0.0)) == 0 and "lr" in start else args.lr
    kw = dict(lr=lr, l2=l2, momentum=args.momentum)
    return kw if layout is None else covered_l2(kw, args, layout)


def final_metrics(res: dict, test_loss, test_error, has_test: bool) -> dict:
    """The metrics both ``adaptive`` commands report for a finished run (the adaptive one or
    its baseline): ``final_train_loss``, ``final_val_loss``, ``final_val_error`` (last logged
    step) and ``test_loss``, ``test_error`` (None without a test split)."""
    return dict(final_train_loss=res["train_loss"][-1], final_val_loss=res["val_loss"][-1],
                final_val_error=res["val_error"][-1], test_loss=test_loss if has_test else None,
                test_error=test_error if has_test else None)


def baseline_metrics(base: dict, optimizer: str, test_loss, test_error, has_test: bool, adaptive: dict) -> dict:
    """``metrics`` entries for the plain optimiser run beside an adaptive one: ``baseline``
    (its curves, ``optimizer`` and ``final_metrics``) and ``val_loss_adaptive_minus_baseline``."""
    b = dict(base, optimizer=optimizer, **final_metrics(base, test_loss, test_error, has_test))
    return {"baseline": b, "val_loss_adaptive_minus_baseline": adaptive["final_val_loss"] - b["final_val_loss"]}
