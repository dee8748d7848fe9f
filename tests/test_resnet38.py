import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.resnet38 import ResNet38, load_resnet38_weights


def _standard_file_shapes():
    """Key -> shape of the ImageNet file ilsvrc-cls_rna-a1_cls1000_ep-0001.pth, built from the layer table."""
    shapes = {"conv1a.weight": (64, 3, 3, 3)}

    def bn(name, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (channels,)

    def basic(name, cin, mid, cout, projection):
        bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
        bn(f"{name}.bn_branch2b1", mid)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        if projection:
            shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)

    def bottleneck(name, cin, cout):
        bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (cout // 4, cin, 1, 1)
        bn(f"{name}.bn_branch2b1", cout // 4)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout // 2, cout // 4, 3, 3)
        bn(f"{name}.bn_branch2b2", cout // 2)
        shapes[f"{name}.conv_branch2b2.weight"] = (cout, cout // 2, 1, 1)
        shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)

    for group, cin, mid, cout, repeats in (("b2", 64, 128, 128, 2), ("b3", 128, 256, 256, 2),
                                           ("b4", 256, 512, 512, 5), ("b5", 512, 512, 1024, 2)):
        basic(group, cin, mid, cout, projection=True)
        for index in range(1, repeats + 1):
            basic(f"{group}_{index}", cout, mid, cout, projection=False)
    bottleneck("b6", 1024, 2048)
    bottleneck("b7", 2048, 4096)
    bn("bn7", 4096)
    return shapes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNet38().eval()


def _constant_state_file(path, shapes, extra=None, wrap=None):
    """Write a state dict of stride-0 constant tensors (tiny on disk); value i+1 for the i-th key."""
    state = {key: torch.full((1,), float(index + 1)).expand(*shape) for index, (key, shape) in enumerate(shapes.items())}
    state.update(extra or {})
    torch.save({wrap: state} if wrap else state, path)
    return state


def test_names_and_shapes_match_the_standard_imagenet_file(model):
    expected = _standard_file_shapes()
    found = {key: tuple(value.shape) for key, value in model.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    assert found == expected
    # The shapes quoted for the published file.
    assert found["b2.conv_branch1.weight"] == (128, 64, 1, 1)
    assert found["b5.conv_branch2a.weight"] == (512, 512, 3, 3)
    assert found["b6.conv_branch2b1.weight"] == (1024, 512, 3, 3)
    assert found["b7.conv_branch2b2.weight"] == (4096, 2048, 1, 1)
    assert found["bn7.running_var"] == (4096,)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_dilations_strides_and_dropout(model):
    assert [model.b2.conv_branch2a.stride, model.b3.conv_branch1.stride, model.b4.conv_branch2a.stride] == [(2, 2)] * 3
    assert model.b5.conv_branch2a.dilation == (1, 1) and model.b5.conv_branch2b1.dilation == (2, 2)
    assert model.b5_2.conv_branch2a.dilation == (2, 2)
    assert model.b6.conv_branch2b1.dilation == (4, 4) and model.b7.conv_branch2b1.dilation == (4, 4)
    assert model.b6.dropout_2b1.p == 0.3 and model.b6.dropout_2b2.p == 0.3
    assert model.b7.dropout_2b1.p == 0.5 and model.b7.dropout_2b2.p == 0.5


def test_encode_finish_shapes_output_stride_and_taps(model):
    captured = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: captured.__setitem__(name, output)) for name in ("b4_5", "b5_2")]
    try:
        with torch.no_grad():
            f45, f52, x6 = model.encode(torch.randn(1, 3, 64, 64))
            f7 = model.finish(x6)
            # The taps are the next block's BN-ReLU of the block outputs (no extra parameters).
            expected_f45 = F.relu(model.b5.bn_branch2a(captured["b4_5"]))
            expected_f52 = F.relu(model.b6.bn_branch2a(captured["b5_2"]))
    finally:
        for handle in handles:
            handle.remove()
    assert f45.shape == (1, ResNet38.tap_channels[0], 8, 8)  # output stride 8
    assert f52.shape == (1, ResNet38.tap_channels[1], 8, 8)
    assert x6.shape == (1, ResNet38.channels_before_deepest, 8, 8)
    assert f7.shape == (1, ResNet38.tap_channels[2], 8, 8)
    assert torch.allclose(f45, expected_f45) and torch.allclose(f52, expected_f52)
    assert (f7 >= 0).all() and torch.isfinite(f7).all() and f7.abs().sum() > 0


@pytest.fixture(scope="module")
def target():
    return ResNet38()


def test_loads_a_standard_style_file_and_skips_the_imagenet_classifier(target, tmp_path):
    shapes = _standard_file_shapes()  # like the published file: no num_batches_tracked counters
    classifier = {"linear1000.weight": torch.zeros(1).expand(1000, 4096), "linear1000.bias": torch.zeros(1000)}
    state = _constant_state_file(tmp_path / "resnet38.pth", shapes, extra=classifier)

    report = load_resnet38_weights(target, tmp_path / "resnet38.pth")

    assert report == {"loaded": len(shapes), "skipped": ["linear1000.bias", "linear1000.weight"]}
    loaded = target.state_dict()
    for key in ("conv1a.weight", "b4_3.bn_branch2a.running_var", "b7.conv_branch2b2.weight", "bn7.bias"):
        assert torch.equal(loaded[key], state[key])
    # Whatever was loaded survives a strict save/load round trip through a file.
    torch.save(target.state_dict(), tmp_path / "round_trip.pth")
    target.load_state_dict(torch.load(tmp_path / "round_trip.pth", weights_only=True), strict=True)
    assert torch.equal(target.state_dict()["b5.conv_branch1.weight"], state["b5.conv_branch1.weight"])


def test_loads_wrapped_and_data_parallel_files(target, tmp_path):
    shapes = _standard_file_shapes()
    prefixed = {f"module.{key}": shape for key, shape in shapes.items()}
    _constant_state_file(tmp_path / "wrapped.pth", prefixed, wrap="state_dict")
    report = load_resnet38_weights(target, tmp_path / "wrapped.pth")
    assert report["loaded"] == len(shapes) and report["skipped"] == []
    assert torch.all(target.conv1a.weight == 1.0)


@pytest.mark.parametrize("damage, named", [
    ("drop", "b4_3.bn_branch2a.weight"),
    ("reshape", "b5.conv_branch1.weight"),
    ("add", "b8.conv_branch2a.weight"),
])
def test_mismatched_files_are_reported_by_key_and_file(target, tmp_path, damage, named):
    shapes = _standard_file_shapes()
    if damage == "drop":
        del shapes[named]
    elif damage == "reshape":
        shapes[named] = (1024, 512, 3, 3)
    else:
        shapes[named] = (8, 8, 1, 1)
    with torch.no_grad():
        target.conv1a.weight.fill_(-5.0)
    path = tmp_path / "bad.pth"
    _constant_state_file(path, shapes)
    with pytest.raises(ValueError) as error:
        load_resnet38_weights(target, path)
    assert named in str(error.value) and str(path) in str(error.value)
    assert torch.all(target.conv1a.weight == -5.0)  # nothing half-loaded


def test_missing_and_unreadable_files(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_resnet38_weights(target, tmp_path / "nowhere.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_resnet38_weights(target, tmp_path / "garbage.pth")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pth")
    with pytest.raises(ValueError, match="no_tensors.pth"):
        load_resnet38_weights(target, tmp_path / "no_tensors.pth")
