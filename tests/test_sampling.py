"""Training patch sampling and the loss options a planned recipe uses."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from volseg import bundle
from volseg.data import transforms as T
from volseg.recipe import load_recipe

PATCH = [16, 16, 8]


def _case(tmp_path):
    """A 12 x 20 x 10 volume (smaller than the patch along x): a liver block holding a 2-voxel tumour."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 5, (12, 20, 10)).astype(np.float32) - 100
    label = np.zeros(image.shape, np.uint8)
    label[2:10, 3:17, 2:8] = 1
    label[5:7, 9, 4] = 2
    image[label == 1] = 60
    image[label == 2] = 20
    affine = np.diag([4.0, 4.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}, label


def _recipe(sampler: str, *extra: str):
    return load_recipe(
        "configs/demo_liver_ct.yaml",
        [f"train.sampler={sampler}", f"train.patch_size={PATCH}", "train.samples_per_volume=12", *extra],
    )


def test_class_balanced_indices_are_computed_once_on_the_padded_grid(tmp_path):
    case, _ = _case(tmp_path)
    recipe = _recipe("class_balanced", "data.crop_foreground=false")
    pre = T.preprocessing(recipe, with_label=True, training=True)
    assert [c["_target_"] for c in pre[-2:]] == ["SpatialPadd", "ClassesToIndicesd"]
    cached = T.instantiate(pre)(dict(case))
    indices = cached[T.CLASS_INDICES_KEY]
    assert len(indices) == recipe.num_classes
    shape = cached["label"].shape[1:]
    assert all(s >= p for s, p in zip(shape, PATCH, strict=True))  # padded before the indices were taken
    flat = cached["label"][0].reshape(-1)
    for value, idx in enumerate(indices):
        idx = torch.as_tensor(idx)
        assert idx.numel() > 0 and bool((flat[idx] == value).all())

    sampling = T.instantiate(T.train_sampling(recipe))
    torch.manual_seed(0)
    tumour_crops = 0
    for _ in range(5):
        crops = sampling(dict(cached))
        assert all(tuple(c["image"].shape[1:]) == tuple(PATCH) for c in crops)
        assert all(T.CLASS_INDICES_KEY not in c for c in crops)
        tumour_crops += sum(int((c["label"] == 2).any()) for c in crops)
    # Centres on each of the 3 classes alike: about a third of 60 crops centre on the 2-voxel tumour (a background
    # or liver centre can also catch it); uniform or pos/neg centres would catch it far less often.
    assert tumour_crops >= 15
    assert T.CLASS_INDICES_KEY in cached  # the cached case keeps its indices for the next draw


def test_pos_neg_sampling_needs_no_cached_indices(tmp_path):
    case, _ = _case(tmp_path)
    recipe = _recipe("pos_neg", "data.crop_foreground=false")
    pre = T.preprocessing(recipe, with_label=True, training=True)
    assert "ClassesToIndicesd" not in [c["_target_"] for c in pre]
    crops = T.instantiate(T.train_sampling(recipe))(T.instantiate(pre)(dict(case)))
    assert all(tuple(c["image"].shape[1:]) == tuple(PATCH) for c in crops)


def test_batch_dice_and_background_options_reach_the_loss():
    plain = bundle._loss(_recipe("pos_neg"))
    assert "batch" not in plain and "include_background" not in plain  # MONAI's defaults: configs unchanged
    cfg = bundle._loss(_recipe("pos_neg", "train.loss.batch_dice=true", "train.loss.dice_background=false"))
    assert cfg["batch"] is True and cfg["include_background"] is False
    loss = T.instantiate(cfg)
    assert loss.dice.batch and not loss.dice.include_background
    # Batch Dice differs from the mean of per-sample Dice when one sample lacks the class.
    logits = torch.zeros(2, 2, 4, 4, 4)
    logits[0, 1, :2] = 5.0
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, 0, :2] = 1
    per_sample = T.instantiate(bundle._loss(_recipe("pos_neg", "train.loss.dice_background=false")))
    assert float(loss(logits, target)) < float(per_sample(logits, target))


def test_the_weighted_loss_takes_batch_dice_too():
    from volseg.bundle_scripts.losses import WeightedDiceCELoss

    assert WeightedDiceCELoss(batch=True).dice.batch
    assert not WeightedDiceCELoss().dice.batch
