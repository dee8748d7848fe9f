import numpy as np
import pytest
import torch

from utils.evaluation.metrics import confusion_matrix, confusion_matrix_torch, scores

TARGET = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 255]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 2]])
# truth 0 -> predicted 0,1,0 ; truth 1 -> 1,1 ; truth 2 -> 2,0 ; last pixel ignored
EXPECTED = np.array([[2, 1, 0],
                     [0, 2, 0],
                     [1, 0, 1]])


def test_confusion_matrix_numpy_and_torch_inputs():
    conf = confusion_matrix(PRED, TARGET, 3)
    assert conf.dtype == np.int64 and np.array_equal(conf, EXPECTED)
    conf_from_torch = confusion_matrix(torch.tensor(PRED), torch.tensor(TARGET, dtype=torch.uint8), 3)
    assert np.array_equal(conf_from_torch, EXPECTED)


def test_confusion_matrix_torch_on_a_batch():
    pred = torch.tensor(np.stack([PRED, PRED]))
    target = torch.tensor(np.stack([TARGET, TARGET]))
    conf = confusion_matrix_torch(pred, target, 3)
    assert conf.dtype == torch.int64 and np.array_equal(conf.numpy(), 2 * EXPECTED)


def test_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(PRED, np.where(TARGET == 2, 7, TARGET), 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix_torch(torch.tensor(PRED) + 1, torch.tensor(TARGET), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:, :3], TARGET, 3)


def test_scores_by_hand():
    result = scores(EXPECTED)
    assert result["pixel_acc"] == pytest.approx(5 / 7)
    assert result["mean_class_acc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    assert result["iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(np.mean(iou))
    assert result["fwiou"] == pytest.approx(3 / 7 * iou[0] + 2 / 7 * iou[1] + 2 / 7 * iou[2])
    dice = [4 / 6, 4 / 5, 2 / 3]
    assert result["dice"] == pytest.approx(dice)
    assert result["mdice"] == pytest.approx(np.mean(dice))
    for key in ("pixel_acc", "mean_class_acc", "miou", "fwiou", "mdice"):
        assert type(result[key]) is float and 0 <= result[key] <= 1
    assert all(type(v) is float for v in result["iou"] + result["dice"])


def test_class_absent_everywhere_is_none_and_left_out_of_means():
    conf = np.array([[3, 1, 0],
                     [0, 4, 0],
                     [0, 0, 0]])  # class 2 neither occurs nor is predicted
    result = scores(conf)
    assert result["iou"][2] is None and result["dice"][2] is None
    assert result["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert result["mdice"] == pytest.approx((6 / 7 + 8 / 9) / 2)
    assert result["mean_class_acc"] == pytest.approx((3 / 4 + 1) / 2)


def test_class_predicted_but_absent_from_truth_scores_zero():
    conf = np.array([[3, 1],
                     [0, 0]])
    result = scores(conf)
    assert result["iou"] == [pytest.approx(0.75), 0.0]
    assert result["miou"] == pytest.approx(0.375)
    assert result["mean_class_acc"] == pytest.approx(0.75)


def test_perfect_and_empty():
    assert scores(np.diag([5, 7]))["miou"] == 1.0
    with pytest.raises(ValueError, match="no labelled pixel"):
        scores(np.zeros((2, 2), dtype=np.int64))
