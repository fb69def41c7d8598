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


def _crop_centres_on(recipe, cached, value, draws=10):
    """How many of ``draws`` x 12 crops have label ``value`` at their centre voxel."""
    sampling = T.instantiate(T.train_sampling(recipe))
    centre = tuple(p // 2 for p in PATCH)
    torch.manual_seed(1)
    return sum(int(c["label"][(0, *centre)] == value) for _ in range(draws) for c in sampling(dict(cached)))


def test_class_ratios_weight_the_crop_centres(tmp_path):
    import pytest

    case, _ = _case(tmp_path)
    alike = _recipe("class_balanced", "data.crop_foreground=false")
    cached = T.instantiate(T.preprocessing(alike, with_label=True, training=True))(dict(case))
    assert "ratios" not in T.train_sampling(alike)[0]  # not given: MONAI's default, configs unchanged
    heavy = _recipe("class_balanced", "data.crop_foreground=false", "train.class_ratios={tumour: 8}")
    assert heavy.class_ratio_list() == [1.0, 1.0, 8.0]
    assert T.train_sampling(heavy)[0]["ratios"] == [1.0, 1.0, 8.0]
    # 120 crops: about a third centred on the tumour when alike, 8/10 with the ratios, few with ratio 0 (a crop
    # whose centre is near the image's edge is moved inwards, which can put another class's centre on it).
    n_alike, n_heavy = _crop_centres_on(alike, cached, 2), _crop_centres_on(heavy, cached, 2)
    assert 20 <= n_alike <= 60 and n_heavy >= 80
    none = _recipe("class_balanced", "data.crop_foreground=false", "train.class_ratios={tumour: 0}")
    assert _crop_centres_on(none, cached, 2) <= n_alike // 4
    from volseg.errors import UserError

    with pytest.raises(UserError, match="needs train.sampler class_balanced"):
        _recipe("pos_neg", "train.class_ratios={tumour: 3}")
    with pytest.raises(UserError, match="unknown label .lesion."):
        _recipe("class_balanced", "train.class_ratios={lesion: 3}")
    with pytest.raises(UserError, match="above 0"):
        _recipe("class_balanced", "train.class_ratios={background: 0, liver: 0, tumour: 0}")


def test_class_weights_reach_both_terms_of_the_loss():
    import pytest
    from monai.bundle import ConfigParser

    from volseg.errors import UserError

    assert "weight" not in bundle._loss(_recipe("pos_neg"))
    recipe = _recipe("pos_neg", "train.loss.class_weights={tumour: 3}", "train.loss.dice_background=false")
    cfg = bundle._loss(recipe)
    loss = ConfigParser({"device": "$torch.device('cpu')", "loss": cfg}).get_parsed_content("loss")
    assert loss.cross_entropy.weight.tolist() == [1.0, 1.0, 3.0]
    assert loss.dice.class_weight.tolist() == [1.0, 3.0]  # the Dice term has no background channel here
    # The weighted loss pulls harder towards the tumour: same logits, a missed tumour voxel costs more.
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, :2] = 1
    target[0, 0, 0, 0, 0] = 2
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1][target[:, 0] > 0] = 3.0
    plain = ConfigParser({"device": "$torch.device('cpu')", "loss": bundle._loss(_recipe(
        "pos_neg", "train.loss.dice_background=false"))}).get_parsed_content("loss")  # fmt: skip
    assert float(loss(logits, target)) > float(plain(logits, target))
    with pytest.raises(UserError, match="unknown label 'lesion'"):
        _recipe("pos_neg", "train.loss.class_weights={lesion: 3}")
