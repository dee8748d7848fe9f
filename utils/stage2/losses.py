"""IICB loss for training on pseudo-masks: confident cross-entropy, uncertainty, smoothness,
class compactness and separation, and soft Dice."""
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_CLAMP = 1e-6
DICE_SMOOTHING = 1.0
COSINE_EPS = 1e-8


def easy_pixel_weights(per_pixel, target, ignore_index, num_classes):
    """OEEM's online easy-example weights (Li et al., MICCAI 2022): within each image, a labelled pixel weighs
    exp(-loss) over the image's mean of exp(-loss), so pixels the network already agrees with (likely right
    labels) count more than those it fights (likely wrong ones); mean weight 1 per image. An image whose
    pseudo-mask holds one class has nothing to tell apart and keeps weight 1. Detached: weights are not learnt."""
    labelled = target != ignore_index
    flat = (-per_pixel.detach()).masked_fill(~labelled, float("-inf")).flatten(1)
    counts = labelled.flatten(1).sum(dim=1, keepdim=True).clamp(min=1)
    weights = (torch.softmax(flat, dim=1).nan_to_num(0.0) * counts).view_as(per_pixel)
    members = F.one_hot(torch.where(labelled, target, 0), num_classes) * labelled.unsqueeze(-1)
    single = ((members.flatten(1, 2).sum(dim=1) > 0).sum(dim=1) <= 1)[:, None, None]
    return torch.where(single, torch.ones_like(weights), weights)


def confident_cross_entropy(logits, target, conf, tau, ignore_index, weighting="none"):
    """Cross-entropy averaged over labelled pixels whose max probability exceeds tau; 0 if there are none.
    weighting "oeem": each pixel's term weighted by easy_pixel_weights."""
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    selected = ((conf > tau) & (target != ignore_index)).to(per_pixel.dtype)
    if weighting == "oeem":
        per_pixel = per_pixel * easy_pixel_weights(per_pixel, target, ignore_index, logits.shape[1])
    return (per_pixel * selected).sum() / selected.sum().clamp(min=1.0)


def uncertainty(conf):
    """Mean of -(1 - conf) * log(1 - conf) over all pixels."""
    doubt = (1.0 - conf).clamp(min=LOG_CLAMP)
    return -(doubt * doubt.log()).mean()


def smoothness(probs, scaling="published"):
    """Absolute probability differences of vertical and horizontal neighbours: the mean of each direction,
    summed (published), or the mean over all pairs of both directions (per_term_mean, half as large)."""
    vertical = (probs[:, :, 1:, :] - probs[:, :, :-1, :]).abs()
    horizontal = (probs[:, :, :, 1:] - probs[:, :, :, :-1]).abs()
    if scaling == "published":
        return sum(d.mean() if d.numel() else probs.sum() * 0.0 for d in (vertical, horizontal))
    count = vertical.numel() + horizontal.numel()
    if count == 0:  # a 1 x 1 image has no neighbours
        return probs.sum() * 0.0
    return (vertical.sum() + horizontal.sum()) / count


def class_statistics(probs, target, ignore_index):
    """Per pseudo-label class: pixel count, mean probability vector and variance of the vectors.

    The variance of a set of vectors is the mean squared Euclidean distance to their mean (the trace of
    their covariance), so it is zero only when every pixel of the class has the same prediction.
    """
    num_classes = probs.shape[1]
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    labels = torch.where(valid, flat_target, torch.zeros_like(flat_target))
    membership = F.one_hot(labels, num_classes).to(flat_probs.dtype) * valid.unsqueeze(1).to(flat_probs.dtype)
    counts = membership.sum(dim=0)
    means = membership.t() @ flat_probs / counts.clamp(min=1.0).unsqueeze(1)
    # one-hot matmul, not means[labels]: indexing's backward scatters ~10^6 atomics into C rows (slow on GPUs)
    squared_distance = (flat_probs - membership @ means).pow(2).sum(dim=1)
    variances = membership.t() @ squared_distance / counts.clamp(min=1.0)
    return counts, means, variances


