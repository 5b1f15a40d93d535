"""bench/singh_side_by_side.py's own parts (the authors' code itself needs their environment, not CI's)."""

import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from singh_side_by_side import THRESHOLD, first_below, write_features  # noqa: E402

from lab.tasks.fewshot import FewshotConfig, FewshotTask  # noqa: E402


def test_first_below_reads_the_smoothed_crossing():
    steps = np.arange(1, 1001)
    loss = np.where(steps < 600, 1.0, 0.0)  # falls below 0.4 ln 2 at step 600
    assert first_below(steps, loss) == 600
    # a 100-step running mean crosses once 73 % of its window is below: at step 600 + 72
    assert first_below(steps, loss, window=100) == 672
    assert first_below(steps, np.full(1000, THRESHOLD + 0.01)) is None


def test_the_feature_file_is_the_labs_features_in_the_authors_layout(tmp_path):
    write_features(tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "r") as f:
        feats = np.asarray(f["resnet18/224/feat"])
    assert feats.shape == (1623, 5, 512)
    task = FewshotTask(FewshotConfig(features_path=str(tmp_path / "f.h5")))
    np.testing.assert_array_equal(np.asarray(task.features), feats)
