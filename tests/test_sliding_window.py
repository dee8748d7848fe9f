import pytest
import torch
import torch.nn as nn

from utils.stage2.sliding_window import count_windows, sliding_window_logits, window_positions

CLASSES = 3


def fully_convolutional(kernel_size, layers=3):
    torch.manual_seed(0)
    blocks = []
    channels = 3
    for index in range(layers):
        out = CLASSES if index == layers - 1 else 8
        blocks.append(nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2))
        if index < layers - 1:
            blocks.append(nn.Tanh())
        channels = out
    return nn.Sequential(*blocks).eval()


def test_window_positions_cover_and_end_at_border():
    assert window_positions(10, 4, 3) == [0, 3, 6]
    assert window_positions(11, 4, 3) == [0, 3, 6, 7]
    assert window_positions(4, 4, 3) == [0]
    assert window_positions(3, 4, 3) == [0]
    for size in range(7, 40):
        starts = window_positions(size, 7, 5)
        covered = set()
        for start in starts:
            covered.update(range(start, start + 7))
        assert covered == set(range(size)) and starts[-1] == size - 7


@pytest.mark.parametrize("size", [(50, 61), (17, 23), (5, 40), (3, 3)])
def test_pointwise_model_matches_whole_image_everywhere(size):
    # A 1x1 model sees no context, so blending, padding and cropping must reproduce it exactly.
    model = fully_convolutional(kernel_size=1)
    image = torch.rand(3, *size)
    with torch.no_grad():
        whole = model(image.unsqueeze(0))
    tiled = sliding_window_logits(model, image, CLASSES, window=24, overlap=0.25, batch_size=3)
    assert tiled.shape == (1, CLASSES, *size)
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_3x3_model_matches_away_from_window_edges():
    model = fully_convolutional(kernel_size=3)  # three 3x3 convs: context of 3 px each way
    reach = 3
    height, width, window, overlap = 70, 53, 32, 0.5
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        whole = model(image)
    tiled = sliding_window_logits(model, image, CLASSES, window=window, overlap=overlap, batch_size=4)

    # A window's prediction is exact except within `reach` of its edges that lie inside the image.
    exact = torch.ones(height, width, dtype=torch.bool)
    stride = round(window * (1 - overlap))
    for top in window_positions(height, window, stride):
        for left in window_positions(width, window, stride):
            bottom, right = top + window, left + window
            if top > 0:
                exact[top:top + reach, left:right] = False
            if bottom < height:
                exact[bottom - reach:bottom, left:right] = False
            if left > 0:
                exact[top:bottom, left:left + reach] = False
            if right < width:
                exact[top:bottom, right - reach:right] = False
    assert exact.float().mean() > 0.2
    difference = (tiled - whole).abs()[0].amax(dim=0)
    assert difference[exact].max() < 1e-5
    assert difference[~exact].max() > 1e-5  # the check above is not vacuous


def test_constant_logits_survive_blending_and_batches_are_used():
    batch_sizes = []

    def predict(batch):
        batch_sizes.append(batch.shape[0])
        return torch.full((batch.shape[0], 2, batch.shape[2], batch.shape[3]), 0.25)

    out = sliding_window_logits(predict, torch.rand(1, 3, 40, 40), 2, window=16, overlap=0.5, batch_size=4)
    assert torch.allclose(out, torch.full_like(out, 0.25))
    windows = count_windows(40, 40, 16, 0.5)
    assert windows == len(window_positions(40, 16, 8)) ** 2 == 16
    assert batch_sizes == [4, 4, 4, 4]


def test_bad_inputs_are_explained():
    model = fully_convolutional(kernel_size=1)
    with pytest.raises(ValueError, match="expected"):
        sliding_window_logits(model, torch.rand(3, 20, 20), CLASSES + 1, window=8, overlap=0.5)
    with pytest.raises(ValueError, match="one image"):
        sliding_window_logits(model, torch.rand(2, 3, 20, 20), CLASSES, window=8, overlap=0.5)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_logits(model, torch.rand(3, 20, 20), CLASSES, window=8, overlap=1.0)
