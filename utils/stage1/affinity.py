"""Affinity propagation of class maps (after AffinityNet, Ahn and Kwak, CVPR 2018; IRN, CVPR 2019).

An affinity head learns, on the stage-1 classifier's frozen feature taps, which neighbouring pixels belong to
the same class: its targets are the pixel pairs where the class maps are sure of both pixels (same class:
affine; different classes: not). A random walk over those affinities then spreads each class map within the
regions the affinities hold together, so a region the CAM misses but whose features match its class's is
filled, and the maps stop at the boundaries the affinities learnt. Classes a pixel's labels rule out stay out.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.affinity import AffinityHead
from utils.data.imageio import IGNORE_INDEX
from utils.stage1.cam import refine_cams
from utils.stage1.class_maps import network_input

EPS = 1e-5


def disc_offsets(radius):
    """(dy, dx) of every neighbour closer than `radius` grid cells (the pixel itself left out)."""
    return [(dy, dx) for dy in range(1 - radius, radius) for dx in range(1 - radius, radius)
            if 0 < dy * dy + dx * dx < radius * radius]


def _shifted(tensor, offsets, fill):
    """The ... x H x W tensor seen from each offset, `fill` outside it: a list of views of one padded copy."""
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    height, width = tensor.shape[-2:]
    padded = F.pad(tensor, (pad, pad, pad, pad), value=fill)
    return [padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width] for dy, dx in offsets]


def pair_affinities(embedding, offsets):
    """K x H x W affinities exp(-mean |f(p) - f(p + o)|) of a 1 x D x H x W embedding, and where the neighbour
    lies inside the image (K x H x W bool)."""
    inside = torch.ones((1, 1, *embedding.shape[-2:]), dtype=torch.bool, device=embedding.device)
    valid = torch.cat(_shifted(inside, offsets, False), dim=1)[0]
    # outside the image the neighbour is the pixel's own copy (replicate), masked out by `valid`
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    height, width = embedding.shape[-2:]
    padded = F.pad(embedding, (pad, pad, pad, pad), mode="replicate")
    affinity = torch.stack([torch.exp(-(embedding - padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width])
                                      .abs().mean(dim=1))[0] for dy, dx in offsets])
    return affinity, valid


def confident_labels(maps, margin):
    """H x W class indices where the class maps (C x H x W, in [0, 1]) are sure: the best class leads the second
    by at least `margin`; IGNORE elsewhere."""
    top2 = maps.topk(2, dim=0).values
    labels = maps.argmax(dim=0)
    return torch.where(top2[0] - top2[1] >= margin, labels, torch.full_like(labels, IGNORE_INDEX))


def affinity_loss(affinity, valid, labels, offsets, background):
    """AffinityNet's loss: -log a on pairs of sure pixels of one class (background pairs and the others averaged
    apart, so that the large background does not drown the rest), -log(1 - a) on pairs of two classes."""
    neighbours = torch.stack(_shifted(labels[None].float(), offsets, float(IGNORE_INDEX)))[:, 0].long()
    both = valid & (labels[None] != IGNORE_INDEX) & (neighbours != IGNORE_INDEX)
    same, different = both & (labels[None] == neighbours), both & (labels[None] != neighbours)
    positive = -torch.log(affinity.clamp(min=EPS))
    negative = -torch.log((1.0 - affinity).clamp(min=EPS))

    def mean(values, where):
        return (values * where).sum() / where.sum().clamp(min=1)

    if background is None:
        return 0.5 * mean(positive, same) + 0.5 * mean(negative, different)
    on_background = labels[None] == background
    return (0.25 * mean(positive, same & on_background) + 0.25 * mean(positive, same & ~on_background)
            + 0.5 * mean(negative, different))


@torch.no_grad()
def random_walk(maps, affinity, valid, offsets, beta, iterations):
    """Class maps (C x H x W) spread `iterations` times over the transition probabilities a^beta (each pixel's
    row, itself included with affinity 1, summing to 1)."""
    weights = torch.cat([torch.ones_like(affinity[:1]), affinity.pow(beta) * valid], dim=0)
    weights = weights / weights.sum(dim=0, keepdim=True)
    steps = [(0, 0)] + list(offsets)
    for _ in range(iterations):
        views = _shifted(maps, steps, 0.0)
        maps = sum(w[None] * view for w, view in zip(weights, views))
    return maps


class AffinityPropagation:
    """The affinity head of one stage-1 classifier: `fit` on the training images' class maps, then `refine`
    the class maps of any image of the same kind (training images and whole val and test images alike)."""

    def __init__(self, cfg, classifier, runtime):
        s1 = cfg.stage1
        self.classifier = getattr(classifier, "members", [classifier])[0]  # an ensemble's first member
        self.cfg, self.runtime = cfg, runtime
        self.offsets = disc_offsets(s1.affinity_radius)
        torch.manual_seed(cfg.seed)
        self.head = AffinityHead(self.classifier.backbone.tap_channels).to(runtime.device)

    @torch.no_grad()
    def _taps(self, image, scale):
        """The classifier's three taps of an RGB image seen at `scale`, and the embedding grid's size."""
        cfg = self.cfg
        tensor = network_input(image, scale, cfg.data.mean, cfg.data.std,
                               getattr(self.classifier, "size_multiple", 1))[None].to(self.runtime.device)
        self.classifier.eval()
        with self.runtime.autocast():
            taps, _, _ = self.classifier.taps(tensor)
        return [t.float() for t in taps]

    def fit(self, samples, scale):
        """Train the head on (image, class maps C x H x W in [0, 1]) pairs; the classifier stays as it is."""
        s1 = self.cfg.stage1
        from utils.config import background_index
        background = background_index(self.cfg.data.classes, self.cfg.data.background)
        cached = []
        for image, maps in tqdm(samples, desc="affinity: features", leave=False, disable=not self.runtime.is_main):
            taps = self._taps(image, scale)
            grid = taps[0].shape[-2:]
            small = F.interpolate(torch.from_numpy(maps)[None].float(), size=grid, mode="area")[0]
            cached.append((taps, confident_labels(small, s1.affinity_margin).to(self.runtime.device)))
        optimizer = torch.optim.Adam(self.head.parameters(), lr=s1.affinity_lr)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.head.train()
        losses = []
        for epoch in tqdm(range(s1.affinity_epochs), desc="affinity: training", leave=False,
                          disable=not self.runtime.is_main):
            total = 0.0
            for index in torch.randperm(len(cached), generator=generator).tolist():
                taps, labels = cached[index]
                if torch.rand(1, generator=generator).item() < 0.5:  # horizontal flips
                    taps, labels = [t.flip(-1) for t in taps], labels.flip(-1)
                affinity, valid = pair_affinities(self.head(taps), self.offsets)
                loss = affinity_loss(affinity, valid, labels, self.offsets, background)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / max(len(cached), 1))
        self.head.eval()
        return losses

    @torch.no_grad()
    def refine(self, image, maps, allowed, scale):
        """Class maps C x H x W (numpy, in [0, 1]) of an RGB image, propagated; `allowed` (C x H x W bool) keeps the
        classes its labels rule out at zero. Colour refinement (stage1.cam_refine_iterations) sharpens the result
        at full resolution, as it does the CAMs."""
        s1 = self.cfg.stage1
        taps = self._taps(image, scale)
        affinity, valid = pair_affinities(self.head(taps), self.offsets)
        grid = affinity.shape[-2:]
        small = F.interpolate(torch.from_numpy(maps)[None].float().to(affinity.device), size=grid, mode="area")[0]
        walked = random_walk(small, affinity, valid, self.offsets, s1.affinity_beta, s1.affinity_iterations)
        full = F.interpolate(walked[None], size=maps.shape[-2:], mode="bilinear", align_corners=False)
        full = full * torch.from_numpy(np.ascontiguousarray(allowed))[None].to(full.device)
        peak = full.flatten(2).amax(dim=2).clamp(min=EPS)[:, :, None, None]
        full = full / peak  # each class back to a peak of 1, as the maps it came from
        image_tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(full.device)
        full = refine_cams(full, image_tensor, s1.cam_refine_iterations, s1.cam_refine_dilations,
                           s1.cam_refine_colour_scale)
        return full[0].cpu().numpy()
