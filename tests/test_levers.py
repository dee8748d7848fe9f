"""The optional levers of a from-scratch recipe do what they claim, mechanically: stain jitter moves colours
and nothing else, scale jitter and rotations move image and mask together, CAM refinement never brings in a class the label lacks, stitched whole-image maps equal
the patch maps where one patch covers a pixel, true masks of whole images are rebuilt from the patches, unsure pseudo-mask pixels are left unlabelled, and the averaged model and flip averaging are what they say."""
import numpy as np
import torch
import torch.nn as nn

from conftest import save_png
from utils.data.datasets import Item, SegmentationSet
from utils.data.imageio import IGNORE_INDEX
from utils.data.transforms import stain_jitter
from utils.stage1.cam import cams_to_masks, refine_cams
from utils.stage1.stitch import VoteStitcher, patch_votes
from utils.stage2.network import build_segmenter
from utils.stage2.predict import FlipAveraged
from utils.stage2.training import save_stage2
from utils.stage2.training_data import training_pairs
from utils.training import WeightAverage


def test_stain_jitter_changes_colours_and_keeps_masks_aligned(tmp_path):
    rng = np.random.default_rng(0)
    image = np.full((40, 40, 3), 235, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[8:20, 5:30] = 1
    image[mask == 1] = (120, 40, 140)  # a dark purple block on pale background: its edges show alignment
    save_png(tmp_path / "img.png", image)
    save_png(tmp_path / "mask.png", mask)
    args = ([tmp_path / "img.png"], [tmp_path / "mask.png"], 32, [0, 0, 0], [1, 1, 1], "index", 2)
    plain = SegmentationSet(*args, seed=3)
    jittered = SegmentationSet(*args, seed=3, jitter=(0.2, 0.2))
    changed = 0
    for key in [(epoch, 0) for epoch in range(8)]:
        image_a, mask_a, _ = plain[key]
        image_b, mask_b, _ = jittered[key]
        assert torch.equal(mask_a, mask_b)  # the same crop and flips
        dark = image_b.mean(dim=0) < image_b.mean()
        assert torch.equal(dark, mask_b == 1)  # the jittered image's block is exactly where its mask says
        changed += int(not torch.equal(image_a, image_b))
    assert changed == 8
    assert np.array_equal(stain_jitter(image, rng, 0.0, 0.0), image)


def test_scale_jitter_and_rotations_move_image_and_mask_together(tmp_path):
    image = np.full((60, 60, 3), 235, np.uint8)
    mask = np.zeros((60, 60), np.uint8)
    mask[20:32, 10:50] = 1  # a wide block: a transposed crop shows it tall
    image[mask == 1] = (120, 40, 140)
    save_png(tmp_path / "img.png", image)
    save_png(tmp_path / "mask.png", mask)
    args = ([tmp_path / "img.png"], [tmp_path / "mask.png"], 56, [0, 0, 0], [1, 1, 1], "index", 2)
    dataset = SegmentationSet(*args, seed=5, scale_jitter=0.4, rotate90=True)
    areas, tall, wide = set(), 0, 0
    for key in [(epoch, 0) for epoch in range(16)]:
        crop, crop_mask, _ = dataset[key]
        assert set(crop_mask.unique().tolist()) <= {0, 1, IGNORE_INDEX}  # no label invented by resizing
        block = crop_mask == 1
        dark = crop.mean(dim=0) < 0.7
        # bilinear resizing blends the block's one-pixel rim; everywhere else image and mask agree
        assert (dark != block)[crop_mask != IGNORE_INDEX].float().mean() < 0.05
        rows, cols = block.any(dim=1).sum().item(), block.any(dim=0).sum().item()
        tall, wide = tall + int(rows > cols), wide + int(cols > rows)
        areas.add(block.sum().item())
    assert tall and wide  # both orientations were drawn
    assert len(areas) > 4  # and several scales
    untouched = SegmentationSet(*args, seed=5)  # the settings off: crops as before, at the image's own scale
    assert all(untouched[(epoch, 0)][1].eq(1).sum().item() == 12 * 40 for epoch in range(4))


def test_refinement_never_brings_in_a_class_the_label_lacks():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 24, 24)
    maps = torch.rand(2, 3, 24, 24)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    refined = refine_cams(maps * labels[:, :, None, None], images, iterations=20, dilations=(1, 2, 4))
    assert (refined[0, 1] == 0).all() and (refined[1, 0] == 0).all() and (refined[1, 2] == 0).all()
    masks = cams_to_masks(refined, labels)
    assert not (masks[0] == 1).any() and (masks[1] == 1).all()


