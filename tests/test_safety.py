"""Untrusted checkpoints are refused before they can run code; faults during training stop it cleanly.

A checkpoint here is a file from someone else: one whose pickle would run a command must be refused by
every entry point that loads one (and the command must not run). A NaN/inf loss or an out-of-memory error
stops training with one sentence that says where and what to change, keeping the last good checkpoint.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, load_script, one_line_error, tiny_demo_args
from models.classifier import Stage1Classifier
from models.dpr import DPR
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import load_config
from utils.data.imageio import read_rgb
from utils.runtime import Runtime
from utils.stage2.predict import load_segmenter, predict_logits
import utils.stage2.training as stage2_training

SMALL = ["demo.train_images=16", "demo.val_images=2", "demo.test_images=2", "stage1.epochs=2",
         "stage2.epochs=2", "stage1.image_size=32", "stage1.cam_flip=false", "stage2.crop_size=32",
         "stage2.window=32", "stage2.train_masks=ground_truth"]
CPU = Runtime(torch.device("cpu"), None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


class TouchOnLoad:
    """Unpickling this creates a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, target, via_shell=False):
        self.target, self.via_shell = str(target), via_shell

    def __reduce__(self):
        if self.via_shell:
            return os.system, (f"touch '{self.target}'",)
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def write_evil_checkpoint(folder, flavour):
    """(checkpoint, the file its unpickling would create); the weapon is checked to be real first."""
    target = folder / "pwned"
    payload = {"format": "ibdr-stage2", "model": {"weight": TouchOnLoad(target, flavour == "os_system")},
               "meta": {}}
    path = folder / "evil.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=flavour != "legacy_format")
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert target.exists()
    target.unlink()
    return path, target


@pytest.fixture(params=["path_touch", "os_system", "legacy_format"])
def evil_checkpoint(request, tmp_path):
    return write_evil_checkpoint(tmp_path, request.param)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data and the arguments of a small run on it."""
    from utils.data.demo_data import ensure_demo_dataset
    tmp = tmp_path_factory.mktemp("safety")
    argv = tiny_demo_args(tmp, *SMALL)
    ensure_demo_dataset(load_config(argv[1], argv[3::2]))
    return tmp, argv


def run_args(tmp_path, demo, *extra):
    """A run of its own (runs dir, pseudo-masks) on the shared data."""
    _, argv = demo
    return argv + [a for o in (f"runs_dir={tmp_path / 'runs'}", f"data.pseudo_mask_dir={tmp_path / 'pseudo'}",
                               *extra) for a in ("--set", o)]


# ------------------------------------------------------------------------------------- safe loading
def test_load_checkpoint_refuses_code_in_a_pickle(evil_checkpoint):
    path, target = evil_checkpoint
    with pytest.raises(CheckpointError, match="refused, it holds objects that are not plain weights") as error:
        load_checkpoint(path, "ibdr-stage2")
    assert str(path) in str(error.value)
    with pytest.raises(CheckpointError, match="refused"):
        load_segmenter(path, "cpu")
    assert not target.exists()


def test_inference_refuses_code_in_a_pickle(tmp_path):
    path, target = write_evil_checkpoint(tmp_path, "os_system")
    (tmp_path / "in").mkdir()
    result = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(path), "--input",
                             str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0]
    assert not target.exists()


def test_stage2_init_from_and_stage1_resume_refuse_code_in_a_pickle(evil_checkpoint, tmp_path, demo, capsys):
    path, target = evil_checkpoint
    line = one_line_error(capsys, load_script("2_train_stage2").main,
                          run_args(tmp_path, demo, f"stage2.init_from={path}"))
    assert str(path) in line and "refused" in line
    stage1_checkpoint = tmp_path / "runs" / "demo" / "stage1" / "checkpoint.pth"
    stage1_checkpoint.parent.mkdir(parents=True)
    stage1_checkpoint.write_bytes(path.read_bytes())
    for flag in ("--resume", "--masks-only"):
        line = one_line_error(capsys, load_script("1_train_stage1").main, run_args(tmp_path, demo) + [flag])
        assert str(stage1_checkpoint) in line and "refused" in line
    assert not target.exists()


def test_safetensors_model_predicts_exactly_as_the_pth(tmp_path, demo):
    shared, _ = demo
    assert load_script("2_train_stage2").main(run_args(tmp_path, demo, "stage2.epochs=1")) == 0
    out = tmp_path / "runs" / "demo" / "stage2"
    from_pth, meta_pth = load_segmenter(out / "best.pth", "cpu")
    from_safetensors, meta_safetensors = load_segmenter(out / "best.safetensors", "cpu")
    assert meta_safetensors == meta_pth
    assert meta_pth["mpp"] == 0.5  # the training images' resolution (configs/demo.yaml data.mpp) travels along
    image = read_rgb(sorted((shared / "data" / "test" / "img").glob("*.png"))[0])
    logits = [predict_logits(model, image, CPU, 32, 0.25, 4, meta_pth["mean"], meta_pth["std"], 2)
              for model in (from_pth, from_safetensors)]
    assert torch.equal(logits[0], logits[1])

    inference = load_script("inference")
    masks = []
    for name in ("best.pth", "best.safetensors"):
        folder = tmp_path / f"out_{name}"
        assert inference.main(["--checkpoint", str(out / name), "--input", str(shared / "data" / "test" / "img"),
                               "--output", str(folder), "--device", "cpu"]) == 0
        masks.append({p.name: p.read_bytes() for p in sorted(folder.glob("*_mask.png"))})
    assert masks[0] and masks[0] == masks[1]


# --------------------------------------------------------------------------------- numerical faults
def poison_call(calls, at, value):
    """A decorator: the `at`-th call's loss (alone, or first of a tuple) is multiplied by `value` (nan or inf)."""
    def wrap(function):
        def wrapped(*args, **kwargs):
            calls.append(1)
            result = function(*args, **kwargs)
            if len(calls) != at:
                return result
            if isinstance(result, tuple):
                return (result[0] * value,) + tuple(result[1:])
            return result * value
        return wrapped
    return wrap


