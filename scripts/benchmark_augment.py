"""What each transform of a recipe's training chain costs on this machine, per sampled batch.

The training chain (:func:`volseg.data.transforms.train_transforms`) is split where volseg's trainer splits it: the
deterministic preprocessing runs once per case (cached), the sampling and augmentation run for every crop. Each
random transform is timed with its probability forced to 1 (the cost when it fires) and at the recipe's own
probability (the cost per crop on average). Results as a Markdown table for docs/benchmarks.md.

    python scripts/benchmark_augment.py --recipe demo/plan/demo_liver_ct.yaml --data demo/data --cases 4 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)

    import torch

    from volseg.data.datalist import load_datalist
    from volseg.data.transforms import instantiate, preprocessing, train_sampling
    from volseg.recipe import load_recipe

    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = load_recipe(args.recipe)
    cases = load_datalist(args.data, recipe.data.source)[: args.cases]
    pre = instantiate(preprocessing(recipe, with_label=True, training=True))
    t = time.perf_counter()
    cached = [pre(dict(c)) for c in cases]
    pre_s = (time.perf_counter() - t) / len(cached)
    chain = train_sampling(recipe)
    rows = []
    # The crop first (with the padding before it, if any: every later transform sees patches), then each
    # transform on the crops, alone. The deep copy of the cached case is what CacheDataset does for each draw.
    n_crop = 1 + next(i for i, c in enumerate(chain) if c["_target_"].startswith("RandCropBy"))
    crop = instantiate(chain[:n_crop])
    crops: list = []
    crop_s = _time(lambda: crops.extend(crop(copy.deepcopy(cached[len(crops) % len(cached)]))), args.repeats)
    rows.append((" + ".join(c["_target_"] for c in chain[:n_crop]), "1", crop_s, crop_s))
    sample = crops[0] if isinstance(crops[0], dict) else crops[0][0]
    for comp in chain[n_crop:]:
        name = comp["_target_"]
        prob = comp.get("prob")
        forced = dict(comp, prob=1.0) if prob is not None else comp
        fired = instantiate(forced)
        cost = _time(lambda f=fired: f(copy.deepcopy(sample)), args.repeats)
        mean = cost * (float(prob) if prob is not None else 1.0)
        rows.append((name, f"{prob:g}" if prob is not None else "1", cost, mean))
    total = sum(r[3] for r in rows)
    patch = "x".join(map(str, recipe.train.patch_size))
    print(f"recipe {recipe.name}, patch {patch}, {len(cached)} cases, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"preprocessing once per case (cached): {pre_s:.2f} s")
    print()
    print("| transform | probability | ms when it runs | ms per crop on average |")
    print("| --- | --- | --- | --- |")
    for name, prob, cost, mean in rows:
        print(f"| {name} | {prob} | {cost * 1e3:.1f} | {mean * 1e3:.1f} |")
    print(f"| **all, per crop** | | | **{total * 1e3:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
