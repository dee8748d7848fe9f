"""Inter-pixel affinity head (after AffinityNet, Ahn and Kwak, CVPR 2018): an embedding of the stage-1
classifier's three feature taps whose distances say which pixels belong together."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class AffinityHead(nn.Module):
    """taps (3 maps, finest first) -> N x dim x H x W embedding at `scale` times the finest tap's resolution.

    Each tap is projected by a 1x1 conv (+ GroupNorm + ReLU), brought to the finest tap's size, concatenated and
    mixed by a 1x1 conv. The classifier's taps are the input, so the head learns only which of the features
    the class maps already use separate one region from another.
    """

    def __init__(self, tap_channels, widths=(32, 64, 128), dim=64, scale=1):
        super().__init__()
        self.scale = scale
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.GroupNorm(min(8, w), w), nn.ReLU(inplace=True))
            for c, w in zip(tap_channels, widths))
        self.mix = nn.Conv2d(sum(widths), dim, 1)

    def forward(self, taps):
        size = taps[0].shape[-2:]
        size = (size[0] * self.scale, size[1] * self.scale)
        projected = [F.interpolate(p(t.float()), size=size, mode="bilinear", align_corners=False)
                     for p, t in zip(self.projections, taps)]
        return self.mix(torch.cat(projected, dim=1))
