"""What the reported figures mean: every labelled pixel counts, post-processing is scored apart from the
raw masks, background is a setting, and the tables come from the files a run wrote."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import ROOT, load_script, save_png
from utils.config import load_config
from utils.data.datasets import Item
from utils.data.imageio import IGNORE_INDEX, overlay
from utils.evaluation.metrics import confusion_matrix, scores
from utils.evaluation.postprocess import fill_holes_with_probabilities
from utils.runtime import Runtime
from utils.stage1.cam import cams_to_masks, claim_unclaimed
from utils.stage1.class_maps import class_maps, network_input
from utils.stage1.scoring import score_whole_images
from utils.stage2.losses import IICBLoss, soft_dice_loss
from utils.timm_settings import resolve_normalisation

CPU = Runtime(torch.device("cpu"), None)


# ---------------------------------------------------------------------------- every pixel counts
from utils.stage2.evaluation import evaluate
def test_unclaimed_pixels_are_misses_not_skipped():
    truth = np.array([[0, 1, 1, 2]])
    predicted = np.array([[0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    conf = confusion_matrix(predicted, truth, 3, count_unclaimed=True)
    assert conf.shape == (3, 4) and conf.sum() == 4 and conf[1, 3] == 1 and conf[2, 3] == 1
    result = scores(conf)
    assert result["iou"] == pytest.approx([1.0, 0.5, 0.0])  # class 2 was missed, not left out
    assert result["pixel_acc"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(predicted, truth, 3)  # without the extra column, 255 is no class


class CamStub(nn.Module):
    """A stage-1 classifier whose CAMs and image scores are given: .cams(x) as Stage1Classifier has it."""

    def __init__(self, maps, image_scores):
        super().__init__()
        self.maps, self.image_scores = maps, image_scores

    def cams(self, x):
        maps = self.maps.expand(len(x), -1, -1, -1)
        return [maps] * 3, [self.image_scores.expand(len(x), -1)] * 3


def write_split(folder, truth):
    save_png(folder / "img" / "a.png", np.full(truth.shape + (3,), 200, np.uint8))
    save_png(folder / "mask" / "a.png", truth)
    return [Item(folder / "img" / "a.png", "a", None, folder / "mask" / "a.png")]


def test_stage1_whole_image_scores_count_every_labelled_pixel(tmp_path):
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 4:] = 1
    truth[0, 0] = IGNORE_INDEX
    items = write_split(tmp_path / "val", truth)
    cfg = load_config(None, ["stage1.cam_flip=false"])
    resolve_normalisation(cfg, "stage1")
    # Every predicted label is under the threshold: once "ignore" everywhere and left out of the score.
    quiet = CamStub(torch.rand(1, 2, 8, 8), torch.full((1, 2), -5.0))
    raw, cleaned, *_ = score_whole_images(cfg, quiet, items, CPU, (8, 8))
    assert raw.sum() == 63 and cleaned is None
    assert raw[:, 0].sum() == 63  # nothing claimed: predicted as background, the gland pixels missed

    # Three tissue classes and no background: pixels no present class activates are misses.
    cfg = load_config(None, ["stage1.cam_flip=false", "data.classes=[a, b, c]", "data.background=null",
                             "data.palette=[[1, 1, 1], [2, 2, 2], [3, 3, 3]]"])
    resolve_normalisation(cfg, "stage1")
    maps = torch.zeros(1, 3, 8, 8)
    maps[0, 1, :, 4:] = 1.0  # class b lights up its half; class a nowhere
    raw, *_ = score_whole_images(cfg, CamStub(maps, torch.tensor([[3.0, 3.0, -3.0]])), items, CPU, (8, 8))
    assert raw.sum() == 63 and raw[0, 3] == 31  # class a's pixels: unclaimed, counted as misses
    assert scores(raw)["iou"][0] == 0.0


class TileTrainedStub(nn.Module):
    """A classifier that only knows tiles of its training size: on a larger input it sees no gland at all
    (as an ImageNet-initialised backbone did on whole GlaS images); on a tile its gland map is the tile's
    brightness."""

    def __init__(self, tile):
        super().__init__()
        self.tile = tile

    def cams(self, x):
        bright = (x.mean(dim=1, keepdim=True) > 0).float()
        maps = torch.cat([1 - bright, bright], dim=1)
        gland = 4.0 if x.shape[-1] <= self.tile else -4.0
        scores = torch.tensor([[4.0, gland]]).expand(len(x), -1)
        return [maps] * 3, [scores] * 3


def test_whole_images_are_scored_over_tiles_of_the_training_size(tmp_path):
    """The same network scores a whole image well over its tiles and badly in one pass: the figure no longer
    depends on how the network copes with inputs larger than its training tiles."""
    truth = np.zeros((40, 52), np.uint8)
    truth[4:20, 6:30] = 1
    image = np.where(truth[..., None] == 1, 230, 20).astype(np.uint8).repeat(3, axis=2)
    save_png(tmp_path / "val" / "img" / "a.png", image)
    save_png(tmp_path / "val" / "mask" / "a.png", truth)
    items = [Item(tmp_path / "val" / "img" / "a.png", "a", None, tmp_path / "val" / "mask" / "a.png")]
    cfg = load_config(None, ["stage1.cam_flip=false", "stage1.image_size=16", "stage1.cam_batch_size=5"])
    resolve_normalisation(cfg, "stage1")
    model = TileTrainedStub(16)
    tiled, *_ = score_whole_images(cfg, model, items, CPU, (16, 16))
    assert scores(tiled)["miou"] > 0.95
    # The image in one pass at the training zoom, as whole images were scored before: no gland anywhere.
    whole = network_input(image, 1.0, cfg.data.mean, cfg.data.std)[None]
    maps, labels = class_maps(model, whole, truth.shape, None, cfg.stage1, CPU)
    one_pass = cams_to_masks(maps, labels, 0)[0].numpy()
    assert labels[0].tolist() == [1.0, 0.0] and scores(confusion_matrix(one_pass, truth, 2))["iou"][1] == 0.0


def test_tiles_cover_the_image_and_the_last_one_is_flush_with_its_edge():
    from utils.stage1.stitch import mean_tile_votes, tile_boxes
    boxes = tile_boxes(130, 60, (112, 112))
    assert {(y, x) for y, x, _, _ in boxes} == {(0, 0), (18, 0)} and all(b[2:] == (112, 60) for b in boxes)
    boxes = tile_boxes(300, 300, (112, 112))
    assert sorted({y for y, _, _, _ in boxes}) == [0, 56, 112, 168, 188]
    votes = np.zeros((2, 2, 4, 4), np.float32)
    votes[0, 1] = 1.0  # the second tile votes for no class: it must not dilute the first one's vote
    mean = mean_tile_votes(votes, [(0, 0, 4, 4), (2, 2, 4, 4)], 6, 6)
    assert mean[1, :4, :4].min() == 1.0 and mean[:, 4:, 4:].max() == 0.0


def test_training_tile_size_does_not_depend_on_file_order(tmp_path):
    from utils.data.datasets import training_tile_size
    paths = [save_png(tmp_path / f"{name}.png", np.zeros(size + (3,), np.uint8))
             for name, size in (("a", (70, 80)), ("b", (64, 64)), ("c", (64, 64)), ("d", (70, 80)), ("e", (9, 9)))]
    assert training_tile_size(paths) == training_tile_size(paths[::-1]) == (70, 80)
    assert training_tile_size(paths[1:3]) == (64, 64)


def test_cams_use_the_heads_weights_without_their_bias():
    from models.classifier import Stage1Classifier

    class Taps(nn.Module):
        tap_channels, channels_before_deepest = (4, 4, 4), 4

        def taps(self, x, between=None):
            return x[:, :4], x[:, :4], x[:, :4]

    torch.manual_seed(0)
    model = Stage1Classifier(Taps(), 2, use_ibm=False).eval()
    with torch.no_grad():
        model.ic1.bias.fill_(100.0)   # a bias this large would make the map flat after peak normalisation
        model.ic2.bias.fill_(-100.0)  # and this one would zero it
    x = torch.randn(1, 4, 6, 6)
    maps, _ = model.cams(x)
    for head, cam in zip(model.heads, maps):
        assert torch.allclose(cam, torch.relu(nn.functional.conv2d(x, head.weight)))


# ------------------------------------------------------------------------------------- background
def test_without_background_unclaimed_pixels_are_ignore_never_a_tissue():
    cams = torch.zeros(1, 3, 2, 3)
    cams[0, 0, 0, 0] = 1.0
    masks = cams_to_masks(cams, torch.tensor([[1, 1, 0]]), background_index=None)
    assert masks[0, 0, 0] == 0 and (masks[0].flatten()[1:] == IGNORE_INDEX).all()
    assert (claim_unclaimed(masks, None) == masks).all()
    assert (claim_unclaimed(masks, 2)[0].flatten()[1:] == 2).all()


def test_overlay_and_dice_follow_the_background_setting():
    image = np.full((1, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, IGNORE_INDEX]])
    palette = [[255, 0, 0], [0, 0, 255]]
    kept = overlay(image, mask, palette, background=0)
    assert kept[0, 0].tolist() == [100, 100, 100] and kept[0, 1].tolist() != [100, 100, 100]
    every = overlay(image, mask, palette, background=None)
    assert every[0, 0].tolist() != [100, 100, 100] and every[0, 2].tolist() == [100, 100, 100]

    probs = torch.tensor([[[[0.9]], [[0.1]]]])  # class 0 predicted, truth is class 0
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert soft_dice_loss(probs, target, 255, background=None) < soft_dice_loss(probs, target, 255, background=0)
    loss = IICBLoss(background=None)
    assert loss.background is None


def test_slide_glass_is_ignore_without_a_background_class():
    from utils.slides.slide import Resolution, segment_slide

    class Glass:
        dimensions, level_downsamples, mpp = (256, 256), (1.0,), None

        def read(self, x, y, level, width, height):
            out = np.full((height, width, 3), 245, np.uint8)
            out[max(0, 64 - y):max(0, 128 - y), max(0, 64 - x):max(0, 128 - x)] = (180, 80, 150)
            return out

    def predict(images):
        return torch.ones(len(images), 3, 64, 64)

    for background, glass_value in ((0, 0), (None, IGNORE_INDEX)):
        result = segment_slide(Glass(), predict, 3, 64, 0.25, 4, Resolution(0, 1.0), 4.0, background=background)
        assert result.mask[-1, -1] == glass_value
        assert result.probabilities[:, -1, -1].sum() == (1.0 if background is not None else 0.0)


# ---------------------------------------------------------------------------------- post-processing
def ring(size=24):
    mask = np.zeros((size, size), np.uint8)
    mask[4:20, 4:20] = 1
    mask[8:16, 8:16] = 0
    return mask


def test_probabilities_agree_with_a_filled_mask():
    mask = ring()
    probs = np.stack([mask == 0, mask == 1]).astype(np.float32) * 0.8 + 0.1
    filled, probs = fill_holes_with_probabilities(mask, probs, [1])
    assert (filled[8:16, 8:16] == 1).all()
    assert (probs.argmax(axis=0) == filled).all() and probs[1, 10, 10] == 1.0


class RingModel(nn.Module):
    """A segmenter that predicts a gland ring (a gland with an empty lumen) in every window it sees."""

    def forward(self, x):
        gland = torch.from_numpy(np.pad(ring(), ((0, x.shape[-2] - 24), (0, x.shape[-1] - 24)))).float()
        logits = torch.stack([1 - gland, gland])[None].expand(len(x), -1, -1, -1)
        return logits * 4.0


def test_stage2_scores_raw_masks_and_post_processed_masks_apart(tmp_path):
    truth = ring()
    truth[8:16, 8:16] = 1  # the truth's gland includes its lumen
    items = write_split(tmp_path / "test", truth)
    cfg = load_config(None, ["postprocess.fill_holes=[gland]", "stage2.window=32", "stage2.overlap=0"])
    resolve_normalisation(cfg, "stage2")
    folders = (tmp_path / "predictions", tmp_path / "overlays")
    raw, cleaned = evaluate(RingModel(), items, cfg, CPU, folders, postprocess=True)
    assert scores(raw)["iou"][1] == pytest.approx(192 / 256)
    assert scores(cleaned)["iou"][1] == 1.0
    saved = np.asarray(Image.open(tmp_path / "predictions" / "a.png"))
    assert (saved == ring()).all()  # what is saved is the network's own mask
    _, none = evaluate(RingModel(), items, cfg, CPU)
    assert none is None  # per-epoch validation: no post-processing at all


# ------------------------------------------------------------------------ scoring a labelled folder
def test_inference_scores_a_labelled_folder(tmp_path):
    import inference
    from models.dpr import DPR
    model = DPR("resnet10t", 2)
    with torch.no_grad():  # a model that says 'gland' everywhere
        model.main_head[-1].weight.zero_()
        model.main_head[-1].bias.copy_(torch.tensor([0.0, 4.0]))
    meta = {"encoder": "resnet10t", "classes": ["background", "gland"], "palette": [[239, 239, 239], [190, 61, 42]],
            "mean": [0.5] * 3, "std": [0.25] * 3, "window": 32, "overlap": 0.25, "background": 0, "fill_holes": [1]}
    checkpoint = tmp_path / "best.pth"
    torch.save({"format": "ibdr-stage2", "model": model.state_dict(), "meta": meta}, checkpoint)
    rng = np.random.default_rng(0)
    truths = {"a": np.zeros((20, 30), np.uint8), "b": np.zeros((40, 40), np.uint8)}
    truths["a"][:, :15] = 255
    truths["b"][:10] = 255
    for stem, truth in truths.items():
        save_png(tmp_path / "tiles" / f"{stem}.png", rng.integers(0, 255, truth.shape + (3,), np.uint8))
        save_png(tmp_path / "masks" / f"{stem}_anno.png", truth)  # raw 0/255 masks, told apart automatically
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "tiles"), "--output", str(out),
            "--masks", str(tmp_path / "masks"), "--mask-suffix", "_anno", "--device", "cpu"]
    assert inference.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    gland = 20 * 15 + 10 * 40
    total = 20 * 30 + 40 * 40
    assert metrics["mask_encoding"] == "binary255" and metrics["images"] == ["a.png", "b.png"]
    assert metrics["input"]["iou"] == pytest.approx([0.0, gland / total])
    assert metrics["input"]["pixel_acc"] == pytest.approx(gland / total)
    assert "postprocessed" not in metrics
    import csv
    with open(out / "summary.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert float(rows["a.png"]["iou_gland"]) == pytest.approx(0.5) and rows["a.png"]["iou_background"] == "0.0000"
    assert float(rows["b.png"]["miou"]) == pytest.approx(0.125)


def test_pipeline_inference_reads_the_config_settings():
    pipeline = load_script("run_pipeline")
    cfg = load_config(None, ["inference.window=48", "inference.overlap=0.5", "inference.batch_size=3"])
    argv = pipeline.inference_argv(cfg, Path("best.pth"), Path("imgs"))
    assert argv[argv.index("--window") + 1] == "48" and argv[argv.index("--overlap") + 1] == "0.5"
    assert argv[argv.index("--batch-size") + 1] == "3"
    default = pipeline.inference_argv(load_config(None), Path("best.pth"), Path("imgs"))
    assert "--window" not in default and "--overlap" not in default  # the checkpoint's own


def test_paper_configs_train_stage2_on_patches_at_their_own_size():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if not cfg.data.demo and cfg.stage2.train_on == "patches":
            assert cfg.stage2.crop_size <= cfg.prepare.patch_size, path.name


# ------------------------------------------------------------------------- four classes, no background
@pytest.mark.slow
def test_multiclass_demo_without_background_end_to_end_and_report(tmp_path, capsys):
    """configs/demo_multiclass.yaml as shipped but for half its training tiles and epochs (test mIoU 0.50 against
    0.73 with all of them, seed 0): four tissue classes, no background class, white gaps ignored."""
    pipeline, report = load_script("run_pipeline"), load_script("report")
    argv = ["--config", str(ROOT / "configs" / "demo_multiclass.yaml"), "--set", f"data.root={tmp_path / 'data'}",
            "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "device=cpu",
            "--set", "stage1.epochs=4", "--set", "stage2.epochs=6", "--set", "demo.train_images=120",
            "--set", "data.test_splits=[test, test_b]", "--set", "data.split_titles={test: Held-out}"]
    assert pipeline.main(argv) == 0
    printed = capsys.readouterr().out
    assert "test split 'test_b' is not in" in printed  # named in the YAML, absent on disk: one line, skipped
    run = tmp_path / "runs" / "demo_multiclass"
    metrics = json.loads((run / "stage2" / "metrics.json").read_text())
    assert set(metrics["images"]) == {"val", "test"}
    assert not set(metrics["images"]["val"]) & set(metrics["images"]["test"])

    truths = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "data" / "test" / "mask").iterdir())]
    assert any((t == IGNORE_INDEX).any() for t in truths)
    constant = max(scores(sum(confusion_matrix(np.full_like(t, c), t, 4) for t in truths))["miou"] for c in range(4))
    assert metrics["test"]["miou"] > constant + 0.2, (metrics["test"]["miou"], constant)
    pseudo = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (tmp_path / "data" / "train" / "pseudo_mask")
                             .glob("*.png")])
    assert set(np.unique(pseudo)) <= {0, 1, 2, 3, IGNORE_INDEX} and (pseudo != IGNORE_INDEX).mean() > 0.5

    assert report.main([str(run)]) == 0
    table = capsys.readouterr().out
    assert f"| {100 * metrics['test']['miou']:.1f} |" in table
    assert "stage 1: CAM pseudo-masks" in table and "chosen on val" in table and "Wall time: " in table
    assert "| Held-out mIoU | Held-out Dice |" in table and "| val mIoU |" in table  # titles from the YAML


def test_ablation_rows_share_stage1_score_val_only_and_make_a_table(tmp_path, capsys):
    from conftest import TINY_DEMO
    ablate = load_script("ablate")
    overrides = [o for o in TINY_DEMO if not o.startswith(("stage1.epochs", "stage2.epochs"))]
    overrides += [f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", "stage2.encoder_from_stage1=true"]
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), *[p for o in overrides for p in ("--set", o)],
            "--rows", "no_eta", "no_aux", "--stage1-epochs", "1", "--stage2-epochs", "1"]
    assert ablate.main(argv) == 0
    folder = tmp_path / "runs" / "demo_ablation"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["no_aux", "no_eta", "stage1_ibm"]
    for row in ("no_eta", "no_aux"):
        metrics = json.loads((folder / row / "stage2" / "metrics.json").read_text())
        assert set(metrics["images"]) == {"val"}  # no test split is ever scored by an ablation
        config = (folder / row / "stage2" / "config.yaml").read_text()
        assert str(folder / "stage1_ibm" / "pseudo_mask") in config
        assert str(folder / "stage1_ibm" / "stage1" / "checkpoint.pth") in config  # the shared stage 1 starts it
    assert "aux_path: false" in (folder / "no_aux" / "stage2" / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert "stage 2: IICB without eta (soft Dice)" in printed and "stage 1: CAMs with IBM" in printed
    assert "stage 1 1 epochs, stage 2 1 epochs (the config's own: stage 1 " in printed
    plan = json.loads((folder / "ablation.json").read_text())
    demo = load_config(plan["config"], plan["overrides"])
    plan["schedule"] = {"stage1_epochs": demo.stage1.epochs, "stage2_epochs": demo.stage2.epochs}
    (folder / "ablation.json").write_text(json.dumps(plan))
    assert load_script("report").main([str(folder)]) == 0
    assert "epochs (the config's own schedule);" in capsys.readouterr().out


def test_ablation_stage2_rows_start_from_the_papers_dpr_whatever_the_config_chose(tmp_path):
    """A recipe that drops the refinement attention still gets an ablation that removes one paper part per row."""
    from argparse import Namespace
    ablate = load_script("ablate")
    recipe = tmp_path / "without_attention.yaml"
    recipe.write_text(f"base: {ROOT / 'configs' / 'glas_imagenet_cpu.yaml'}\nstage2: {{refinement_attention: false}}\n")
    assert load_config(recipe, []).stage2.refinement_attention is False
    args, folder = Namespace(config=recipe, stage1_epochs=1, stage2_epochs=1), tmp_path / "ablation"

    def row(key, base_overrides=()):
        _, _, stage, overrides = next(r for r in ablate.row_plan() if r[0] == key)
        return load_config(recipe, ablate.row_settings(args, folder, key, stage, overrides, list(base_overrides)))
    full, no_refinement, no_aux = row("stage2_iicb"), row("no_refinement"), row("no_aux")
    assert (full.stage2.refinement_attention, full.stage2.aux_path) == (True, True)
    assert (no_refinement.stage2.refinement_attention, no_refinement.stage2.aux_path) == (False, True)
    assert (no_aux.stage2.refinement_attention, no_aux.stage2.aux_path) == (True, False)
    assert row("stage2_iicb", ["stage2.aux_path=false"]).stage2.aux_path is False  # the user's --set still wins


def test_final_model_without_validation_keeps_its_last_epoch(tmp_path, capsys):
    """Once settings are chosen, a model may be trained on every image: with no val folder stage 2 keeps its last
    epoch when told to, says so in the table, and otherwise stops with one sentence naming the setting."""
    import shutil

    from conftest import one_line_error, tiny_demo_args
    from utils.checkpoint import STAGE2_FORMAT, load_checkpoint
    from utils.data.demo_data import ensure_demo_dataset
    stage1, stage2, report = load_script("1_train_stage1"), load_script("2_train_stage2"), load_script("report")
    argv = tiny_demo_args(tmp_path, "stage2.epochs=2")
    ensure_demo_dataset(load_config(argv[1], argv[3::2]))
    shutil.rmtree(tmp_path / "data" / "val")
    assert stage1.main(argv) == 0
    assert "val" not in json.loads((tmp_path / "runs" / "demo" / "stage1" / "metrics.json").read_text())
    message = one_line_error(capsys, stage2.main, argv)
    assert "val/img does not exist" in message and "stage2.keep_epoch: last" in message
    assert stage2.main(argv + ["--set", "stage2.keep_epoch=last"]) == 0
    out = tmp_path / "runs" / "demo" / "stage2"
    assert load_checkpoint(out / "best.pth", STAGE2_FORMAT)["epoch"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["images"]) == {"test"} and metrics["best_epoch"] == 2
    assert metrics["selected_by"].startswith("the last epoch")
    assert [line.split(",")[2] for line in (out / "log.csv").read_text().splitlines()[1:]] == ["", ""]
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs" / "demo")]) == 0
    table = capsys.readouterr().out
    assert "(epoch 2 of 2, the last)" in table and "chosen on val" not in table and "val mIoU" not in table


def test_report_states_how_steady_the_val_curve_was():
    report = load_script("report")
    log = [{"epoch": str(e), "val_miou": str(v)} for e, v in enumerate([0.5, 0.8, 0.6, 0.7, 0.65, 0.75, 0.7], 1)]
    line = report.val_curve(log)
    assert "best 80.0 (epoch 2)" in line and "last 5 epochs 60.0–75.0 (mean 68.0)" in line
    assert report.val_curve([{"epoch": "1", "val_miou": ""}]) is None  # a run that kept its last epoch, no val


def test_report_names_a_stage2_trained_on_true_masks():
    report = load_script("report")
    data = {"config": {"stage2": {"epochs": 12, "keep_epoch": "last", "train_masks": "ground_truth"}},
            "metrics": {"best_epoch": 12}}
    assert report.stage_label("stage2", data) == "stage 2: DPR on true masks (epoch 12 of 12, the last)"
    data["config"]["stage2"]["epochs"] = 0    # scoring a given model only: it learnt from no masks here
    assert report.stage_name("stage2", data) == "stage 2: DPR"
    data["config"]["stage2"]["epochs"] = 12
    data["config"]["stage2"]["train_masks"] = "pseudo"
    assert report.stage_label("stage2", data) == "stage 2: DPR (epoch 12 of 12, the last)"
    assert report.stage_label("stage1", data) == "stage 1: CAM pseudo-masks"


def test_report_names_flip_test_time_augmentation():
    report = load_script("report")
    data = {"config": {"stage2": {"epochs": 0, "init_from": "best.pth", "tta_flip": True}},
            "metrics": {"best_epoch": 0}}
    assert report.stage_label("stage2", data) == ("stage 2: DPR (stage2.init_from as it is, not trained; flip "
                                                  "test-time augmentation)")
    data["config"]["stage2"].update(epochs=16, keep_epoch="last")
    data["metrics"]["best_epoch"] = 16
    assert report.stage_label("stage2", data) == "stage 2: DPR (epoch 16 of 16, the last; flip test-time augmentation)"
    data["config"]["stage2"]["tta_flip"] = False
    assert "augmentation" not in report.stage_label("stage2", data)


def test_averaged_class_maps_weigh_each_classifier_alike():
    """Each member's maps are scaled by their own peak before the mean, so a classifier whose CAMs run ten times
    higher does not outvote the other; labels come from the mean of their image probabilities."""
    from models.classifier import ClassifierEnsemble
    cfg = load_config(None, ["stage1.cam_flip=false"])
    left, right = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    left[0, 1, :, :2], right[0, 1, :, 2:] = 10.0, 1.0       # one sees gland on the left, the other on the right
    left[0, 0], right[0, 0] = 10.0, 1.0
    sure, unsure = CamStub(left, torch.tensor([[4.0, 4.0]])), CamStub(right, torch.tensor([[4.0, -4.0]]))
    images = torch.zeros(1, 3, 4, 4)
    maps, labels = class_maps(ClassifierEnsemble([sure, unsure]), images, (4, 4), None, cfg.stage1, CPU)
    assert torch.allclose(maps[0, 1], torch.full((4, 4), 0.5)) and torch.allclose(maps[0, 0], torch.ones(4, 4))
    # gland: probabilities 0.98 and 0.02 average 0.50, above the 0.25 threshold, so the label keeps it
    assert labels[0].tolist() == [1.0, 1.0]
    alone, alone_labels = class_maps(sure, images, (4, 4), None, cfg.stage1, CPU)
    single, single_labels = class_maps(ClassifierEnsemble([sure]), images, (4, 4), None, cfg.stage1, CPU)
    assert torch.equal(alone, single) and torch.equal(alone_labels, single_labels)
