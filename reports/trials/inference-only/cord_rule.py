"""Where do a release's false lesions on the controls lie against the universal head's cord (1 mm grid, native)?
And how many test/val lesions would a rule 'a lesion must touch the cord dilated by D mm' drop?"""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage
from sct_sitehead.admin_cli import open_all_heads
from sct_sitehead.evaluate import find_cases, healthy_controls, lesion_index
from sct_sitehead.lesions import label_lesions

registry, model, sim, split = sys.argv[1:5]
release, seg = open_all_heads(registry, False, model, 2, crop=True)
cord_i = [l.name for l in seg.heads["universal"].labels].index("cord")
DIL = (0, 1, 2, 3)


def cordmask(prob, zooms, d):
    cord = prob >= 0.5
    if d == 0 or not cord.any():
        return cord
    dist = ndimage.distance_transform_edt(~cord, sampling=zooms)
    return dist <= d


def components(mask, cords):
    lab, n = label_lesions(mask)
    out = []
    for k in range(1, n + 1):
        comp = lab == k
        out.append([bool((comp & c).any()) for c in cords])
    return out


ctrl = {d: [0, 0] for d in DIL}  # kept, all
for path in healthy_controls(Path("../shared/data/bids")):
    image, probs = seg.predict(path)
    zooms = tuple(voxel_sizes(image.affine))
    cords = [cordmask(probs["universal"][cord_i], zooms, d) for d in DIL]
    runs = {d: 0 for d in DIL}
    for head in seg.sites:
        m = seg.lesion_mask(head, probs[head][lesion_index(seg, head)], zooms)
        comps = components(m, cords)
        for j, d in enumerate(DIL):
            ctrl[d][1] += len(comps)
            ctrl[d][0] += sum(c[j] for c in comps)
print("controls: false lesions touching the cord dilated by d mm (kept) / all:", {d: tuple(v) for d, v in ctrl.items()})

ref_kept = {d: [0, 0] for d in DIL}
pred = {d: [0, 0] for d in DIL}
for case in find_cases(Path(sim), split):
    image, probs = seg.predict(case.image)
    zooms = tuple(voxel_sizes(image.affine))
    ref = np.asanyarray(nib.load(case.reference).dataobj) > 0
    cords = [cordmask(probs["universal"][cord_i], zooms, d) for d in DIL]
    for comp in components(ref, cords):
        for j, d in enumerate(DIL):
            ref_kept[d][1] += 1
            ref_kept[d][0] += comp[j]
    head = case.site
    m = seg.lesion_mask(head, probs[head][lesion_index(seg, head)], zooms)
    lab, n = label_lesions(m)
    for k in range(1, n + 1):
        c = lab == k
        tp = bool((c & ref).any())
        for j, d in enumerate(DIL):
            if not (c & cords[j]).any():
                pred[d][0 if tp else 1] += 1
print(
    f"{split}: reference lesions touching the cord dilated by d mm / all:", {d: tuple(v) for d, v in ref_kept.items()}
)
print(f"{split}: own-head predicted lesions the rule would drop (true, false):", {d: tuple(v) for d, v in pred.items()})