def test_refinement_follows_colour_edges():
    images = torch.zeros(1, 3, 16, 16)
    images[..., 8:] = 1.0  # two flat halves
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 1, 4:12, 2:6] = 1.0   # class 1 lit on part of the left half only
    maps[0, 0, 4:12, 10:14] = 1.0  # class 0 on part of the right half
    refined = refine_cams(maps, images, iterations=30, dilations=(1, 2, 4))
    masks = refined.argmax(dim=1)[0]
    assert (masks[:, :8] == 1).float().mean() > 0.9 and (masks[:, 8:] == 0).float().mean() > 0.9


def refined_by_the_formula(cams, images, iterations, dilations, colour_scale):
    """Pixel-adaptive refinement written out pixel by pixel, borders replicated: the reference."""
    _, _, height, width = cams.shape
    images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    offsets = [(0, 0)] + [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    affinity = torch.zeros(cams.shape[0], len(offsets), height, width)
    for n in range(cams.shape[0]):
        for y in range(height):
            for x in range(width):
                colours = torch.stack([images[n, :, min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)]
                                       for dy, dx in offsets])              # K x 3
                spread = colours.std(dim=0).mean() + 1e-4
                difference = (colours - images[n, :, y, x]).abs().mean(dim=1)
                affinity[n, :, y, x] = torch.softmax(-(difference / (colour_scale * spread)) ** 2, dim=0)
    refined = cams.clone()
    for _ in range(iterations):
        total = torch.zeros_like(refined)
        for k, (dy, dx) in enumerate(offsets):
            rows = (torch.arange(height) + dy).clamp(0, height - 1)
            cols = (torch.arange(width) + dx).clamp(0, width - 1)
            total += refined[:, :, rows][:, :, :, cols] * affinity[:, k:k + 1]
        refined = total
    return refined


def test_refinement_is_the_formula_in_either_memory_layout():
    torch.manual_seed(2)
    images, cams = torch.rand(2, 3, 20, 20), torch.rand(2, 2, 10, 10)
    expected = refined_by_the_formula(cams, images, 3, (1, 3), 0.3)
    for layout in (torch.contiguous_format, torch.channels_last):
        refined = refine_cams(cams.contiguous(memory_format=layout), images.contiguous(memory_format=layout),
                              iterations=3, dilations=(1, 3), colour_scale=0.3)
        assert torch.allclose(refined, expected, atol=1e-5)


def test_stitched_maps_equal_patch_maps_where_one_patch_covers_a_pixel(tmp_path):
    """Two 8 x 8 patches of a 8 x 12 image, overlapping in columns 4..7."""
    items = []
    for x in (0, 4):
        path = save_png(tmp_path / f"im_0_{x}[1, 1].png", np.full((8, 8, 3), 10 * x, np.uint8))
        items.append(Item(path, f"im_0_{x}", np.array([1.0, 1.0])))
    stitcher = VoteStitcher(items, 2)
    assert stitcher.sizes == {"im": (8, 12)}
    torch.manual_seed(1)
    maps = torch.rand(2, 2, 8, 8)
    votes = patch_votes(maps, torch.ones(2, 2)).numpy()
    for item, vote in zip(items, votes):
        stitcher.add(item, vote)
    stitched = stitcher.stitched_maps("im")
    assert np.allclose(stitched[:, :, :4], votes[0][:, :, :4])
    assert np.allclose(stitched[:, :, 8:], votes[1][:, :, 4:])
    assert np.allclose(stitched[:, :, 4:8], (votes[0][:, :, 4:] + votes[1][:, :, :4]) / 2)
    mask = stitcher.mask("im", background=0)
    assert np.array_equal(mask[:, :4], votes[0][:, :, :4].argmax(axis=0))
    weighed = stitcher.mask("im", background=0, background_scale=0.5)   # the background vote halved
    assert np.array_equal(weighed, np.stack([stitched[0] * 0.5, stitched[1]]).argmax(axis=0))
    assert (weighed >= mask).all() and (weighed != mask).any()
    assert np.array_equal(stitcher.mask("im", background=0), mask)     # the stitched votes are left as they were
    image = stitcher.image("im")
    assert (image[:, :4] == 0).all() and (image[:, 4:] == 40).all()


