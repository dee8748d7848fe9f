"""Stage-1 classifier: a backbone with three taps, IBM before the deepest tapped stage (or on the deepest tap),
one 1x1 head per tap."""
import torch.nn as nn
import torch.nn.functional as F

from models.ibm import ImplicitBoundaryMining


IBM_PLACES = ("before_deepest_stage", "deepest_tap")


class Stage1Classifier(nn.Module):
    """`ibm_at`: "before_deepest_stage", the paper's place (ResNet-38: between b6 and b7; a timm network: on
    the input of its deepest tapped stage, which then reads IBM's output with its pretrained weights), or
    "deepest_tap" (IBM's output is the deepest head's feature map itself). A Vision Transformer's blocks read
    tokens, so it has IBM on its deepest tap wherever asked (`ibm_at` then says so). `ibm_edge_from`: IBM's edge map
    from its "input" (as published) or from the "fused" multi-scale features."""

    def __init__(self, backbone, num_classes, use_ibm=True, dropout=0.5, ibm_at="before_deepest_stage",
                 ibm_edge_from="input"):
        super().__init__()
        self.backbone = backbone
        low, mid, deep = backbone.tap_channels
        if ibm_at not in IBM_PLACES:
            raise ValueError(f"ibm_at must be one of {', '.join(IBM_PLACES)}, got {ibm_at!r}.")
        if ibm_at == "before_deepest_stage" and backbone.channels_before_deepest is None:
            ibm_at = "deepest_tap"
        self.ibm_at, self.ibm = ibm_at, None
        if use_ibm:
            channels = deep if ibm_at == "deepest_tap" else backbone.channels_before_deepest
            self.ibm = ImplicitBoundaryMining(channels, edge_from=ibm_edge_from)
        self.ic1 = nn.Conv2d(low, num_classes, 1)
        self.ic2 = nn.Conv2d(mid, num_classes, 1)
        self.fc8 = nn.Conv2d(deep, num_classes, 1, bias=False)
        self.dropout = nn.Dropout2d(dropout)
        self.backbone_frozen = False
        nn.init.xavier_uniform_(self.fc8.weight)

    @property
    def size_multiple(self):
        """Input sides must be multiples of this (a ViT's patch size; 1 for convolutional backbones)."""
        return getattr(self.backbone, "size_multiple", 1)

    def freeze_backbone(self):
        """Train only IBM and the heads: the backbone gets no gradient and stays in eval mode."""
        self.backbone_frozen = True
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # no dropout, drop-path or BatchNorm updates in a backbone that does not learn
        for norm in getattr(self.backbone, "frozen_norms", ()):
            norm.eval()
        return self

    @property
    def heads(self):
        return (self.ic1, self.ic2, self.fc8)

    def new_modules(self):
        """Layers that start from random initialisation, by kind: {"ibm", "side_heads" (ic1, ic2), "head" (fc8)},
        each of which may learn at its own rate."""
        return {"ibm": [self.ibm] if self.ibm is not None else [], "side_heads": [self.ic1, self.ic2],
                "head": [self.fc8]}

    def taps(self, x):
        if self.ibm is None:
            return self.backbone.taps(x), None, None
        side = {}

        def boundary_mining(features):
            out, side["boundary"], side["embedding"] = self.ibm(features)
            return out

        if self.ibm_at == "deepest_tap":
            low, mid, deep = self.backbone.taps(x)
            deep = boundary_mining(deep)
        else:
            low, mid, deep = self.backbone.taps(x, between=boundary_mining)
        return (low, mid, deep), side["boundary"], side["embedding"]

    def forward(self, x):
        """Per-head image scores (N x C each) from global average pooling, plus IBM side outputs."""
        (low, mid, deep), boundary, embedding = self.taps(x)
        deep = self.dropout(deep)
        # a 1x1 conv commutes with average pooling: pool first, then classify (cheaper, same scores)
        logits = [head(F.adaptive_avg_pool2d(f, 1)).flatten(1) for head, f in zip(self.heads, (low, mid, deep))]
        return {"logits": logits, "boundary": boundary, "embedding": embedding}

    def cams(self, x):
        """Class activation maps of the three heads, plus image scores.

        A map is the ReLU of the head's weights applied to its tap, without the head's bias: a bias lifts
        or sinks a whole map evenly, and after each map is scaled by its peak it would flatten the map.
        """
        taps, _, _ = self.taps(x)
        maps = [F.relu(F.conv2d(f, head.weight)) for head, f in zip(self.heads, taps)]
        scores = [head(F.adaptive_avg_pool2d(f, 1)).flatten(1) for head, f in zip(self.heads, taps)]
        return maps, scores


class ClassifierEnsemble(nn.Module):
    """Stage-1 classifiers of one network, e.g. trained with different seeds, whose class maps are averaged
    (utils/stage1/class_maps.py): each map is scaled by its own peak first, so no member outweighs another."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def size_multiple(self):
        return self.members[0].size_multiple


def build_backbone(name, pretrained=False, out_indices=(2, 3, 4), output_stride=8, kwargs=None, vit_blocks=None):
    """ResNet-38 (with its ImageNet weight file when given) or any timm model by name, `hf-hub:` names included.

    timm Vision Transformers tap the blocks `vit_blocks` (None: three spread over the depth); convolutional
    networks the stages `out_indices`. `kwargs` go to timm.create_model.
    """
    if name == "resnet38":
        from models.resnet38 import ResNet38, load_resnet38_weights
        backbone = ResNet38()
        if pretrained is True:
            raise ValueError("stage1.pretrained: ResNet-38 weights are not on a model hub; set it to the "
                             "path of ilsvrc-cls_rna-a1_cls1000_ep-0001.pth (see init_weights/README.md).")
        if isinstance(pretrained, str):
            load_resnet38_weights(backbone, pretrained)
        return backbone
    from models.timm_encoder import is_timm_vit
    from models.timm_taps import TimmTaps, VitTaps
    if is_timm_vit(name, kwargs):
        return VitTaps(name, pretrained, vit_blocks, kwargs)
    return TimmTaps(name, pretrained, out_indices, output_stride, kwargs)
