import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one test per core (pytest -n): each worker, and the scripts it launches, on one thread, so that the
    # workers do not wait on each other's threads
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    # the slow tests first: a long test drawn last would leave one worker idle while the other finishes it
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


GLAS = ROOT.parent / "shared" / "data" / "glas"


def save_png(path, array, mode=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)
    return path


@pytest.fixture
def glas_dir():
    if not GLAS.is_dir():
        pytest.skip("../shared/data/glas is not present")
    return GLAS


def load_script(name):
    """Import a numbered script (its file name starts with a digit) as a module."""
    import importlib
    return importlib.import_module(name)


TINY_DEMO = [  # a few small synthetic tiles and a small network: seconds on a CPU
    "demo.train_images=48", "demo.val_images=3", "demo.test_images=3", "demo.tile_size=64",
    "demo.test_size=[96,80]", "demo.target_domain=false", "stage1.image_size=64", "stage1.epochs=4",
    "stage1.batch_size=8", "stage1.backbone=resnet10t", "stage1.samples=2", "num_workers=0",
    "stage2.encoder=resnet10t", "stage2.crop_size=64", "stage2.window=64", "stage2.epochs=3",
    "stage2.batch_size=8", "inference.window=64", "device=cpu",
]


def tiny_demo_args(tmp_path, *extra):
    overrides = TINY_DEMO + [f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", *extra]
    return ["--config", str(ROOT / "configs" / "demo.yaml")] + [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy two-core machine two threads wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses too (see one_thread)


def write_glas_like_raw(folder, train=10, test=3, size=(160, 128), seed=0):
    """A raw folder in the official GlaS layout (train_N.png, testA_N.png with _anno masks, 0/255) drawn with
    the demo's synthetic tissue: whole images to cut into patches, as 0_prepare_data.py expects."""
    from utils.data.synthetic_tissue import render_tissue
    folder = Path(folder)
    for prefix, count in (("train", train), ("testA", test)):
        for index in range(1, count + 1):
            rng = np.random.default_rng([seed, len(prefix), index])
            image, mask = render_tissue(rng, size[0], size[1], "glands")
            save_png(folder / f"{prefix}_{index}.png", image)
            save_png(folder / f"{prefix}_{index}_anno.png", (mask * 255).astype(np.uint8))
    return folder


def one_line_error(capsys, main, argv):
    """Run a script's main as its command line does; return the single stderr line it ends with."""
    from utils.cli import run_main
    with pytest.raises(SystemExit) as stop:
        run_main(main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]
