"""IBM and DPR's refinement attention in the places and at the rates the paper uses them, and the earlier
forms each setting keeps reachable."""
import csv
import json

import numpy as np
import pytest
import torch

from models.classifier import Stage1Classifier, build_backbone
from models.dpr import DPR, RefinementAttention
from models.ibm import ImplicitBoundaryMining
from utils.config import load_config
from utils.training import sgd_with_multipliers

from conftest import load_script, tiny_demo_args

stage1 = load_script("1_train_stage1")


def timm_classifier(ibm_at, edge_from="input"):
    torch.manual_seed(0)
    backbone = build_backbone("resnet10t", False, out_indices=(1, 2, 3), output_stride=32)
    return Stage1Classifier(backbone, 2, ibm_at=ibm_at, ibm_edge_from=edge_from).eval()


def test_ibm_sits_before_the_deepest_stage_which_then_reads_it():
    model = timm_classifier("before_deepest_stage")
    # resnet10t: layer2 gives 128 channels into layer3 (256): IBM works on what layer3 reads
    assert model.ibm.branch_1x1.in_channels == 128 and model.backbone.tap_channels == (64, 128, 256)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (low, mid, deep), boundary, embedding = model.taps(x)
        plain = model.backbone.taps(x)
        assert deep.shape == plain[2].shape == (1, 256, 4, 4) and boundary.shape == (1, 1, 8, 8)
        assert torch.equal(low, plain[0]) and torch.equal(mid, plain[1])  # the finer taps come before IBM
        model.ibm.output.weight.mul_(0.0)  # IBM now hands layer3 zeros: the deep tap must change with it
        changed = model.taps(x)[0][2]
    assert not torch.allclose(changed, plain[2])
    # no hook is left behind: the backbone alone gives what it gave before
    assert torch.equal(model.backbone.taps(x)[2], plain[2])


def test_ibm_on_the_deepest_tap_is_the_deep_heads_feature_map():
    model = timm_classifier("deepest_tap")
    assert model.ibm.branch_1x1.in_channels == 256
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (_, _, deep), _, _ = model.taps(x)
        expected, _, _ = model.ibm(model.backbone.taps(x)[2])
    assert torch.allclose(deep, expected)


def test_resnet38_keeps_ibm_between_b6_and_b7():
    from models.resnet38 import ResNet38
    backbone = ResNet38()
    model = Stage1Classifier(backbone, 2)
    assert model.ibm_at == "before_deepest_stage" and model.ibm.branch_1x1.in_channels == 2048


@pytest.mark.parametrize("edge_from", ["input", "fused"])
def test_the_edge_map_reads_the_modules_input_or_its_fused_features(edge_from):
    torch.manual_seed(0)
    module = ImplicitBoundaryMining(8, edge_from=edge_from)
    seen = []
    module.edge.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 8, 5, 5)
    module(x)
    assert torch.equal(seen[0], x) == (edge_from == "input")
    with pytest.raises(ValueError, match="edge_from"):
        ImplicitBoundaryMining(8, edge_from="boundary")


def test_new_layers_learn_at_the_published_rates_unless_set():
    model = timm_classifier("before_deepest_stage")
    cfg = load_config(None, ["stage1.lr_mult_new=10"])
    rates = {id(p): g["lr"] for g in sgd_with_multipliers([model.backbone], stage1.new_layer_groups(model, cfg.stage1),
                                                            0.01, 0.9, 5e-4).param_groups for p in g["params"]}
    assert rates[id(model.fc8.weight)] == pytest.approx(0.1)
    assert rates[id(model.ibm.fuse.weight)] == rates[id(model.ic1.weight)] == pytest.approx(0.01)
    assert rates[id(model.ibm.fuse.bias)] == rates[id(model.ic2.bias)] == pytest.approx(0.02)
    assert rates[id(next(model.backbone.parameters()))] == pytest.approx(0.01)
    earlier = load_config(None, ["stage1.lr_mult_new=10", "stage1.ibm_lr_mult=10", "stage1.side_head_lr_mult=10"])
    optimizer = sgd_with_multipliers([model.backbone], stage1.new_layer_groups(model, earlier.stage1), 0.01, 0.9, 5e-4)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(model.ibm.fuse.weight)] == rates[id(model.ic1.weight)] == pytest.approx(0.1)
    assert rates[id(model.ibm.fuse.bias)] == pytest.approx(0.2)
    # weight decay: weights only, pretrained or new
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(model.ibm.fuse.weight)] == 5e-4 and decays[id(model.ibm.fuse.bias)] == 0.0


def test_refinement_attention_width_and_gate_start():
    assert RefinementAttention(2).channel_gate[1].out_channels == 1  # 2 -> 1 -> 2, as published
    assert RefinementAttention(40).channel_gate[1].out_channels == 2
    assert RefinementAttention(2, hidden=8).channel_gate[1].out_channels == 8
    logits = torch.randn(2, 2, 6, 6)
    for scale, start in ((1.0, 0.5), (2.0, 1.0)):
        module = RefinementAttention(2, gate_scale=scale)
        for conv in (module.channel_gate[3], module.spatial_conv):  # gates at their value for zero input
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)
        out = module(logits)
        assert torch.allclose(out, logits * start * start)
        assert [round(float(g), 4) for g in module.mean_gates] == [start, start]


