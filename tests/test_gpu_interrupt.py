"""An interrupted ``gpu_ver train`` resumes to the uninterrupted result bit for bit, wherever
SIGINT lands (shared/interrupt.py: only between two steps). ``drmad`` and ``adaptive``:
test_gpu_interrupt_online.py.

Before that, SIGINT after a compiled step had updated the shared variables but before the
loop counted it left a checkpoint of step t holding the weights after t + 1, so the step
was applied twice on resume; SIGINT inside a numba op ended ``train`` with a SystemError."""
import interrupt_runs as IR
from shared import interrupt


TRAIN = ["gpu_ver", "train", "--dataset", "synthetic-images", "--depth", "7", "--growth", "3", "--image-size", "8",
         "--n-train", "96", "--n-val", "32", "--n-test", "32", "--batch", "16", "--epochs", "8",
         "--eval-batch", "64", "--seed", "5"]


def test_train_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    def resume_of(a):                    # a run resumes in its own folder (every command alike)
        return interrupt.resume_argv(a, ["--resume"], out=IR.option_value(a, "--out"))

    def progress_of(a):
        return IR.checkpointed_steps(IR.option_value(a, "--out"), ["checkpoint.npz"]) if "--resume" in a else 0

    IR.chain_equals_reference(tmp_path, TRAIN, resume_of, progress_of, lambda a: IR.option_value(a, "--out"), 48,
                            drop=("checkpoint",))
