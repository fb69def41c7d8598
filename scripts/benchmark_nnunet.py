"""volseg against nnU-Net v2: the same data, the same training wall-clock budget, the same held-out cases, CPU.

Each tool plans for itself: nnU-Net with ``nnUNetv2_plan_and_preprocess`` (3d_fullres), volseg with ``volseg train
--data DIR --time-budget`` (``volseg plan``). nnU-Net trains fold 0 on the CPU (``-device cpu``) with a trainer
subclass that stops at the budget, as nnU-Net's own ``nnUNetTrainer_Xepochs`` variants stop at an epoch count: after
the first epoch it measures an epoch's time and sets its poly schedule's length to the epochs that fit, and at the
first epoch end past the budget it ends training as at a normal end (final checkpoint). nnU-Net runs in a virtual
environment of its own that this script makes, with ``torch==2.13.0`` in the same pip command so that pip keeps the
CPU build. Both predict the same held-out cases; each prediction is scored against the truth.

    python scripts/benchmark_nnunet.py --work runs/bench/nnunet --budget-s 600 --n-train 10 --n-test 4 \\
        --json runs/bench/nnunet.json --md runs/bench/nnunet.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_info, machine_lines, run_child, write_reports  # noqa: E402

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_SynthLiver"
TRAINER = "nnUNetTrainer_volsegBudget"
TRAINER_SOURCE = '''"""nnU-Net's default trainer, stopped at a wall-clock budget (written by volseg's benchmark)."""

import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_volsegBudget(nnUNetTrainer):
    """Stops at the first epoch end past VOLSEG_NNUNET_BUDGET_S seconds of training, ending as a normal run ends
    (final checkpoint); after epoch 0 the poly schedule is shortened to the epochs that fit the budget."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        # nnU-Net records its trainers' arguments by name (locals()), so the signature is spelled out.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("VOLSEG_NNUNET_BUDGET_S", "600"))
        self.num_iterations_per_epoch = int(os.environ.get("VOLSEG_NNUNET_ITERATIONS", "50"))
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 10)
        self.started = None

    def on_train_start(self):
        super().on_train_start()
        self.started = time.monotonic()

    def on_epoch_end(self):
        super().on_epoch_end()
        elapsed = time.monotonic() - self.started
        if self.current_epoch == 1 and hasattr(self.lr_scheduler, "max_steps"):
            self.lr_scheduler.max_steps = max(2, int(self.budget_s / elapsed))
            self.print_to_log_file(f"poly schedule over {self.lr_scheduler.max_steps} epochs (budget)")
        if elapsed >= self.budget_s:
            self.print_to_log_file(f"wall-clock budget reached after {self.current_epoch} epochs ({elapsed:.0f} s)")
            self.on_train_end()
            raise SystemExit(0)
