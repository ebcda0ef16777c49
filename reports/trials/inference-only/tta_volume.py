"""Trial: mirror test-time augmentation patched into the deploy path's sliding window, the whole volume flipped along every combination of TTA_AXES (default 0,1,2: 8 copies). Run as `python tta_volume.py evaluate ...` with the arguments of `sct_sitehead evaluate`."""

import itertools
import os
import sys

import numpy as np
import sct_sitehead.inference as inf

AXES = [int(a) for a in os.environ.get("TTA_AXES", "0,1,2").split(",") if a != ""]
_orig = inf.sliding_window


def tta(volume, predict, patch_size, **kw):
    total, n = None, 0
    for k in range(len(AXES) + 1):
        for combo in itertools.combinations(AXES, k):
            v = np.ascontiguousarray(np.flip(volume, combo)) if combo else volume
            out = _orig(v, predict, patch_size, **kw)
            out = {key: np.flip(val, tuple(a + 1 for a in combo)) if combo else val for key, val in out.items()}
            if total is None:
                total = {key: val.astype(np.float32).copy() for key, val in out.items()}
            else:
                for key in total:
                    total[key] += out[key]
            n += 1
    return {key: np.ascontiguousarray(val / n) for key, val in total.items()}


inf.sliding_window = tta
from sct_sitehead.admin_cli import main

sys.exit(main(sys.argv[1:]))
