"""Meta-optimisation on the Theano backend: the outer loop over hyperparameters
(docs/ALGORITHMS.md s.3), with DrMAD hypergradients from ``gpu_ver.drmad``.

Repeat: train (forward), DrMAD hypergradient of the validation loss, update the
free coordinates of the tuned groups (log L2 strengths, log learning rates,
logit momenta, log initial scales) with a meta-optimiser, record curves.

Meta-optimisers are (init, update) pairs of pure numpy functions (the same
rules as ``cpu_ver.meta``; gpu_ver does not import cpu_ver):

* SGD with momentum:  m = mu m + g;  x -= eta m
* Adam (Kingma & Ba 2015), textbook (momentum kept after step 0):
  m = b1 m + (1-b1) g;  s = b2 s + (1-b2) g^2;  x -= eta mhat / (sqrt(shat) + eps)
* sign-SGD (the DrMAD experiments): x -= eta sign(g)

``clip`` rescales the hypergradient to at most that Euclidean norm; ``clip_value``
clips every entry to [-c, c] (applied after the norm clip).

Compile once: the ``DrMAD`` engine (all Theano functions) is built before the
loop; a meta-iteration only copies the new hyperparameters to the device. The
loop writes ``checkpoint.npz`` after every meta-iteration; ``resume`` continues
bit for bit. A checkpoint records the model, the data and the settings that
decide the trajectory, and one written for anything else is refused
(ConfigError naming the differing entry).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from shared.cli import add_l2_on_argument, add_resume_argument, invocation, option_identity, parse_groups
from shared.errors import ConfigError, NonFiniteError
from shared import interrupt
from shared.meta_opt import OPTIMIZERS, checkpoint_arrays, make_optimizer
from shared.records import load_checkpoint, require_arrays, save_checkpoint

KIND = "gpu_ver.meta/1"


def clip(g: np.ndarray, max_norm=None, max_value=None) -> np.ndarray:
    """g * min(1, max_norm / ||g||), then entries clipped to [-max_value, max_value]."""
    if max_norm is not None:
        if not max_norm > 0:
            raise ConfigError(f"--clip must be positive, got {max_norm}")
        n = float(np.linalg.norm(g))
        if n > max_norm:
            g = g * (max_norm / n)
    if max_value is not None:
        if not max_value > 0:
            raise ConfigError(f"--clip-value must be positive, got {max_value}")
        g = np.clip(g, -max_value, max_value)
    return g


def identity(engine, config: dict) -> dict:
    """What a checkpoint must match to be resumed: model, layout, problem and settings
    (one key per option, so that a refusal names the option that differs)."""
    p = engine.problem
    lay = p.layout
    return {"kind": KIND, "model": p.model.describe(),
            "layout_sha256": hashlib.sha256(json.dumps(lay.to_json()).encode()).hexdigest()[:16],
            "problem": p.describe(), **option_identity(config)}


HISTORY_KEYS = ("train_loss", "val_loss", "val_error", "test_error", "hypergradient_norm")


def run(engine, hypers, *, n_meta: int, optimizer: str = "adam", meta_lr: float = 0.05, clip_norm=None,
        clip_value=None, checkpoint=None, resume: bool = False, config: dict = None, progress: bool = True,
        on_iter=None):
    """The meta-loop. Returns ``(final hypers, history)``; history has one entry per
    meta-iteration in ``HISTORY_KEYS`` (losses at the weights trained with that
    iteration's hyperparameters) and ``seconds`` (its duration, so that a resumed run's
    total counts the meta-iterations before the resume)."""
    if n_meta < 0:
        raise ConfigError(f"number of meta-iterations must be >= 0, got {n_meta}")
    if engine.velocity == "ignore":
        bad = [g for g in ("lr", "momentum") if g in hypers.tuned]
        if bad:
            raise ConfigError(f"DrMAD with velocity 'ignore' gives no hypergradient for {bad}; "
                              "tune l2/init_scale only or use velocity 'reconstruct'")
    opt = make_optimizer(optimizer, meta_lr)
    x = hypers.flatten()
    state = opt.init(x)
    history = {k: [] for k in (*HISTORY_KEYS, "seconds")}
    start = 0
    ident = identity(engine, config or {})
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise ConfigError(f"resume: no checkpoint at {checkpoint}")
        arrays, meta = load_checkpoint(checkpoint, expect=ident)
        require_arrays(checkpoint, arrays, ["hypers", *("hist_" + k for k in history)])
        x = arrays["hypers"]
        if x.shape != (hypers.size,):
            raise ConfigError(f"{checkpoint}: {x.shape[0]} tuned hyperparameters, this run has {hypers.size}")
        state = {k[len("opt_"):]: arrays[k] for k in arrays if k.startswith("opt_")}
        history = {k: [float(v) for v in arrays["hist_" + k]] for k in history}
        start = int(meta["meta_iter"])
        hypers = hypers.unflatten(x)
    from tqdm.auto import tqdm  # noqa: PLC0415

    p = engine.problem
    engine.f_eval            # compile the evaluation function now, never inside the loop

    def save(done):
        """The checkpoint after ``done`` meta-iterations (also the interrupted one's)."""
        if checkpoint is not None:
            save_checkpoint(checkpoint, checkpoint_arrays(x, state, history), {**ident, "meta_iter": done})

    kind = "exact" if getattr(engine, "K", None) is None else "drmad"
    bar = tqdm(range(start, n_meta), initial=start, total=n_meta, desc=f"meta ({kind})", disable=not progress)
    done = start
    with interrupt.checkpointed(lambda: save(done)):
        for i in bar:
            interrupt.check()                     # Ctrl-C takes effect here, between meta-iterations
            t_iter = time.perf_counter()
            res = engine.hypergradient(hypers)
            g = hypers.flatten_free_grads({k: v for k, v in res.grads.items() if k in hypers.tuned})
            if not np.all(np.isfinite(g)) or not np.isfinite(res.objective):
                raise NonFiniteError("hypergradient", f"{i} (meta-iteration)",
                                     f"validation loss {res.objective}; lower the learning rates or the meta step")
            val_err = res.info["val_error"] if "val_error" in res.info else engine.validation(False)[1]
            train_loss, _ = engine.evaluate(p.X_train, p.y_train)
            test_err = engine.evaluate(p.X_test, p.y_test)[1] if p.y_test is not None and len(p.y_test) else float("nan")
            gnorm = float(np.linalg.norm(g))
            for k, v in zip(HISTORY_KEYS, (train_loss, res.objective, val_err, test_err, gnorm)):
                history[k].append(float(v))
            x, state = opt.update(x, clip(g, clip_norm, clip_value), state)
            hypers = hypers.unflatten(x)
            history["seconds"].append(time.perf_counter() - t_iter)     # kept across a resume, unlike a clock
            bar.set_postfix(val=f"{res.objective:.4f}", gnorm=f"{gnorm:.3g}")
            done = i + 1
            save(done)
            if on_iter is not None:
                on_iter(i, hypers, history)
    bar.close()
    return hypers, history


def evaluate_hypers(engine, hypers) -> dict:
    """Train loss, validation loss and error, test error at the weights a training run with
    ``hypers`` reaches: the figures of the hyperparameters a run saves (its last update
    comes after the last hypergradient, so the history does not hold them)."""
    p = engine.problem
    engine.forward(hypers)
    val_loss, val_error = engine.validation(accumulate_grad=False)
    out = {"train_loss": engine.evaluate(p.X_train, p.y_train)[0], "val_loss": val_loss, "val_error": val_error}
    if p.y_test is not None and len(p.y_test):
        out["test_error"] = engine.evaluate(p.X_test, p.y_test)[1]
    return out


def plot_history(history: dict, path, title="meta-optimisation (DrMAD)") -> None:
    import sys  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from shared.records import save_figure  # noqa: PLC0415

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    it = np.arange(len(history["val_loss"]))
    a.plot(it, history["train_loss"], label="train")
    a.plot(it, history["val_loss"], label="validation")
    a.set(xlabel="meta-iteration", ylabel="cross-entropy", title=title)
    a.legend()
    b.semilogy(it, np.maximum(history["hypergradient_norm"], 1e-300))
    b.set(xlabel="meta-iteration", ylabel="|hypergradient| (free coordinates)")
    from shared.plotting import integer_axis  # noqa: PLC0415

    integer_axis(a), integer_axis(b)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- command line
# ``python -m gpu_ver drmad``. This module does not import Theano at the top, so the
# parser can be built before ``config.load`` applies --device/--floatX; ``run_drmad``
# imports ``gpu_ver.drmad`` (and with it Theano) lazily.

MLP_DATASETS = ("digits", "mnist", "mnist-t10k", "synthetic")
IMAGE_DATASETS = ("synthetic-images", "cifar10")


HVP_CHOICES, HVP_DEFAULT = ("ror", "rop"), "ror"   # gpu_ver.models.HVP_METHODS / DEFAULT_HVP (tested equal)


def add_hvp_argument(p):
    """``--hvp``: the reverse step's Hessian-vector product (``gpu_ver.models.symbolic_grad_and_hvp``)."""
    p.add_argument("--hvp", default=HVP_DEFAULT, metavar="ror|rop",
                   help="Hessian-vector product of the reverse step: ror (reverse over reverse, the default) or "
                        "rop (forward over reverse); equal to rounding")


def check_hvp_option(args) -> None:
    """ConfigError (one line, exit 2) for an ``--hvp`` that is not ror or rop."""
    if getattr(args, "hvp", HVP_DEFAULT) not in HVP_CHOICES:
        raise ConfigError(f"--hvp must be one of {', '.join(HVP_CHOICES)}, got {args.hvp!r}")


def add_problem_arguments(p, iters=100, batch=100):
    """Options shared by ``drmad`` (model, data, training, hyperparameters, DrMAD variant)."""
    p.add_argument("--model", default="mlp", choices=("mlp", "densenet"))
    p.add_argument("--dataset", default=None, choices=MLP_DATASETS + IMAGE_DATASETS,
                   help="default: digits for the MLP, synthetic-images for DenseNet")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST / CIFAR-10 files")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--layers", default=None, help="MLP sizes, e.g. 64,50,10 (default input,50,classes)")
    p.add_argument("--activation", default=None, choices=("tanh", "relu", "softplus"),
                   help="default tanh (MLP), relu (DenseNet)")
    p.add_argument("--depth", type=int, default=7, help="DenseNet depth 3n + 4")
    p.add_argument("--growth", type=int, default=4, help="DenseNet growth rate")
    p.add_argument("--image-size", type=int, default=8, help="synthetic-images: height = width")
    p.add_argument("--iters", type=int, default=iters, help="training steps T")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=0.3, help="initial learning rate (> 0)")
    p.add_argument("--momentum", type=float, default=0.9, help="initial momentum in (0, 1)")
    p.add_argument("--l2", type=float, default=1e-4, help="initial L2 strength (> 0)")
    p.add_argument("--l2-shape", default="unit", choices=("scalar", "block", "unit", "param"),
                   help="per-unit (default), per-layer/block, per-parameter or one strength")
    add_l2_on_argument(p.add_argument)
    p.add_argument("--lr-shape", default="scalar", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--momentum-shape", default="scalar", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--hypers", default="l2", help="tuned groups, comma-separated from l2,lr,momentum,init_scale")
    p.add_argument("--hypers-from", default=None, metavar="RUN_DIR|FILE",
                   help="start from the hyperparameters a run saved (RUN_DIR/hypers.json, or a hypers.npz/json "
                        "file); they replace --lr, --momentum, --l2 and the --*-shape options")
    p.add_argument("--K", type=int, default=1, help="checkpoint segments (1 = DrMAD, T = every step stored)")
    p.add_argument("--grid", default="t/T", choices=("t/T", "cumlr"))
    p.add_argument("--velocity", default="reconstruct", choices=("reconstruct", "ignore"))
    add_hvp_argument(p)
    p.add_argument("--val-chunk", type=int, default=1000,
                   help="validation split evaluated in near-equal chunks of at most this size")


