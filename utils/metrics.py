"""Segmentation scores from one confusion matrix accumulated over all evaluated pixels."""
import numpy as np
import torch

RANGE_ERROR = ("a label or prediction lies outside 0..{last} and is not the ignore index; "
               "check the masks' encoding and the number of classes.")


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """C x C int64 counts, rows = truth, columns = prediction; pixels whose truth is ignore_index are skipped.

    Accepts numpy arrays or torch tensors of the same shape.
    """
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    target = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from mask shape {target.shape}.")
    keep = target != ignore_index
    pred = pred[keep].astype(np.int64)
    target = target[keep].astype(np.int64)
    if pred.size and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= num_classes):
        raise ValueError(RANGE_ERROR.format(last=num_classes - 1))
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


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
    hits = np.diag(conf)
    truth = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
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
