"""An interrupted ``gpu_ver drmad`` (meta loop) / ``gpu_ver adaptive`` resumes to the
uninterrupted result bit for bit, wherever SIGINT lands (shared/interrupt.py). ``train``'s
chain is in test_gpu_interrupt.py (a file each, so that two test workers share them)."""
import interrupt_runs as IR
from shared import interrupt
from shared.online_cli import CHECKPOINTS


DRMAD = ["gpu_ver", "drmad", "--model", "mlp", "--dataset", "digits", "--n-train", "200", "--n-val", "100",
         "--n-test", "100", "--layers", "64,16,10", "--iters", "20", "--batch", "50", "--meta-iters", "12"]


def test_drmad_meta_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    IR.chain_equals_reference(tmp_path, DRMAD, lambda a: interrupt.resume_argv(a, ["--resume"], out=IR.option_value(a, "--out")),
                            lambda a: IR.checkpointed_steps(IR.option_value(a, "--out"), ["checkpoint.npz"]),
                            lambda a: IR.option_value(a, "--out"), 12, drop=("seconds",))


ADAPTIVE = ["gpu_ver", "adaptive", "--model", "mlp", "--layers", "16", "--n-train", "200", "--n-val", "60",
            "--n-test", "60", "--steps", "150", "--batch", "20", "--eval-every", "25", "--eval-train-n", "100",
            "--method", "idbd", "--lr", "0.05"]


def test_adaptive_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    def folder(a):
        return IR.option_value(a, "--resume") if "--resume" in a else IR.option_value(a, "--out")

    IR.chain_equals_reference(tmp_path, ADAPTIVE, lambda a: interrupt.resume_argv(a, ["--resume", folder(a)]),
                            lambda a: IR.checkpointed_steps(folder(a), CHECKPOINTS.values()), folder, 300)