def add_drmad_arguments(p):
    add_problem_arguments(p)
    p.add_argument("--method", default="drmad", choices=("drmad", "exact"),
                   help="hypergradient of each meta-iteration: DrMAD (--K/--grid/--velocity) or exact "
                        "reversible learning (gpu_ver.reversible)")
    p.add_argument("--meta-iters", type=int, default=0, help="meta-iterations (0: one hypergradient)")
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--meta-lr", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=None, help="clip the hypergradient to this norm")
    p.add_argument("--clip-value", type=float, default=None, help="clip each hypergradient entry to +-this")
    add_resume_argument(p.add_argument)
    p.add_argument("--memory-steps", default=None,
                   help="measure peak memory of DrMAD (K=1) for these T, e.g. 100,1000,10000, instead")
    p.add_argument("--no-progress", action="store_true")


add_drmad_args = add_drmad_arguments      # the registry's spelling (gpu_ver/__main__.py)


def build_problem(args):
    """(problem, hypers, data description) from parsed options; ConfigError for bad input."""
    check_hvp_option(args)
    from gpu_ver import drmad as D  # noqa: PLC0415 (loads Theano)
    from gpu_ver import models as M  # noqa: PLC0415
    from shared import datasets  # noqa: PLC0415
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    dataset = args.dataset or ("digits" if args.model == "mlp" else "synthetic-images")
    if args.model == "mlp" and dataset not in MLP_DATASETS:
        raise ConfigError(f"--dataset {dataset} needs --model densenet; the MLP takes {', '.join(MLP_DATASETS)}")
    if args.model == "densenet" and dataset not in IMAGE_DATASETS:
        raise ConfigError(f"--dataset {dataset} has no images; DenseNet takes {', '.join(IMAGE_DATASETS)}")
    if dataset == "synthetic-images":
        from gpu_ver.train import synthetic_images  # noqa: PLC0415

        data = synthetic_images(args.n_train or 256, 64 if args.n_val is None else args.n_val,
                                64 if args.n_test is None else args.n_test, size=args.image_size, seed=args.seed)
    else:
        data = datasets.load(dataset, args.data_dir, args.n_train, args.n_val, args.n_test, args.seed)
    act = args.activation or ("tanh" if args.model == "mlp" else "relu")
    if args.model == "mlp":
        sizes = parse_layers(args.layers) if args.layers else (data.n_features, 50, data.n_classes)
        model = M.MLP(sizes, act)
    else:
        model = M.DenseNet(args.depth, args.growth, n_classes=data.n_classes, input_shape=data.input_shape,
                           activation=act)
    if not 0 < args.momentum < 1:
        raise ConfigError(f"--momentum must lie in (0, 1), got {args.momentum}")
    if not (args.lr > 0 and args.l2 > 0):
        raise ConfigError(f"--lr and --l2 must be positive (they are tuned in log space), got {args.lr}, {args.l2}")
    groups = parse_groups(args.hypers, D.GROUPS)
    problem = D.Problem.from_dataset(model, data, n_iters=args.iters, batch_size=args.batch,
                                     batch_seed=args.seed, init_seed=args.seed, val_chunk=args.val_chunk)
    hypers = problem.hypers(lr=args.lr, momentum=args.momentum, l2=args.l2, groups=groups, l2_shape=args.l2_shape,
                            lr_shape=args.lr_shape, momentum_shape=args.momentum_shape, l2_on=args.l2_on)
    if args.hypers_from:
        from shared.hyperparams import load_for_run  # noqa: PLC0415

        hypers = load_for_run(args.hypers_from, problem.layout, args.iters, groups, l2_on=args.l2_on)
        D.check_shapes(*(hypers.group(g).shape for g in ("l2", "lr", "momentum")))
    return problem, hypers, data.describe()


