"""Segmentation scores from one confusion matrix accumulated over all evaluated pixels.

Whole-image scores count every labelled pixel. A pixel that a prediction leaves to no class (the ignore
index, e.g. where no class activates in a CAM and there is no background class) is counted as a miss of
its true class: the matrix then has one extra column, "claimed by no class".
"""
import numpy as np
import torch

RANGE_ERROR = ("a label or prediction lies outside 0..{last} and is not the ignore index; "
               "check the masks' encoding and the number of classes.")


def confusion_matrix(pred, target, num_classes, ignore_index=255, count_unclaimed=False):
    """C x C int64 counts, rows = truth, columns = prediction; pixels whose truth is ignore_index are skipped.

    With count_unclaimed, predictions equal to ignore_index are allowed and counted in an extra last
    column (C x (C + 1)): they are misses, not skipped pixels. Accepts numpy arrays or torch tensors.
    """
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    target = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from mask shape {target.shape}.")
    keep = target != ignore_index
    pred = pred[keep].astype(np.int64)
    target = target[keep].astype(np.int64)
    columns = num_classes + 1 if count_unclaimed else num_classes
    if count_unclaimed:
        pred = np.where(pred == ignore_index, num_classes, pred)
    if pred.size and (min(pred.min(), target.min()) < 0 or target.max() >= num_classes or pred.max() >= columns):
        raise ValueError(RANGE_ERROR.format(last=num_classes - 1))
    counts = np.bincount(target * columns + pred, minlength=num_classes * columns)
    return counts.reshape(num_classes, columns).astype(np.int64)


def confusion_matrix_torch(pred, target, num_classes, ignore_index=255):
    """Same as confusion_matrix for tensors on any device (a whole batch at once); an int64 tensor there."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from mask shape {tuple(target.shape)}.")
    keep = target != ignore_index
    pred = pred[keep].long()
    target = target[keep].long()
    if ((pred < 0) | (pred >= num_classes) | (target < 0) | (target >= num_classes)).any():
        raise ValueError(RANGE_ERROR.format(last=num_classes - 1))
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _safe_ratio(numerator, denominator):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _as_list(values):
    return [None if np.isnan(v) else float(v) for v in values]


def scores(conf):
    """pixel_acc, mean_class_acc, iou (per class), miou, fwiou, dice (per class) and mdice.

    `conf` is C x C, or C x (C + 1) with a last column of pixels claimed by no class (misses).

    A class absent from both truth and prediction has no defined IoU or Dice (0/0): it is reported as
    None in the per-class lists and left out of the means, because scoring it 1 would inflate the mean
    for tiles that simply lack the class and scoring it 0 would punish a correct prediction. Likewise
    mean_class_acc averages only over classes present in the truth.
    """
    conf = conf.detach().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf)
    conf = conf.astype(np.float64)
    total = conf.sum()
    if total == 0:
        raise ValueError("no labelled pixel was evaluated (empty confusion matrix); check the masks.")
    num_classes = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"a confusion matrix is C x C or C x (C + 1), got shape {conf.shape}.")
    hits = np.diag(conf[:, :num_classes])
    truth = conf.sum(axis=1)
    predicted = conf[:, :num_classes].sum(axis=0)
    class_acc = _safe_ratio(hits, truth)
    iou = _safe_ratio(hits, truth + predicted - hits)
    dice = _safe_ratio(2 * hits, truth + predicted)
    frequency = truth / total
    return {
        "pixel_acc": float(hits.sum() / total),
        "mean_class_acc": float(np.nanmean(class_acc)),
        "iou": _as_list(iou),
        "miou": float(np.nanmean(iou)),
        "fwiou": float(np.nansum(frequency * iou)),
        "dice": _as_list(dice),
        "mdice": float(np.nanmean(dice)),
    }
