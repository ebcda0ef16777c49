"""Trial: average several releases' probabilities (same sites, same localiser) and score the test split and the
controls at threshold 0.5, against each member alone at 0.5."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from sct_sitehead.admin_cli import open_all_heads
from sct_sitehead.evaluate import find_cases, healthy_controls, lesion_index, score_case
from sct_sitehead.lesions import lesion_stats

sim = Path(sys.argv[1])
members = [m.split("=") for m in sys.argv[2:]]  # REGISTRY=MODEL
segs = [open_all_heads(r, False, m, 1, crop=True)[1] for r, m in members]
sites = segs[0].sites
names = [m for _, m in members] + ["ensemble"]
scores = {n: {"own": [], "universal": [], "own_f1": [], "universal_f1": []} for n in names}
ctrl = {n: [0, 0.0] for n in names}


def masks(probs_list, site):
    out = {}
    for name, probs, seg in zip(names, probs_list, segs + [segs[0]]):
        li = lesion_index(seg, site)
        out[name] = probs[site][li] >= 0.5
    return out


for case in find_cases(sim, "test"):
    results = [seg.predict(case.image) for seg in segs]
    image = results[0][0]
    zooms = tuple(voxel_sizes(image.affine))
    probs = [p for _, p in results]
    probs.append({s: np.mean([p[s] for p in probs], axis=0) for s in sites})
    ref = np.asanyarray(nib.load(case.reference).dataobj) > 0
    for head, key in ((case.site, "own"), ("universal", "universal")):
        for name, m in masks(probs, head).items():
            sc = score_case(m, ref, zooms)
            scores[name][key].append(sc["dice"])
            scores[name][key + "_f1"].append(sc["f1_any"])
    print(case.subject, {n: round(scores[n]["own"][-1], 2) for n in names}, flush=True)

for path in healthy_controls(Path("../shared/data/bids")):
    results = [seg.predict(path) for seg in segs]
    zooms = tuple(voxel_sizes(results[0][0].affine))
    probs = [p for _, p in results]
    probs.append({s: np.mean([p[s] for p in probs], axis=0) for s in sites})
    for head in sites:
        for name, m in masks(probs, head).items():
            st = lesion_stats(m, zooms)
            ctrl[name][0] += st["count"] > 0
            ctrl[name][1] += st["total_volume_mm3"]

for n in names:
    s = scores[n]
    print(
        f"{n:24s} own Dice {np.mean(s['own']):.3f} F1 {np.mean(s['own_f1']):.3f}  universal Dice {np.mean(s['universal']):.3f} F1 {np.mean(s['universal_f1']):.3f}  controls {ctrl[n][0]}/77 {ctrl[n][1]:.0f} mm3"
    )