'''


def ensure_venv(venv: Path, torch_req: str, nnunet_req: str) -> Path:
    """A venv with nnU-Net and the CPU torch; refuses one that pulled CUDA wheels."""
    py = venv / "bin" / "python"
    if not (venv / "bin" / "nnUNetv2_train").is_file():
        if not py.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # One pip command: pip resolves nnunetv2's torch requirement to the local CPU build asked for here.
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", torch_req, nnunet_req],
                       check=True)  # fmt: skip
    listed = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    if any(line.lower().startswith("nvidia-") for line in listed.splitlines()):
        raise SystemExit(f"{venv}: CUDA wheels were installed; remove the venv")
    site = subprocess.run([str(py), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    trainers = Path(site) / "training" / "nnUNetTrainer"
    (trainers / "variants" / "volseg_budget.py").write_text(TRAINER_SOURCE)
    # nnU-Net finds a trainer by importing every module under training/nnUNetTrainer. The Primus (transformer)
    # trainers import timm, which imports torchvision; the torchvision wheel pip brings is built for a CUDA torch
    # ("operator torchvision::nms does not exist" with the CPU build), so that import fails and takes the lookup
    # down. The default U-Net trainer needs neither: the Primus trainers are left out of this benchmark's venv.
    if subprocess.run([str(py), "-c", "import torchvision"], capture_output=True).returncode != 0:
        shutil.rmtree(trainers / "primus", ignore_errors=True)
    return py


def make_data(work: Path, n_train: int, n_test: int, seed: int, variety: str) -> tuple[Path, Path]:
    volseg = str(REPO / ".venv" / "bin" / "volseg")
    msd = work / "msd"
    if not (msd / "dataset.json").is_file():
        subprocess.run([volseg, "synth", "--task", "liver_ct", "-n", str(n_train), "--n-test", str(n_test), "--seed",
                        str(seed), "--variety", variety, "-o", str(msd)], check=True)  # fmt: skip
    raw = work / "nnUNet_raw"
    if not (raw / DATASET).is_dir():
        subprocess.run([volseg, "export-dataset", "--data", str(msd), "--out", str(raw), "--name", DATASET],
                       check=True)  # fmt: skip
    test = work / "test_nnunet"  # nnU-Net's predictor wants <case>_0000.nii.gz
    test.mkdir(exist_ok=True)
    for img in sorted((msd / "imagesTs").glob("*.nii.gz")):
        dst = test / img.name.replace(".nii.gz", "_0000.nii.gz")
        if not dst.exists():
            shutil.copyfile(img, dst)
    return msd, test


def dice_table(pred_dir: Path, truth_dir: Path, suffix: str) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    from volseg.metrics import dice_per_label

    labels = {"liver": 1, "tumour": 2}
    per: dict[str, list[float]] = {k: [] for k in labels}
    cases = []
    for truth_path in sorted(truth_dir.glob("*.nii.gz")):
        pred_path = pred_dir / truth_path.name.replace(".nii.gz", suffix)
        truth = np.asarray(nib.load(str(truth_path)).dataobj)
        if not pred_path.is_file():
            cases.append({"case": truth_path.name, "missing": True})
            continue
        pred = np.asarray(nib.load(str(pred_path)).dataobj)
        d = dice_per_label(pred, truth, labels)
        for k, v in d.items():
            if (truth == labels[k]).any():
                per[k].append(v)
        cases.append({"case": truth_path.name, **{k: round(v, 4) for k, v in d.items()}})
    return {"mean": {k: (round(statistics.mean(v), 4) if v else None) for k, v in per.items()}, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "nnunet")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-nnunet")
    ap.add_argument("--torch", default="torch==2.13.0")
    ap.add_argument("--nnunet", default="nnunetv2==2.8.1")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock budget of each tool")
    ap.add_argument("--nnunet-iterations", type=int, default=50, help="nnU-Net iterations per epoch")
    ap.add_argument("--no-nnunet-mirroring", action="store_true", help="skip nnU-Net's (8x slower) mirrored run")
    ap.add_argument("--n-train", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variety", default="clinical")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    py = ensure_venv(args.venv.resolve(), args.torch, args.nnunet)
    msd, test = make_data(work, args.n_train, args.n_test, args.seed, args.variety)
    n_test = len(list(test.glob("*_0000.nii.gz")))
    bindir = py.parent
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_pre"),
           "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": "1",
           "VOLSEG_NNUNET_BUDGET_S": str(args.budget_s),
           "VOLSEG_NNUNET_ITERATIONS": str(args.nnunet_iterations)}  # fmt: skip
    result: dict[str, Any] = {"machine": machine_info(), "budget_s": args.budget_s, "n_train": args.n_train,
                              "n_test": n_test, "variety": args.variety}  # fmt: skip
    steps = result["steps"] = {}
    steps["nnunet_plan"] = run_child([bindir / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres",
                                      "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                                     log=logs / "nnunet_plan.log", env=env)  # fmt: skip
    steps["nnunet_train"] = run_child([bindir / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER,
                                       "-device", "cpu"], log=logs / "nnunet_train.log", env=env,
                                      timeout=args.budget_s * 3 + 600)  # fmt: skip
    volseg = REPO / ".venv" / "bin" / "volseg"
    run = work / "volseg_run"
    if run.exists():
        shutil.rmtree(run)
    steps["volseg_train"] = run_child([volseg, "train", "--data", msd, "--out", run, "--device", "cpu",
                                       "--time-budget", f"{int(args.budget_s)}s"], log=logs / "volseg_train.log",
                                      timeout=args.budget_s * 3 + 600)  # fmt: skip
    predictions: dict[str, dict[str, Any]] = {}
    runs_nnunet = [("nnunet, mirroring (default)", []), ("nnunet, no mirroring", ["--disable_tta"])]
    for name, extra in runs_nnunet[1:] if args.no_nnunet_mirroring else runs_nnunet:
        out = work / ("pred_nnunet_tta" if not extra else "pred_nnunet")
        shutil.rmtree(out, ignore_errors=True)
        r = run_child([bindir / "nnUNetv2_predict", "-i", test, "-o", out, "-d", DATASET_ID, "-c", "3d_fullres",
                       "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1",
                       "-nps", "1", *extra], log=logs / f"{out.name}.log", env=env)  # fmt: skip
        predictions[name] = {**r, "per_case_s": round(r["wall_s"] / n_test, 2),
                             "dice": dice_table(out, msd / "labelsTs", ".nii.gz")}  # fmt: skip
    for name, extra in (("volseg, defaults", []), ("volseg, mirroring", ["--set", "infer.tta_flips=[0,1,2]"])):
        out = work / ("pred_volseg" if not extra else "pred_volseg_tta")
        shutil.rmtree(out, ignore_errors=True)
        r = run_child([volseg, "infer", msd / "imagesTs", "-o", out, "--bundle", run, "--device", "cpu", *extra],
                      log=logs / f"{out.name}.log")  # fmt: skip
        predictions[name] = {**r, "per_case_s": round(r["wall_s"] / n_test, 2),
                             "dice": dice_table(out, msd / "labelsTs", "_seg.nii.gz")}  # fmt: skip
    result["predictions"] = predictions
    lines = [f"# volseg vs nnU-Net v2 ({args.n_train} training / {n_test} held-out {args.variety} phantoms, "
             f"{args.budget_s:g} s training budget each)", "", *machine_lines(result["machine"]), "",
             "| step | rc | wall s | peak RSS MB (tree) |", "| --- | --- | --- | --- |"]  # fmt: skip
    for k, r in steps.items():
        lines.append(f"| {k} | {r['rc']} | {r['wall_s']:.0f} | {r['peak_rss_tree_mb']:.0f} |")
    lines += ["", "| prediction | s per case (whole command / cases) | peak RSS MB (tree) | liver Dice | tumour Dice |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, p in predictions.items():
        m = p["dice"]["mean"]
        lines.append(f"| {name} | {p['per_case_s']:.2f} | {p['peak_rss_tree_mb']:.0f} | {m['liver']} | {m['tumour']} |")
    write_reports(result, "\n".join(lines) + "\n", args.json, args.md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
