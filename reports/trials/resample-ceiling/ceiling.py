"""Dice of the reference lesion mask after the deploy path's round trip (native -> 1 mm RAS -> native, threshold 0.5)."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from sct_sitehead.evaluate import find_cases

from sct_sitehead import spatial

sim, split = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "test"
by_site = {}
for case in find_cases(sim, split):
    img = nib.load(case.reference)
    ref = np.asarray(img.dataobj) > 0
    if not ref.any():
        continue
    soft, grid = spatial.to_model_grid(ref.astype(np.float32), img.affine, "RAS", (1, 1, 1), order=1)
    back = spatial.mask_from_model_grid(soft, grid, 0.5)
    by_site.setdefault(case.site, []).append(2 * (back & ref).sum() / (back.sum() + ref.sum()))
for site, d in sorted(by_site.items()):
    print(f"{site}\t{len(d)}\tmean {np.mean(d):.3f}\tmin {np.min(d):.3f}")