def _argv(args) -> list:
    return invocation("gpu_ver", getattr(args, "_argv", sys.argv[1:]))


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}


def run_drmad(args) -> int:
    """``python -m gpu_ver drmad``: one DrMAD hypergradient, a meta-optimisation run, or
    (``--memory-steps``) the peak-memory measurement."""
    from shared import records  # noqa: PLC0415

    out = Path(args.out)          # resolved once by gpu_ver.__main__ (shared.cli.prepare_run_folder)
    if args.memory_steps:
        from gpu_ver import drmad as D  # noqa: PLC0415

        try:
            steps = [int(s) for s in str(args.memory_steps).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--memory-steps must be comma-separated integers, got {args.memory_steps!r}") from None
        t0 = time.perf_counter()
        rows = D.measure_memory(steps, layers=args.layers or "64,50,10", batch=args.batch, seed=args.seed,
                                progress=not args.no_progress)
        D.print_memory_table(rows)
        metrics = {"peak_memory_bytes": {str(r["T"]): r["maxrss_bytes"] for r in rows}, "rows": rows}
        records.write_results(out, _argv(args), _config(args), metrics, {"total_s": time.perf_counter() - t0})
        print(f"results: {out / records.RESULTS_FILE}")
        return 0
    t0 = time.perf_counter()
    problem, hypers, data_desc = build_problem(args)
    from gpu_ver import drmad as D  # noqa: PLC0415

    if getattr(args, "method", "drmad") == "exact":
        from gpu_ver import reversible as R  # noqa: PLC0415

        engine = R.Reversible(problem, hypers, hvp=args.hvp)
    else:
        engine = D.DrMAD(problem, hypers, K=args.K, grid=args.grid, velocity=args.velocity, hvp=args.hvp)
    timings = {"setup_s": time.perf_counter() - t0 - engine.compile_s, "compile_s": engine.compile_s}
    config = {**_config(args), "data": data_desc, "problem": problem.describe(), "floatX": D.floatX()}
    records.make_run_dir(out)
    if args.meta_iters == 0:
        t1 = time.perf_counter()
        res = engine.hypergradient(hypers, progress=not args.no_progress)
        timings["hypergradient_s"] = time.perf_counter() - t1
        timings.update({k: res.info[k] for k in ("forward_s", "reverse_s")})
        if "val_error" not in res.info:                     # the exact engine evaluates on request
            res.info["val_error"] = engine.validation(False)[1]
        grads = {k: v for k, v in res.grads.items() if k in hypers.tuned}
        free = hypers.chain(grads)
        metrics = {"val_loss": res.objective, "val_error": res.info["val_error"],
                   "hypergradient_norm": {k: float(np.linalg.norm(v)) for k, v in grads.items()},
                   "hypergradient_free_norm": {k: float(np.linalg.norm(v)) for k, v in free.items()},
                   "hypergradient": {k: v.tolist() for k, v in grads.items() if v.size <= 20000},
                   **({"K": res.info["K"], "shared_bytes": engine.shared_bytes()} if "K" in res.info else
                      {k: res.info[k] for k in ("reversal_max_abs_error", "buffer_bits", "information_floor_bits")})}
        np.savez(out / "hypergradient.npz", **{k: v for k, v in grads.items()}, grad_w0=res.grad_w0)
        print(f"validation loss {res.objective:.6f} (error {res.info['val_error']:.4f}); |hypergradient|: "
              + ", ".join(f"{k} {v:.3e}" for k, v in metrics["hypergradient_norm"].items()))
    else:
        ckpt = out / "checkpoint.npz"
        stable = {k: v for k, v in config.items()
                  if k not in ("resume", "no_progress", "out", "meta_iters", "overwrite")}
        t1 = time.perf_counter()
        with interrupt.resumable(interrupt.resume_argv(_argv(args), ["--resume"], out=out)):
            hypers, hist = run(engine, hypers, n_meta=args.meta_iters, optimizer=args.optimizer,
                               meta_lr=args.meta_lr, clip_norm=args.clip, clip_value=args.clip_value,
                               checkpoint=ckpt, resume=args.resume is not None, config=stable,
                               progress=not args.no_progress)
        timings["meta_s"] = float(sum(hist["seconds"]))      # every meta-iteration, also before a resume
        timings["this_process_meta_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        final = evaluate_hypers(engine, hypers)          # the saved hyperparameters, after the last update
        timings["final_s"] = time.perf_counter() - t1
        hypers.save(out / "hypers")
        if hist["val_loss"]:
            try:
                plot_history(hist, out / "learning_curves.png",
                             f"meta-optimisation ({'exact' if args.method == 'exact' else 'DrMAD'})")
            except ImportError:                      # e.g. a GPU machine without matplotlib
                print("matplotlib not installed: learning_curves.png skipped", file=sys.stderr)
            print(f"validation loss {hist['val_loss'][0]:.4f} -> {final['val_loss']:.4f} over "
                  f"{len(hist['val_loss'])} meta-iterations (the saved hyperparameters); test error "
                  f"{hist['test_error'][0]:.4f} -> {final.get('test_error', float('nan')):.4f}")
        metrics = {**hist, **{f"final_{k}": v for k, v in final.items()}, "learned": hypers.describe()}
    records.write_results(out, _argv(args), config, metrics, timings)
    print(f"results: {out / records.RESULTS_FILE}")
    return 0
