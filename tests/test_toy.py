"""The rank-1 tensor toy model of the plateau (Singh et al.)."""

import numpy as np

from lab.toy import rank1_run


def test_plateau_without_clamp_and_none_with_clamp():
    free = np.asarray(rank1_run(seed=0, steps=3000))
    clamped = np.asarray(rank1_run(seed=0, steps=3000, clamp=("b", "c")))
    # unclamped: stuck near the initial loss (1/2) for a long stretch, then solved
    assert free[1000] > 0.45 and free[-1] < 0.01
    first_free = int(np.argmax(free < 0.05))
    first_clamped = int(np.argmax(clamped < 0.05))
    assert clamped[first_clamped] < 0.05 and first_clamped < 50
    assert first_free > 20 * first_clamped
