"""Training details: schedulers, caching kinds, reproducibility by seed, early stopping, deep supervision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from volseg.bundle import train_config
from volseg.recipe import load_recipe


def _parsed(recipe, key: str, tmp_path: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser(train_config(recipe, str(tmp_path), [], []))
    parser["bundle_root"] = str(tmp_path)
    return parser.get_parsed_content(key)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("poly", torch.optim.lr_scheduler.PolynomialLR),
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("multistep", torch.optim.lr_scheduler.MultiStepLR),
        ("plateau", torch.optim.lr_scheduler.ReduceLROnPlateau),
    ],
)
def test_schedulers(name: str, cls: type, tiny_recipe_path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path, [f"train.scheduler.name={name}", "train.scheduler.milestones=[2]"])
    assert isinstance(_parsed(recipe, "lr_scheduler", tmp_path), cls)


@pytest.mark.parametrize(
    "kind,cls", [("memory", "CacheDataset"), ("persistent", "PersistentDataset"), ("none", "Dataset")]
)
def test_cache_kinds(kind: str, cls: str, tiny_recipe_path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path, [f"data.cache.kind={kind}"])
    assert type(_parsed(recipe, "train#dataset", tmp_path)).__name__ == cls


@pytest.mark.parametrize(
    "optimizer,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizers(optimizer: str, cls: type, tiny_recipe_path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe_path, [f"train.optimizer.name={optimizer}"])
    assert type(_parsed(recipe, "optimizer", tmp_path)) is cls


def test_iterations_per_epoch_sets_the_epoch_length(tiny_recipe_path: Path, tiny_data: Path, tmp_path: Path) -> None:
    from volseg.bundle import train_config as tc
    from volseg.data.datalist import load_datalist

    recipe = load_recipe(tiny_recipe_path, ["train.iterations_per_epoch=7", "data.cache.kind=none"])
    cases = [{k: str(Path(v).relative_to(tiny_data)) for k, v in c.items()} for c in load_datalist(tiny_data)]
    from monai.bundle import ConfigParser

    parser = ConfigParser(tc(recipe, str(tiny_data), cases, cases[:1]))
    assert len(parser.get_parsed_content("train#dataloader")) == 7


@pytest.mark.slow
def test_same_seed_same_losses_and_early_stopping(tiny_recipe_path: Path, tiny_data: Path, tmp_path: Path) -> None:
    from volseg.train import train

    sets = ["train.max_epochs=2"]
    a = train(load_recipe(tiny_recipe_path, sets), tiny_data, tmp_path / "a", echo=lambda s: None)
    b = train(load_recipe(tiny_recipe_path, sets), tiny_data, tmp_path / "b", echo=lambda s: None)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    # With a zero learning rate the validation Dice cannot improve: patience 1 stops after the second validation.
    stop = load_recipe(
        tiny_recipe_path,
        [
            "train.max_epochs=6",
            "train.optimizer.lr=1e-12",
            "train.early_stopping.patience=1",
            "train.scheduler.name=none",
        ],
    )
    c = train(stop, tiny_data, tmp_path / "c", echo=lambda s: None)
    assert c.stopped_early and c.epochs < 6


@pytest.mark.slow
def test_unet_plusplus_deep_supervision_trains_and_bundles(
    tiny_recipe_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from volseg.infer import Predictor
    from volseg.train import train

    recipe = load_recipe(
        tiny_recipe_path,
        [
            "model.name=unet_plusplus",
            "model.args={features: [4, 4, 8, 8, 16, 4]}",
            "train.max_epochs=2",
            "train.patch_size=[32, 32, 32]",
        ],
    )
    result = train(recipe, tiny_data, tmp_path / "pp", echo=lambda s: None)
    assert result.epochs == 2 and result.losses[-1] < result.losses[0]
    assert (tmp_path / "pp" / "scripts" / "nets.py").is_file()
    pred = Predictor.from_bundle(tmp_path / "pp", "cpu").predict(next((tiny_data / "imagesTr").glob("*.nii.gz")))
    assert pred.labels.ndim == 3 and pred.labels.max() <= 2


def test_cpu_autocast_covers_training_iterations_only() -> None:
    from ignite.engine import Engine

    from volseg.train import attach_cpu_autocast

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def step(engine, batch):
        opt.zero_grad()
        out = net(batch)
        loss = out.square().mean()
        loss.backward()
        opt.step()
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype, net[0].weight.grad.dtype))
        return loss.item()

    trainer = Engine(step)
    leave = attach_cpu_autocast(trainer, net)
    trainer.run([torch.randn(1, 1, 8, 8, 8)] * 3, max_epochs=2)
    assert seen == [(True, torch.float32, torch.float32)] * 6  # bf16 inside, float32 outputs and gradients
    assert not torch.is_autocast_enabled("cpu")
    assert net[0].weight.dtype == torch.float32

    def boom(engine, batch):
        raise RuntimeError("stop inside an iteration")

    failing = Engine(boom)
    leave = attach_cpu_autocast(failing, net)
    try:
        failing.run([torch.zeros(1)], max_epochs=1)
    except RuntimeError:
        pass
    assert torch.is_autocast_enabled("cpu")  # left on by the interrupted iteration, until the run's closer
    leave()
    assert not torch.is_autocast_enabled("cpu")


def test_final_weights_are_what_the_bundle_keeps(tiny_recipe_path: Path, tiny_data: Path, tmp_path: Path) -> None:
    """``train.weights: final``: models/model.pt (and the calibration, TorchScript) are the weights of the last
    iteration, saved by a CheckpointSaver on the trainer that the MONAI bundle's train.json carries too."""
    import json

    from volseg.train import train

    recipe = load_recipe(tiny_recipe_path, ["train.max_epochs=3", "train.weights=final"])
    cfg = train_config(recipe, str(tmp_path), [], [])
    savers = [h for h in cfg["train"]["handlers"] if h["_target_"] == "CheckpointSaver"]
    assert savers and savers[0]["save_final"] and savers[0]["final_filename"] == "model.pt"
    assert not [h for h in cfg["validate"]["handlers"] if h["_target_"] == "CheckpointSaver"]
    best = load_recipe(tiny_recipe_path, ["train.max_epochs=3"])
    assert [h for h in train_config(best, str(tmp_path), [], [])["validate"]["handlers"]
            if h["_target_"] == "CheckpointSaver" and h.get("save_key_metric")]  # fmt: skip

    run = tmp_path / "final"
    result = train(recipe, tiny_data, run, echo=lambda s: None, progress=False)
    assert result.epochs == 3
    kept = torch.load(run / "models" / "model.pt", map_location="cpu", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["network"]
    assert kept.keys() == last.keys()
    assert all(torch.equal(kept[k], last[k]) for k in kept)
    note = json.loads((run / "configs" / "metadata.json").read_text())
    assert "final weights" in json.dumps(note)
