"""Any timm backbone as a stage-1 feature extractor with three taps (its last three chosen stages)."""
import timm
import torch.nn as nn

from models.timm_encoder import load_encoder_weights


class TimmTaps(nn.Module):
    """`encode` gives (tap1, tap2, deepest); `finish` is the identity, so IBM acts on the deepest stage."""

    def __init__(self, name, pretrained=False, out_indices=(2, 3, 4), output_stride=8):
        super().__init__()
        kwargs = {"features_only": True, "out_indices": tuple(out_indices)}
        if output_stride and output_stride != 32:
            kwargs["output_stride"] = output_stride
        try:
            self.net = timm.create_model(name, pretrained=pretrained is True, **kwargs)
        except (TypeError, ValueError, RuntimeError) as error:
            if "output_stride" not in kwargs:
                raise
            kwargs.pop("output_stride")  # not every family supports dilation; fall back to its native strides
            self.net = timm.create_model(name, pretrained=pretrained is True, **kwargs)
            del error
        if isinstance(pretrained, str):
            load_encoder_weights(self.net, name, pretrained)
        channels = self.net.feature_info.channels()
        self.tap_channels = tuple(channels)
        self.ibm_channels = channels[-1]

    def encode(self, x):
        first, second, deepest = self.net(x)
        return first, second, deepest

    def finish(self, deepest):
        return deepest