def test_nan_loss_stops_stage1_and_keeps_last_good_checkpoint(tmp_path, demo, monkeypatch, capsys):
    stage1 = load_script("1_train_stage1")
    # 16 tiles in batches of 8: two steps per epoch, so the 4th loss is epoch 2's second step
    monkeypatch.setattr(stage1, "classification_loss",
                        poison_call([], 4, float("nan"))(stage1.classification_loss))
    line = one_line_error(capsys, stage1.main, run_args(tmp_path, demo))
    checkpoint = tmp_path / "runs" / "demo" / "stage1" / "checkpoint.pth"
    assert "nan at epoch 2, step 4 " in line and str(checkpoint) in line
    state = load_checkpoint(checkpoint, "ibdr-stage1")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "pseudo").exists()


def test_infinite_loss_stops_stage2_and_keeps_last_good_checkpoint(tmp_path, demo, monkeypatch, capsys):
    stage2 = load_script("2_train_stage2")

    class PoisonedLoss(stage2_training.IICBLoss):
        calls = []
        forward = poison_call(calls, 6, float("inf"))(stage2_training.IICBLoss.forward)  # main + aux per step

    monkeypatch.setattr(stage2_training, "IICBLoss", PoisonedLoss)
    line = one_line_error(capsys, stage2.main, run_args(tmp_path, demo))
    out = tmp_path / "runs" / "demo" / "stage2"
    assert "inf at epoch 2, step 3 " in line and str(out / "last.pth") in line  # 16 tiles, batches of 8
    assert load_checkpoint(out / "last.pth", "ibdr-stage2")["epoch"] == 1
    load_segmenter(out / "best.pth", "cpu")
    assert not (out / "metrics.json").exists()


def raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_setting_to_lower(tmp_path, demo, monkeypatch, capsys):
    monkeypatch.setattr(Stage1Classifier, "forward", raise_oom)
    line = one_line_error(capsys, load_script("1_train_stage1").main, run_args(tmp_path, demo))
    assert "out of memory" in line and "stage1.batch_size" in line

    monkeypatch.setattr(DPR, "forward", raise_oom)
    line = one_line_error(capsys, load_script("2_train_stage2").main, run_args(tmp_path, demo))
    assert "out of memory" in line and "stage2.batch_size" in line


def test_out_of_memory_while_evaluating_or_making_masks_names_its_setting(tmp_path, demo, monkeypatch, capsys):
    real_dpr_forward = DPR.forward

    def dpr_forward(self, x):
        return real_dpr_forward(self, x) if self.training else raise_oom()

    monkeypatch.setattr(DPR, "forward", dpr_forward)
    line = one_line_error(capsys, load_script("2_train_stage2").main, run_args(tmp_path, demo, "stage2.epochs=1"))
    assert "out of memory" in line and "stage2.eval_batch_size" in line

    monkeypatch.setattr(Stage1Classifier, "cams", raise_oom)
    line = one_line_error(capsys, load_script("1_train_stage1").main, run_args(tmp_path, demo, "stage1.epochs=1"))
    assert "out of memory" in line and "stage1.cam_batch_size" in line
