"""Backend-neutral pieces of the online (adaptive) hyperparameter methods.

Both ``cpu_ver.adaptive`` (autograd/numpy) and ``gpu_ver.adaptive`` (Theano) implement
the same methods under the same names; what does not depend on the backend lives here:
the method and granularity names, the option checks (clear ``ConfigError`` messages),
the deterministic float64 check problem and its configurations (the numbers both
backends must reproduce to 1e-10), and the finite-difference check of a one-step
hypergradient (``shared.fdcheck``'s fourth-order stencil along directions).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from shared.cli import add_resume_argument, option_identity, prepare_run_folder
from shared.errors import ConfigError
from shared.fdcheck import directional_fd
from shared.mlp_spec import MLPSpec

METHOD_NAMES = ("hd", "sgdn-hd", "adam-hd", "almeida", "idbd", "smd", "t1t2", "combined")
PLAIN_NAMES = ("sgd", "sgdn", "adam")
GRANULARITIES = ("global", "block", "unit", "param")
BASELINE_OF = {"sgdn-hd": "sgdn", "adam-hd": "adam"}   # the plain optimiser each method is compared with
GRANULARITY_ALIASES = {"layer": "block", "per-layer": "block", "per-block": "block",
                        "per-unit": "unit", "per-param": "param", "parameter": "param", "scalar": "global"}


def check_meta_step(name, value):
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"meta step size {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name, value):
    if not np.all(np.isfinite(value)) or np.any(np.asarray(value) <= 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    return value


def check_decay(name, value):
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"trace decay {name} must be in [0, 1], got {value!r}")
    return float(value)


def check_clip(clip):
    if clip is None:
        return None
    if not np.isfinite(clip) or clip <= 0:
        raise ConfigError(f"hypergradient clip must be > 0 (or None for no clipping), got {clip!r}")
    return float(clip)


def check_l2(l2, n):
    a = np.asarray(l2, dtype=float)
    if a.ndim == 0:
        if not np.isfinite(a) or a < 0:
            raise ConfigError(f"l2 must be finite and >= 0, got {l2!r}")
        return float(a)
    if a.shape != (n,) or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ConfigError(f"l2 must be a number or a per-parameter array of length {n}, finite and >= 0")
    return a


class OneStep(NamedTuple):
    """``value``: analytic d loss / d hyper at ``hyper``; ``loss(hyper)``: the loss after the step."""
    value: np.ndarray
    hyper: np.ndarray
    loss: Callable


def fd_directional(loss, hyper, d, h):
    """Central finite difference of loss(hyper + eps d) at eps = 0 (fourth order)."""
    return directional_fd(lambda s: loss(hyper + s * d), h)


def fd_check(onestep: OneStep, seed=0, n_random=3, rel_step=1e-3) -> float:
    """Max relative error of ``value . d`` against central FD over directions d.

    Directions: every coordinate when there are at most 12 hyperparameters,
    else ``n_random`` seeded Gaussian directions and the all-ones direction.
    """
    m = onestep.hyper.size
    if m <= 12:
        dirs = list(np.eye(m))
    else:
        rng = np.random.default_rng([seed, m])
        dirs = [rng.standard_normal(m) for _ in range(n_random)] + [np.ones(m)]
    h = rel_step * max(float(np.sqrt(np.mean(onestep.hyper ** 2))), 1e-2)
    worst = 0.0
    for d in dirs:
        a = float(np.dot(onestep.value, d))
        fd = fd_directional(onestep.loss, onestep.hyper, d, h)
        worst = max(worst, abs(a - fd) / max(abs(a), abs(fd), 1e-300))
    return worst


class CheckProblem(NamedTuple):
    """A small float64 problem built from a seed with numpy alone.

    sizes/activation: the MLP; X, y (train) and Xv, yv (validation); w0;
    batches: list of index arrays into the training set (step t uses batches[t]);
    val_batches: index arrays into the validation set; l2: per-parameter L2.
    """
    sizes: tuple
    activation: str
    X: np.ndarray
    y: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    w0: np.ndarray
    batches: list
    val_batches: list
    l2: np.ndarray


def check_batch(p: CheckProblem, t) -> tuple:
    """(X, y) of training minibatch t of the check problem."""
    i = p.batches[t]
    return p.X[i], p.y[i]


def check_val_batch(p: CheckProblem, t) -> tuple:
    """(Xv, yv) of validation minibatch t of the check problem (T1-T2's C2 batch)."""
    i = p.val_batches[t]
    return p.Xv[i], p.yv[i]


CHECK_WARMUP = 3


def build_check_problem(seed=0, sizes=(5, 4, 3), activation="tanh", n_train=30, n_val=20, batch=10,
                        n_steps=CHECK_WARMUP + 4) -> CheckProblem:
    """Data from a random linear teacher, w0 = MLPSpec.init(seed), fixed batch indices."""
    rng = np.random.default_rng([seed, 7])
    d, k = sizes[0], sizes[-1]
    teacher = rng.standard_normal((d, k))
    X = rng.standard_normal((n_train + n_val, d))
    y = np.argmax(X @ teacher + 0.5 * rng.standard_normal((n_train + n_val, k)), axis=1).astype(np.int64)
    spec = MLPSpec(tuple(sizes), activation)
    w0 = spec.init(seed)
    batches = [np.sort(rng.permutation(n_train)[:batch]) for _ in range(n_steps)]
    val_batches = [np.sort(rng.permutation(n_val)[:batch]) for _ in range(n_steps)]
    l2 = 1e-2 * np.exp(0.3 * rng.standard_normal(spec.layout.size))
    return CheckProblem(tuple(sizes), activation, X[:n_train], y[:n_train], X[n_train:], y[n_train:],
                        w0, batches, val_batches, l2)


# name -> (method, options). lr values are initial rates; warm-up steps make
# momentum, Adam moments, traces and previous directions non-trivial.
CHECK_CONFIGS = {
    "hd": ("hd", dict(lr=0.2, beta=0.05, granularity="global")),
    "hd-block-log": ("hd", dict(lr=0.2, beta=0.3, granularity="block", log_space=True)),
    "hd-unit": ("hd", dict(lr=0.2, beta=0.05, granularity="unit")),
    "hd-param-log": ("hd", dict(lr=0.2, beta=0.3, granularity="param", log_space=True)),
    "sgdn-hd": ("sgdn-hd", dict(lr=0.1, beta=0.05, granularity="block", momentum=0.9)),
    "adam-hd": ("adam-hd", dict(lr=0.02, beta=1e-3, granularity="global")),
    "almeida": ("almeida", dict(lr=0.2, beta=0.05, gamma=0.9)),
    "idbd": ("idbd", dict(lr=0.2, theta=0.1, trace_decay=0.9)),
    "idbd-hvp": ("idbd", dict(lr=0.2, theta=0.1, trace_decay=0.9, curvature="hvp")),
    "smd": ("smd", dict(lr=0.2, mu=0.1, lam=0.9)),
    "t1t2-block": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="block", meta_lr=0.1, every=1)),
    "t1t2-unit": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="unit", meta_lr=0.1, every=1)),
    "t1t2-param": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="param", meta_lr=0.1, every=1)),
    # --l2-on weights: the bias blocks' strengths get hypergradient 0 (block) or only the
    # weight columns' part (unit groups join a column and its bias)
    "t1t2-block-weights": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="block", meta_lr=0.1, every=1,
                                        l2_on="weights")),
    "t1t2-unit-weights": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="unit", meta_lr=0.1, every=1,
                                       l2_on="weights")),
    "combined": ("combined", dict(lr=0.2, beta=0.3, l2_init=1e-2, meta_lr=0.1, every=1)),
}
TRACE_HORIZON = 3
TRACE_NAMES = (f"smd-trace{TRACE_HORIZON}", f"idbd-hvp-trace{TRACE_HORIZON}")


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