def test_stage2_on_true_masks_of_whole_images_puts_them_back_together_from_the_patches(tmp_path, capsys):
    """stage2.train_masks=ground_truth with train_on=whole_images: each image and its true mask rebuilt from
    overlapping patches as prepare cuts them; an image with a patch lacking its mask is left out."""
    import pytest

    from utils.config import load_config
    from utils.data.imageio import DataError, read_mask, read_rgb
    rng = np.random.default_rng(0)
    whole = {stem: (rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), rng.integers(0, 2, (12, 20), dtype=np.uint8))
             for stem in ("a", "b")}
    for stem, (image, mask) in whole.items():
        for y in (0, 4):
            for x in (0, 6, 12):
                save_png(tmp_path / "train" / "img" / f"{stem}_{y}_{x}[1, 1].png", image[y:y + 8, x:x + 8])
                if stem == "a" or (y, x) != (4, 12):   # b lacks one patch's mask
                    save_png(tmp_path / "train" / "mask" / f"{stem}_{y}_{x}.png", mask[y:y + 8, x:x + 8])
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}", "stage2.train_masks=ground_truth",
                                            "stage2.train_on=whole_images"])
    images, masks, encoding = training_pairs(cfg)
    assert [p.stem for p in images] == ["a"] and encoding == "index"
    printed = capsys.readouterr().out
    assert "1 whole training images and their true masks" in printed
    assert "(1 left out: a patch without its mask)" in printed
    assert np.array_equal(read_rgb(images[0]), whole["a"][0])
    assert np.array_equal(read_mask(masks[0], "index", 2), whole["a"][1])
    (tmp_path / "train" / "mask" / "a_0_0.png").unlink()
    with pytest.raises(DataError, match="lacks masks for some patches of every training image"):
        training_pairs(cfg)


def test_ignore_margin_marks_only_pixels_whose_top_two_votes_are_close(tmp_path):
    path = save_png(tmp_path / "im_0_0[1, 1].png", np.zeros((2, 3, 3), np.uint8))
    stitcher = VoteStitcher([Item(path, "im_0_0", np.array([1.0, 1.0]))], 2)
    stitcher.add(stitcher.patches["im"][0][0], np.array([[[0.9, 0.5, 0.2], [0.6, 0.0, 0.3]],
                                                        [[0.1, 0.45, 0.9], [0.55, 0.0, 0.5]]], np.float32))
    assert stitcher.uncertain("im", 0.1, background=0).tolist() == [[False, True, False], [True, True, False]]
    # the background vote halved: 0.25 against 0.45 and 0.3 against 0.55 are no longer close
    assert stitcher.uncertain("im", 0.1, background=0, background_scale=0.5).tolist() == [
        [False, False, False], [False, True, False]]