def test_old_segmenter_files_rebuild_their_wider_attention(tmp_path):
    from utils.checkpoint import STAGE2_FORMAT, save_checkpoint
    from utils.stage2.predict import load_segmenter, segmenter_meta
    cfg = load_config(None, ["stage2.encoder=resnet10t", "stage2.refinement_hidden=8", "data.mean=[0.5,0.5,0.5]",
                             "data.std=[0.5,0.5,0.5]"])
    model = DPR("resnet10t", 2, refine_hidden=8)
    meta = segmenter_meta(cfg)
    assert meta["refinement_hidden"] == 8
    del meta["refinement_hidden"], meta["refinement_gate_scale"]  # a file from before these settings
    save_checkpoint(tmp_path / "old.pth", {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": meta})
    loaded, _ = load_segmenter(tmp_path / "old.pth", torch.device("cpu"))
    assert loaded.refine.channel_gate[1].out_channels == 8


def test_logs_record_gradient_clipping_and_mean_gates(tmp_path):
    stage2 = load_script("2_train_stage2")
    args = tiny_demo_args(tmp_path)
    assert stage1.main(args + ["--set", "stage1.epochs=1"]) == 0
    assert stage2.main(args + ["--set", "stage2.epochs=1"]) == 0
    with open(tmp_path / "runs" / "demo" / "stage1" / "log.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["grad_norm"]) > 0 and 0 <= float(row["clipped"]) <= 1
    with open(tmp_path / "runs" / "demo" / "stage2" / "log.csv") as handle:
        row = next(csv.DictReader(handle))
    assert 0 < float(row["channel_gate"]) < 1 and 0 < float(row["spatial_gate"]) < 1
    # the trained run's gates measured on val, without training again
    assert stage2.main(args + ["--gate-effects"]) == 0
    effects = json.loads((tmp_path / "runs" / "demo" / "stage2" / "gate_effects.json").read_text())
    assert effects["gates"]["windows"] > 0 and 0 <= effects["equal class gates"]["changed_pixels"] <= 1


def _segmenter_with_gate(hidden_weight, class_bias):
    """A resnet10t DPR whose channel gate's hidden unit has the given input weights (and bias 0.5) and whose
    class units have the biases class_bias: zero input weights make the gate one constant per class."""
    torch.manual_seed(0)
    model = DPR("resnet10t", 2).eval()
    gate = model.refine.channel_gate
    with torch.no_grad():
        gate[1].weight.fill_(hidden_weight)
        gate[1].bias.fill_(0.5)
        gate[3].weight.fill_(1.0)
        gate[3].bias.copy_(torch.tensor(class_bias))
    meta = {"classes": ["background", "gland"], "window": 48, "overlap": 0.25, "mean": [0.5] * 3,
            "std": [0.25] * 3, "tta_flip": False}
    return model, meta


def _val_items(tmp_path, count=2):
    from utils.data.datasets import split_items
    from utils.data.imageio import write_palette_png, write_rgb
    rng = np.random.default_rng(0)
    for folder in ("img", "mask"):
        (tmp_path / "val" / folder).mkdir(parents=True)
    for index in range(count):
        write_rgb(tmp_path / "val" / "img" / f"v{index}.png", rng.integers(0, 256, (80, 72, 3), dtype=np.uint8))
        write_palette_png(tmp_path / "val" / "mask" / f"v{index}.png",
                          (rng.random((80, 72)) > 0.5).astype(np.uint8), [(0, 0, 0), (255, 255, 255)])
    return split_items(tmp_path, "val")


def val_image(item):
    from utils.data.imageio import read_rgb
    return read_rgb(item.image)


def test_gate_effects_count_what_equal_and_fixed_gates_change(tmp_path):
    from utils.runtime import setup_runtime
    from utils.stage2.gate_effects import gate_effects
    from utils.stage2.predict import predict_mask
    items = _val_items(tmp_path)
    runtime = setup_runtime(load_config(None, []), "cpu")

    # constant, unequal class gates: the same in every window, and equalising them gives the ungated argmax
    model, meta = _segmenter_with_gate(0.0, [2.0, -2.0])
    effects = gate_effects(model, meta, items, "index", runtime)
    assert effects["gates"]["std"] == [0.0, 0.0]
    # the hidden unit passes its bias, 0.5, to both class units
    expected_gap = torch.sigmoid(torch.tensor(2.5)) - torch.sigmoid(torch.tensor(-1.5))
    assert effects["class_gap"]["mean"] == pytest.approx(float(expected_gap), abs=1e-5)
    assert effects["one gate for every window"]["changed_pixels"] == 0.0
    gated = [predict_mask(model, val_image(item), runtime, 48, 0.25, 8, meta["mean"], meta["std"], 2)
             for item in items]
    model.refine = torch.nn.Identity()
    ungated = [predict_mask(model, val_image(item), runtime, 48, 0.25, 8, meta["mean"], meta["std"], 2)
               for item in items]
    flipped = sum(int((a != b).sum()) for a, b in zip(gated, ungated)) / sum(a.size for a in gated)
    assert flipped > 0 and effects["equal class gates"]["changed_pixels"] == pytest.approx(flipped)

    # a gate that reads the window's logits differs between windows
    model, meta = _segmenter_with_gate(3.0, [0.0, 0.0])
    effects = gate_effects(model, meta, items, "index", runtime)
    assert effects["gates"]["windows"] >= 2 * len(items) and min(effects["gates"]["std"]) > 0


def test_gate_effects_refuse_a_segmenter_without_attention(tmp_path):
    from utils.runtime import setup_runtime
    from utils.stage2.gate_effects import gate_effects
    model, meta = _segmenter_with_gate(0.0, [0.0, 0.0])
    model.refine = torch.nn.Identity()
    with pytest.raises(ValueError, match="no refinement attention"):
        gate_effects(model, meta, _val_items(tmp_path), "index", setup_runtime(load_config(None, []), "cpu"))
