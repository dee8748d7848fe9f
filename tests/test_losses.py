import math

import numpy as np
import pytest
import torch

from utils.stage2.losses import IICBLoss

IGNORE = 255


def softmax_np(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_terms(logits, target, tau=0.4, scaling="published"):
    """Straightforward loop versions of each term, written independently of the module."""
    logits = logits.astype(np.float64)
    probs = softmax_np(logits)
    n, c, h, w = probs.shape
    conf = probs.max(axis=1)
    ce_values = [-math.log(probs[i, target[i, y, x], y, x])
                 for i in range(n) for y in range(h) for x in range(w)
                 if target[i, y, x] != IGNORE and conf[i, y, x] > tau]
    ce = float(np.mean(ce_values)) if ce_values else 0.0
    uncertainty = float(np.mean(-(1 - conf) * np.log(1 - conf)))
    vertical, horizontal = [], []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if y + 1 < h:
                    vertical += list(np.abs(probs[i, :, y + 1, x] - probs[i, :, y, x]))
                if x + 1 < w:
                    horizontal += list(np.abs(probs[i, :, y, x + 1] - probs[i, :, y, x]))
    if scaling == "published":  # the mean of each direction, summed
        smooth = float(np.mean(vertical)) + float(np.mean(horizontal))
    else:
        smooth = float(np.mean(vertical + horizontal))
    vectors = probs.transpose(0, 2, 3, 1).reshape(-1, c)
    labels = target.reshape(-1)
    means, variances, published = {}, [], 0.0
    for k in range(c):
        members = vectors[labels == k]
        if len(members):
            means[k] = members.mean(axis=0)
            variances.append(np.mean(np.sum((members - means[k]) ** 2, axis=1)))
        if len(members) > 1:  # the variance of every element of the class's vectors, over C classes
            published += np.mean((members - means[k]) ** 2) / c
    if scaling == "published":
        compact = float(published)
    else:
        compact = float(np.mean(variances)) if variances else 0.0
    cosines = [means[a] @ means[b] / (np.linalg.norm(means[a]) * np.linalg.norm(means[b]))
               for a in means for b in means if a < b]
    separation = float(np.mean(cosines)) if cosines else 0.0
    valid = labels != IGNORE
    dices = []
    for k in range(1, c):
        p = vectors[valid, k]
        g = (labels[valid] == k).astype(np.float64)
        dices.append((2 * np.sum(p * g) + 1) / (np.sum(p) + np.sum(g) + 1))
    dice = 1 - float(np.mean(dices))
    return {"ce": ce, "uncertainty": uncertainty, "smooth": smooth, "compact": compact,
            "separation": separation, "dice": dice}


def random_case(seed, n=2, c=3, h=5, w=6, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, c, h, w)).astype(np.float32)
    target = rng.integers(0, c, size=(n, h, w))
    target[rng.random((n, h, w)) < ignore_fraction] = IGNORE
    return logits, target


def run_loss(logits, target, **weights):
    loss = IICBLoss(**weights)
    return loss(torch.tensor(logits), torch.tensor(target))


def test_confident_ce_by_hand():
    # 1 x 3 x 1 x 4: pixel 1 is not confident (uniform, 1/3 < tau), pixel 3 is ignored.
    logits = np.array([[2, 0, 0, 5], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32).reshape(1, 3, 1, 4)
    target = np.array([[[0, 1, 2, IGNORE]]])
    p_pixel0 = math.exp(2) / (math.exp(2) + 2)
    p_pixel2 = math.e / (math.e + 2)
    expected = (-math.log(p_pixel0) - math.log(p_pixel2)) / 2
    _, terms = run_loss(logits, target)
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-5)


def test_uncertainty_and_smoothness_by_hand():
    # Two classes, two pixels side by side with probabilities 0.5 and sigmoid(2).
    logits = np.array([[[[0.0, 2.0]], [[0.0, 0.0]]]], dtype=np.float32)
    target = np.array([[[0, 0]]])
    conf = np.array([0.5, 1 / (1 + math.exp(-2))])
    expected_uncertainty = np.mean(-(1 - conf) * np.log(1 - conf))
    # one horizontal pair, two class channels, each differing by conf[1] - 0.5
    expected_smooth = conf[1] - 0.5
    _, terms = run_loss(logits, target)
    assert terms["uncertainty"].item() == pytest.approx(expected_uncertainty, rel=1e-5)
    assert terms["smooth"].item() == pytest.approx(expected_smooth, rel=1e-5)