def check_validation_split(method_name: str, needs_val: bool, n_val: int) -> None:
    """ConfigError when a method that learns from held-out data (T1-T2, combined) has none."""
    if needs_val and n_val == 0:
        raise ConfigError(f"{method_name}: the validation split is empty; T1-T2 needs held-out data (--n-val)")


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


def restore_curves(resume, steps, curves: dict, hyp: dict, record_hypers: bool) -> int:
    """Fill ``curves`` (and ``hyp``) in place from a checkpoint ``resume = (arrays, meta)``
    written with ``curve_arrays``; return the step it holds (ConfigError outside 0..steps)."""
    arrays, meta = resume
    start = int(meta["step"])
    if not 0 <= start <= steps:
        raise ConfigError(f"checkpoint step {start} is outside 0..{steps}")
    for k in curves:
        curves[k] = arrays[f"curve/{k}"].tolist()
    if record_hypers:
        for k in hyp:
            hyp[k] = arrays[f"hyp/{k}"].tolist()
    return start


def curve_arrays(curves: dict, hyp: dict, record_hypers: bool) -> dict:
    """The curves (and hyperparameter quantiles) as arrays for a checkpoint: the step
    numbers as integers (so that a resumed run writes them as an uninterrupted one
    does), everything else as floats."""
    out = {f"curve/{k}": np.asarray(v, np.int64 if k == "step" else float) for k, v in curves.items()}
    if record_hypers:
        out.update({f"hyp/{k}": np.asarray(v, float) for k, v in hyp.items()})
    return out


def spent_before(resume) -> float:
    """Seconds a resumed run spent before its checkpoint (0 for a new run): the
    checkpoints of ``train_online`` record ``spent_s`` so that a resumed run's
    timings count the whole run."""
    return 0.0 if resume is None else float(resume[1].get("spent_s", 0.0))


def record_due(t, eval_every, steps) -> bool:
    """Whether the curves are recorded after t steps: at 0, every ``eval_every``, at the end."""
    return t == 0 or t % eval_every == 0 or t == steps


# ---------------------------------------------------------------------------
# ``--hypers-from`` for the ``adaptive`` commands (both backends)

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def block_quantiles(layout, values, quantiles=QUANTILES) -> list:
    """Per block, the quantiles of per-parameter ``values`` (a number gives the same row
    for every block): a list (blocks) of lists (quantiles)."""
    if np.ndim(values) == 0:
        return [[float(values)] * len(quantiles) for _ in layout.names]
    v = np.asarray(values)
    return [np.quantile(v[layout.slice(b)], quantiles).tolist() for b in range(layout.n_blocks)]


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
