import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# one compilation cache for the whole session (subprocesses too): identical programs compile once
os.environ.setdefault("LAB_COMPILATION_CACHE", tempfile.mkdtemp(prefix="lab-jax-cache-"))
ROOT = Path(__file__).resolve().parent.parent

# A tiny run on the demo task: a few seconds on a CPU, same shapes in every test that uses it.
TINY = [
    "experiment=demo", "tracking.wandb.mode=disabled", "trainer.progress=false",
    "trainer.steps=60", "trainer.batch_size=16", "trainer.steps_per_call=10", "trainer.eval_every=20",
    "trainer.eval_log_points=0", "checkpoint.every=30", "checkpoint.log_points=0",
    "model.d_model=16", "model.n_heads=2", "task.vocab_size=32", "task.seg_len=8", "task.seq_len=16",
    "task.eval_size=40", "optim.lr=3e-3", "optim.warmup_steps=0", "measures.names=[none]", "measures.circuit=false",
    "tracking.attention_images=false",  # drawn where a test is about them (test_wandb.py, the CLI end to end)
]


@pytest.fixture
def tiny():
    return list(TINY)


def lab_cmd(*args):
    return [sys.executable, "-m", "lab.cli", *args]


def kill_once_checkpointed(args: list, run_dir: Path, step: int, timeout: float = 120.0) -> None:
    """Start ``lab ARGS`` and kill it with SIGKILL as soon as its checkpoint ``step`` exists in ``run_dir``."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(lab_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout and not (run_dir / "checkpoints" / str(step)).is_dir():
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it was killed: make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
