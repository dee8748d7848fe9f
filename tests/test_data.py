import numpy as np
import pytest

from conftest import save_png
from utils.data import load_pair, parse_label, split_items, train_items
from utils.imageio import DataError, decode_mask, read_rgb


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


def test_unreadable_image_names_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_rgb(bad)


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