def test_whole_image_pseudo_masks_leave_unsure_pixels_unlabelled_but_keep_filled_lumens(tmp_path, capsys):
    """A gland ring around a lumen, stitched from two patches: filling makes the lumen gland; with a margin,
    pixels whose two votes are close become ignore, except the filled lumen; the log says how many."""
    from utils.config import load_config
    from utils.data.imageio import read_mask
    from utils.runtime import Runtime
    from utils.stage1.mask_writing import write_whole_images
    items = []
    for x in (0, 4):
        path = save_png(tmp_path / "train" / "img" / f"im_0_{x}[1, 1].png", np.full((8, 8, 3), 200, np.uint8))
        items.append(Item(path, f"im_0_{x}", np.array([1.0, 1.0])))
    gland = np.zeros((8, 12), np.float32)
    gland[1:7, 2:10] = 0.9
    gland[3:5, 4:8] = 0.45                                  # the lumen: background wins it (0.55), filling gives it back
    gland[1, 2:10] = 0.55                                   # an unsure row: 0.55 against 0.45
    background = 1.0 - gland
    cpu = Runtime(torch.device("cpu"), None)
    for margin, unlabelled in ((0.0, "0.0%"), (0.2, f"{100 * 8 / 96:.1f}%")):
        cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}", "stage1.stitch_whole_images=true",
                                                "stage1.pseudo_mask_fill_holes=[gland]",
                                                f"stage1.pseudo_mask_ignore_margin={margin}"])
        stitcher = VoteStitcher(items, 2)
        for item, x in zip(items, (0, 4)):
            stitcher.add(item, np.stack([background, gland])[:, :, x:x + 8])
        write_whole_images(cfg, stitcher, cpu, "sha")
        mask = read_mask(tmp_path / "train" / "pseudo_mask" / "whole" / "mask" / "im.png", "index", 2)
        assert (mask[3:5, 4:8] == 1).all() and (mask[2, 2:10] == 1).all() and (mask[7] == 0).all()
        assert (mask[1, 2:10] == (IGNORE_INDEX if margin else 1)).all()
        assert f"({unlabelled} of their pixels left unlabelled)" in capsys.readouterr().out


def test_single_class_patches_vote_for_their_class_everywhere():
    maps = torch.zeros(2, 2, 4, 4)
    votes = patch_votes(maps, torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert (votes[0, 1] == 1).all() and (votes[0, 0] == 0).all() and (votes[1] == 0).all()


def test_weight_average_follows_its_formula_and_round_trips():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)  # first step: decay warms up to min(0.9, 2 / 11)
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(average.model[0].weight, expected)
    assert not average.model[0].weight.requires_grad
    other = WeightAverage(model, decay=0.9)
    other.load_state_dict(average.state_dict())
    assert other.updates == 1 and torch.equal(other.model[0].weight, average.model[0].weight)


def test_flip_averaging_is_the_mean_over_flips():
    class Skewed(nn.Module):  # not flip-equivariant: adds a ramp along x
        def forward(self, x):
            ramp = torch.arange(x.shape[-1], dtype=x.dtype)
            return x[:, :2] + ramp

    x = torch.rand(1, 3, 4, 6)
    model = Skewed()
    expected = (model(x) + model(x.flip(-1)).flip(-1) + model(x.flip(-2)).flip(-2)) / 3
    assert torch.allclose(FlipAveraged(model)(x), expected)
    assert torch.allclose(FlipAveraged(nn.Identity())(x), x)


def test_stage2_encoder_starts_from_the_stage1_backbone(tmp_path):
    import importlib

    import pytest

    from utils.checkpoint import STAGE1_FORMAT, CheckpointError, save_checkpoint
    from utils.config import ConfigError, load_config
    stage1 = importlib.import_module("1_train_stage1")
    settings = [f"runs_dir={tmp_path}", "stage2.encoder_from_stage1=true"]
    cfg = load_config("configs/demo.yaml", settings)
    with pytest.raises(ConfigError, match="no stage-1 checkpoint"):
        build_segmenter(cfg)
    classifier = stage1.build_classifier(cfg)
    path = tmp_path / cfg.name / "stage1" / "checkpoint.pth"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"format": STAGE1_FORMAT, "model": classifier.state_dict(), "config": cfg.to_dict()})
    model = build_segmenter(cfg)
    copied = classifier.backbone.net.state_dict()
    encoder = model.encoder.state_dict()
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight"} <= set(encoder)
    assert all(torch.equal(encoder[key], copied[key]) for key in encoder)
    fresh = build_segmenter(load_config("configs/demo.yaml", [f"runs_dir={tmp_path}"]))
    assert not torch.equal(fresh.encoder.state_dict()["conv1.weight"], copied["conv1.weight"])
    with pytest.raises(ConfigError, match="same network in both stages"):
        build_segmenter(load_config("configs/demo.yaml", settings + ["stage2.encoder=resnet34"]))
    cut = {key: value for key, value in classifier.state_dict().items() if ".layer2." not in key}
    save_checkpoint(path, {"format": STAGE1_FORMAT, "model": cut, "config": cfg.to_dict()})
    with pytest.raises(CheckpointError, match="layer2"):  # a backbone without the stages the encoder needs
        build_segmenter(cfg)


