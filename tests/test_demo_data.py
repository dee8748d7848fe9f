import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.config import load_config
from utils.data.demo_data import MARKER, ensure_demo_dataset, generate_demo_dataset, target_root
from utils.settings import DEFAULTS

PALETTE = DEFAULTS["data"]["palette"]
SMALL = {"train_images": 24, "val_images": 2, "test_images": 2, "tile_size": 64, "test_size": [96, 80],
         "stain_shift": 0.0, "target_domain": True}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _label_digits(name):
    return [int(d) for d in re.search(r"\[(.*)\]", name).group(1).split(",")]


def _mask_of(root, image_path):
    stem = image_path.name.split("[")[0]
    return np.asarray(Image.open(Path(root) / "train" / "mask" / f"{stem}.png"))


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = generate_demo_dataset(tmp_path / "a" / "demo", SMALL, PALETTE, seed=3)
    generate_demo_dataset(tmp_path / "b" / "demo", SMALL, PALETTE, seed=3)
    generate_demo_dataset(tmp_path / "c" / "demo", SMALL, PALETTE, seed=4)
    for name in ("demo", "demo_target"):
        a, b, c = (_files(tmp_path / run / name) for run in ("a", "b", "c"))
        assert a and a == b
        shared_images = [k for k in a if k.startswith("val/img/")]
        assert shared_images and all(a[k] != c[k] for k in shared_images)
    assert first["target_root"] == str(tmp_path / "a" / "demo_target")
    assert (tmp_path / "a" / "demo" / MARKER).is_file() and (tmp_path / "a" / "demo_target" / MARKER).is_file()


def test_default_settings_give_every_label_kind_and_labels_follow_masks(tmp_path):
    root = tmp_path / "demo"
    summary = generate_demo_dataset(root, DEFAULTS["demo"], PALETTE, seed=0)
    tiles = sorted((root / "train" / "img").glob("*.png"))
    assert len(tiles) == DEFAULTS["demo"]["train_images"]
    kinds = set()
    for tile in tiles:
        mask = _mask_of(root, tile)
        image = np.asarray(Image.open(tile))
        assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
        assert set(np.unique(mask)) <= {0, 1}
        fractions = np.bincount(mask.ravel(), minlength=2) / mask.size
        assert _label_digits(tile.name) == [int(f > 0.05) for f in fractions], tile.name
        kinds.add(tuple(_label_digits(tile.name)))
    assert kinds == {(1, 0), (1, 1), (0, 1)}
    assert sum(summary["labels"].values()) == len(tiles)
    width, height = DEFAULTS["demo"]["test_size"]
    for split, count in (("val", 8), ("test", 12)):
        images = sorted((root / split / "img").glob("*.png"))
        assert len(images) == count
        for image_path in images:
            image = Image.open(image_path)
            mask = np.asarray(Image.open(root / split / "mask" / image_path.name))
            assert image.size == (width, height) and mask.shape == (height, width)
            assert 0.03 < mask.mean() < 0.9  # several glands and some stroma in each large image


def test_target_domain_is_stain_shifted_with_the_same_layout(tmp_path):
    root = tmp_path / "demo"
    generate_demo_dataset(root, SMALL, PALETTE, seed=0)
    target = target_root(root)
    assert target == tmp_path / "demo_target"
    source_tiles = sorted((root / "train" / "img").glob("*.png"))
    target_tiles = sorted((target / "train" / "img").glob("*.png"))
    assert 0 < len(target_tiles) < len(source_tiles)
    for tile in target_tiles:
        assert _mask_of(target, tile).shape == (64, 64)
    assert len(list((target / "val" / "mask").glob("*.png"))) == 2
    assert len(list((target / "test" / "img").glob("*.png"))) == 2

    def mean_colour(paths):
        return np.mean([np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3).mean(0) for p in paths], 0)

    source_rgb, target_rgb = mean_colour(source_tiles), mean_colour(target_tiles)
    # Bluer haematoxylin and paler eosin: the target is less red relative to blue.
    assert (target_rgb[2] - target_rgb[0]) > (source_rgb[2] - source_rgb[0]) + 5


def test_ensure_generates_once_and_again_after_a_missing_marker(tmp_path, capsys):
    cfg = load_config(None, [f"data.root={tmp_path / 'demo'}", "demo.train_images=6", "demo.val_images=1",
                             "demo.test_images=1", "demo.tile_size=48", "demo.test_size=[64, 64]",
                             "demo.target_domain=false"])
    root = ensure_demo_dataset(cfg)
    assert root == tmp_path / "demo" and (root / MARKER).is_file()
    assert "demo" in capsys.readouterr().out
    assert not (tmp_path / "demo_target").exists()
    tile = sorted((root / "train" / "img").glob("*.png"))[0]
    original = tile.read_bytes()
    tile.unlink()
    ensure_demo_dataset(cfg)                     # marker present: nothing is done
    assert not tile.exists()
    assert capsys.readouterr().out == ""
    (root / MARKER).unlink()                     # as after a killed generation
    ensure_demo_dataset(cfg)
    assert tile.read_bytes() == original


def test_changed_settings_regenerate_and_remove_old_tiles(tmp_path):
    overrides = [f"data.root={tmp_path / 'demo'}", "demo.val_images=1", "demo.test_images=1",
                 "demo.tile_size=48", "demo.test_size=[64, 64]", "demo.target_domain=false"]
    ensure_demo_dataset(load_config(None, overrides + ["demo.train_images=8"]))
    ensure_demo_dataset(load_config(None, overrides + ["demo.train_images=5"]))
    root = tmp_path / "demo"
    assert len(list((root / "train" / "img").glob("*.png"))) == 5
    assert len(list((root / "train" / "mask").glob("*.png"))) == 5


def test_too_small_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="tile_size"):
        generate_demo_dataset(tmp_path / "demo", {**SMALL, "tile_size": 8}, PALETTE)
