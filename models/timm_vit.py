"""A timm Vision Transformer as a feature extractor: the token maps of chosen blocks, as images.

Pathology foundation models (UNI, Virchow, H-optimus, Prov-GigaPath) are plain ViTs: one grid of patch
tokens (stride 14 or 16) through every block, with a class token and sometimes register tokens in front.
"""
import timm
import torch.nn as nn

from models.timm_encoder import create_timm_model, load_encoder_weights


def spread_blocks(depth, count=3):
    """`count` block indices spread over the depth, ending with the last block (12 blocks: 3, 7, 11)."""
    return tuple(round(depth * (k + 1) / count) - 1 for k in range(count))


def resolve_blocks(blocks, depth, count):
    """Block indices counted from 0 (negative ones from the end), checked; None: spread over the depth."""
    if blocks is None:
        if depth < count:
            raise ValueError(f"a ViT with {depth} blocks cannot give {count} taps from distinct blocks.")
        return spread_blocks(depth, count)
    resolved = tuple(b + depth if b < 0 else b for b in blocks)
    if any(not 0 <= b < depth for b in resolved) or len(set(resolved)) != len(resolved):
        raise ValueError(f"ViT blocks {list(blocks)} must be distinct indices of its {depth} blocks "
                         f"(0..{depth - 1}, or negative from the end).")
    return tuple(sorted(resolved))


class VitFeatures(nn.Module):
    """forward(x) -> [N x C x H/p x W/p] maps of the chosen blocks, shallow to deep.

    Class and register tokens are dropped, and each map passes the model's final norm (what the pretrained
    model's own output features see). Blocks after the deepest chosen one are not built. H and W must be
    multiples of the patch size p (`size_multiple`); any such size works (`dynamic_img_size` is always on).
    """

    def __init__(self, name, blocks=None, count=3, pretrained=False, kwargs=None):
        super().__init__()
        # Tiles, windows and whole images come in many sizes: the position embedding is resized to each.
        kwargs = {**(kwargs or {}), "dynamic_img_size": True}
        self.net = create_timm_model(name, pretrained, kwargs)
        self.blocks = resolve_blocks(blocks, len(self.net.blocks), count)
        self.net.prune_intermediate_layers(list(self.blocks), prune_norm=False, prune_head=True)
        if pretrained not in (False, True, None):
            load_encoder_weights(self.net, name, pretrained, kwargs)
        patch = self.net.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise ValueError(f"timm ViT '{name}' has {patch[0]}x{patch[1]} patches; only square ones are supported.")
        self.size_multiple = patch[0]
        self.channels = self.net.embed_dim

    def forward(self, x):
        return self.net.forward_intermediates(x, indices=list(self.blocks), norm=True, output_fmt="NCHW",
                                              intermediates_only=True)

    def set_grad_checkpointing(self, enable=True):
        self.net.set_grad_checkpointing(enable)

    def layer_groups(self):
        """Parameter names (prefixed with `net.`) from the input side to the output side: patch embedding and
        tokens first, then one group per block (the final norm with the last), for layer-wise lr decay."""
        groups = timm.models.group_parameters(self.net, self.net.group_matcher(coarse=False))
        return [[f"net.{name}" for name in names] for _, names in sorted(groups.items())]
