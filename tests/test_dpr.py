import pytest
import timm
import torch

from models.dpr import DPR, stride8_out_indices

ENCODER = "resnet10t"


def test_stride8_index_picks_deepest_stride8_stage():
    assert stride8_out_indices("resnet18") == (2,)
    assert stride8_out_indices("convnext_atto") == (1,)
    with pytest.raises(ValueError, match="stride 8"):
        stride8_out_indices("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown timm encoder"):
        stride8_out_indices("no_such_network")


def test_encoder_stops_at_stride8_and_runs_once():
    model = DPR(ENCODER, num_classes=2)
    names = [name for name, _ in model.encoder.named_children()]
    assert "layer2" in names and "layer3" not in names and "layer4" not in names
    calls = []
    model.encoder.register_forward_hook(lambda module, args, output: calls.append(output[-1].shape))
    model.train()
    model(torch.randn(2, 3, 64, 48))
    assert calls == [torch.Size([2, 128, 8, 6])]


def test_a_chosen_stage_is_decoded_when_it_is_dilated_to_stride8():
    assert stride8_out_indices("resnet18", {"output_stride": 8}, 3) == (3,)
    with pytest.raises(ValueError, match="output_stride: 8"):  # layer3 at its native stride 16
        stride8_out_indices("resnet18", None, 3)
    with pytest.raises(ValueError, match="stages 0 to 4"):
        stride8_out_indices("resnet18", None, 7)
    model = DPR(ENCODER, num_classes=2, encoder_kwargs={"output_stride": 8}, encoder_stage=3).train()
    names = [name for name, _ in model.encoder.named_children()]
    assert "layer3" in names and "layer4" not in names
    assert model.encode(torch.randn(1, 3, 64, 48)).shape == (1, 256, 8, 6)
    out = model(torch.randn(2, 3, 64, 48))
    assert out["main"].shape == out["aux"].shape == (2, 2, 64, 48)


@pytest.mark.parametrize("size", [(64, 64), (37, 51), (9, 13)])
def test_outputs_match_input_size_in_train_and_eval(size):
    torch.manual_seed(0)
    model = DPR(ENCODER, num_classes=3)
    model.train()
    out = model(torch.randn(2, 3, *size))
    assert set(out) == {"main", "aux"}
    assert out["main"].shape == out["aux"].shape == (2, 3, *size)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, *size)
    assert torch.isfinite(logits).all()


def test_both_paths_train_the_encoder():
    torch.manual_seed(0)
    model = DPR(ENCODER, num_classes=2).train()
    out = model(torch.randn(2, 3, 32, 32))
    first_conv = next(model.encoder.parameters())
    for name in ("main", "aux"):
        model.zero_grad()
        out[name].sum().backward(retain_graph=True)
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, name


def _full_model_state(name):
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("wrap", [False, True])
def test_local_weight_file_loads_into_encoder(tmp_path, wrap):
    state = _full_model_state(ENCODER)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    model = DPR(ENCODER, num_classes=2, pretrained=path)
    assert torch.equal(model.encoder.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert torch.equal(model.encoder.state_dict()["bn1.running_var"], state["bn1.running_var"])


def test_local_weights_with_renamed_stages_load(tmp_path):
    # timm's feature wrapper renames convnext's `stages.0` to `stages_0`
    state = _full_model_state("convnext_atto")
    path = tmp_path / "convnext.pth"
    torch.save(state, path)
    model = DPR("convnext_atto", num_classes=2, pretrained=str(path))
    assert torch.equal(model.encoder.state_dict()["stages_1.downsample.1.weight"],
                       state["stages.1.downsample.1.weight"])


def test_bad_weight_files_are_named(tmp_path):
    state = _full_model_state(ENCODER)
    del state["layer1.0.conv1.weight"]
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        DPR(ENCODER, num_classes=2, pretrained=path)
    message = str(error.value)
    assert "wrong.pth" in message and "layer1.0.conv1.weight" in message and "extra_head.weight" in message
    assert "layer4" not in message  # deeper stages of a full checkpoint are simply not needed
    with pytest.raises(ValueError, match="does not exist"):
        DPR(ENCODER, num_classes=2, pretrained=tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth cannot be read"):
        DPR(ENCODER, num_classes=2, pretrained=garbage)


def test_an_efficientnet_encoder_stops_at_the_decoded_stage():
    """timm's EfficientNet feature extractor would run its deepest blocks too; DPR gets the same features
    without them."""
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(3,), output_stride=8).eval()
    model = DPR("tf_efficientnet_lite0", 2, encoder_kwargs={"output_stride": 8}, encoder_stage=3).eval()
    assert len(model.encoder.blocks) == 5 and len(full.blocks) == 7
    model.encoder.load_state_dict({k: v for k, v in full.state_dict().items() if k in model.encoder.state_dict()})
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x)[-1], full(x)[-1])
