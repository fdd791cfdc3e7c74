"""An interrupted ``gpu_ver train`` / ``drmad`` / ``adaptive`` resumes to the uninterrupted
result bit for bit, wherever SIGINT lands (shared/interrupt.py: only between two steps).

Before that, SIGINT after a compiled step had updated the shared variables but before the
loop counted it left a checkpoint of step t holding the weights after t + 1, so the step
was applied twice on resume; SIGINT inside a numba op ended ``train`` with a SystemError."""
from pathlib import Path

import interrupt_runs as IR
from shared import interrupt
from shared.online import CHECKPOINTS


def _value(argv, opt):
    i = argv.index(opt)
    return Path(argv[i + 1]) if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None


def _chain_equals_reference(tmp_path, argv, resume_of, progress_of, final_dir, total, drop=()):
    ref = tmp_path / "ref"
    step_s, _ = IR.run([*argv, "--out", str(ref)], tmp_path)
    log, last, problems = IR.chain([*argv, "--out", str(tmp_path / "cut")], resume_of, progress_of, total,
                                   tmp_path, step_s, n=5, seed=total)
    IR.assert_same(final_dir(last), ref, drop)
    assert not problems, problems
    IR.assert_all_mid_run(log, total, n=5)


TRAIN = ["gpu_ver", "train", "--dataset", "synthetic", "--depth", "7", "--growth", "3", "--image-size", "8",
         "--n-train", "96", "--n-val", "32", "--n-test", "32", "--batch", "16", "--epochs", "8",
         "--eval-batch", "64", "--seed", "5"]


def test_train_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    def resume_of(a):                    # a new folder: train never writes into the one it resumes
        out = _value(a, "--out")
        return interrupt.resume_argv(a, ["--resume", out], out=f"{out}-resumed")

    def progress_of(a):
        src = _value(a, "--resume") if "--resume" in a else None
        return 0 if src is None else IR.checkpointed_steps(src, ["checkpoint.npz"])

    _chain_equals_reference(tmp_path, TRAIN, resume_of, progress_of, lambda a: _value(a, "--out"), 48,
                            drop=("checkpoint",))


DRMAD = ["gpu_ver", "drmad", "--model", "mlp", "--dataset", "digits", "--n-train", "200", "--n-val", "100",
         "--n-test", "100", "--layers", "64,16,10", "--iters", "20", "--batch", "50", "--meta-iters", "12"]


def test_drmad_meta_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    _chain_equals_reference(tmp_path, DRMAD, lambda a: interrupt.resume_argv(a, ["--resume"], out=_value(a, "--out")),
                            lambda a: IR.checkpointed_steps(_value(a, "--out"), ["checkpoint.npz"]),
                            lambda a: _value(a, "--out"), 12)


ADAPTIVE = ["gpu_ver", "adaptive", "--model", "mlp", "--layers", "16", "--n-train", "200", "--n-val", "60",
            "--n-test", "60", "--steps", "150", "--batch", "20", "--eval-every", "25", "--eval-train-n", "100",
            "--method", "idbd", "--lr", "0.05"]


def test_adaptive_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    def folder(a):
        return _value(a, "--resume") if "--resume" in a else _value(a, "--out")

    _chain_equals_reference(tmp_path, ADAPTIVE, lambda a: interrupt.resume_argv(a, ["--resume", folder(a)]),
                            lambda a: IR.checkpointed_steps(folder(a), CHECKPOINTS.values()), folder, 300)
