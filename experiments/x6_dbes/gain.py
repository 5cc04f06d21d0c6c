"""X6: code-loss gain per trained parameter of path-restricted vs full post-training.

    python experiments/x6_dbes/gain.py multirun/x6/<date_time>

Reads each post-training run's summary.json (sweeps `path` and `full`): gain = init/val/loss/code -
val/loss/code (the pretrained checkpoint's code loss minus the post-trained one, same validation
tokens), and gain per million trained parameters. Prints per-seed rows and mean ± std per sweep.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main(root: Path) -> None:
    rows = []
    for path in sorted(root.glob("*/*/*/summary.json")):
        sweep = path.relative_to(root).parts[0]
        if sweep not in ("path", "full"):
            continue
        s = json.loads(path.read_text())
        gain = s["init/val/loss/code"] - s["val/loss/code"]
        rows.append((sweep, s["seed"], s["trainable_params"], gain, 1e6 * gain / s["trainable_params"]))
    print("| sweep | seed | trained params | code loss gain | gain per 1M trained params |")
    print("|---|---|---|---|---|")
    for sweep, seed, params, gain, per in sorted(rows):
        print(f"| {sweep} | {seed} | {params} | {gain:.4f} | {per:.4f} |")
    print()
    for sweep in ("path", "full"):
        picked = [r for r in rows if r[0] == sweep]
        if picked:
            gains, pers = np.array([r[3] for r in picked]), np.array([r[4] for r in picked])
            std = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0
            print(
                f"{sweep}: n={len(picked)} gain {gains.mean():.4f} ± {std(gains):.4f}, "
                f"per 1M params {pers.mean():.4f} ± {std(pers):.4f}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
