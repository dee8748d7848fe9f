import json

import numpy as np
from PIL import Image

from conftest import load_script, tiny_demo_args
from utils.data.datasets import train_items
from utils.data.imageio import read_mask
from utils.evaluation.metrics import confusion_matrix, scores
from utils.stage2.training_data import training_pairs


def test_stage1_end_to_end_on_tiny_demo(tmp_path):
    stage1 = load_script("1_train_stage1")
    assert stage1.main(tiny_demo_args(tmp_path)) == 0

    out = tmp_path / "runs" / "demo" / "stage1"
    for name in ("config.yaml", "checkpoint.pth", "log.csv", "metrics.json", "samples.png"):
        assert (out / name).is_file(), name
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test", "images"}
    for split in ("train", "val", "test"):
        assert 0 <= metrics[split]["miou"] <= 1 and len(metrics[split]["iou"]) == 2
    # whole-image scores come from different images, and each from the images of its own folder
    for split in ("val", "test"):
        assert metrics["images"][split] == sorted(p.stem for p in (tmp_path / "data" / split / "img").iterdir())
    assert not set(metrics["images"]["val"]) & set(metrics["images"]["test"])

    items = train_items(tmp_path / "data", 2)
    folder = tmp_path / "data" / "train" / "pseudo_mask"
    pseudo = {p.name for p in folder.glob("*.png")}
    assert pseudo == {i.image.name for i in items}
    assert json.loads((folder / "manifest.json").read_text())["complete"] is True
    assert Image.open(folder / items[0].image.name).mode == "P"

    # pseudo-masks must beat the best constant mask on the training tiles
    truth = [read_mask(i.mask, "index", 2) for i in items]
    constant = max(scores(sum(confusion_matrix(np.full_like(t, c), t, 2) for t in truth))["miou"] for c in (0, 1))
    assert metrics["train"]["miou"] > constant + 0.1

    # rerunning only the mask step from the checkpoint keeps the finished files
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert stage1.main(tiny_demo_args(tmp_path) + ["--masks-only"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == before


def test_timm_backbone_loads_a_local_weight_file_and_names_a_wrong_one(tmp_path):
    import pytest
    import timm
    import torch

    from models.classifier import build_backbone

    # A full timm checkpoint, saved from a DataParallel wrapper: its classifier is skipped, the rest must fit.
    full = timm.create_model("resnet10t", pretrained=False).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "resnet10t.pth")
    backbone = build_backbone("resnet10t", str(tmp_path / "resnet10t.pth"), (1, 2, 3), 8)
    for name, tensor in backbone.net.state_dict().items():
        assert torch.equal(tensor, full[name]), name

    del full["layer2.0.conv1.weight"]
    torch.save(full, tmp_path / "damaged.pth")
    with pytest.raises(ValueError) as error:
        build_backbone("resnet10t", str(tmp_path / "damaged.pth"), (1, 2, 3), 8)
    assert "damaged.pth" in str(error.value) and "layer2.0.conv1.weight" in str(error.value)


def test_class_maps_averaged_with_another_checkpoint(tmp_path):
    """stage1.average_cams_with: a partner that is missing is refused before any training; averaging with an
    identical classifier gives this run's own pseudo-masks, and the manifest ties them to both checkpoints, so
    stage 2 accepts them only under the same setting."""
    import shutil

    import pytest

    from utils.config import load_config
    from utils.data.imageio import DataError
    from utils.stage1.pseudo_masks import file_sha256, masks_checkpoint_sha, read_manifest
    stage1 = load_script("1_train_stage1")
    missing = tmp_path / "runs" / "other" / "stage1" / "checkpoint.pth"
    with pytest.raises(DataError, match="stage1.average_cams_with: .*other.*is not a file"):
        stage1.main(tiny_demo_args(tmp_path, f"stage1.average_cams_with=[{missing}]"))
    assert not (tmp_path / "runs" / "demo" / "stage1" / "checkpoint.pth").exists()

    assert stage1.main(tiny_demo_args(tmp_path)) == 0
    own = tmp_path / "runs" / "demo" / "stage1" / "checkpoint.pth"
    with pytest.raises(Exception, match="this run's own checkpoint"):
        stage1.main(tiny_demo_args(tmp_path, f"stage1.average_cams_with=[{own}]") + ["--masks-only"])
    missing.parent.mkdir(parents=True)
    shutil.copy(own, missing)
    single = tmp_path / "data" / "train" / "pseudo_mask"
    averaged = tmp_path / "averaged"
    setting = [f"stage1.average_cams_with=[{missing}]", f"data.pseudo_mask_dir={averaged}"]
    assert stage1.main(tiny_demo_args(tmp_path, *setting) + ["--masks-only"]) == 0
    names = sorted(p.name for p in single.glob("*.png"))
    assert names == sorted(p.name for p in averaged.glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(single / name)), np.asarray(Image.open(averaged / name))), name
    sha = read_manifest(averaged)["checkpoint_sha256"]
    assert sha == masks_checkpoint_sha(own, [missing]) and sha != file_sha256(own)

    cfg = load_config(str(tiny_demo_args(tmp_path)[1]), tiny_demo_args(tmp_path, *setting)[3::2])
    assert len(training_pairs(cfg)[0]) == len(names)
    cfg.stage1.average_cams_with = []
    with pytest.raises(DataError, match="another stage-1 checkpoint"):
        training_pairs(cfg)
