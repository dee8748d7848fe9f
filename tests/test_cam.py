import torch

from utils.data.imageio import IGNORE_INDEX
from utils.stage1.cam import cams_to_masks, normalise_cams


def test_absent_classes_never_win():
    cams = torch.zeros(1, 3, 4, 4)
    cams[0, 2] = 10.0          # strongest everywhere, but absent from the label
    cams[0, 1, :2] = 1.0
    cams[0, 0, 2:] = 1.0
    masks = cams_to_masks(cams, torch.tensor([[1, 1, 0]]))
    assert (masks[0, :2] == 1).all() and (masks[0, 2:] == 0).all()


def test_single_class_tile_is_that_class_everywhere():
    cams = torch.rand(2, 2, 5, 5)
    masks = cams_to_masks(cams, torch.tensor([[0, 1], [1, 0]]))
    assert (masks[0] == 1).all() and (masks[1] == 0).all()


def test_flat_cam_gives_no_nan_and_no_foreground():
    cams = torch.zeros(1, 2, 6, 6)
    assert torch.isfinite(normalise_cams(cams)).all()
    masks = cams_to_masks(cams, torch.tensor([[1, 1]]))
    assert (masks == 0).all()  # unactivated pixels fall back to background, never to a foreground class


def test_unactivated_pixels_without_background_are_ignored():
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 1, 0, 0] = 1.0
    cams[0, 2, 1, 1] = 1.0
    masks = cams_to_masks(cams, torch.tensor([[0, 1, 1]]))
    assert masks[0, 0, 0] == 1 and masks[0, 1, 1] == 2
    assert masks[0, 0, 1] == IGNORE_INDEX and masks[0, 1, 0] == IGNORE_INDEX


def test_classes_compared_after_normalisation():
    cams = torch.zeros(1, 2, 1, 2)
    cams[0, 0] = torch.tensor([100.0, 10.0])   # background peaks at 100
    cams[0, 1] = torch.tensor([0.5, 1.0])      # gland peaks at 1
    masks = cams_to_masks(cams, torch.tensor([[1, 1]]))
    assert masks[0, 0].tolist() == [0, 1]


def test_fill_holes_closes_enclosed_regions_only():
    import numpy as np

    from utils.evaluation.postprocess import fill_holes
    mask = np.zeros((7, 9), np.uint8)
    mask[1:6, 1:6] = 1
    mask[2:5, 2:5] = 0            # a lumen inside a gland
    mask[0:3, 7:9] = 1
    mask[1, 8] = 0                # touches the border: not enclosed
    mask[3, 3] = 255              # ignore stays ignore
    filled = fill_holes(mask, [1])
    assert (filled[2:5, 2:5][np.arange(9).reshape(3, 3) != 4] == 1).all()
    assert filled[3, 3] == 255 and filled[1, 8] == 0
    assert (fill_holes(mask, []) == mask).all()


def test_background_scale_favours_foreground_only_where_the_label_has_it():
    cams = torch.zeros(2, 2, 1, 3)
    cams[:, 0] = torch.tensor([1.0, 0.6, 0.0])   # background
    cams[:, 1] = torch.tensor([0.0, 0.5, 1.0])   # gland, absent from the second tile's label
    labels = torch.tensor([[1, 1], [1, 0]])
    assert cams_to_masks(cams, labels)[0, 0].tolist() == [0, 0, 1]
    weighed = cams_to_masks(cams, labels, background_scale=0.8)
    assert weighed[0, 0].tolist() == [0, 1, 1]           # 0.6 * 0.8 < 0.5: the close call goes to gland
    assert (weighed[1] == 0).all()                       # a tile without gland never gets any
    no_background = cams_to_masks(cams, torch.tensor([[1, 1], [1, 1]]), background_index=None, background_scale=0.1)
    assert torch.equal(no_background, cams_to_masks(cams, torch.tensor([[1, 1], [1, 1]]), background_index=None))
