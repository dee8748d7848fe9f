"""Any timm backbone as a stage-1 feature extractor with three taps.

Convolutional networks give their last three chosen stages; Vision Transformers the token maps of three
blocks. `taps(x, between)` applies `between` (IBM) to the input of the deepest tapped stage, as the paper puts
IBM between ResNet-38's b6 and b7: a pretrained stage then reads IBM's output. A Vision Transformer's blocks
read tokens, so there IBM can only act on the deepest tap itself.
"""
import functools

import torch
import torch.nn as nn

from models.timm_encoder import create_timm_model, freeze_first_stages, load_encoder_weights
from models.timm_vit import VitFeatures


class TimmTaps(nn.Module):
    """`encode` gives (tap1, tap2, deepest) from three stages of a convolutional timm network."""

    size_multiple = 1

    def __init__(self, name, pretrained=False, out_indices=(2, 3, 4), output_stride=8, kwargs=None):
        super().__init__()
        options = {"features_only": True, "out_indices": tuple(out_indices)}
        if output_stride and output_stride != 32:
            options["output_stride"] = output_stride
        try:
            self.net = create_timm_model(name, pretrained, kwargs, **options)
        except (TypeError, ValueError, RuntimeError) as error:
            if "output_stride" not in options:
                raise
            options.pop("output_stride")  # not every family supports dilation; fall back to its native strides
            self.net = create_timm_model(name, pretrained, kwargs, **options)
            del error
        if isinstance(pretrained, str):
            load_encoder_weights(self.net, name, pretrained, kwargs)
        channels = self.net.feature_info.channels()
        self.tap_channels = tuple(channels)
        self.name, self.kwargs, self.frozen_norms = name, kwargs, []
        self.deepest_stage = _submodule(self.net, self.net.feature_info.module_name()[-1])

    @functools.cached_property
    def channels_before_deepest(self):
        """Channels entering the deepest tapped stage, where IBM sits by default (probed once, when asked)."""
        return _input_channels(self.net, self.deepest_stage)

    def freeze_stages(self, count):
        """No gradient for the stem and the first `count` feature stages; their BatchNorm stays in eval mode."""
        self.frozen_norms = freeze_first_stages(self.net, self.name, count, self.kwargs)

    def encode(self, x):
        first, second, deepest = self.net(x)
        return first, second, deepest

    def taps(self, x, between=None):
        """The three taps; `between` (features -> features) acts on the input of the deepest tapped stage."""
        if between is None:
            return self.encode(x)
        hook = self.deepest_stage.register_forward_pre_hook(lambda module, args: (between(args[0]), *args[1:]))
        try:
            return self.encode(x)
        finally:
            hook.remove()

    def set_grad_checkpointing(self, enable=True):
        self.net.set_grad_checkpointing(enable)


def _submodule(net, name):
    """A feature stage by its feature_info name; timm's feature wrappers rename `layer.0` to `layer_0`."""
    for candidate in (name, name.replace(".", "_")):
        try:
            return net.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"feature stage {name} not found in the network.")


@torch.no_grad()
def _input_channels(net, stage):
    """Channels entering `stage`, from one pass of a small image (networks do not say it in one attribute)."""
    seen = []
    hook = stage.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    was_training = net.training
    try:
        net.eval()  # no BatchNorm statistics are updated by the probe
        net(torch.zeros(1, 3, 64, 64, device=next(net.parameters()).device))
    finally:
        hook.remove()
        net.train(was_training)
    return seen[0]


class VitTaps(nn.Module):
    """`encode` gives the token maps of three transformer blocks at the patch stride (14 or 16).

    Inputs must be multiples of the patch size (`size_multiple`).
    """

    def __init__(self, name, pretrained=False, blocks=None, kwargs=None):
        super().__init__()
        self.features = VitFeatures(name, blocks, count=3, pretrained=pretrained, kwargs=kwargs)
        self.size_multiple = self.features.size_multiple
        self.tap_channels = (self.features.channels,) * 3
        self.channels_before_deepest = None  # blocks read tokens: IBM can only act on the deepest tap

    def encode(self, x):
        first, second, deepest = self.features(x)
        return first, second, deepest

    def taps(self, x, between=None):
        if between is not None:
            raise ValueError("a Vision Transformer has no feature map between its blocks for IBM.")
        return self.encode(x)

    def set_grad_checkpointing(self, enable=True):
        self.features.set_grad_checkpointing(enable)

    def layer_groups(self):
        return [[f"features.{name}" for name in group] for group in self.features.layer_groups()]

