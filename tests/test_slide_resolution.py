"""Slides analysed at the model's resolution: level choice, the resize path, warnings, pyramidal TIFF masks."""
import csv
import json

import cv2
import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import inference
from utils.slides.exports import write_mask_tiff
from utils.slides.slide import Resolution, choose_resolution, segment_slide

WINDOW = 64
CLASSES = ["background", "gland"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GLASS = (238, 238, 238)
STROMA = (230, 150, 190)   # pink: red above the stub's threshold
GLAND = (120, 60, 160)     # purple: red below it


def meta(mpp=None):
    """Stage-2 metadata; without `mpp` it is a file from before models stated their resolution."""
    values = {"encoder": "stub", "classes": CLASSES, "palette": [[239, 239, 239], [190, 61, 42]],
              "mean": MEAN, "std": STD, "window": WINDOW, "overlap": 0.25, "background": 0}
    if mpp is not None:
        values["mpp"] = mpp
    return values


class RedThreshold(nn.Module):
    """Pointwise stub: gland where a pixel's red value is below 0.7, background elsewhere."""

    def forward(self, x):
        red = x[:, :1] * STD[0] + MEAN[0]
        return torch.cat([torch.zeros_like(red), 20 * (0.7 - red)], dim=1)


class FineStripes(nn.Module):
    """A stub that sees scale: gland where vertical stripes repeat every 4 network pixels.

    Pixels two apart differ on such stripes and pixels four apart agree; stripes twice as wide (the same
    tissue seen at twice the resolution) give the opposite, so the stub finds no gland there.
    """

    def forward(self, x):
        gray = x.mean(dim=1, keepdim=True)
        padded = F.pad(gray, (2, 2, 0, 0), mode="replicate")
        two = (padded[..., 3:-1] - padded[..., 1:-3]).abs()   # pixels x - 1 and x + 1
        four = (padded[..., 4:] - padded[..., :-4]).abs()     # pixels x - 2 and x + 2
        score = F.avg_pool2d(two - four, 9, stride=1, padding=4, count_include_pad=False)
        return torch.cat([torch.zeros_like(score), 10 * (score - 0.5)], dim=1)


def use_stub(monkeypatch, model, model_meta):
    monkeypatch.setattr(inference, "load_segmenter", lambda path, device: (model.eval(), model_meta))


def run(tmp_path, folder, *flags):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "stub.pth"), "--input", str(folder), "--output", str(out),
            "--device", "cpu", "--overwrite", *flags]
    assert inference.main(argv) == 0
    with open(out / "summary.csv", newline="") as handle:
        return out, {row["file"]: row for row in csv.DictReader(handle)}


