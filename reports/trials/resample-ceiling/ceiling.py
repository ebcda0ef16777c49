"""Dice of the reference lesion mask after the deploy path's round trip (native -> 1 mm RAS -> native, threshold 0.5)."""
import csv, glob, sys
import numpy as np, nibabel as nib
from sct_sitehead import spatial
sim = sys.argv[1]
split = sys.argv[2] if len(sys.argv) > 2 else "test"
rows = [r for r in csv.DictReader(open(f"{sim}/participants.tsv"), delimiter="\t") if r["split"] == split]
by_site = {}
for r in rows:
    sub = r["participant_id"]
    for path in glob.glob(f"{sim}/derivatives/labels/{sub}/anat/*_lesion-manual.nii.gz"):
        img = nib.load(path)
        ref = np.asarray(img.dataobj) > 0
        if not ref.any():
            continue
        soft, grid = spatial.to_model_grid(ref.astype(np.float32), img.affine, "RAS", (1, 1, 1), order=1)
        back = spatial.mask_from_model_grid(soft, grid, 0.5)
        dice = 2 * (back & ref).sum() / (back.sum() + ref.sum())
        by_site.setdefault(r["site"], []).append(dice)
for site, d in sorted(by_site.items()):
    print(f"{site}\t{len(d)}\tmean {np.mean(d):.3f}\tmin {np.min(d):.3f}")
