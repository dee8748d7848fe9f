"""A process killed while it writes a pseudo-mask or a checkpoint leaves no truncated file under a final name,
and the rerun finishes the job. Pseudo-masks carry a manifest naming the checkpoint that made them.

The kills are real: a driver process half-writes the file that is being saved (under whatever name the
code chose for it) and SIGKILLs itself, the worst moment for a kill.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ONE_THREAD, ROOT, load_script, save_png, tiny_demo_args
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_safetensors
from utils.config import load_config
from utils.data.datasets import train_items
from utils.data.imageio import IGNORE_INDEX, DataError, list_images, read_mask
from utils.files import atomic_path
from utils.stage1.pseudo_masks import check_pseudo_masks, file_sha256, pseudo_mask_name
from utils.stage2.training_data import training_pairs

SMALL = ["demo.train_images=16", "stage1.epochs=1", "stage2.epochs=1", "stage1.cam_flip=false",
         "stage1.image_size=32", "stage2.crop_size=32", "stage2.window=32", "demo.val_images=2",
         "demo.test_images=1"]

DRIVER = """
import importlib, io, itertools, os, signal, sys
sys.path.insert(0, {root!r})
import torch
from PIL import Image
counter = itertools.count(1)

def half_write_then_die(data, destination):
    with open(destination, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
importlib.import_module({script!r}).main(sys.argv[1:])
"""
# Dies half-way through the nth PNG the process writes (PNGs are encoded in memory, then written).
PNG_PATCH = """
import pathlib
real_write_bytes = pathlib.Path.write_bytes
def write_bytes(self, data):
    if self.suffix == ".png" and next(counter) == {nth}:
        half_write_then_die(data, self)
    return real_write_bytes(self, data)
pathlib.Path.write_bytes = write_bytes
"""
# Dies half-way through the nth torch.save of a file whose (temporary) name starts with `prefix`.
TORCH_PATCH = """
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if os.path.basename(str(f)).startswith({prefix!r}) and next(counter) == {nth}:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half_write_then_die(buffer.getvalue(), f)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def run_killed(tmp_path, script, patch, argv):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), script=script, patch=patch))
    result = subprocess.run([sys.executable, str(driver), *argv], cwd=ROOT, capture_output=True, text=True,
                            env=ONE_THREAD, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # killed by SIGKILL, not finished or failed


OLD = 946684800  # 1 January 2000: a file still this old was not written again


def mark_old(paths):
    names = []
    for path in paths:
        os.utime(path, (OLD, OLD))
        names.append(path.name)
    return sorted(names)


def is_old(path):
    return path.stat().st_mtime == OLD


def hidden_leftovers(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def png_is_whole(path):
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained stage-1 run: (argv, run dir, its pseudo-mask folder, its data root)."""
    tmp = tmp_path_factory.mktemp("atomic")
    argv = tiny_demo_args(tmp, *SMALL)
    assert load_script("1_train_stage1").main(argv) == 0
    return argv, tmp / "runs" / "demo" / "stage1", tmp / "data" / "train" / "pseudo_mask", tmp / "data"


def test_kill_while_writing_pseudo_masks_leaves_only_whole_files(tmp_path, trained):
    argv, stage1_dir, _, data = trained
    items = train_items(data, 2)
    folder = tmp_path / "pseudo"
    # Masks left by an earlier checkpoint, all "ignore": every one of them must be redone.
    for item in items:
        save_png(folder / pseudo_mask_name(item.image), np.full((64, 64), IGNORE_INDEX, np.uint8))
    (folder / "manifest.json").write_text(json.dumps({"checkpoint_sha256": "0" * 64, "complete": True,
                                                      "files": sorted(p.name for p in folder.glob("*.png"))}))
    masks_argv = argv + ["--set", f"data.pseudo_mask_dir={folder}", "--masks-only"]

    run_killed(tmp_path, "1_train_stage1", PNG_PATCH.format(nth=4), masks_argv)
    leftovers = hidden_leftovers(folder)
    assert leftovers and not all(png_is_whole(p) for p in leftovers)  # the kill did hit a half-written file
    finals = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
    assert 0 < len(finals) < len(items) and all(png_is_whole(p) for p in finals)
    # the old masks are gone: the manifest now names this checkpoint, so they would pass for its own
    assert all((read_mask(p, "index", 2) != IGNORE_INDEX).any() for p in finals)
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    sha = file_sha256(stage1_dir / "checkpoint.pth")
    with pytest.raises(DataError, match="partial"):
        check_pseudo_masks(folder, [i.image for i in items], sha)
    finished = mark_old(finals)

    assert load_script("1_train_stage1").main(masks_argv) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["checkpoint_sha256"] == sha
    for item in items:
        path = folder / pseudo_mask_name(item.image)
        assert png_is_whole(path)
        assert (read_mask(path, "index", 2) != IGNORE_INDEX).any(), f"{path.name} is still the old mask"
    assert all(is_old(folder / name) for name in finished)  # finished files were not made again
    check_pseudo_masks(folder, [i.image for i in items], sha)  # leftover temporaries are no obstacle


def test_kill_while_saving_checkpoint_keeps_previous_one_and_resume_finishes(tmp_path, trained):
    _, _, _, data = trained
    argv = tiny_demo_args(tmp_path, *SMALL, "stage1.epochs=2", f"data.root={data}",
                          f"data.pseudo_mask_dir={tmp_path / 'pseudo'}")
    out = tmp_path / "runs" / "demo" / "stage1"

    run_killed(tmp_path, "1_train_stage1", TORCH_PATCH.format(prefix=".checkpoint.pth.", nth=2), argv)
    assert load_checkpoint(out / "checkpoint.pth", "ibdr-stage1")["epoch"] == 1
    leftovers = hidden_leftovers(out)
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp.pth")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(leftovers[0])
    assert not (tmp_path / "pseudo").exists()

    assert load_script("1_train_stage1").main(argv + ["--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pth", "ibdr-stage1")["epoch"] == 2
    assert (out / "metrics.json").is_file()
    assert json.loads((tmp_path / "pseudo" / "manifest.json").read_text())["complete"] is True


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    save_checkpoint(target, {"format": "x", "value": torch.ones(3)})
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise OSError("No space left on device")
    assert torch.equal(load_checkpoint(target)["value"], torch.ones(3))

    safetensors = tmp_path / "model.safetensors"
    save_safetensors(safetensors, {"w": torch.zeros(2)}, "ibdr-stage2", {"classes": ["a", "b"]})

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x08\x00\x00")
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", half_then_fail)
    with pytest.raises(OSError):
        save_safetensors(safetensors, {"w": torch.ones(2)}, "ibdr-stage2", {})
    assert torch.equal(load_checkpoint(safetensors)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model.safetensors"]


def test_readers_ignore_temporary_files(tmp_path, trained):
    """A leftover '.<name>.<random>.tmp.png' is never taken for an image, an input or a pseudo-mask."""
    _, _, pseudo, data = trained
    leftover = data / "train" / "img" / ".a[1, 0].png.x1y2.tmp.png"
    leftover.write_bytes(b"\x89PNG half")
    try:
        assert leftover not in list_images(data / "train" / "img")
        assert all(not i.image.name.startswith(".") for i in train_items(data, 2))
        inference = load_script("inference")
        found = inference.find_inputs(data / "train" / "img", tmp_path / "out", recursive=False)
        assert leftover not in [path for path, _ in found]
    finally:
        leftover.unlink()


def test_pseudo_masks_are_reused_unless_overwrite(tmp_path, trained):
    argv, _, pseudo, _ = trained
    folder = tmp_path / "pseudo"
    masks_argv = argv + ["--set", f"data.pseudo_mask_dir={folder}", "--masks-only"]
    stage1 = load_script("1_train_stage1")
    assert stage1.main(masks_argv) == 0
    contents = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    names = mark_old(folder.glob("*.png"))
    victim = names[0]
    (folder / victim).unlink()

    assert stage1.main(masks_argv) == 0  # only the missing one is made again
    assert sorted(p.name for p in folder.glob("*.png")) == names
    assert [n for n in names if not is_old(folder / n)] == [victim]
    assert (folder / victim).read_bytes() == contents[victim]

    mark_old(folder.glob("*.png"))
    assert stage1.main(masks_argv + ["--overwrite"]) == 0  # every one is made again, identically
    assert not any(is_old(folder / n) for n in names)
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == contents

    mark_old(folder.glob("*.png"))  # same checkpoint, another pseudo-mask setting: nothing is reused
    assert stage1.main(masks_argv + ["--set", "stage1.background_cam_scale=0.5"]) == 0
    assert not any(is_old(folder / n) for n in names)
    assert json.loads((folder / "manifest.json").read_text())["settings"]["background_cam_scale"] == 0.5


def test_stage2_refuses_foreign_or_partial_pseudo_masks(tmp_path, trained):
    argv, stage1_dir, pseudo, data = trained
    stage2 = load_script("2_train_stage2")
    manifest_path = pseudo / "manifest.json"
    original = manifest_path.read_text()
    try:
        manifest = json.loads(original)
        manifest["checkpoint_sha256"] = "f" * 64
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="another stage-1 checkpoint.*accept_foreign_pseudo_masks=true"):
            stage2.main(argv)
        cfg = load_config(argv[1], argv[3::2] + ["stage2.accept_foreign_pseudo_masks=true"])
        images, masks, _ = training_pairs(cfg)
        assert len(images) == len(masks) == 16

        manifest["checkpoint_sha256"], manifest["complete"] = file_sha256(stage1_dir / "checkpoint.pth"), False
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="partial or has no manifest"):
            stage2.main(argv)
        assert len(training_pairs(cfg)[0]) == 16  # accepted when asked for

        manifest_path.write_text(original)
        victim = sorted(pseudo.glob("*.png"))[0]
        kept = victim.read_bytes()
        victim.unlink()
        try:
            with pytest.raises(DataError, match="1 training images have no pseudo-mask"):
                training_pairs(cfg)  # a missing file is refused even when foreign masks are accepted
        finally:
            victim.write_bytes(kept)
        assert len(training_pairs(load_config(argv[1], argv[3::2]))[0]) == 16  # the genuine set is fine
    finally:
        manifest_path.write_text(original)
