import numpy as np
import pytest

from conftest import save_png
from utils.data.datasets import load_pair, parse_label, split_items, train_items
from utils.data.imageio import IGNORE_INDEX, DataError, decode_mask, read_mask, read_rgb, write_palette_png


@pytest.mark.parametrize("name", ["a[1, 0].png", "a[1,0].png", "a[1 0].png", "a[10].png", "a [1,0].png"])
def test_label_forms(name):
    stem, label = parse_label(name, 2)
    assert stem == "a" and label.tolist() == [1.0, 0.0]


def test_label_four_classes_and_extra_brackets():
    stem, label = parse_label("slide[x]_3[0, 1, 1, 0].png", 4)
    assert stem == "slide[x]_3" and label.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("name, message", [
    ("a.png", "no image-level label"), ("a[1, 2].png", "0/1"), ("a[1, 0, 1].png", "3 digits"),
    ("a[].png", "0/1"), ("a[x,y].png", "0/1")])
def test_label_errors_name_the_file(name, message):
    with pytest.raises(DataError, match=message) as error:
        parse_label(name, 2)
    assert name in str(error.value)


def test_mask_encodings():
    raw = np.array([[0, 255], [3, 0]])
    assert decode_mask(np.array([[0, 255], [0, 255]]), "binary255", 2).tolist() == [[0, 1], [0, 1]]
    assert decode_mask(raw, "instance", 2).tolist() == [[0, 1], [1, 0]]
    assert decode_mask(np.array([[0, 3], [255, 1]]), "index", 4).tolist() == [[0, 3], [255, 1]]
    with pytest.raises(DataError, match="outside the 3 classes"):
        decode_mask(np.array([[0, 7]]), "index", 3, "m.png")


def test_image_modes_are_converted(tmp_path):
    gray = save_png(tmp_path / "g.png", np.full((5, 6), 100, np.uint8))
    rgba = save_png(tmp_path / "r.png", np.dstack([np.full((5, 6, 3), 10, np.uint8), np.full((5, 6), 255, np.uint8)]))
    sixteen = tmp_path / "s.png"
    from PIL import Image
    Image.fromarray(np.full((5, 6), 40000, np.uint16)).save(sixteen)
    for path in (gray, rgba, sixteen):
        image = read_rgb(path)
        assert image.shape == (5, 6, 3) and image.dtype == np.uint8
    assert read_rgb(gray)[0, 0].tolist() == [100, 100, 100]


def test_sixteen_bit_images_are_scaled_by_bit_depth_not_by_their_content(tmp_path):
    from PIL import Image
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(dark)      # a dim 16-bit image stays dim
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(bright)
    assert read_rgb(dark)[0, 0].tolist() == [4, 4, 4]                 # 1000 * 255 / 65535
    assert read_rgb(bright)[0, 0].tolist() == [255, 255, 255]


def test_unreadable_image_names_file(tmp_path, capfd):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_rgb(bad)
    whole = save_png(tmp_path / "whole.png", np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:300])
    capfd.readouterr()
    with pytest.raises(DataError, match="truncated.png"):
        read_rgb(truncated)
    assert capfd.readouterr().err == ""  # one message, the DataError: no decoder log lines besides it


def test_rgb_png_reads_exactly_as_pil_decodes_it(tmp_path):
    from PIL import Image
    pixels = np.random.default_rng(1).integers(0, 255, (37, 53, 3), np.uint8)
    path = save_png(tmp_path / "rgb.png", pixels)
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.flags["C_CONTIGUOUS"]
    assert np.array_equal(image, pixels) and np.array_equal(image, np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (40, 33)])
def test_palette_png_holds_the_indices_and_the_class_colours(tmp_path, shape):
    from PIL import Image
    palette = [(239, 239, 239), (190, 61, 42), (10, 200, 30)]
    mask = np.random.default_rng(2).integers(0, 3, shape).astype(np.uint8)
    mask.flat[-1] = IGNORE_INDEX
    write_palette_png(tmp_path / "m.png", mask, palette)
    image = Image.open(tmp_path / "m.png")
    assert image.mode == "P" and image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), mask)
    colours = np.asarray(image.getpalette()[:768]).reshape(-1, 3)
    assert colours[:3].tolist() == [list(c) for c in palette] and colours[IGNORE_INDEX].tolist() == [0, 0, 0]
    assert read_mask(tmp_path / "m.png", "index", 3).tolist() == mask.tolist()


def batches_of(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(images.clone(), labels.clone(), indices.clone()) for images, labels, indices in loader]


def test_training_batches_depend_on_seed_and_epoch_only(tmp_path):
    """Persistent or not, any worker count gives the same augmented batches, so --resume stays exact."""
    import torch

    from utils.data.datasets import ClassificationSet, training_loader
    from utils.runtime import Runtime
    make_layout(tmp_path)
    items = train_items(tmp_path, 2) * 4  # 12 images: a few batches
    dataset = ClassificationSet(items, 8, [0.5] * 3, [0.25] * 3, augment=True, seed=7)
    runs = []
    for workers in (0, 2):
        loader = training_loader(dataset, 4, Runtime(torch.device("cpu"), None, num_workers=workers), seed=7)
        runs.append([batches_of(loader, 0), batches_of(loader, 1)])
    for epoch in (0, 1):
        for (a_images, a_labels, a_index), (b_images, b_labels, b_index) in zip(runs[0][epoch], runs[1][epoch]):
            assert torch.equal(a_index, b_index) and torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    first, second = runs[0]
    assert [b[2].tolist() for b in first] != [b[2].tolist() for b in second]  # reshuffled each epoch

    def by_index(batches):
        return {int(i): image for images, _, indices in batches for i, image in zip(indices, images)}

    # and augmented afresh: some image is flipped differently in the second epoch
    first, second = by_index(first), by_index(second)
    assert any(not torch.equal(first[i], second[i]) for i in first.keys() & second.keys())


def make_layout(root, classes=2):
    rng = np.random.default_rng(0)
    for i in range(3):
        save_png(root / "train" / "img" / f"t{i}[1, {i % 2}].png", rng.integers(0, 255, (8, 8, 3), np.uint8))
    for split in ("val", "test"):
        save_png(root / split / "img" / "w.png", rng.integers(0, 255, (10, 12, 3), np.uint8))
        save_png(root / split / "mask" / "w.png", (rng.random((10, 12)) > 0.5).astype(np.uint8) * 255)


def test_layout_readers(tmp_path):
    make_layout(tmp_path)
    items = train_items(tmp_path, 2)
    assert [i.stem for i in items] == ["t0", "t1", "t2"] and items[1].label.tolist() == [1, 1]
    assert all(i.mask is None for i in items)
    (val,) = split_items(tmp_path, "val")
    image, mask = load_pair(val, "binary255", 2)
    assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 1}


def test_layout_errors(tmp_path):
    make_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        train_items(tmp_path / "nowhere", 2)
    (tmp_path / "empty" / "train" / "img").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        train_items(tmp_path / "empty", 2)
    (tmp_path / "test" / "mask" / "w.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        split_items(tmp_path, "test")
    save_png(tmp_path / "val" / "mask" / "w.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="must match"):
        load_pair(split_items(tmp_path, "val")[0], "binary255", 2)
    save_png(tmp_path / "train" / "img" / "bad[1, 0, 0].png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="bad"):
        train_items(tmp_path, 2)