def compactness(counts, variances, scaling="published"):
    """Within-class variance of the pseudo-label classes. published: each class's variance per vector element
    (its trace / C), summed over the classes with two or more pixels and divided by C; per_term_mean: the trace
    averaged over the classes present (2x the published figure for two classes)."""
    if scaling == "published":
        num_classes = variances.shape[0]
        return (variances * (counts > 1).to(variances.dtype)).sum() / (num_classes * num_classes)
    present = (counts > 0).to(variances.dtype)
    return (variances * present).sum() / present.sum().clamp(min=1.0)


def separation(counts, means):
    """Mean cosine similarity between the mean probability vectors of every pair of present classes.

    Minimising it pushes class means apart; 0 when fewer than two classes are present.
    """
    present = counts > 0
    unit = means / means.norm(dim=1, keepdim=True).clamp(min=COSINE_EPS)
    similarity = unit @ unit.t()
    pairs = (present.unsqueeze(0) & present.unsqueeze(1)).triu(diagonal=1).to(similarity.dtype)
    return (similarity * pairs).sum() / pairs.sum().clamp(min=1.0)


def soft_dice_loss(probs, target, ignore_index, background=0):
    """1 - mean over the foreground classes (all but `background`; every class when it is None) of soft
    Dice, over the labelled pixels of the whole batch.

    Smoothing 1 keeps a class absent from both prediction and target from dividing by zero.
    """
    num_classes = probs.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    labels = torch.where(target != ignore_index, target, torch.zeros_like(target))
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(probs.dtype) * valid
    masked = probs * valid
    dims = (0, 2, 3)
    overlap = (masked * one_hot).sum(dim=dims)
    total = masked.sum(dim=dims) + one_hot.sum(dim=dims)
    dice = (2.0 * overlap + DICE_SMOOTHING) / (total + DICE_SMOOTHING)
    foreground = [c for c in range(num_classes) if c != background]
    return 1.0 - dice[foreground].mean()


class IICBLoss(nn.Module):
    """Weighted sum of the IICB terms; forward returns (total, detached terms)."""

    def __init__(self, alpha=1.0, beta=0.2, gamma=0.1, delta=0.1, eta=0.1, tau=0.4, ignore_index=255,
                 background=0, scaling="published", pixel_weighting="none"):
        super().__init__()
        self.pixel_weighting = pixel_weighting  # "oeem": easy pixels weigh more in the cross-entropy term
        self.scaling = scaling  # how the smoothness and compactness terms are normalised (see each)
        self.background = background  # class index left out of the Dice term; None: none is
        self.alpha, self.beta, self.gamma, self.delta, self.eta = alpha, beta, gamma, delta, eta
        self.tau = tau
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        if logits.dim() != 4 or target.shape != (logits.shape[0],) + logits.shape[2:]:
            raise ValueError(f"IICB loss needs logits N x C x H x W and target N x H x W, got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}.")
        if logits.shape[1] < 2:
            raise ValueError(f"IICB loss needs at least 2 classes, got {logits.shape[1]}.")
        logits = logits.float()  # the terms are unstable in half precision
        target = target.long()
        probs = logits.softmax(dim=1)
        conf = probs.amax(dim=1)
        counts, means, variances = class_statistics(probs, target, self.ignore_index)
        terms = {
            "ce": confident_cross_entropy(logits, target, conf, self.tau, self.ignore_index, self.pixel_weighting),
            "uncertainty": uncertainty(conf),
            "smooth": smoothness(probs, self.scaling),
            "compact": compactness(counts, variances, self.scaling),
            "separation": separation(counts, means),
            "dice": soft_dice_loss(probs, target, self.ignore_index, self.background),
        }
        total = (self.alpha * terms["ce"] + self.beta * terms["uncertainty"] + self.gamma * terms["smooth"]
                 + self.delta * (terms["compact"] + terms["separation"]) + self.eta * terms["dice"])
        return total, {name: value.detach() for name, value in terms.items()}
