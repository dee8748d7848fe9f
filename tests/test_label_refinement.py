"""Affinity propagation and the dense CRF between the class maps and the pseudo-masks, on generated images."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import save_png
from utils.config import ConfigError, load_config
from utils.data.datasets import Item
from utils.data.imageio import read_mask
from utils.runtime import Runtime
from utils.stage1.affinity import (AffinityPropagation, affinity_loss, confident_labels, disc_offsets,
                                   pair_affinities, random_walk)
from utils.stage1.crf import crf_available, dense_crf
from utils.stage1.refinement import LabelRefiner, check_refinement
from utils.stage1.stitch import VoteStitcher, label_union

CPU = Runtime(torch.device("cpu"), None)


def gland_picture(size=48):
    """A red disc (the gland) on pale stroma, and class maps that see only the disc's left half: the CAM's miss."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    image = np.full((size, size, 3), 235, np.uint8)
    image[disc] = (170, 40, 60)
    gland = (disc & (xx < size / 2)).astype(np.float32)
    background = (~disc).astype(np.float32)
    return image, disc, np.stack([background, gland])


def test_a_random_walk_over_colour_affinities_fills_the_region_the_cam_misses():
    image, disc, maps = gland_picture()
    embedding = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 10.0
    offsets = disc_offsets(3)
    affinity, valid = pair_affinities(embedding, offsets)
    walked = random_walk(torch.from_numpy(maps), affinity, valid, offsets, beta=8, iterations=200).numpy()
    assert (maps.argmax(0)[disc] == 1).mean() < 0.6  # the CAM sees about half the gland
    assert (walked.argmax(0)[disc] == 1).mean() > 0.95 and (walked.argmax(0)[~disc] == 0).mean() > 0.95


def test_the_affinity_loss_pulls_sure_pairs_of_one_class_together_and_pushes_two_classes_apart():
    labels = torch.tensor([[0, 0, 1, 255]])
    offsets = [(0, 1)]
    valid = torch.tensor([[[True, True, True, False]]])
    together = torch.tensor([[[0.99, 0.01, 0.5, 0.5]]])  # right on both pairs (the third pair has an unsure pixel)
    apart = torch.tensor([[[0.01, 0.99, 0.5, 0.5]]])
    assert affinity_loss(together, valid, labels, offsets, 0) < 0.1 < affinity_loss(apart, valid, labels, offsets, 0)
    maps = torch.tensor([[[0.9, 0.5]], [[0.1, 0.45]]])
    assert confident_labels(maps, 0.3).tolist() == [[0, 255]]


class ColourTaps(nn.Module):
    """A stand-in classifier whose three taps are the image's colours at stride 2: all an affinity head needs."""
    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.tap_channels = (3, 3, 3)

    def taps(self, x):
        pooled = F.avg_pool2d(x, 2)
        return (pooled, pooled, pooled), None, None


def test_a_learnt_affinity_head_fills_the_missed_gland_and_keeps_ruled_out_classes_out():
    image, disc, maps = gland_picture()
    cfg = load_config("configs/demo.yaml", ["stage1.affinity=true", "stage1.stitch_whole_images=true",
                                            "stage1.affinity_epochs=60", "stage1.affinity_lr=0.01",
                                            "stage1.affinity_radius=4", "stage1.affinity_iterations=200",
                                            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    propagation = AffinityPropagation(cfg, ColourTaps(), CPU)
    losses = propagation.fit([(image, maps)] * 4, 1.0)
    assert losses[-1] < losses[0]
    allowed = np.ones_like(maps, bool)
    refined = propagation.refine(image, maps, allowed, 1.0)
    assert (refined.argmax(0)[disc] == 1).mean() > 0.9 and (refined.argmax(0)[~disc] == 0).mean() > 0.9
    # where the labels rule the gland out (the disc's lower half here), it stays out
    allowed[1, 24:] = False
    refined = propagation.refine(image, maps, allowed, 1.0)
    assert (refined[1, 24:] == 0).all() and (refined.argmax(0)[:20][disc[:20]] == 1).mean() > 0.9

    mask = LabelRefiner(cfg, propagation).mask(image, maps, np.ones_like(maps, bool), 1.0)
    assert (mask[disc] == 1).mean() > 0.9


def test_label_union_rules_out_a_class_only_where_no_covering_tile_has_it():
    labels = np.array([[1, 0], [1, 1]])
    allowed = label_union(labels, [(0, 0, 2, 2), (0, 1, 2, 2)], 2, 4)
    assert allowed[1].tolist() == [[False, True, True, True]] * 2  # column 3: no tile, every class allowed
    assert allowed[0].all()


def test_the_whole_training_images_get_refined_masks_and_both_are_scored(tmp_path, capsys):
    from utils.stage1.mask_writing import write_whole_images
    image, disc, maps = gland_picture(48)
    items = []
    for x in (0, 24):
        path = save_png(tmp_path / "train" / "img" / f"im_0_{x}[1, 1].png", image[:, x:x + 24])
        truth = save_png(tmp_path / "train" / "mask" / f"im_0_{x}.png", disc[:, x:x + 24].astype(np.uint8))
        items.append(Item(path, f"im_0_{x}", np.array([1.0, 1.0]), truth))
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}", "stage1.stitch_whole_images=true",
                                            "stage1.affinity=true", "stage1.affinity_epochs=60",
                                            "stage1.affinity_lr=0.01", "stage1.affinity_radius=4",
                                            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    stitcher = VoteStitcher(items, 2)
    for item, x in zip(items, (0, 24)):
        stitcher.add(item, maps[:, :, x:x + 24])
    written, unrefined = write_whole_images(cfg, stitcher, CPU, "sha", LabelRefiner(
        cfg, AffinityPropagation(cfg, ColourTaps(), CPU)), 1.0)
    mask = read_mask(tmp_path / "train" / "pseudo_mask" / "whole" / "mask" / "im.png", "index", 2)
    assert (mask[disc] == 1).mean() > 0.9
    iou = lambda m: m[1, 1] / (m[1].sum() + m[:, 1].sum() - m[1, 1])
    assert iou(written) > 0.85 > 0.6 > iou(unrefined)
    assert "affinity head trained on 1 whole training images" in capsys.readouterr().out


def test_refinement_needs_whole_images_and_the_crf_its_package():
    with pytest.raises(ConfigError, match="stage1.stitch_whole_images: true"):
        check_refinement(load_config("configs/demo.yaml", ["stage1.affinity=true"]).stage1)
    cfg = load_config("configs/demo.yaml", ["stage1.crf_iterations=5", "stage1.stitch_whole_images=true"])
    if crf_available():
        check_refinement(cfg.stage1)
    else:
        with pytest.raises(ConfigError, match="pydensecrf2"):
            check_refinement(cfg.stage1)


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 is not installed (requirements-crf.txt)")
def test_the_dense_crf_snaps_a_coarse_map_to_the_colour_edge():
    image, disc, _ = gland_picture()
    coarse = np.zeros((2, 48, 48), np.float32)
    coarse[1, 12:36, 12:36] = 0.7  # a square where the gland is a disc
    coarse[0] = 1 - coarse[1]
    probs = dense_crf(image, coarse, np.ones_like(coarse, bool), 10)
    assert np.allclose(probs.sum(0), 1, atol=1e-4)
    before = ((coarse.argmax(0) == 1) == disc).mean()
    assert ((probs.argmax(0) == 1) == disc).mean() > before
