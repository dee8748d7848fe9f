import csv
import hashlib
import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
from PIL import Image

import inference
from models.dpr import DPR
from utils.checkpoint import CheckpointError
from utils.cli import run_main
from utils.runtime import Runtime
from utils.slides.exports import mask_to_geojson
from utils.slides.slide import Resolution, is_slide, segment_slide, tile_grid
from utils.stage2.predict import load_segmenter, predict_logits

ENCODER = "resnet10t"
WINDOW = 64
META = {"encoder": ENCODER, "classes": ["background", "gland"], "palette": [[239, 239, 239], [190, 61, 42]],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "window": WINDOW, "overlap": 0.25}
CPU = Runtime(torch.device("cpu"), None)


def save_stage2(path, model):
    torch.save({"format": "ibdr-stage2", "model": model.state_dict(), "meta": META}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_stage2(tmp_path_factory.mktemp("ckpt") / "best.pth", DPR(ENCODER, 2))


@pytest.fixture(scope="module")
def gland_checkpoint(tmp_path_factory):
    """A DPR whose main head says 'gland' everywhere: predicted tiles become gland, skipped glass stays background."""
    model = DPR(ENCODER, 2)
    with torch.no_grad():
        model.main_head[-1].weight.zero_()
        model.main_head[-1].bias.copy_(torch.tensor([0.0, 4.0]))
    return save_stage2(tmp_path_factory.mktemp("ckpt") / "gland.pth", model)


def read_summary(folder):
    with open(folder / "summary.csv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folder_of_mixed_formats_with_a_corrupt_file(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    folder, out = tmp_path / "tiles", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)).save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (100, 90), dtype=np.uint8)).save(folder / "gray.tif")
    deep = rng.integers(0, 4000, (50, 60, 3)).astype(np.uint16)  # a dim 16-bit image: it must stay dim
    tifffile.imwrite(folder / "deep.tif", deep, photometric="rgb")
    (folder / "broken.png").write_bytes((folder / "rgb.png").read_bytes()[:300])
    before = digest(folder)
    argv = ["--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out), "--device", "cpu",
            "--save-probs"]

    assert inference.main(argv) == 1
    rows = read_summary(out)
    assert set(rows) == {"rgb.png", "photo.jpg", "alpha.png", "gray.tif", "deep.tif", "broken.png"}
    assert rows["broken.png"]["status"].startswith("error: ") and "broken.png" in rows["broken.png"]["status"]
    assert not (out / "broken_mask.png").exists()
    sizes = {"rgb.png": (64, 64), "photo.jpg": (64, 64), "alpha.png": (48, 40), "gray.tif": (90, 100),
             "deep.tif": (60, 50)}
    for name, size in sizes.items():
        stem = name.split(".")[0]
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == size
        assert Image.open(out / f"{stem}_overlay.png").size == size
        probs = [np.asarray(Image.open(out / f"{stem}_prob_{c}.png"), dtype=int) for c in META["classes"]]
        assert np.abs(probs[0] + probs[1] - 255).max() <= 1
        # The mask is the more probable class wherever the probabilities are not tied at 8 bits.
        decided = np.abs(probs[1] - probs[0]) > 2
        assert np.array_equal(np.asarray(mask)[decided], (probs[1] > probs[0])[decided])
        assert rows[name]["status"] == "ok"
        assert (int(rows[name]["width"]), int(rows[name]["height"])) == size
        assert abs(float(rows[name]["frac_background"]) + float(rows[name]["frac_gland"]) - 1) < 1e-3
        assert abs(float(rows[name]["frac_gland"]) - (np.asarray(mask) == 1).mean()) < 1e-4  # as written
    assert rows["gray.tif"]["kind"] == "image" and rows["rgb.png"]["kind"] == "tile"
    assert rows["gray.tif"]["tiles_predicted"] == "4"
    # 16-bit RGB is scaled to 8 bits by its bit depth, not truncated to its low byte nor stretched to its peak.
    expected = np.rint(deep * (255.0 / 65535))
    assert np.abs(inference.read_image(folder / "deep.tif").astype(float) - expected).max() <= 1
    assert digest(folder) == before

    mask_time = (out / "rgb_mask.png").stat().st_mtime_ns
    assert inference.main(argv) == 1
    rows = read_summary(out)
    assert {rows[f]["status"] for f in rows if f != "broken.png"} == {"skipped"}
    assert rows["gray.tif"]["frac_gland"] != ""
    assert rows["broken.png"]["status"].startswith("error: ")
    assert (out / "rgb_mask.png").stat().st_mtime_ns == mask_time
    assert inference.main(argv + ["--overwrite"]) == 1
    assert read_summary(out)["rgb.png"]["status"] == "ok"


def test_batched_tiles_equal_one_by_one_prediction(checkpoint):
    model, meta = load_segmenter(checkpoint, "cpu")
    rng = np.random.default_rng(1)
    for shape in [(64, 64), (40, 48), (20, 64)]:
        tiles = [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for _ in range(3)]
        batched = inference.predict_tile_batch(model, tiles, CPU, WINDOW, meta["mean"], meta["std"], len(tiles))
        for tile, logits in zip(tiles, batched):
            single = predict_logits(model, tile, CPU, WINDOW, 0.25, 4, meta["mean"], meta["std"], 2)[0]
            assert logits.shape == single.shape == (2,) + shape
            torch.testing.assert_close(logits, single, atol=1e-4, rtol=1e-4)


class ArraySlide:
    """An in-memory single-level stand-in for an OpenSlide slide."""

    def __init__(self, image):
        self.image = image
        self.dimensions = (image.shape[1], image.shape[0])
        self.level_downsamples = (1.0,)
        self.mpp = None
        self.reads = self.pixels_read = 0

    def read(self, x, y, level, width, height):
        self.reads += 1
        self.pixels_read += width * height
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        crop = self.image[y:y + height, x:x + width]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out


def pointwise_model():
    """A fully convolutional stand-in (1x1 convolutions): its output at a pixel depends on that pixel only."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 3, 1)).eval()


def tissue_image(height, width, rng):
    """Pink, textured tissue everywhere (so every tile is predicted)."""
    base = np.array([200, 110, 170]) + rng.integers(-40, 40, (height, width, 3))
    return base.clip(0, 255).astype(np.uint8)


def as_predictor(model):
    def predict(images):
        batch = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return model(batch)
    return predict


def test_stitched_slide_logits_equal_whole_image_logits():
    rng = np.random.default_rng(2)
    image = tissue_image(300, 260, rng)
    model = pointwise_model()
    with torch.no_grad():
        whole = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)[0].numpy()
    slide = ArraySlide(image)
    result = segment_slide(slide, as_predictor(model), 3, WINDOW, 0.25, 5, Resolution(0, 1.0), 1.0)
    assert result.tiles_predicted == result.tiles_total == len(tile_grid(260, 300, WINDOW, 0.25))
    expected = torch.softmax(torch.from_numpy(whole), dim=0).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert np.array_equal(result.mask, expected.argmax(axis=0))

    # At a mask downsample of 4 the stitched map matches the whole image pooled 4 x 4, up to smoothing.
    coarse = segment_slide(slide, as_predictor(model), 3, WINDOW, 0.25, 5, Resolution(0, 1.0), 4.0)
    assert coarse.probabilities.shape == (3, 75, 65)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(whole)[None], 4, ceil_mode=True)[0]
    agreement = (coarse.mask == pooled.argmax(dim=0).numpy()).mean()
    assert agreement > 0.8


def test_glass_tiles_are_not_read_or_predicted():
    rng = np.random.default_rng(3)
    image = np.full((512, 640, 3), 240, dtype=np.uint8) + rng.integers(0, 6, (512, 640, 3)).astype(np.uint8)
    image[100:220, 300:460] = tissue_image(120, 160, rng)
    seen = []

    def predict(images):
        seen.extend(images)
        return torch.zeros(len(images), 2, WINDOW, WINDOW)

    slide = ArraySlide(image)
    result = segment_slide(slide, predict, 2, WINDOW, 0.25, 4, Resolution(0, 1.0), 8.0)
    grid = tile_grid(640, 512, WINDOW, 0.25)
    touching = [(x, y) for x, y in grid if x < 460 and x + WINDOW > 300 and y < 220 and y + WINDOW > 100]
    assert result.tiles_total == len(grid)
    assert len(touching) <= result.tiles_predicted <= len(touching) + 12
    assert result.tiles_predicted == len(seen) < len(grid) // 2
    # one thumbnail read, then the predicted tiles (row neighbours in one read), nothing else
    assert 1 < slide.reads <= len(seen) + 1
    assert slide.pixels_read - 640 * 512 <= len(seen) * WINDOW ** 2
    assert result.mask.shape == (64, 80)


def test_geojson_keeps_holes_and_scales_to_level0():
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:35, 10:40] = 1
    mask[15:25, 20:30] = 0
    mask[30:38, 44:50] = 1
    collection = mask_to_geojson(mask, META["classes"], META["palette"], 8, (400, 320))
    json.loads(json.dumps(collection))
    polygons = [f["geometry"]["coordinates"] for f in collection["features"]]
    assert sorted(len(p) for p in polygons) == [1, 2]
    ring_with_hole = next(p for p in polygons if len(p) == 2)
    outer = np.array(ring_with_hole[0])
    assert outer[:, 0].min() == pytest.approx(10.5 * 8) and outer[:, 0].max() == pytest.approx(39.5 * 8)
    assert ring_with_hole[0][0] == ring_with_hole[0][-1]
    all_points = np.concatenate([np.array(r) for p in polygons for r in p])
    assert all_points[:, 0].max() <= 400 and all_points[:, 1].max() <= 320
    assert collection["features"][0]["properties"] == {
        "objectType": "annotation", "classification": {"name": "gland", "color": [190, 61, 42]}}


def write_pyramid(path, image, mpp):
    levels = [image]
    while min(levels[-1].shape[:2]) > 256:
        levels.append(levels[-1][::2, ::2].copy())
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            per_cm = 1e4 / (mpp * 2 ** i)
            tif.write(level, tile=(256, 256), photometric="rgb", subfiletype=1 if i else 0,
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")


def test_pyramidal_tiff_slide_through_openslide(tmp_path, gland_checkpoint):
    pytest.importorskip("openslide")
    rng = np.random.default_rng(4)
    size, centre, radius = 2048, (1400, 700), 300
    image = np.full((size, size, 3), 238, dtype=np.uint8) + rng.integers(0, 8, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < radius ** 2
    image[disc] = tissue_image(size, size, rng)[disc]
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    write_pyramid(folder / "case.tif", image, mpp=0.5)
    Image.fromarray(image[:64, :64]).save(folder / "plain.tif")
    assert is_slide(folder / "case.tif") and not is_slide(folder / "plain.tif")

    argv = ["--checkpoint", str(gland_checkpoint), "--input", str(folder), "--output", str(out),
            "--device", "cpu", "--mpp", "1.0", "--downsample", "8"]
    assert inference.main(argv) == 0
    row = read_summary(out)["case.tif"]
    assert (row["kind"], row["width"], row["height"], row["mask_downsample"]) == ("slide", "2048", "2048", "8")
    predicted, total = int(row["tiles_predicted"]), int(row["tiles_total"])
    assert total == len(tile_grid(1024, 1024, WINDOW, 0.25)) and 0 < predicted < total // 4
    assert Image.open(out / "case_mask.png").size == (256, 256)
    assert (out / "case_overlay.jpg").is_file() and (out / "plain_overlay.png").is_file()

    collection = json.loads((out / "case.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    points = []
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["classification"]["name"] == "gland"
        points += [pt for ring in feature["geometry"]["coordinates"] for pt in ring]
    points = np.array(points)
    assert points.min() >= 0 and points.max() <= size
    # The gland region surrounds the tissue disc and stays near it, in level-0 pixels.
    assert points[:, 0].min() <= centre[0] - radius and points[:, 0].max() >= centre[0] + radius
    assert points[:, 0].min() >= centre[0] - radius - 2 * WINDOW * 2
    assert points[:, 1].max() <= centre[1] + radius + 2 * WINDOW * 2


def test_a_checkpoint_of_another_kind_is_refused(tmp_path, capsys):
    stage1 = tmp_path / "stage1.pth"
    torch.save({"format": "ibdr-stage1", "model": {}}, stage1)
    (tmp_path / "tile.png").write_bytes(b"")
    argv = ["--checkpoint", str(stage1), "--input", str(tmp_path), "--output", str(tmp_path / "out"),
            "--device", "cpu"]
    with pytest.raises(CheckpointError, match="not a ibdr-stage2 checkpoint"):
        inference.main(argv)
    with pytest.raises(SystemExit) as exit_info:
        run_main(inference.main, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and str(stage1) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_slide_post_processing_is_asked_for_and_saved_probabilities_agree(tmp_path, gland_checkpoint):
    """Tissue around a glass hole too wide for any tile: the model calls the tissue gland, the hole is glass.
    Hole filling turns the enclosed glass into gland only when asked, and the probability maps follow."""
    pytest.importorskip("openslide")
    rng = np.random.default_rng(5)
    size, centre = 1024, (512, 512)
    image = np.full((size, size, 3), 238, dtype=np.uint8) + rng.integers(0, 8, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(xx - centre[0], yy - centre[1])
    annulus = (distance < 420) & (distance > 220)
    image[annulus] = tissue_image(size, size, rng)[annulus]
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "ring.tif", image, mpp=0.5)
    payload = torch.load(gland_checkpoint, weights_only=True)
    payload["meta"] = {**payload["meta"], "fill_holes": [1]}  # the data set's YAML: postprocess.fill_holes [gland]
    gland_checkpoint = tmp_path / "gland_fill.pth"
    torch.save(payload, gland_checkpoint)
    hole = (slice(60, 68), slice(60, 68))  # mask pixels (downsample 8) at the centre of the hole
    for asked in (False, True):
        out = tmp_path / f"out_{asked}"
        argv = ["--checkpoint", str(gland_checkpoint), "--input", str(folder), "--output", str(out),
                "--device", "cpu", "--level", "0", "--downsample", "8", "--save-probs"]
        assert inference.main(argv + (["--postprocess"] if asked else [])) == 0
        mask = np.asarray(Image.open(out / "ring_mask.png"))
        gland_probability = np.asarray(Image.open(out / "ring_prob_gland.png"))
        assert (mask[hole] == (1 if asked else 0)).all()
        assert ((gland_probability > 127) == (mask == 1)).all()  # the saved maps agree with the mask


def test_a_rerun_on_a_subset_keeps_the_folders_record_whole(tmp_path, checkpoint, capsys):
    """Scored on four images, then run on one of them (skipped) and on a new one: summary.csv keeps every
    image's row and score, and metrics.json still describes exactly the scored rows beside it."""
    rng = np.random.default_rng(1)
    images, masks, out = tmp_path / "img", tmp_path / "mask", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(images / f"t{index}.png")
        Image.fromarray((rng.random((48, 56)) > 0.5).astype(np.uint8)).save(masks / f"t{index}.png")
    first = tmp_path / "first"
    first.mkdir()
    for index in range(4):
        (first / f"t{index}.png").write_bytes((images / f"t{index}.png").read_bytes())
    base = ["--checkpoint", str(checkpoint), "--output", str(out), "--device", "cpu"]
    assert inference.main(base + ["--input", str(first), "--masks", str(masks)]) == 0
    scored = read_summary(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(scored) == 4 and metrics["images"] == sorted(scored)
    one = tmp_path / "one"
    one.mkdir()
    (one / "t2.png").write_bytes((images / "t2.png").read_bytes())
    capsys.readouterr()
    assert inference.main(base + ["--input", str(one)]) == 0  # skipped: its outputs exist
    assert "0 done, 1 skipped" in capsys.readouterr().out  # this run's inputs, not the summary's rows
    after = read_summary(out)
    assert after["t2.png"].pop("status") == "skipped" and scored["t2.png"].pop("status") == "ok"
    assert after == scored  # every row and per-image score kept, t2's included
    assert json.loads((out / "metrics.json").read_text()) == metrics
    (one / "t4.png").write_bytes((images / "t4.png").read_bytes())
    assert inference.main(base + ["--input", str(one), "--masks", str(masks)]) == 0  # t2 rescored, t4 new
    assert "2 done, 0 skipped" in capsys.readouterr().out  # with masks every input is predicted again
    after = read_summary(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(after) == [f"t{index}.png" for index in range(5)] and all(r["miou"] for r in after.values())
    assert metrics["images"] == sorted(after) and after["t0.png"] == scored["t0.png"]
    assert after["t4.png"]["checkpoint"] == str(checkpoint)
    # the folder-wide figure is the pooled confusion of every scored image, earlier ones included
    total = sum(np.asarray(c["input"]) for c in metrics["per_image_confusion"].values())
    from utils.evaluation.metrics import scores
    assert metrics["input"]["miou"] == pytest.approx(scores(total)["miou"])
    # redone without masks, an image loses its score, and the figure no longer counts it
    assert inference.main(base + ["--input", str(one), "--overwrite"]) == 0
    after = read_summary(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert after["t4.png"]["miou"] == "" and after["t0.png"]["miou"]
    assert metrics["images"] == ["t0.png", "t1.png", "t3.png"]
