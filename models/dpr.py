"""DPR (Dual Path Refinement): the stage-2 segmentation network.

A timm encoder cut at output stride 8, a pyramid-pooling main path whose class logits pass through a
refinement attention, and a light auxiliary path on the same encoder features. A Vision Transformer has no
stride-8 map: the token map of one of its blocks (stride 14 or 16) is upsampled to stride 8 instead.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.timm_encoder import (create_timm_model, encoder_feature_info, freeze_first_stages, is_plain_vit,
                                 load_encoder_weights)
from models.timm_vit import VitFeatures

PYRAMID_BINS = (1, 2, 3, 6)


def stride8_out_indices(encoder_name, kwargs=None, stage=None):
    """(index,) of the encoder feature DPR decodes: `stage` when given, else the deepest whose reduction is at
    most 8. A chosen stage must be at stride 8 or finer too (dilated by an `output_stride` kwarg, for one)."""
    info, _ = encoder_feature_info(encoder_name, kwargs)
    reductions = info.reduction()
    fine = [i for i, reduction in enumerate(reductions) if reduction <= 8]
    if not fine:
        raise ValueError(f"timm encoder '{encoder_name}' has no feature map at stride 8 or finer; "
                         f"pick a convolutional encoder such as a ResNet or ResNeSt, or a plain Vision Transformer.")
    if stage is None:
        return (fine[-1],)
    if not 0 <= stage < len(reductions):
        raise ValueError(f"timm encoder '{encoder_name}' has feature stages 0 to {len(reductions) - 1}, "
                         f"not {stage}.")
    if reductions[stage] > 8:
        raise ValueError(f"stage {stage} of timm encoder '{encoder_name}' is at stride {reductions[stage]}; DPR "
                         "decodes stride 8: dilate it with encoder_kwargs {output_stride: 8} or pick a stage "
                         f"from {fine[0]} to {fine[-1]}.")
    return (stage,)


def conv_bn_relu(in_channels, out_channels, kernel_size):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample(x, size):
    """Bilinear resize in float32: its backward accumulates with atomics, which crawl on bf16/fp16 GPUs."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


def pad_to_multiple(x, multiple):
    """Pad the bottom and right edges so both sides are multiples of `multiple` (a ViT takes whole patches)."""
    height, width = x.shape[-2:]
    bottom, right = -height % multiple, -width % multiple
    if not bottom and not right:
        return x
    mode = "reflect" if bottom < height and right < width else "replicate"
    return F.pad(x, (0, right, 0, bottom), mode=mode)


