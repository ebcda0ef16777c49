"""Leave-one-out on the val split: a site head's own tuned threshold vs the universal head's tuned one vs 0.5."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from sct_sitehead.admin_cli import open_all_heads
from sct_sitehead.metrics import dice

from sct_sitehead import evaluate as ev

registry, model, dataset = sys.argv[1], sys.argv[2], Path(sys.argv[3])
release, seg = open_all_heads(registry, True, model, 2)
T = ev.THRESHOLDS
half = min(range(len(T)), key=lambda k: abs(T[k] - 0.5))
cases = ev.find_cases(dataset, "val")
own, uni = [], []  # per case: Dice per threshold with the site's head, with universal
for case in cases:
    image, prob = seg.predict(case.image)
    ref = np.asanyarray(nib.load(case.reference).dataobj) > 0
    row = {h: np.array([dice(prob[h][ev.lesion_index(seg, h)] >= t, ref) for t in T]) for h in ("universal", case.site)}
    own.append(row[case.site])
    uni.append(row["universal"])
own, uni = np.array(own), np.array(uni)
sites = np.array([c.site for c in cases])
out = {"own": np.zeros(len(cases)), "universal's": np.zeros(len(cases)), "0.5": own[:, half]}
for i in range(len(cases)):
    same = (sites == sites[i]) & (np.arange(len(cases)) != i)
    others = np.arange(len(cases)) != i
    out["own"][i] = own[i, int(np.argmax(own[same].mean(0)))]
    out["universal's"][i] = own[i, int(np.argmax(uni[others].mean(0)))]
for s in sorted(set(sites)):
    print(s, int((sites == s).sum()), {k: round(float(v[sites == s].mean()), 3) for k, v in out.items()})
print("all", len(cases), {k: round(float(v.mean()), 3) for k, v in out.items()})