def test_stage2_decodes_the_dilated_stage1_layer3_and_keeps_it_in_its_file(tmp_path):
    import importlib

    import pytest

    from utils.checkpoint import STAGE1_FORMAT, save_checkpoint
    from utils.config import ConfigError, load_config
    from utils.stage2.predict import load_segmenter
    from utils.timm_settings import resolve_normalisation
    stage1 = importlib.import_module("1_train_stage1")
    deep = [f"runs_dir={tmp_path}", "stage1.out_indices=[1, 2, 3]", "stage1.output_stride=32"]
    with pytest.raises(ConfigError, match="stage2.encoder_stage.*output_stride: 8"):
        build_segmenter(load_config("configs/demo.yaml", deep + ["stage2.encoder_stage=3"]))
    settings = deep + ["stage2.encoder_from_stage1=true", "stage2.encoder_kwargs={output_stride: 8}",
                       "stage2.encoder_stage=3"]
    cfg = load_config("configs/demo.yaml", settings)
    classifier = stage1.build_classifier(cfg)
    path = tmp_path / cfg.name / "stage1" / "checkpoint.pth"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"format": STAGE1_FORMAT, "model": classifier.state_dict(), "config": cfg.to_dict()})
    model = build_segmenter(cfg).eval()
    copied, encoder = classifier.backbone.net.state_dict(), model.encoder.state_dict()
    assert "layer3.0.conv1.weight" in encoder and not any(key.startswith("layer4.") for key in encoder)
    assert all(torch.equal(encoder[key], copied[key]) for key in encoder)
    # the dilated stage runs at stride 8: 32 px in, a 4 x 4 map of 256 channels out
    assert model.encode(torch.rand(1, 3, 32, 32)).shape == (1, 256, 4, 4)
    resolve_normalisation(cfg, "stage2")  # the mean and std a stage-2 file carries
    saved = tmp_path / "best.pth"
    save_stage2(saved, model, cfg, {"epoch": 1})
    loaded, _ = load_segmenter(saved, torch.device("cpu"))
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_frozen_stages_keep_their_weights_and_statistics_while_later_stages_learn():
    import importlib

    import pytest

    from utils.config import ConfigError, load_config
    stage1 = importlib.import_module("1_train_stage1")
    cfg = load_config("configs/demo.yaml", ["stage1.backbone=resnet10t", "stage1.frozen_stages=2",
                                            "stage1.freeze_bn=false", "stage2.encoder=resnet10t",
                                            "stage2.frozen_stages=2"])
    torch.manual_seed(0)
    for model, net in ((stage1.build_classifier(cfg), None), (build_segmenter(cfg), None)):
        net = model.backbone.net if hasattr(model, "backbone") else model.encoder
        before = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        out = model(torch.randn(2, 3, 64, 64))
        loss = sum(v.float().mean() for v in (out["logits"] if "logits" in out else [out["main"]]))
        loss.backward()
        optimizer.step()
        after = net.state_dict()
        early = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
        late = [k for k in before if k.startswith("layer2.") and k.endswith("weight")]
        assert early and late
        assert all(torch.equal(before[k], after[k]) for k in early)  # weights and running statistics alike
        assert any(not torch.equal(before[k], after[k]) for k in late)
    with pytest.raises(ConfigError, match="cannot freeze 9"):
        stage1.build_classifier(load_config("configs/demo.yaml", ["stage1.backbone=resnet10t",
                                                                   "stage1.frozen_stages=9"]))
    with pytest.raises(ConfigError, match=r"stage2\.frozen_stages. is -1"):
        load_config("configs/demo.yaml", ["stage2.frozen_stages=-1"])
