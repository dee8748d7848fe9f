"""Implicit Boundary Mining (IBM): multi-scale features gated by an edge map, channel and spatial
attention, a residual output conv, and boundary / embedding side branches."""
import torch
import torch.nn as nn


class ImplicitBoundaryMining(nn.Module):
    """x (N, C, H, W) -> (out (N, C, H, W), boundary (N, 1, H, W), embedding (N, D, H, W)).

    1. 1x1, 3x3 and 5x5 convs (C -> C each), concatenated and fused by a 1x1 conv (3C -> C);
    2. edge map E = sigmoid(3x3 conv C -> 1) of the module's input (as published; `edge_from="fused"`: of the
       fused features); the fused features scaled by (1 + E);
    3. channel attention: global average pool -> Linear C -> C/r -> ReLU -> Linear -> sigmoid;
    4. spatial attention: channel max and mean -> 7x7 conv -> sigmoid;
    5. out = 3x3 conv(attended + x);
    6. boundary = 1x1(ReLU(3x3 conv C -> C/2 of out)), raw; embedding = 1x1 conv of out.

    The output conv starts as the identity (Dirac kernel, zero bias), so that at initialisation the
    module passes x plus a small attended term and a pretrained layer after it sees familiar features.
    """

    def __init__(self, channels, reduction=16, embedding_dim=8, edge_from="input"):
        super().__init__()
        if channels < 2:
            raise ValueError(f"ImplicitBoundaryMining needs at least 2 channels, got {channels}.")
        if edge_from not in ("input", "fused"):
            raise ValueError(f"ImplicitBoundaryMining edge_from must be 'input' or 'fused', got {edge_from!r}.")
        self.edge_from = edge_from
        self.branch_1x1 = nn.Conv2d(channels, channels, 1)
        self.branch_3x3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.branch_5x5 = nn.Conv2d(channels, channels, 5, padding=2)
        self.fuse = nn.Conv2d(3 * channels, channels, 1)
        self.edge = nn.Conv2d(channels, 1, 3, padding=1)
        hidden = max(1, channels // reduction)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.output = nn.Conv2d(channels, channels, 3, padding=1)
        self.boundary_head = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1),
                                           nn.ReLU(inplace=True), nn.Conv2d(channels // 2, 1, 1))
        self.embedding_head = nn.Conv2d(channels, embedding_dim, 1)
        nn.init.dirac_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        fused = self.fuse(torch.cat([self.branch_1x1(x), self.branch_3x3(x), self.branch_5x5(x)], dim=1))
        edge = torch.sigmoid(self.edge(x if self.edge_from == "input" else fused))
        gated = torch.addcmul(fused, fused, edge)  # fused * (1 + E) in one kernel

        channel_weight = torch.sigmoid(self.channel_mlp(gated.mean(dim=(2, 3))))
        channel_attended = gated * channel_weight[:, :, None, None].to(gated.dtype)

        pooled = torch.cat([channel_attended.amax(dim=1, keepdim=True),
                            channel_attended.mean(dim=1, keepdim=True)], dim=1)
        spatial_weight = torch.sigmoid(self.spatial(pooled))
        out = self.output(torch.addcmul(x, channel_attended, spatial_weight))  # x + attended

        return out, self.boundary_head(out), self.embedding_head(out)
