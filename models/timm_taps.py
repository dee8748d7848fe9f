"""Any timm backbone as a stage-1 feature extractor with three taps.

Convolutional networks give their last three chosen stages; Vision Transformers the token maps of three
blocks. `finish` is the identity in both, so IBM acts on the deepest tap.
"""
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
        self.ibm_channels = channels[-1]
        self.name, self.kwargs, self.frozen_norms = name, kwargs, []

    def freeze_stages(self, count):
        """No gradient for the stem and the first `count` feature stages; their BatchNorm stays in eval mode."""
        self.frozen_norms = freeze_first_stages(self.net, self.name, count, self.kwargs)

    def encode(self, x):
        first, second, deepest = self.net(x)
        return first, second, deepest

    def finish(self, deepest):
        return deepest

    def set_grad_checkpointing(self, enable=True):
        self.net.set_grad_checkpointing(enable)


class VitTaps(nn.Module):
    """`encode` gives the token maps of three transformer blocks at the patch stride (14 or 16).

    Inputs must be multiples of the patch size (`size_multiple`).
    """

    def __init__(self, name, pretrained=False, blocks=None, kwargs=None):
        super().__init__()
        self.features = VitFeatures(name, blocks, count=3, pretrained=pretrained, kwargs=kwargs)
        self.size_multiple = self.features.size_multiple
        self.tap_channels = (self.features.channels,) * 3
        self.ibm_channels = self.features.channels

    def encode(self, x):
        first, second, deepest = self.features(x)
        return first, second, deepest

    def finish(self, deepest):
        return deepest

    def set_grad_checkpointing(self, enable=True):
        self.features.set_grad_checkpointing(enable)

    def layer_groups(self):
        return [[f"features.{name}" for name in group] for group in self.features.layer_groups()]

