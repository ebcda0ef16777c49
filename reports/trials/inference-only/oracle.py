"""Diagnostic only (never for shipping): the best threshold per head ON THE TEST SPLIT, to see how much of the gap
calibration could close at most."""

import sys
from pathlib import Path

from sct_sitehead.admin_cli import open_all_heads
from sct_sitehead.evaluate import find_cases, tune_thresholds

registry, model, sim = sys.argv[1:4]
_, seg = open_all_heads(registry, False, model, 1)
res = tune_thresholds(seg, find_cases(Path(sim), "test"))
for head, r in sorted(res.items()):
    print(f"{head:10s} best {r['threshold']:.2f} Dice {r['dice']:.3f} (at 0.5 {r['dice_at_0.5']:.3f}) n {r['cases']}")