def write_slide(path, image, mpp=None, factor=2):
    """A pyramidal tiled TIFF that OpenSlide opens: levels `factor` times smaller each, area-averaged."""
    levels = [image]
    while min(levels[-1].shape[:2]) // factor >= 128:
        height, width = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (width // factor, height // factor), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            options = {}
            if mpp is not None:
                per_centimetre = 1e4 / (mpp * image.shape[1] / level.shape[1])
                options = {"resolution": (per_centimetre, per_centimetre), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(128, 128), photometric="rgb", subfiletype=1 if index else 0, **options)
    return path


def disc(size, centre, radius):
    yy, xx = np.mgrid[:size, :size]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < radius ** 2


def painted(size, gland_disc, tissue_radius, gland_colour=GLAND, seed=0):
    """Glass with a disc of pink tissue in the middle and a gland region inside it, with a little noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = GLASS
    image[disc(size, (size // 2, size // 2), tissue_radius)] = STROMA
    image[gland_disc] = gland_colour
    noise = rng.integers(-6, 7, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


class LevelsOnly:
    """What choose_resolution needs of a slide."""

    def __init__(self, mpp, level_downsamples):
        self.mpp, self.level_downsamples, self.path = mpp, tuple(level_downsamples), "slide.svs"


# ----- the default level ------------------------------------------------------------------------------
@pytest.mark.parametrize("slide_mpp, downsamples, model_mpp, expected", [
    (0.5, (1, 4, 16), 0.5, Resolution(0, 1.0)),             # 20x slide, 20x model: level 0 as it is
    (0.25, (1, 2, 4, 8), 0.5, Resolution(1, 2.0)),          # 40x slide with a 2x pyramid: level 1 as it is
    (0.25, (1, 4, 16), 0.5, Resolution(0, 2.0)),            # 40x slide, 4x pyramid (as in .svs): level 0, shrunk
    (0.2527, (1, 4, 16), 0.62, Resolution(0, 0.62 / 0.2527)),  # GlaS model on a 40x scan
    (0.5027, (1, 4, 16), 0.62, Resolution(0, 0.62 / 0.5027)),  # GlaS model on a 20x scan
    (0.25, (1, 4, 16, 64), 2.0, Resolution(1, 8.0)),        # coarse model: the nearest level at or finer
    (0.252, (1, 2.0002, 4.0008), 0.504, Resolution(1, 2.0002)),  # within 1%: the level as it is
    (0.5, (1, 4), 0.25, Resolution(0, 0.5)),                # model finer than the scan: tiles enlarged
])
def test_default_level_is_the_models_resolution(slide_mpp, downsamples, model_mpp, expected):
    chosen = choose_resolution(LevelsOnly(slide_mpp, downsamples), model_mpp=model_mpp)
    assert chosen.level == expected.level and chosen.downsample == pytest.approx(expected.downsample)


def test_flags_override_the_models_resolution():
    slide = LevelsOnly(0.25, (1, 4, 16))
    assert choose_resolution(slide, level=2, model_mpp=0.5) == Resolution(2, 16.0)
    assert choose_resolution(slide, mpp=1.0, model_mpp=0.5) == Resolution(1, 4.0)
    assert choose_resolution(slide) == Resolution(0, 1.0)  # no resolution known anywhere: level 0
    assert choose_resolution(LevelsOnly(None, (1, 4)), model_mpp=0.5) == Resolution(0, 1.0)


# ----- the resize path --------------------------------------------------------------------------------
class ArraySlide:
    """An in-memory single-level slide that records the size of every tile read."""

    def __init__(self, image):
        self.image, self.mpp = image, None
        self.dimensions = (image.shape[1], image.shape[0])
        self.level_downsamples = (1.0,)
        self.read_sizes = []

    def read(self, x, y, level, width, height):
        self.read_sizes.append((width, height))
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        crop = self.image[y:y + height, x:x + width]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out


def predictor(model):
    def predict(images):
        batch = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        batch = (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return model(batch)
    return predict


def test_tiles_are_resized_when_no_level_matches():
    """Analysed at 2.5 level-0 pixels per network pixel from a level-0-only slide: each tile is read at 160 px
    and shrunk to the 64 px window (with its row neighbours), and the mask equals the one of the image shrunk
    beforehand."""
    size, centre, radius = 800, (430, 370), 170
    image = painted(size, disc(size, centre, radius), tissue_radius=360)
    slide = ArraySlide(image)
    result = segment_slide(slide, predictor(RedThreshold()), 2, WINDOW, 0.25, 8, Resolution(0, 2.5), 5.0)
    # after the thumbnail: row neighbours in one read, 160 px high and at least as wide
    assert {height for _, height in slide.read_sizes[1:]} == {160}
    assert min(width for width, _ in slide.read_sizes[1:]) >= 160
    assert result.mask.shape == (160, 160)

    shrunk = cv2.resize(image, (320, 320), interpolation=cv2.INTER_AREA)
    reference = segment_slide(ArraySlide(shrunk), predictor(RedThreshold()), 2, WINDOW, 0.25, 8,
                              Resolution(0, 1.0), 2.0)
    assert (result.mask == reference.mask).mean() > 0.995
    # and the gland is where it is in level-0 pixels
    truth = cv2.resize(disc(size, centre, radius).astype(np.uint8), (160, 160), interpolation=cv2.INTER_AREA)
    assert iou(result.mask == 1, truth == 1) > 0.97


def iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


# ----- whole slides through inference.py --------------------------------------------------------------
def test_geojson_vertices_lie_within_one_mask_pixel_of_the_gland(tmp_path, monkeypatch):
    """A 40x slide (0.25 um/px, levels 4x apart) read by a 0.5 um/px model: level 0 shrunk 2x. The gland's
    polygon lies within one mask pixel (8 level-0 pixels) of the true circle."""
    pytest.importorskip("openslide")
    size, centre, radius, downsample = 2048, (1100, 940), 300, 8
    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "case.tif", painted(size, disc(size, centre, radius), tissue_radius=700), mpp=0.25,
                factor=4)
    use_stub(monkeypatch, RedThreshold(), meta(mpp=0.5))
    out, rows = run(tmp_path, folder)
    assert rows["case.tif"]["analysis_mpp"] == "0.5" and rows["case.tif"]["mask_downsample"] == "8"
    features = json.loads((out / "case.geojson").read_text())["features"]
    assert len(features) == 1
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    assert len(ring) >= 12
    distance = np.hypot(ring[:, 0] - centre[0], ring[:, 1] - centre[1])
    assert np.abs(distance - radius).max() <= downsample
    area = 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
    assert area == pytest.approx(np.pi * radius ** 2, rel=0.05)


def test_a_40x_slide_and_its_20x_copy_give_the_same_mask(tmp_path, monkeypatch, capsys):
    """Default flags: both are analysed at the model's 0.5 um/px, so a model that sees scale finds the same
    gland. Read at 40x as it is (--level 0, what happened before), it finds none."""
    pytest.importorskip("openslide")
    size, centre, radius = 2048, (1000, 1060), 380
    gland = disc(size, centre, radius)
    image = painted(size, gland, tissue_radius=800)
    stripes = (np.arange(size) // 4) % 2 == 0  # 8 level-0 pixels a period at 0.25 um/px: 4 um
    image[gland & stripes[None, :]] = (70, 30, 120)
    image[gland & ~stripes[None, :]] = (225, 190, 230)
    folder_40x, folder_20x = tmp_path / "40x", tmp_path / "20x"
    folder_40x.mkdir()
    folder_20x.mkdir()
    write_slide(folder_40x / "case.tif", image, mpp=0.25, factor=4)
    write_slide(folder_20x / "case.tif", cv2.resize(image, (size // 2, size // 2), interpolation=cv2.INTER_AREA),
                mpp=0.5, factor=4)
    use_stub(monkeypatch, FineStripes(), meta(mpp=0.5))

    masks = {}
    for name, folder in (("40x", folder_40x), ("20x", folder_20x)):
        out, rows = run(tmp_path / name, folder)
        assert rows["case.tif"]["analysis_mpp"] == "0.5"
        masks[name] = np.asarray(Image.open(out / "case_mask.png"))
    assert "warning" not in capsys.readouterr().err
    # the same level-0 scale for both: 40x mask pixels are 8 level-0 pixels of 0.25 um, 20x ones 8 of 0.5 um
    as_40x = np.repeat(np.repeat(masks["20x"], 2, axis=0), 2, axis=1)
    agreement = iou(masks["40x"] == 1, as_40x == 1)
    truth = cv2.resize(gland.astype(np.uint8), masks["40x"].shape[::-1], interpolation=cv2.INTER_AREA) == 1
    print(f"gland IoU, 40x slide vs its 20x copy: {agreement:.4f}")
    assert agreement >= 0.95
    assert iou(masks["40x"] == 1, truth) >= 0.9

    out, _ = run(tmp_path / "level0", folder_40x, "--level", "0")
    at_level_0 = np.asarray(Image.open(out / "case_mask.png"))
    assert iou(at_level_0 == 1, masks["40x"] == 1) < 0.2


def test_one_warning_line_says_what_was_assumed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("openslide")
    size = 1024
    image = painted(size, disc(size, (500, 500), 150), tissue_radius=350)
    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "unstated.tif", image)  # no resolution tags: OpenSlide knows no mpp
    use_stub(monkeypatch, RedThreshold(), meta(mpp=0.5))
    _, rows = run(tmp_path, folder)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "unstated.tif" in warnings[0] and "0.5 um/px" in warnings[0] and "level 0" in warnings[0]
    assert rows["unstated.tif"]["analysis_mpp"] == ""

    # --input-mpp states the scan's resolution: no warning, and the slide is read at the model's
    _, rows = run(tmp_path, folder, "--input-mpp", "0.25")
    assert "warning" not in capsys.readouterr().err
    assert rows["unstated.tif"]["analysis_mpp"] == "0.5"

    # a model file from before models stated their resolution, on a slide that states its own
    write_slide(folder / "unstated.tif", image, mpp=0.25)
    use_stub(monkeypatch, RedThreshold(), meta(mpp=None))
    _, rows = run(tmp_path, folder)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "stub.pth" in warnings[0] and "data.mpp" in warnings[0]
    assert rows["unstated.tif"]["analysis_mpp"] == "0.25"  # level 0 as it is


def test_tiff_mask_reads_back_identical(tmp_path, monkeypatch):
    size = 2048
    image = painted(size, disc(size, (900, 1100), 420), tissue_radius=800)
    image[1000:1200, 300:500] = GLAND  # a second region, touching nothing
    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "case.tif", image, mpp=0.25, factor=4)
    use_stub(monkeypatch, RedThreshold(), meta(mpp=0.5))
    out, _ = run(tmp_path, folder, "--mask-format", "tiff", "--downsample", "2")
    mask = np.asarray(Image.open(out / "case_mask.png"))
    assert mask.shape == (1024, 1024) and set(np.unique(mask)) == {0, 1}
    with tifffile.TiffFile(out / "case_mask.tif") as tif:
        pages = list(tif.pages)
        assert [page.shape for page in pages] == [(1024, 1024), (512, 512), (256, 256)]
        assert all(page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE for page in pages)
        assert np.array_equal(pages[0].asarray(), mask)
        assert np.array_equal(pages[1].asarray(), mask[::2, ::2])
        assert pages[0].tags["XResolution"].value == (20000, 1)  # 0.5 um per mask pixel, in pixels per cm
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(out / "case_mask.tif")) as viewer:
        assert viewer.level_count == 3
        assert float(viewer.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        region = np.asarray(viewer.read_region((0, 0), 0, viewer.dimensions))
        assert np.array_equal(region[..., 0], mask) and (region[..., 3] == 255).all()


def test_tiff_writer_keeps_classes_and_odd_sizes(tmp_path):
    mask = np.random.default_rng(0).integers(0, 5, (700, 333)).astype(np.uint8)
    write_mask_tiff(tmp_path / "mask.tif", mask)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert [page.shape for page in tif.pages] == [(700, 333), (350, 167), (175, 84)]
        assert np.array_equal(tif.pages[0].asarray(), mask)
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE  # no resolution claimed
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no temporary file left


def test_plain_images_are_analysed_at_the_models_resolution_with_input_mpp(tmp_path, monkeypatch):
    """A 0.25 um/px image and its 0.5 um/px copy: with --input-mpp both reach the network at 0.5 um/px, and
    each mask has its own image's size."""
    size = 512
    gland = disc(size, (250, 270), 100)
    image = painted(size, gland, tissue_radius=240)
    stripes = (np.arange(size) // 4) % 2 == 0
    image[gland & stripes[None, :]] = (70, 30, 120)
    image[gland & ~stripes[None, :]] = (225, 190, 230)
    folder_40x, folder_20x = tmp_path / "40x", tmp_path / "20x"
    folder_40x.mkdir()
    folder_20x.mkdir()
    Image.fromarray(image).save(folder_40x / "field.png")
    Image.fromarray(cv2.resize(image, (size // 2, size // 2), interpolation=cv2.INTER_AREA)).save(
        folder_20x / "field.png")
    use_stub(monkeypatch, FineStripes(), meta(mpp=0.5))
    out_40x, rows = run(tmp_path / "a", folder_40x, "--input-mpp", "0.25")
    assert (rows["field.png"]["width"], rows["field.png"]["analysis_mpp"]) == ("512", "0.5")
    out_20x, rows = run(tmp_path / "b", folder_20x, "--input-mpp", "0.5")
    assert (rows["field.png"]["width"], rows["field.png"]["analysis_mpp"]) == ("256", "0.5")
    mask_40x = np.asarray(Image.open(out_40x / "field_mask.png"))
    mask_20x = np.asarray(Image.open(out_20x / "field_mask.png"))
    assert mask_40x.shape == (512, 512) and Image.open(out_40x / "field_overlay.png").size == (512, 512)
    as_40x = np.repeat(np.repeat(mask_20x, 2, axis=0), 2, axis=1)
    assert iou(mask_40x == 1, as_40x == 1) >= 0.95 and iou(mask_40x == 1, gland) >= 0.9
    out, _ = run(tmp_path / "c", folder_40x)  # its own pixel size: the stripes look too wide
    assert (np.asarray(Image.open(out / "field_mask.png")) == 1).mean() < 0.2 * gland.mean()