def test_compactness_separation_and_dice_by_hand():
    # Class 0 pixels predict p = (0.5, 0.5) and (a, 1 - a); class 1 pixel predicts (b, 1 - b).
    a, b = 0.8, 0.3
    to_logit = lambda p: math.log(p / (1 - p))
    logits = np.array([[[[0.0, to_logit(a), to_logit(b)]], [[0.0, 0.0, 0.0]]]], dtype=np.float32)
    target = np.array([[[0, 0, 1]]])
    mean0 = np.array([(0.5 + a) / 2, (0.5 + 1 - a) / 2])
    mean1 = np.array([b, 1 - b])
    var0 = 2 * ((a - 0.5) / 2) ** 2  # both pixels lie (a - 0.5) / 2 from the mean in each of 2 channels
    expected_compact = (var0 + 0.0) / 2  # per_term_mean: the mean over the two classes present
    expected_published = (var0 / 2) / 2   # per element (2 channels), summed over classes with 2+ pixels, / C
    expected_separation = mean0 @ mean1 / (np.linalg.norm(mean0) * np.linalg.norm(mean1))
    fg = np.array([0.5, 1 - a, 1 - b])
    expected_dice = 1 - (2 * (1 - b) + 1) / (fg.sum() + 1 + 1)
    _, terms = run_loss(logits, target, scaling="per_term_mean")
    assert terms["compact"].item() == pytest.approx(expected_compact, rel=1e-5)
    assert run_loss(logits, target)[1]["compact"].item() == pytest.approx(expected_published, rel=1e-5)
    assert terms["separation"].item() == pytest.approx(expected_separation, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(expected_dice, rel=1e-5)


@pytest.mark.parametrize("scaling", ["published", "per_term_mean"])
@pytest.mark.parametrize("seed,classes", [(0, 2), (1, 3), (2, 5)])
def test_terms_match_loop_reference(seed, classes, scaling):
    logits, target = random_case(seed, c=classes)
    _, terms = run_loss(logits, target, scaling=scaling)
    expected = reference_terms(logits, target, scaling=scaling)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_total_is_the_weighted_sum():
    logits, target = random_case(3)
    weights = dict(alpha=0.7, beta=0.3, gamma=0.05, delta=0.4, eta=0.9)
    total, terms = run_loss(logits, target, **weights)
    t = {k: v.item() for k, v in terms.items()}
    expected = (0.7 * t["ce"] + 0.3 * t["uncertainty"] + 0.05 * t["smooth"]
                + 0.4 * (t["compact"] + t["separation"]) + 0.9 * t["dice"])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert all(not v.requires_grad for v in terms.values())


ONLY = {
    "ce": dict(alpha=1, beta=0, gamma=0, delta=0, eta=0),
    "uncertainty": dict(alpha=0, beta=1, gamma=0, delta=0, eta=0),
    "smooth": dict(alpha=0, beta=0, gamma=1, delta=0, eta=0),
    "compact_separation": dict(alpha=0, beta=0, gamma=0, delta=1, eta=0),
    "dice": dict(alpha=0, beta=0, gamma=0, delta=0, eta=1),
}


@pytest.mark.parametrize("term", list(ONLY))
def test_every_term_has_a_finite_nonzero_gradient(term):
    logits, target = random_case(4)
    logits = torch.tensor(logits, requires_grad=True)
    total, _ = IICBLoss(**ONLY[term])(logits, torch.tensor(target))
    total.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 1e-6


def test_no_confident_pixel_gives_zero_ce_without_nan():
    logits = torch.zeros(1, 4, 3, 3, requires_grad=True)  # every pixel has max probability 1/4 < tau
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    total, terms = IICBLoss()(logits, target)
    total.backward()
    assert terms["ce"].item() == 0.0
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def test_all_ignored_target_stays_finite():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    total, terms = IICBLoss()(logits, target)
    total.backward()
    assert terms["ce"].item() == terms["compact"].item() == terms["separation"].item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_separation_falls_as_class_means_move_apart():
    target = torch.tensor([[[0, 0, 1, 1]]])
    values = []
    for spread in [0.0, 0.5, 1.0, 2.0, 4.0]:
        logits = torch.tensor([[[[spread, spread, 0.0, 0.0]], [[0.0, 0.0, spread, spread]]]])
        values.append(IICBLoss()(logits, target)[1]["separation"].item())
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_ignored_pixels_do_not_change_supervised_terms():
    logits, target = random_case(5)
    _, before = run_loss(logits, target)
    changed = logits.copy()
    changed[np.broadcast_to((target == IGNORE)[:, None], changed.shape)] = 9.0
    _, after = run_loss(changed, target)
    for name in ("ce", "compact", "separation", "dice"):
        assert after[name].item() == pytest.approx(before[name].item(), rel=1e-6), name


def test_half_precision_logits_and_shape_errors():
    logits, target = random_case(6)
    total, _ = IICBLoss()(torch.tensor(logits).half(), torch.tensor(target))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    with pytest.raises(ValueError, match="N x H x W"):
        IICBLoss()(torch.tensor(logits), torch.tensor(target)[:, :-1])


def test_oeem_weights_favour_easy_pixels_and_leave_one_class_images_alone():
    from utils.stage2.losses import easy_pixel_weights
    # image 0: two classes, losses 0, 1, 2 and one ignored pixel; image 1: one class only
    per_pixel = torch.tensor([[[0.0, 1.0, 2.0, 5.0]], [[0.0, 3.0, 1.0, 2.0]]])
    target = torch.tensor([[[0, 1, 1, IGNORE]], [[1, 1, 1, 1]]])
    weights = easy_pixel_weights(per_pixel, target, IGNORE, 2)
    easy = np.exp(-np.array([0.0, 1.0, 2.0]))
    assert torch.allclose(weights[0, 0, :3], torch.tensor(3 * easy / easy.sum(), dtype=torch.float32))
    assert weights[0, 0, 3] == 0 and torch.equal(weights[1], torch.ones(1, 4))
    # in the loss: a pixel the network fights (a wrong label, large loss) counts less than with plain weights
    logits = torch.tensor([[[[4.0, 4.0, -4.0]], [[-4.0, -4.0, 4.0]]]])
    wrong = torch.tensor([[[0, 1, 1]]])  # the middle pixel's label disagrees with a confident prediction
    plain = run_loss(logits.numpy(), wrong.numpy(), beta=0, gamma=0, delta=0, eta=0, tau=0.0)[1]["ce"]
    easy_first = run_loss(logits.numpy(), wrong.numpy(), beta=0, gamma=0, delta=0, eta=0, tau=0.0,
                          pixel_weighting="oeem")[1]["ce"]
    assert easy_first < 0.5 * plain
