"""Vision Transformers (the architecture of UNI, Virchow, H-optimus, Prov-GigaPath) in both stages: tiny timm
ViTs with random weights, on CPU, without a model hub."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import ROOT, load_script
from models.classifier import Stage1Classifier, build_backbone
from models.dpr import DPR
from models.timm_vit import spread_blocks
from utils.checkpoint import STAGE2_FORMAT, CheckpointError, save_checkpoint
from utils.config import ConfigError, load_config
from utils.data.imageio import read_mask
from utils.evaluation.metrics import confusion_matrix, scores
from utils.stage2.predict import load_segmenter, segmenter_meta
from utils.timm_settings import model_kwargs, resolve_normalisation
from utils.training import layer_decay_scales, sgd_with_layer_decay, sgd_with_multipliers

TINY = "vit_tiny_patch16_224"
from utils.stage2.network import build_segmenter
TINY_KWARGS = {"depth": 3}
# patch 14 and four register tokens, as in DINOv2-style pathology models (H-optimus, Virchow2, UNI2)
TINY_REG = ("vit_small_patch14_reg4_dinov2", {"depth": 3, "embed_dim": 48, "num_heads": 2})


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def tiny_dpr(**options):
    torch.manual_seed(0)
    return DPR(TINY, 2, encoder_kwargs=TINY_KWARGS, **options)


# ------------------------------------------------------------------------------------------ stage 1 taps
@pytest.mark.parametrize("name, kwargs, patch, prefix", [(TINY, TINY_KWARGS, 16, 1), (*TINY_REG, 14, 5)])
def test_taps_are_token_maps_at_the_patch_stride(name, kwargs, patch, prefix):
    backbone = build_backbone(name, False, kwargs=kwargs)
    assert backbone.features.net.num_prefix_tokens == prefix  # class token (+ 4 register tokens)
    assert backbone.size_multiple == patch and backbone.features.blocks == (0, 1, 2)
    channels = backbone.features.channels
    taps = backbone.encode(torch.randn(2, 3, 4 * patch, 6 * patch))
    assert [tuple(t.shape) for t in taps] == [(2, channels, 4, 6)] * 3  # prefix tokens dropped, grid kept

    model = Stage1Classifier(backbone, num_classes=3)
    assert model.ibm is not None and model.ibm.fuse.out_channels == channels  # IBM on the deepest tap
    maps, scores_ = model.cams(torch.randn(1, 3, 5 * patch, 3 * patch))
    assert [tuple(m.shape) for m in maps] == [(1, 3, 5, 3)] * 3 and scores_[0].shape == (1, 3)


@pytest.mark.parametrize("name, kwargs, grid, prefix", [
    # UNI and UNI2-h as their model cards build them for a local pytorch_model.bin (no weights: meta device)
    ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": "1e-5", "num_classes": 0,
                               "dynamic_img_size": True}, 14, 1),
    ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                               "init_values": "1e-5", "embed_dim": 1536, "mlp_ratio": 5.33334, "num_classes": 0,
                               "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
                               "reg_tokens": 8, "dynamic_img_size": True}, 16, 9)])
def test_foundation_model_architectures_build_with_their_published_kwargs(name, kwargs, grid, prefix):
    kwargs = model_kwargs(kwargs, "stage1.backbone_kwargs")
    with torch.device("meta"):
        backbone = build_backbone(name, False, kwargs=kwargs)
        taps = backbone.encode(torch.empty(2, 3, 224, 224))
        segmenter = DPR(name, 2, encoder_kwargs=kwargs).eval()
        logits = segmenter(torch.empty(1, 3, 224, 224))
    assert backbone.features.blocks == (7, 15, 23) and backbone.features.net.num_prefix_tokens == prefix
    assert [tuple(t.shape) for t in taps] == [(2, backbone.features.channels, grid, grid)] * 3
    assert tuple(logits.shape) == (1, 2, 224, 224)


def test_tapped_blocks_default_to_the_last_and_two_spread_over_the_depth():
    assert spread_blocks(12) == (3, 7, 11) and spread_blocks(24) == (7, 15, 23) and spread_blocks(4) == (0, 2, 3)
    backbone = build_backbone(TINY, False, kwargs={"depth": 6}, vit_blocks=[-1, 1, 2])
    assert backbone.features.blocks == (1, 2, 5)
    shallow = build_backbone(TINY, False, kwargs={"depth": 6}, vit_blocks=[0, 1, 2])
    assert len(shallow.features.net.blocks) == 3  # blocks after the deepest tap are not built


def test_stage1_sizes_and_blocks_are_checked_against_the_vit():
    stage1 = load_script("1_train_stage1")
    base = [f"stage1.backbone={TINY}", "stage1.backbone_kwargs={depth: 3}"]
    with pytest.raises(ConfigError, match=r"stage1\.image_size=100 is not a multiple of the 16 px patches.*96 or 112"):
        stage1.build_classifier(load_config(None, base + ["stage1.image_size=100"]))
    with pytest.raises(ConfigError, match="stage1.vit_blocks"):
        stage1.build_classifier(load_config(None, base + ["stage1.image_size=96", "stage1.vit_blocks=[0, 1, 7]"]))
    with pytest.raises(ConfigError, match="stage1.layer_decay"):
        stage1.build_classifier(load_config(None, ["stage1.backbone=resnet10t", "stage1.layer_decay=0.8"]))
    with pytest.raises(ConfigError, match=r"stage2\.window=90 is not a multiple"):
        build_segmenter(load_config(None, [f"stage2.encoder={TINY}", "stage2.encoder_kwargs={depth: 3}",
                                                  "stage2.crop_size=64", "stage2.window=90"]))


# ------------------------------------------------------------------------------------------------- DPR
@pytest.mark.parametrize("size", [(64, 64), (37, 51)])
def test_dpr_decodes_one_block_upsampled_to_stride8(size):
    model = tiny_dpr(vit_block=1)
    assert len(model.encoder.net.blocks) == 2  # the block after the decoded one is not built
    seen = []
    model.pyramid.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    model.train()
    out = model(torch.randn(2, 3, *size))
    assert out["main"].shape == out["aux"].shape == (2, 2, *size)
    padded = [-(-side // 16) * 16 for side in size]  # any input: padded to whole patches, cropped back
    assert seen == [(2, 192, padded[0] // 8, padded[1] // 8)]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


def test_dpr_with_patch14_and_register_tokens():
    name, kwargs = TINY_REG
    model = DPR(name, 3, encoder_kwargs=kwargs).eval()
    assert model.size_multiple == 14
    with torch.no_grad():
        assert model(torch.randn(1, 3, 98, 70)).shape == (1, 3, 98, 70)


# -------------------------------------------------------------------------------------------- weights
def write_full_vit(path, name, kwargs, **extra):
    """A full timm ViT state dict with its ImageNet head, as a hub download or a local pytorch_model.bin."""
    torch.manual_seed(3)
    state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    state.update(extra)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name, kwargs", [(TINY, TINY_KWARGS), TINY_REG])
def test_local_weight_file_loads_strictly_in_both_stages(tmp_path, name, kwargs):
    state = write_full_vit(tmp_path / "pytorch_model.bin", name, kwargs)
    backbone = build_backbone(name, str(tmp_path / "pytorch_model.bin"), kwargs=kwargs)
    for key, tensor in backbone.features.net.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    model = DPR(name, 2, pretrained=tmp_path / "pytorch_model.bin", encoder_kwargs=kwargs, vit_block=1)
    for key, tensor in model.encoder.net.state_dict().items():
        assert torch.equal(tensor, state[key]), key  # blocks.2 and the head are in the file, simply not needed


def test_a_weight_file_that_does_not_fit_is_refused_with_the_keys_named(tmp_path):
    state = write_full_vit(tmp_path / "uni.bin", TINY, TINY_KWARGS, **{"mask_token": torch.zeros(1, 192)})
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "uni.bin")
    with pytest.raises(ValueError) as error:
        build_backbone(TINY, str(tmp_path / "uni.bin"), kwargs=TINY_KWARGS)
    assert "uni.bin" in str(error.value) and "blocks.1.attn.qkv.weight" in str(error.value)
    assert "mask_token" in str(error.value)
    # the same file for a model with register tokens: the missing token is named
    write_full_vit(tmp_path / "plain.bin", TINY, TINY_KWARGS)
    cfg = load_config(None, [f"stage2.encoder={TINY}", "stage2.encoder_kwargs={depth: 3, reg_tokens: 4}",
                             f"stage2.pretrained={tmp_path / 'plain.bin'}", "stage2.crop_size=64",
                             "stage2.window=64"])
    with pytest.raises(CheckpointError, match=r"stage2\.pretrained: .*plain\.bin.*missing keys: reg_token"):
        build_segmenter(cfg)


# --------------------------------------------------------------------------------------------- kwargs
def test_kwargs_name_timm_and_torch_classes():
    from timm.layers import SwiGLUPacked
    kwargs = model_kwargs({"mlp_layer": "SwiGLUPacked", "act_layer": "torch.nn.SiLU", "init_values": "1e-5",
                           "reg_tokens": 8, "dynamic_img_size": True}, "stage2.encoder_kwargs")
    assert kwargs == {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "init_values": 1e-5, "reg_tokens": 8,
                      "dynamic_img_size": True}
    # Virchow2's and UNI2-h's layers, in a tiny ViT
    backbone = build_backbone(TINY, False, kwargs={**TINY_KWARGS, **kwargs, "mlp_ratio": 2.0})
    block = backbone.features.net.blocks[0]
    assert type(block.mlp).__name__ == "GluMlp" and isinstance(block.mlp.act, torch.nn.SiLU)
    assert backbone.encode(torch.randn(1, 3, 32, 32))[-1].shape == (1, 192, 2, 2)


def test_unknown_class_names_and_wrong_kwargs_are_refused():
    with pytest.raises(ConfigError, match=r"stage1\.backbone_kwargs\.mlp_layer' is 'SwiGLUPackd'"):
        load_config(None, ["stage1.backbone_kwargs={mlp_layer: SwiGLUPackd}"])
    with pytest.raises(ConfigError, match=r"stage2\.encoder_kwargs\.act_layer' is 'os\.system'"):
        load_config(None, ["stage2.encoder_kwargs={act_layer: os.system}"])
    with pytest.raises(ConfigError, match="mapping of keyword arguments"):
        load_config(None, ["stage2.encoder_kwargs=3"])
    # --set adds one kwarg to those of the YAML
    cfg = load_config(ROOT / "configs" / "glas_uni.yaml", ["stage1.backbone_kwargs.reg_tokens=0"])
    assert cfg.stage1.backbone_kwargs == {"init_values": "1e-5", "dynamic_img_size": True, "reg_tokens": 0}
    with pytest.raises(ConfigError, match=r"stage2\.encoder_kwargs' does not fit resnet10t"):
        build_segmenter(load_config(None, ["stage2.encoder=resnet10t", "stage2.encoder_kwargs={reg_tokens: 4}"]))


# ---------------------------------------------------------------------------------- training settings
def test_frozen_encoders_get_no_gradient_and_stay_in_eval_mode():
    stage1 = load_script("1_train_stage1")
    cfg = load_config(None, [f"stage1.backbone={TINY}", "stage1.backbone_kwargs={depth: 3}", "stage1.image_size=32",
                             "stage1.freeze_encoder=true", "stage1.ibm_at=deepest_tap", "device=cpu"])
    model = stage1.build_classifier(cfg)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = sgd_with_multipliers([model.backbone], stage1.new_layer_groups(model, cfg.stage1), 0.1, 0.9, 0.0)
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for group in model.new_modules().values() for m in group for p in m.parameters()}
    model.train()
    assert not model.backbone.training and model.ibm.training
    outputs = model(torch.randn(2, 3, 32, 32))
    stage1.classification_loss(outputs, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), cfg.stage1).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.fc8.weight.grad is not None and model.ibm.fuse.weight.grad.abs().sum() > 0
    optimizer.step()
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[key]), key

    segmenter = tiny_dpr()
    segmenter.freeze_encoder()
    segmenter.train()
    assert not segmenter.encoder.training and segmenter.main_head.training
    out = segmenter(torch.randn(2, 3, 32, 32))
    (out["main"].sum() + out["aux"].sum()).backward()
    assert all(p.grad is None for p in segmenter.encoder.parameters())
    assert segmenter.pyramid.branches[0][0].weight.grad is not None
    optimizer = sgd_with_layer_decay(segmenter, segmenter.encoder, 0.1, 0.9, 0.0, 1.0)
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trainable & {id(p) for p in segmenter.encoder.parameters()}


def test_layer_decay_scales_each_block_once_more():
    model = tiny_dpr()  # 3 blocks: stem group, blocks 0, 1, 2 (+ final norm)
    scales = layer_decay_scales(model.encoder, 0.5)
    named = dict(model.encoder.named_parameters())
    assert scales[id(named["net.blocks.2.mlp.fc1.weight"])] == scales[id(named["net.norm.weight"])] == 1.0
    assert scales[id(named["net.blocks.0.mlp.fc1.weight"])] == 0.25
    assert scales[id(named["net.patch_embed.proj.weight"])] == scales[id(named["net.pos_embed"])] == 0.125
    optimizer = sgd_with_layer_decay(model, model.encoder, 0.01, 0.9, 5e-4, 0.5)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(model.main_head[-1].weight)] == 0.01
    assert rates[id(named["net.patch_embed.proj.weight"])] == pytest.approx(0.01 * 0.125)
    assert all(g["initial_lr"] == g["lr"] for g in optimizer.param_groups)
    assert layer_decay_scales(model.encoder, 1.0) == {}

    classifier = Stage1Classifier(build_backbone(TINY, False, kwargs=TINY_KWARGS), 2, ibm_at="deepest_tap")
    optimizer = sgd_with_multipliers([classifier.backbone], [(classifier.new_modules()["head"], 10.0)], 0.01, 0.9,
                                     5e-4, layer_decay_scales(classifier.backbone, 0.5))
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    embed = dict(classifier.backbone.named_parameters())["features.net.patch_embed.proj.weight"]
    assert rates[id(embed)] == pytest.approx(0.01 * 0.125) and rates[id(classifier.fc8.weight)] == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        model = tiny_dpr().eval()
        model.encoder.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 48)).square().mean().backward()
        gradients.append(model.encoder.net.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(gradients[0], gradients[1])
    model = build_segmenter(load_config(None, [f"stage2.encoder={TINY}", "stage2.encoder_kwargs={depth: 3}",
                                                      "stage2.crop_size=64", "stage2.window=64",
                                                      "stage2.grad_checkpointing=true"]))
    assert model.encoder.net.grad_checkpointing


def test_normalisation_comes_from_the_pretrained_cfg_unless_the_yaml_gives_it():
    cfg = load_config(ROOT / "configs" / "demo_vit.yaml")
    assert cfg.data.mean is None
    assert "pretrained_cfg of vit_tiny_patch16_224" in resolve_normalisation(cfg, "stage1")
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.5, 0.5, 0.5]
    cfg = load_config(ROOT / "configs" / "glas_uni.yaml")
    assert resolve_normalisation(cfg, "stage2") is None and cfg.data.mean == [0.485, 0.456, 0.406]
    cfg = load_config(None)  # resnet38: ImageNet
    resolve_normalisation(cfg, "stage1")
    assert cfg.data.std == [0.229, 0.224, 0.225]
    with pytest.raises(ConfigError, match="data.mean"):
        load_config(None, ["data.mean=[0.5, 0.5]"])


# ----------------------------------------------------------------------------- checkpoints and the hub
def test_a_hub_model_is_rebuilt_from_the_checkpoint_without_the_hub(tmp_path, monkeypatch):
    from models import timm_encoder
    hub_config = ({"mean": (0.7, 0.6, 0.7), "std": (0.2, 0.2, 0.2), "hf_hub_id": "lab/tiny-path"}, TINY,
                  {"depth": 2, "reg_tokens": 4, "dynamic_img_size": True})
    asked = []

    def fake_hub(repo):
        asked.append(repo)
        return hub_config

    timm_encoder._architecture.cache_clear()
    monkeypatch.setattr(timm.models, "load_model_config_from_hf", fake_hub)
    cfg = load_config(None, ["stage2.encoder=hf-hub:lab/tiny-path", "stage2.encoder_kwargs={init_values: 1e-5}",
                             "stage2.window=32", "stage2.overlap=0.25"])
    resolve_normalisation(cfg, "stage2")
    assert cfg.data.mean == [0.7, 0.6, 0.7]  # from the hub's pretrained_cfg
    torch.manual_seed(0)
    model = DPR(cfg.stage2.encoder, 2, encoder_kwargs=model_kwargs(cfg.stage2.encoder_kwargs, "")).eval()
    assert len(model.encoder.net.blocks) == 2 and model.encoder.net.num_prefix_tokens == 5
    meta = segmenter_meta(cfg)
    assert meta["encoder_architecture"] == TINY and meta["encoder_hub_args"]["reg_tokens"] == 4
    assert meta["encoder_kwargs"] == {"init_values": "1e-5"}
    save_checkpoint(tmp_path / "best.pth", {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": meta})

    def no_hub(repo):
        raise OSError("no internet")

    timm_encoder._architecture.cache_clear()
    monkeypatch.setattr(timm.models, "load_model_config_from_hf", no_hub)
    reloaded, _ = load_segmenter(tmp_path / "best.pth", "cpu")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    assert asked == ["lab/tiny-path"]  # once per process
    with pytest.raises(ConfigError, match=r"stage2\.encoder: the config of 'hf-hub:lab/other' could not be read"):
        resolve_normalisation(load_config(None, ["stage2.encoder=hf-hub:lab/other"]), "stage2")
    timm_encoder._architecture.cache_clear()


def test_a_checkpoint_with_unknown_layer_names_is_refused(tmp_path):
    model = tiny_dpr()
    cfg = load_config(None, [f"stage2.encoder={TINY}", "stage2.encoder_kwargs={depth: 3}"])
    resolve_normalisation(cfg, "stage2")
    meta = dict(segmenter_meta(cfg), encoder_kwargs={"depth": 3, "mlp_layer": "EvilLayer"})
    save_checkpoint(tmp_path / "bad.pth", {"format": STAGE2_FORMAT, "model": model.state_dict(), "meta": meta})
    with pytest.raises(CheckpointError, match="bad.pth: its metadata holds .*EvilLayer"):
        load_segmenter(tmp_path / "bad.pth", "cpu")


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_vit_pipeline_beats_a_constant_mask_and_inference_predicts_as_in_training(tmp_path):
    """configs/demo_vit.yaml on a smaller generated set: tiny ViTs in both stages, then inference.py."""
    pipeline = load_script("run_pipeline")
    overrides = [f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}",
                 f"data.pseudo_mask_dir={tmp_path / 'pseudo'}", "device=cpu", "num_workers=0",
                 "demo.train_images=64", "demo.val_images=4", "demo.test_images=4", "demo.target_domain=false",
                 "stage1.epochs=6", "stage2.epochs=6"]
    argv = ["--config", str(ROOT / "configs" / "demo_vit.yaml")] + [a for o in overrides for a in ("--set", o)]
    assert pipeline.main(argv) == 0
    run = tmp_path / "runs" / "demo_vit"
    metrics = json.loads((run / "stage2" / "metrics.json").read_text())
    truths = [read_mask(p, "index", 2) for p in sorted((tmp_path / "data" / "test" / "mask").iterdir())]
    constant = max(scores(sum(confusion_matrix(np.full_like(t, c), t, 2) for t in truths))["miou"] for c in (0, 1))
    assert metrics["test"]["miou"] > constant + 0.1, (metrics["test"]["miou"], constant)

    # the saved model, rebuilt by inference.py from its metadata, predicts what stage 2 predicted
    _, meta = load_segmenter(run / "stage2" / "best.pth", "cpu")
    assert meta["encoder_architecture"] == "vit_tiny_patch16_224" and meta["encoder_kwargs"] == {"depth": 4}
    assert meta["mean"] == [0.5, 0.5, 0.5]  # the ViT's own normalisation, the YAML giving none
    for path in sorted((run / "stage2" / "predictions" / "test").glob("*.png")):
        trained = np.asarray(Image.open(path))
        inferred = read_mask(run / "inference" / f"{path.stem}_mask.png", "index", 2)
        assert np.array_equal(trained, inferred), path.name
