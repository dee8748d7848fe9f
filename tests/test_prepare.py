import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.config import load_config
from utils.data.imageio import DataError
from utils.data.prepare import patch_starts, prepare_dataset

SHARED_GLAS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glas"


def _save(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _config(root, *overrides):
    return load_config(None, [f"data.root={root}", "prepare.patch_size=32", "prepare.stride=16", *overrides])


def _glas_raw(folder):
    """A tiny GlaS-like raw folder: BMP instance masks, PNG 0/255 masks, a small image, a thin gland."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    # train_1: 90 x 64 BMP, two gland instances (ids 1 and 2).
    instances = np.zeros((64, 90), np.uint8)
    instances[5:30, 10:40] = 1
    instances[35:60, 50:85] = 2
    _save(folder / "train_1.bmp", _image(rng, 64, 90))
    _save(folder / "train_1_anno.bmp", instances)
    # train_2: 64 x 64 PNG, 0/255; a 7 x 7 gland in the corner (49 of 1024 pixels < 5%) and a large one.
    binary = np.zeros((64, 64), np.uint8)
    binary[2:9, 2:9] = 255
    binary[32:64, 32:64] = 255
    _save(folder / "train_2.png", _image(rng, 64, 64))
    _save(folder / "train_2_anno.png", binary)
    # train_3: 24 wide x 40 high, narrower than a patch; gland in the top half.
    small = np.zeros((40, 24), np.uint8)
    small[0:20] = 255
    _save(folder / "train_3.png", _image(rng, 40, 24))
    _save(folder / "train_3_anno.png", small)
    # train_4: held out as validation.
    _save(folder / "train_4.png", _image(rng, 48, 48))
    _save(folder / "train_4_anno.png", np.pad(np.full((20, 20), 255), 14))
    for name, suffix, mask_value in (("testA_1", ".png", 255), ("testB_1", ".bmp", 3)):
        test_mask = np.zeros((50, 70), np.uint8)
        test_mask[10:30, 20:50] = mask_value
        _save(folder / f"testA_1{suffix}".replace("testA_1", name), _image(rng, 50, 70))
        _save(folder / f"{name}_anno{suffix}", test_mask)
    (folder / "Grade.csv").write_text("name,grade\n")
    return {"train_1": instances > 0, "train_2": binary > 0, "train_3": small > 0}


def _expected_patches(masks, patch=32, stride=16):
    expected = {}
    for stem, mask in masks.items():
        for y in patch_starts(mask.shape[0], patch, stride):
            for x in patch_starts(mask.shape[1], patch, stride):
                window = mask[y:y + patch, x:x + patch]
                fractions = [(~window).mean(), window.mean()]
                expected[f"{stem}_{y}_{x}"] = "[" + ", ".join(str(int(f > 0.05)) for f in fractions) + "]"
    return expected


def _names(folder):
    return sorted(p.name for p in Path(folder).glob("*.png"))


def test_patch_starts_cover_the_image_and_end_at_the_border():
    assert patch_starts(90, 32, 16) == [0, 16, 32, 48, 58]
    assert patch_starts(64, 32, 16) == [0, 16, 32]
    assert patch_starts(32, 32, 16) == [0]
    assert patch_starts(20, 32, 16) == [0]


def test_glas_preparation_names_labels_and_counts(tmp_path):
    masks = _glas_raw(tmp_path / "raw")
    out = tmp_path / "out"
    counts = prepare_dataset(_config(out, "prepare.val_images=[train_4]"), tmp_path / "raw")
    expected = _expected_patches(masks)
    assert len(expected) == 15 + 9 + 2
    assert counts["patches"] == 26 and counts["val"] == 1 and counts["train_images"] == 3
    assert counts["test"] == 1 and counts["test_b"] == 1  # Test A and Test B are kept apart
    assert _names(out / "train" / "img") == sorted(f"{name}{label}.png" for name, label in expected.items())
    assert _names(out / "train" / "mask") == sorted(f"{name}.png" for name in expected)
    assert sum(counts["labels"].values()) == 26
    assert counts["labels"]["[0, 1]"] >= 1 and counts["labels"]["[1, 0]"] >= 1

    # The 7 x 7 gland is below the 5% rule: gland pixels in the mask, but not in the label.
    corner = np.asarray(Image.open(out / "train" / "mask" / "train_2_0_0.png"))
    assert (corner == 1).sum() == 49 and (out / "train" / "img" / "train_2_0_0[1, 0].png").is_file()
    assert (out / "train" / "img" / "train_2_32_32[0, 1].png").is_file()
    # Instance ids 1 and 2 both become gland (class 1).
    instance_patch = np.asarray(Image.open(out / "train" / "mask" / "train_1_0_0.png"))
    assert set(np.unique(instance_patch)) == {0, 1}
    assert (instance_patch == 1).sum() == masks["train_1"][:32, :32].sum()
    # The narrow image is padded: white image, ignore (255) mask, label from the real pixels only.
    padded_image = np.asarray(Image.open(out / "train" / "img" / "train_3_0_0[1, 1].png"))
    padded_mask = np.asarray(Image.open(out / "train" / "mask" / "train_3_0_0.png"))
    assert padded_image.shape == (32, 32, 3) and (padded_image[:, 24:] == 255).all()
    assert (padded_mask[:, 24:] == 255).all() and set(np.unique(padded_mask[:, :24])) == {0, 1}
    # Validation and test images are whole, with class-index masks.
    assert _names(out / "val" / "img") == ["train_4.png"] and _names(out / "val" / "mask") == ["train_4.png"]
    assert _names(out / "test" / "img") == ["testA_1.png"] and _names(out / "test_b" / "img") == ["testB_1.png"]
    for split, name in (("test", "testA_1.png"), ("test_b", "testB_1.png")):
        mask = Image.open(out / split / "mask" / name)
        assert mask.mode == "P" and mask.size == (70, 50)
        assert (np.asarray(mask) == 1).sum() == 20 * 30 and set(np.unique(np.asarray(mask))) == {0, 1}
    assert not list((out / "train" / "img").glob("train_4_*"))


def test_rerun_is_idempotent_and_stale_files_need_overwrite(tmp_path):
    _glas_raw(tmp_path / "raw")
    out = tmp_path / "out"
    cfg = _config(out, "prepare.val_images=[train_4]")
    prepare_dataset(cfg, tmp_path / "raw")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    again = prepare_dataset(cfg, tmp_path / "raw")
    assert again["written"] == 0 and again["removed"] == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.png")} == before

    wider = _config(out, "prepare.val_images=[train_4]", "prepare.stride=32")
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dataset(wider, tmp_path / "raw")
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == {p: b for p, (b, _) in before.items()}
    counts = prepare_dataset(wider, tmp_path / "raw", overwrite=True)
    assert counts["removed"] > 0
    assert len(_names(out / "train" / "img")) == counts["patches"] == len(_names(out / "train" / "mask"))
    assert "train_1_0_16" not in " ".join(_names(out / "train" / "img"))


def test_val_hold_out_by_count_is_seeded(tmp_path):
    _glas_raw(tmp_path / "raw")
    chosen = []
    for run in ("a", "b"):
        prepare_dataset(_config(tmp_path / run, "prepare.val_count=2", "seed=7"), tmp_path / "raw")
        chosen.append(_names(tmp_path / run / "val" / "img"))
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2
    train_names = " ".join(_names(tmp_path / "a" / "train" / "img"))
    assert not any(name[:-4] + "_" in train_names for name in chosen[0])
    every = prepare_dataset(_config(tmp_path / "all", "prepare.val_count=0"), tmp_path / "raw")
    assert every["val"] == 0 and not (tmp_path / "all" / "val").exists()  # a final model trains on every image
    assert every["train_images"] == len({name.split("_")[1] for name in _names(tmp_path / "all" / "train" / "img")})


def test_missing_mask_size_mismatch_and_bad_folders_are_clear_errors(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    _save(raw / "train_1.png", _image(rng, 40, 40))
    with pytest.raises(DataError, match=r"train_1\.png: no mask train_1_anno"):
        prepare_dataset(_config(tmp_path / "out"), raw)
    _save(raw / "train_1_anno.png", np.zeros((40, 41), np.uint8))
    with pytest.raises(DataError, match=r"train_1_anno\.png: mask is 41x40 but its image train_1\.png is 40x40"):
        prepare_dataset(_config(tmp_path / "out"), raw)
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(_config(tmp_path / "out"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no GlaS training images"):
        prepare_dataset(_config(tmp_path / "out"), tmp_path / "empty")
    with pytest.raises(DataError, match="val_images.*train_9"):
        _save(raw / "train_1_anno.png", np.zeros((40, 40), np.uint8))
        prepare_dataset(_config(tmp_path / "out", "prepare.val_images=[train_9]"), raw)


def test_generic_mode_with_three_classes(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    for split, count in (("train", 3), ("test", 1)):
        (raw / split).mkdir(parents=True)
        for index in range(count):
            mask = np.zeros((40, 40), np.uint8)
            mask[:, 20:] = 1
            mask[36:, :] = 2
            _save(raw / split / f"tile{index}.png", _image(rng, 40, 40))
            _save(raw / split / f"tile{index}_mask.png", mask)
    cfg = _config(tmp_path / "out", "prepare.mode=generic", "prepare.raw_mask_suffix=_mask",
                  "prepare.raw_mask_encoding=index", "prepare.val_count=1", "data.classes=[a, b, c]", "data.background=a",
                  "data.palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]]")
    counts = prepare_dataset(cfg, raw)
    assert counts["val"] == 1 and counts["test"] == 1 and counts["patches"] == 2 * 4
    names = _names(tmp_path / "out" / "train" / "img")
    top_left = [n for n in names if re.match(r"tile\d_0_0\[", n)]
    bottom_right = [n for n in names if re.match(r"tile\d_8_8\[", n)]
    assert top_left and all(n.endswith("[1, 1, 0].png") for n in top_left)
    assert bottom_right and all(n.endswith("[1, 1, 1].png") for n in bottom_right)  # 4 of 32 rows are class c
    assert _names(tmp_path / "out" / "test" / "mask") == ["tile0.png"]


def test_command_line_writes_the_config_root_and_reports_errors(tmp_path, capsys):
    _glas_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    config = tmp_path / "glas.yaml"
    config.write_text(f"data:\n  root: {out}\nprepare:\n  patch_size: 32\n  stride: 16\n  val_images: [train_4]\n")
    script = importlib.import_module("0_prepare_data")
    assert script.main(["--config", str(config), "--raw", str(tmp_path / "raw")]) == 0
    assert "26 training patches" in capsys.readouterr().out
    assert len(_names(out / "train" / "img")) == 26
    with pytest.raises(SystemExit) as stop:
        from utils.cli import run_main
        run_main(script.main, ["--config", str(config), "--raw", str(tmp_path / "missing")])
    assert stop.value.code == 2 and "missing does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_GLAS.is_dir(), reason="real GlaS images not present at ../shared/data/glas")
def test_three_real_glas_images(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    stems = ["train_1", "train_2", "train_3"]
    for stem in stems:
        for name in (f"{stem}.png", f"{stem}_anno.png"):
            if not (SHARED_GLAS / name).is_file():
                pytest.skip(f"{SHARED_GLAS / name} is missing")
            (raw / name).symlink_to(SHARED_GLAS / name)
    cfg = load_config(None, [f"data.root={tmp_path / 'out'}", "prepare.val_images=[train_3]"])
    counts = prepare_dataset(cfg, raw)
    masks = {stem: np.asarray(Image.open(SHARED_GLAS / f"{stem}_anno.png")) > 0 for stem in stems[:2]}
    expected = _expected_patches(masks, patch=112, stride=56)
    assert counts["patches"] == len(expected) and counts["val"] == 1 and "test" not in counts
    assert _names(tmp_path / "out" / "train" / "img") == sorted(f"{n}{label}.png" for n, label in expected.items())
    val_image = np.asarray(Image.open(tmp_path / "out" / "val" / "img" / "train_3.png"))
    assert np.array_equal(val_image, np.asarray(Image.open(SHARED_GLAS / "train_3.png").convert("RGB")))


def test_val_hold_out_by_patient_keeps_every_patient_on_one_side(tmp_path, capsys):
    from conftest import write_glas_like_raw
    from utils.data.prepare import find_raw_pairs
    raw = write_glas_like_raw(tmp_path / "raw", train=10, test=1, size=(40, 40))
    patient = {1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "c", 7: "d", 8: "d", 9: "d", 10: "d"}
    (raw / "groups.csv").write_text("name, patient ID, grade\n" + "".join(
        f"train_{i}, {p}, benign\n" for i, p in patient.items()) + "testA_1, e, benign\n")
    outcomes = set()
    for seed in range(8):
        cfg = _config(tmp_path / "out", "prepare.val_groups=groups.csv", "prepare.val_count=3", f"seed={seed}")
        train, val, _ = find_raw_pairs(cfg, raw)
        held = {patient[int(p.stem.split("_")[1])] for p in val}
        trained = {patient[int(p.stem.split("_")[1])] for p in train}
        assert val and len(val) <= 3 and not held & trained and len(train) + len(val) == 10
        assert [p.stem for p in find_raw_pairs(cfg, raw)[1]] == [p.stem for p in val]  # seeded
        outcomes.add(frozenset(held))
    assert len(outcomes) > 1
    assert "whole groups" in capsys.readouterr().out
    with pytest.raises(DataError, match="no column 'patient'.*name, patient ID, grade"):
        find_raw_pairs(_config(tmp_path / "out", "prepare.val_groups=groups.csv",
                               "prepare.val_group_column=patient"), raw)
    with pytest.raises(DataError, match="missing.csv does not exist"):
        find_raw_pairs(_config(tmp_path / "out", "prepare.val_groups=missing.csv"), raw)
    (raw / "groups.csv").write_text("name,patient ID\ntrain_1,a\n")
    with pytest.raises(DataError, match=r"groups.csv names no group for training image train_\d+ \(nor 8 more\)"):
        find_raw_pairs(_config(tmp_path / "out", "prepare.val_groups=groups.csv"), raw)
    (raw / "groups.csv").write_text("name,patient ID\n" + "".join(f"train_{i},x\n" for i in range(1, 11)))
    with pytest.raises(DataError, match="val_count=3"):
        find_raw_pairs(_config(tmp_path / "out", "prepare.val_groups=groups.csv", "prepare.val_count=3"), raw)


def test_glas_patients_are_never_split_between_train_and_val():
    import csv
    if not SHARED_GLAS.is_dir():
        pytest.skip("../shared/data/glas is not present")
    from utils.data.prepare import find_raw_pairs
    with open(SHARED_GLAS / "Grade.csv", newline="") as handle:
        patient = {row[0]: row[1].strip() for row in list(csv.reader(handle))[1:]}
    cfg = load_config("configs/glas_cpu.yaml", ["prepare.val_groups=Grade.csv"])
    train, val, _ = find_raw_pairs(cfg, SHARED_GLAS)
    assert 0 < len(val) <= 15 and len(train) + len(val) == 85
    assert not {patient[p.stem] for p in val} & {patient[p.stem] for p in train}
