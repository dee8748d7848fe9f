"""Awkward and broken inputs, seen as a user sees them: the scripts run as commands.

Each script either handles an input (warning where it skipped something) or exits non-zero with one
sentence that names the file or the setting -- never a traceback. Decisions this pins down:
- 255 in a mask is "ignore" in every dataset, whatever its number of classes: it is allowed, not scored
  and not learnt from;
- 16-bit images are scaled to 8 bits, a 1x1 image is a valid (if useless) image;
- file names may hold spaces, non-ASCII letters and extra brackets; only the last [..] group of a
  training image's name is its label;
- an unreadable image stops training and preparation (a silently smaller data set would change results),
  but is only skipped, with an error row and a line on stderr, by inference.
Interpreter start-up dominates the cost, so the many error cases run in one process through the same
`run_main` wrapper the scripts' command lines use.
"""
import csv
import json
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ONE_THREAD, ROOT, save_png
from models.dpr import DPR

CLASSES = ["stroma", "gland", "lumen"]
CONFIG = {
    "name": "awkward",
    "device": "cpu",
    "num_workers": 0,
    "data": {"classes": CLASSES, "background": "stroma", "palette": [[239, 239, 239], [190, 61, 42], [40, 90, 200]],
             "mask_encoding": "index"},
    "prepare": {"mode": "generic", "patch_size": 32, "stride": 32, "raw_mask_encoding": "index",
                "raw_mask_suffix": "_mask"},
    "stage1": {"backbone": "resnet10t", "out_indices": [1, 2, 3], "image_size": 32, "epochs": 1,
               "batch_size": 4, "freeze_bn": False, "freeze_stem": False, "lr_mult_new": 1.0, "cam_flip": False,
               "samples": 1},
    "stage2": {"encoder": "resnet10t", "crop_size": 32, "window": 32, "epochs": 1, "batch_size": 4},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def run(argv, timeout=300):
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                            env=ONE_THREAD, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def error_line(stderr):
    """The single 'error: ...' sentence a script ends with."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def tissue(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def three_class_mask(height, width):
    """Stroma left, gland middle, lumen right, and a band of 255 (ignore) across the middle."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3:] = 1
    mask[:, 2 * width // 3:] = 2
    mask[height // 2 - 2:height // 2 + 2] = 255
    return mask


def write_raw(raw):
    """A raw generic-mode folder full of awkward but valid files."""
    rng = np.random.default_rng(0)
    train = raw / "train"
    for stem in ("plain", "with space é ü", "brackets [v2] (copy)"):
        save_png(train / f"{stem}.png", tissue(rng, 64, 64))
        save_png(train / f"{stem}_mask.png", three_class_mask(64, 64))
    # 16-bit RGB image (OpenCV writes BGR) and a 16-bit grayscale one with a 16-bit mask
    cv2.imwrite(str(train / "deep16.png"), rng.integers(0, 65536, (64, 64, 3)).astype(np.uint16))
    save_png(train / "deep16_mask.png", three_class_mask(64, 64))
    save_png(train / "gray16.png", rng.integers(0, 65536, (64, 64)).astype(np.uint16))
    Image.fromarray(three_class_mask(64, 64).astype(np.uint16)).save(train / "gray16_mask.png")
    for split, names in (("val", ("val one", "val [2]")), ("test", ("test ä", "test[b]"))):
        for name in names:
            save_png(raw / split / f"{name}.png", tissue(rng, 48, 64))
            save_png(raw / split / f"{name}_mask.png", three_class_mask(48, 64))
    save_png(raw / "val" / "dot.png", tissue(rng, 1, 1))  # a 1x1 image, gland
    save_png(raw / "val" / "dot_mask.png", np.ones((1, 1), np.uint8))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(config path, prepared data root, work folder): 0_prepare_data.py run on the awkward raw folder."""
    tmp = tmp_path_factory.mktemp("awkward")
    write_raw(tmp / "raw")
    config = tmp / "awkward.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "root": str(tmp / "data")},
                                      "runs_dir": str(tmp / "runs")}, allow_unicode=True))
    result = run(["0_prepare_data.py", "--config", config, "--raw", tmp / "raw"])
    assert result.returncode == 0, result.stderr[-2000:]
    return config, tmp / "data", tmp


@pytest.mark.slow
def test_awkward_but_valid_inputs_go_through_the_whole_pipeline(prepared):
    config, prepared_data, tmp = prepared
    data = copy_data(prepared_data, tmp / "pipeline data")  # the other test copies the pristine one
    root = ["--set", f"data.root={data}"]
    names = [p.name for p in (data / "train" / "img").iterdir()]
    assert len(names) == 5 * 4  # five 64x64 images in 32 px patches
    assert "with space é ü_0_0[1, 1, 0].png" in names and "brackets [v2] (copy)_0_32[0, 1, 1].png" in names
    assert {p.name for p in (data / "val" / "img").iterdir()} == {"val one.png", "val [2].png", "dot.png"}
    val_mask = np.asarray(Image.open(data / "val" / "mask" / "val one.png"))
    assert set(np.unique(val_mask)) == {0, 1, 2, 255}  # ignore survives preparation
    # a 1x1 and a 16-bit training tile next to the prepared ones, and a training mask of the wrong size
    save_png(data / "train" / "img" / "dot[0, 1, 0].png", np.full((1, 1, 3), 128, np.uint8))
    save_png(data / "train" / "img" / "deep[0, 0, 1].png", np.full((32, 32), 40000, np.uint16))
    # a tile whose label names no class: its pseudo-mask is all "ignore", which scoring must survive
    save_png(data / "train" / "img" / "blank[0, 0, 0].png", np.full((32, 32, 3), 200, np.uint8))
    save_png(data / "train" / "mask" / "blank.png", np.zeros((32, 32), np.uint8))
    wrong_size = data / "train" / "mask" / "plain_0_0.png"
    save_png(wrong_size, np.zeros((16, 16), np.uint8))

    result = run(["1_train_stage1.py", "--config", config, *root])
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and str(wrong_size) in warnings[0]  # left out of the pseudo-mask score
    pseudo = data / "train" / "pseudo_mask"
    assert np.asarray(Image.open(pseudo / "dot[0, 1, 0].png")).tolist() == [[1]]
    assert (np.asarray(Image.open(pseudo / "deep[0, 0, 1].png")) == 2).all()
    assert (np.asarray(Image.open(pseudo / "blank[0, 0, 0].png")) == 255).all()
    assert (pseudo / "with space é ü_0_0[1, 1, 0].png").is_file()
    metrics = json.loads((tmp / "runs" / "awkward" / "stage1" / "metrics.json").read_text())
    assert len(metrics["val"]["iou"]) == 3

    result = run(["2_train_stage2.py", "--config", config, *root])
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = tmp / "runs" / "awkward" / "stage2"
    assert {p.name for p in (stage2 / "predictions" / "test").iterdir()} == {"test ä.png", "test[b].png"}

    # inference on a folder of good, awkward and broken files: it goes on, and says which failed
    rng = np.random.default_rng(1)
    folder = tmp / "to segment"
    save_png(folder / "good ñ [x].png", tissue(rng, 40, 40))
    save_png(folder / "one pixel.png", tissue(rng, 1, 1))
    save_png(folder / "sixteen.png", rng.integers(0, 65536, (20, 30)).astype(np.uint16))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "cut.png").write_bytes((folder / "good ñ [x].png").read_bytes()[:200])
    out = tmp / "segmented"
    result = run(["inference.py", "--checkpoint", stage2 / "best.pth", "--input", folder, "--output", out,
                  "--device", "cpu"])
    assert result.returncode == 1
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        status = {row["file"]: row["status"] for row in csv.DictReader(handle)}
    assert [name for name, s in status.items() if s == "ok"] == ["good ñ [x].png", "one pixel.png", "sixteen.png"]
    for broken in ("empty.png", "notes.png", "cut.png"):
        assert status[broken].startswith("error: ") and broken in status[broken]
        assert re.search(rf"^  {re.escape(broken)}: error: .*{re.escape(broken)}", result.stderr, re.M)
    assert Image.open(out / "one pixel_mask.png").size == (1, 1)


# Runs many (script, argv) cases in one interpreter, each through the wrapper its command line uses, and
# marks where each case's stderr ends. An exception escaping run_main is printed as Python would print it.
CASES_DRIVER = """
import importlib, json, sys, traceback
sys.path.insert(0, {root!r})
from utils.cli import run_main
for name, script, argv in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    try:
        run_main(importlib.import_module(script).main, argv)
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        traceback.print_exc()
        code = 1
    print(f"\\n@@ {{name}} exit {{code}} @@", file=sys.stderr, flush=True)
"""


def run_cases(tmp, cases):
    """{case name: (exit code, stderr)} for [(name, script, argv, ...)]."""
    spec = tmp / "cases.json"
    spec.write_text(json.dumps([[name, script, [str(a) for a in argv]] for name, script, argv in cases]),
                    encoding="utf-8")
    driver = tmp / "cases_driver.py"
    driver.write_text(CASES_DRIVER.format(root=str(ROOT)))
    result = subprocess.run([sys.executable, str(driver), str(spec)], cwd=ROOT, capture_output=True, text=True,
                            env=ONE_THREAD, timeout=300)
    parts = re.split(r"\n@@ (\S+) exit (\S+) @@\n", "\n" + result.stderr)
    found = {parts[i]: (parts[i + 1], parts[i - 1]) for i in range(1, len(parts) - 1, 3)}
    assert set(found) == {name for name, _, _ in cases}, result.stderr[-3000:]
    return found


def copy_data(data, folder):
    shutil.copytree(data, folder, ignore=shutil.ignore_patterns("pseudo_mask"))
    return folder


def with_config(config, tmp, name, **changes):
    """A copy of the YAML with some settings changed (nested dicts merged)."""
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            settings.setdefault(section, {})[leaf] = value
        else:
            settings[section] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    return path


def test_bad_inputs_stop_with_one_sentence_naming_the_file_or_setting(prepared, tmp_path):
    config, data, _ = prepared
    rng = np.random.default_rng(2)
    cases, expect = [], {}

    def case(name, script, argv, *needles):
        cases.append((name, script, argv))
        expect[name] = needles

    # ---- 0_prepare_data.py: raw folders with one broken file each
    def raw_with(name, breaker):
        raw = tmp_path / f"raw_{name}"
        for stem in ("a", "b"):
            save_png(raw / "train" / f"{stem}.png", tissue(rng, 40, 40))
            save_png(raw / "train" / f"{stem}_mask.png", three_class_mask(40, 40))
        broken = breaker(raw / "train")
        return raw, broken

    def zero_byte(folder):
        (folder / "a.png").write_bytes(b"")
        return folder / "a.png"

    def truncated(folder):
        (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:150])
        return folder / "b.png"

    def text_mask(folder):
        (folder / "a_mask.png").write_text("0 1 2\n")
        return folder / "a_mask.png"

    def small_mask(folder):
        save_png(folder / "b_mask.png", three_class_mask(20, 40))
        return folder / "b_mask.png"

    def out_of_range_mask(folder):
        save_png(folder / "a_mask.png", np.full((40, 40), 7, np.uint8))
        return folder / "a_mask.png"

    for name, breaker in (("zero_byte", zero_byte), ("truncated", truncated), ("text_mask", text_mask),
                          ("small_mask", small_mask), ("mask_value_7", out_of_range_mask)):
        raw, broken = raw_with(name, breaker)
        case(f"prepare_{name}", "0_prepare_data", ["--config", config, "--raw", raw, "--set",
                                                   f"data.root={tmp_path / ('prepared_' + name)}"], str(broken))
    (tmp_path / "raw_empty" / "train").mkdir(parents=True)
    case("prepare_empty_folder", "0_prepare_data", ["--config", config, "--raw", tmp_path / "raw_empty"],
         str(tmp_path / "raw_empty" / "train"), "holds no images")

    # ---- 1_train_stage1.py: a prepared data set with one broken training file each
    def stage1_case(name, breaker, *extra):
        root = copy_data(data, tmp_path / f"data_{name}")
        broken = breaker(root / "train" / "img")
        case(f"stage1_{name}", "1_train_stage1", ["--config", config, "--set", f"data.root={root}",
                                                  "--set", f"runs_dir={tmp_path / 'runs'}", *extra], str(broken))

    def first_image(folder):
        return sorted(folder.glob("*.png"))[0]

    def zero_byte_tile(folder):
        first_image(folder).write_bytes(b"")
        return first_image(folder)

    def text_tile(folder):
        (folder / "notes[1, 0, 0].png").write_text("not an image")
        return folder / "notes[1, 0, 0].png"

    def unlabelled_tile(folder):
        save_png(folder / "copy [1, 0, 0] (2).png", tissue(rng, 32, 32))
        return folder / "copy [1, 0, 0] (2).png"

    def two_digit_label(folder):
        save_png(folder / "x[1, 0].png", tissue(rng, 32, 32))
        return folder / "x[1, 0].png"

    stage1_case("zero_byte_tile_in_worker", zero_byte_tile, "--set", "num_workers=1")
    stage1_case("text_tile", text_tile)
    stage1_case("unlabelled_name", unlabelled_tile)
    stage1_case("label_of_wrong_length", two_digit_label)
    empty = copy_data(data, tmp_path / "data_empty")
    for path in (empty / "train" / "img").iterdir():
        path.unlink()
    case("stage1_empty_folder", "1_train_stage1", ["--config", config, "--set", f"data.root={empty}"],
         str(empty / "train" / "img"), "holds no images")

    # ---- 2_train_stage2.py: ground-truth training masks, one broken val/test file each
    def stage2_case(name, breaker):
        root = copy_data(data, tmp_path / f"data2_{name}")
        broken = breaker(root)
        case(f"stage2_{name}", "2_train_stage2", ["--config", config, "--set", f"data.root={root}",
                                                  "--set", "stage2.train_masks=ground_truth",
                                                  "--set", f"runs_dir={tmp_path / 'runs2'}"], str(broken))

    def wrong_size_val_mask(root):
        save_png(root / "val" / "mask" / "val one.png", three_class_mask(20, 20))
        return root / "val" / "mask" / "val one.png"

    def truncated_test_image(root):
        path = root / "test" / "img" / "test ä.png"
        path.write_bytes(path.read_bytes()[:300])
        return path

    def missing_val_mask(root):
        (root / "val" / "mask" / "val [2].png").unlink()
        return root / "val" / "mask" / "val [2].png"

    def empty_val_folder(root):
        for path in (root / "val" / "img").iterdir():
            path.unlink()
        return root / "val" / "img"

    def raw_0_255_val_masks(root):
        # 0/255 masks read as class indices: every foreground pixel would be 'ignore', and any prediction
        # would score as if perfect
        for path in (root / "val" / "mask").iterdir():
            save_png(path, np.where(np.asarray(Image.open(path)) > 0, 255, 0).astype(np.uint8))
        return root / "val" / "mask"

    for name, breaker in (("wrong_size_val_mask", wrong_size_val_mask), ("truncated_test_image", truncated_test_image),
                          ("missing_val_mask", missing_val_mask), ("empty_val_folder", empty_val_folder),
                          ("0_255_val_masks_read_as_indices", raw_0_255_val_masks)):
        stage2_case(name, breaker)
    expect["stage2_0_255_val_masks_read_as_indices"] += ("data.mask_encoding", "binary255")
    crop_root = copy_data(data, tmp_path / "data2_crop")
    case("stage2_crop_larger_than_training_images", "2_train_stage2",
         ["--config", config, "--set", f"data.root={crop_root}", "--set", "stage2.train_masks=ground_truth",
          "--set", "stage2.crop_size=64", "--set", f"runs_dir={tmp_path / 'runs2'}"],
         "stage2.crop_size=64", "prepare.patch_size", "32x32")

    # ---- configs: unknown key, wrong type, negative epoch count (in the YAML and on the command line)
    bad_yamls = {"unknown_key": ({"stage1__epocs": 3}, "stage1.epocs"),
                 "wrong_type": ({"stage2__batch_size": "sixteen"}, "stage2.batch_size"),
                 "negative_epochs": ({"stage1__epochs": -2}, "stage1.epochs")}
    for (name, (changes, key)), script in zip(bad_yamls.items(), ("0_prepare_data", "1_train_stage1",
                                                                  "2_train_stage2")):
        path = with_config(config, tmp_path, name, **changes)
        extra = ["--raw", tmp_path / "raw_empty"] if script == "0_prepare_data" else []
        case(f"yaml_{name}", script, ["--config", path, *extra], str(path), key)
    case("set_negative_epochs", "2_train_stage2", ["--config", config, "--set", "stage2.epochs=-1"], "stage2.epochs")
    case("set_moved_key", "1_train_stage1", ["--config", config, "--set", "data.fill_holes=[gland]"],
         "data.fill_holes", "postprocess.fill_holes")
    case("set_background_not_a_class", "2_train_stage2", ["--config", config, "--set", "data.background=glass"],
         "data.background", "glass")
    case("set_unknown_key", "1_train_stage1", ["--config", config, "--set", "stage1.lr_multiplier=2"],
         "stage1.lr_multiplier")

    # ---- inference.py
    (tmp_path / "nothing here").mkdir()
    checkpoint = tmp_path / "untrained.pth"
    torch.save({"format": "ibdr-stage2", "model": DPR("resnet10t", 3).state_dict(),
                "meta": {"encoder": "resnet10t", "classes": CLASSES, "palette": CONFIG["data"]["palette"],
                         "mean": [0.5] * 3, "std": [0.25] * 3, "window": 32, "overlap": 0.25}}, checkpoint)
    case("inference_empty_folder", "inference", ["--checkpoint", checkpoint, "--input", tmp_path / "nothing here",
                                                 "--output", tmp_path / "out", "--device", "cpu"],
         "nothing here")
    case("inference_missing_checkpoint", "inference", ["--checkpoint", tmp_path / "missing.pth", "--input",
                                                       tmp_path / "nothing here", "--output", tmp_path / "out"],
         str(tmp_path / "missing.pth"))
    text_checkpoint = tmp_path / "notes.pth"
    text_checkpoint.write_text("not a checkpoint")
    case("inference_text_checkpoint", "inference", ["--checkpoint", text_checkpoint, "--input",
                                                    tmp_path / "nothing here", "--output", tmp_path / "out"],
         str(text_checkpoint), "not a PyTorch checkpoint")

    for name, second_mask in (("missing_one", None), ("wrong_size", np.zeros((10, 20), np.uint8))):
        scored = tmp_path / f"scored {name}"
        save_png(scored / "a.png", tissue(rng, 20, 20))
        save_png(scored / "b.png", tissue(rng, 20, 20))
        save_png(scored / "masks" / "a.png", np.zeros((20, 20), np.uint8))
        if second_mask is not None:
            save_png(scored / "masks" / "b.png", second_mask)
        needles = (str(scored / "b.png"), "no mask") if second_mask is None else (str(scored / "masks" / "b.png"),
                                                                                   "20x10")
        case(f"inference_masks_{name}", "inference", ["--checkpoint", checkpoint, "--input", scored, "--output",
                                                      tmp_path / "out scored", "--masks", scored / "masks",
                                                      "--device", "cpu"], *needles)

    results = run_cases(tmp_path, cases)
    assert not (tmp_path / "out scored").exists()  # mask problems are found before anything is written
    # found from the file headers before training, not after an epoch of work
    assert "stage 2 epoch" not in results["stage2_wrong_size_val_mask"][1]
    failures = []
    for name, needles in expect.items():
        code, stderr = results[name]
        if "Traceback" in stderr or code != "2":
            failures.append(f"{name}: exit {code}\n{stderr[-1500:]}")
            continue
        line = error_line(stderr)
        print(f"{name}: {line}")  # the catalogue of messages, shown with pytest -s
        missing = [n for n in needles if n not in line]
        if missing:
            failures.append(f"{name}: {line!r} does not name {missing}")
    assert not failures, "\n\n".join(failures)