class PyramidPooling(nn.Module):
    """Pool at several grid sizes, project to C/4 channels, upsample back and concatenate with the input."""

    def __init__(self, channels, bins=PYRAMID_BINS):
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(conv_bn_relu(channels, channels // 4, 1) for _ in self.bins)
        self.out_channels = channels + len(self.bins) * (channels // 4)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [upsample(branch(F.adaptive_avg_pool2d(x.float(), b)), size)
                  for b, branch in zip(self.bins, self.branches)]
        return torch.cat([x] + [p.to(x.dtype) for p in pooled], dim=1)


class RefinementAttention(nn.Module):
    """Channel gate then spatial gate, applied to the class logits.

    As published, the channel gate's MLP squeezes the classes 16-fold (to 1 unit for 2 classes) unless `hidden`
    says otherwise, and each gate is a sigmoid: at the start both are near 0.5, so the logits enter training
    scaled by about 0.25. `gate_scale` 2 makes each gate 2 * sigmoid, near 1 at the start. The mean gates of
    the last forward pass are kept in `mean_gates` (channel, spatial), for the training log.
    """

    def __init__(self, num_classes, hidden=None, gate_scale=1.0):
        super().__init__()
        hidden = hidden or max(1, num_classes // 16)
        self.gate_scale = gate_scale
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_classes, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 1),
            nn.Sigmoid(),
        )
        self.spatial_conv = nn.Conv2d(2, 1, 7, padding=3)
        self.mean_gates = None

    def forward(self, logits):
        channel = self.gate_scale * self.channel_gate(logits)
        logits = logits * channel
        stats = torch.cat([logits.amax(dim=1, keepdim=True), logits.mean(dim=1, keepdim=True)], dim=1)
        spatial = self.gate_scale * torch.sigmoid(self.spatial_conv(stats))
        self.mean_gates = (channel.detach().mean(), spatial.detach().mean())
        return logits * spatial


class DPR(nn.Module):
    """Segmentation network; `pretrained` is False, True (timm hub weights) or a local weight file.

    forward(x) returns {"main", "aux"} logits in training mode and the main logits in eval mode, both at
    the input's height and width. `refine` and `aux` switch off the refinement attention and the auxiliary
    path (for ablations); training then returns "aux" None. `encoder_kwargs` go to timm.create_model;
    `vit_block` is the block whose tokens a Vision Transformer encoder gives (negative: from the end);
    `encoder_stage` the convolutional encoder's feature stage it decodes (None: the deepest at stride 8);
    `refine_hidden` and `refine_gate_scale` shape the refinement attention (RefinementAttention).
    """

    def __init__(self, encoder: str, num_classes: int, pretrained=False, refine=True, aux=True,
                 encoder_kwargs=None, vit_block=-1, encoder_stage=None, refine_hidden=None, refine_gate_scale=1.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DPR needs at least 2 classes, got num_classes={num_classes}.")
        self.size_multiple, self.encoder_frozen, self.frozen_norms = 1, False, []
        self.encoder_name, self.encoder_kwargs = encoder, encoder_kwargs
        if is_plain_vit(encoder_feature_info(encoder, encoder_kwargs)[1]):
            # Blocks after the chosen one are not built.
            self.encoder = VitFeatures(encoder, (vit_block,), count=1, pretrained=pretrained, kwargs=encoder_kwargs)
            self.size_multiple, channels = self.encoder.size_multiple, self.encoder.channels
        else:
            # Only the stages up to the decoded one are built, so deeper stages cost neither memory nor time.
            self.encoder = create_timm_model(encoder, pretrained, encoder_kwargs, features_only=True,
                                             out_indices=stride8_out_indices(encoder, encoder_kwargs, encoder_stage))
            if pretrained not in (False, True, None):
                load_encoder_weights(self.encoder, encoder, pretrained, encoder_kwargs)
            channels = self.encoder.feature_info.channels()[-1]

        self.pyramid = PyramidPooling(channels)
        self.main_head = nn.Sequential(
            conv_bn_relu(self.pyramid.out_channels, 512, 1),
            nn.Dropout2d(0.2),
            nn.Conv2d(512, num_classes, 3, padding=1),
        )
        self.refine = (RefinementAttention(num_classes, refine_hidden, refine_gate_scale) if refine
                       else nn.Identity())
        self.aux_head = nn.Sequential(
            conv_bn_relu(channels, 256, 3),
            nn.Dropout2d(0.1),
            nn.Conv2d(256, num_classes, 1),
        ) if aux else None

    def freeze_encoder(self):
        """Train only the decoder (pyramid pooling, heads, attention): the encoder gets no gradient and stays in
        eval mode."""
        self.encoder_frozen = True
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        self.encoder.eval()

    def freeze_encoder_stages(self, count):
        """No gradient for the encoder's stem and first `count` feature stages (a convolutional encoder); their
        BatchNorm stays in eval mode."""
        self.frozen_norms = freeze_first_stages(self.encoder, self.encoder_name, count, self.encoder_kwargs)

    def train(self, mode=True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # no dropout, drop-path or BatchNorm updates in an encoder that does not learn
        for norm in self.frozen_norms:
            norm.eval()
        return self

    def encode(self, x):
        """Encoder features at stride 8 (a ViT's patch-stride tokens upsampled to it), for an input whose sides
        are multiples of size_multiple."""
        features = self.encoder(x)[-1]
        if self.size_multiple > 1:
            stride8 = (-(-x.shape[-2] // 8), -(-x.shape[-1] // 8))
            features = upsample(features, stride8).to(features.dtype)
        return features

    def forward(self, x):
        size = x.shape[-2:]
        x = pad_to_multiple(x, self.size_multiple)
        features = self.encode(x)
        main = self.main_head(self.pyramid(features))
        main = self.refine(upsample(main, x.shape[-2:])[..., :size[0], :size[1]])
        if not self.training:
            return main
        aux = self.aux_head(features) if self.aux_head is not None else None
        aux = upsample(aux, x.shape[-2:])[..., :size[0], :size[1]] if aux is not None else None
        return {"main": main, "aux": aux}
