"""`--resume` after a killed run ends where an uninterrupted run ends; the same seed gives the same files.

The interrupted run is a real process killed with SIGKILL right after it wrote its first checkpoint, so
nothing from its memory (RNG, optimiser, data-loader order) survives except what the checkpoint holds.
"""
import csv
import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, load_script, tiny_demo_args
from utils.config import load_config

pytestmark = pytest.mark.slow  # killed runs and the uninterrupted runs they are held against

SMALL = ["demo.train_images=16", "stage1.epochs=2", "stage2.epochs=2", "stage2.train_masks=ground_truth",
         "stage1.cam_flip=false", "stage1.image_size=32", "stage2.crop_size=32", "stage2.window=32",
         "num_workers=1"]  # one loader worker: its augmentation seeds must resume too

# Runs a numbered script, SIGKILLing the process right after the first save of a given file name.
KILL_AFTER_SAVE = """
import importlib, os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
torch.use_deterministic_algorithms(True)
script = importlib.import_module({script!r})
module = importlib.import_module({module!r}) if {module!r} else script
real_save = getattr(module, {function!r})
def save_then_die(path, *args, **kwargs):
    real_save(path, *args, **kwargs)
    if Path(path).name == {target!r}:
        os.kill(os.getpid(), signal.SIGKILL)
setattr(module, {function!r}, save_then_die)
script.main(sys.argv[1:])
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def killed_after_save(tmp_path, script, function, target, argv, module=""):
    """module: where the script's save function lives, when not in the script itself."""
    driver = tmp_path / f"kill_{script}.py"
    driver.write_text(KILL_AFTER_SAVE.format(root=str(ROOT), script=script, module=module, function=function,
                                             target=target))
    result = subprocess.run([sys.executable, str(driver), *argv], cwd=ROOT, capture_output=True, text=True,
                            env=ONE_THREAD, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    """CPU training is bit-for-bit repeatable only with deterministic kernels (conv backward sums in any order)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One small demo data set shared by every run here (runs never write into it)."""
    from utils.data.demo_data import ensure_demo_dataset
    root = tmp_path_factory.mktemp("shared") / "data"
    argv = run_args(root.parent, root, "unused")  # ["--config", path, "--set", override, ...]
    ensure_demo_dataset(load_config(argv[1], argv[3::2]))
    return root


def run_args(tmp_path, data_root, run, *extra):
    """Arguments for a run of its own: runs dir and pseudo-mask folder per run, data shared."""
    return tiny_demo_args(tmp_path, *SMALL, f"data.root={data_root}", f"runs_dir={tmp_path / run}",
                          f"data.pseudo_mask_dir={tmp_path / run / 'pseudo'}", *extra)


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(path_a, path_b, exact):
    a, b = model_state(path_a), model_state(path_b)
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def log_without_times(path):
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def file_bytes(folder, pattern="*.png"):
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def stage1_straight(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("stage1")
    assert load_script("1_train_stage1").main(run_args(tmp, data_root, "straight")) == 0
    return tmp / "straight"


@pytest.fixture(scope="module")
def stage2_straight(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("stage2")
    assert load_script("2_train_stage2").main(run_args(tmp, data_root, "straight")) == 0
    return tmp / "straight"


def test_stage1_resume_after_kill_matches_uninterrupted_run(tmp_path, data_root, stage1_straight):
    argv = run_args(tmp_path, data_root, "resumed")
    out = tmp_path / "resumed" / "demo" / "stage1"
    killed_after_save(tmp_path, "1_train_stage1", "save_checkpoint", "checkpoint.pth", argv)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not (out / "metrics.json").exists()

    assert load_script("1_train_stage1").main(argv + ["--resume"]) == 0
    straight = stage1_straight / "demo" / "stage1"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert_same_weights(straight / "checkpoint.pth", out / "checkpoint.pth", exact=False)
    assert log_without_times(out / "log.csv") == log_without_times(straight / "log.csv")
    assert json.loads((out / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())
    assert file_bytes(tmp_path / "resumed" / "pseudo") == file_bytes(stage1_straight / "pseudo")


def test_stage2_resume_after_kill_matches_uninterrupted_run(tmp_path, data_root, stage2_straight):
    argv = run_args(tmp_path, data_root, "resumed")
    out = tmp_path / "resumed" / "demo" / "stage2"
    killed_after_save(tmp_path, "2_train_stage2", "save_stage2", "last.pth", argv, module="utils.stage2.training")
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1
    assert not (out / "metrics.json").exists()

    assert load_script("2_train_stage2").main(argv + ["--resume"]) == 0
    straight = stage2_straight / "demo" / "stage2"
    resumed_last = torch.load(out / "last.pth", weights_only=True)
    straight_last = torch.load(straight / "last.pth", weights_only=True)
    assert (resumed_last["epoch"], resumed_last["step"]) == (straight_last["epoch"], straight_last["step"])
    assert resumed_last["best_miou"] == pytest.approx(straight_last["best_miou"])  # the best score survives
    for name in ("last.pth", "best.pth"):
        assert_same_weights(straight / name, out / name, exact=False)
    assert log_without_times(out / "log.csv") == log_without_times(straight / "log.csv")
    assert json.loads((out / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, data_root):
    """--resume on a fresh run directory is not an error: it trains from epoch 1."""
    argv = run_args(tmp_path, data_root, "fresh", "stage2.epochs=1")
    assert load_script("2_train_stage2").main(argv + ["--resume"]) == 0
    assert torch.load(tmp_path / "fresh" / "demo" / "stage2" / "last.pth", weights_only=True)["epoch"] == 1


def test_same_seed_gives_byte_identical_pseudo_masks(tmp_path, data_root, stage1_straight):
    assert load_script("1_train_stage1").main(run_args(tmp_path, data_root, "again")) == 0
    again = file_bytes(tmp_path / "again" / "pseudo")
    assert again and again == file_bytes(stage1_straight / "pseudo")
    assert_same_weights(stage1_straight / "demo" / "stage1" / "checkpoint.pth",
                        tmp_path / "again" / "demo" / "stage1" / "checkpoint.pth", exact=True)


def test_same_seed_gives_byte_identical_predictions(tmp_path, data_root, stage2_straight):
    assert load_script("2_train_stage2").main(run_args(tmp_path, data_root, "again")) == 0
    first = stage2_straight / "demo" / "stage2" / "predictions" / "test"
    again = tmp_path / "again" / "demo" / "stage2" / "predictions" / "test"
    assert file_bytes(again) and file_bytes(again) == file_bytes(first)
    assert_same_weights(stage2_straight / "demo" / "stage2" / "best.pth",
                        tmp_path / "again" / "demo" / "stage2" / "best.pth", exact=True)


def test_resume_continues_loss_scaling_where_it_stopped(tmp_path, data_root, monkeypatch):
    """fp16 loss scaling, played on the CPU: the scale doubles after every good step and must survive --resume."""
    from utils.runtime import Runtime
    monkeypatch.setattr(Runtime, "grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
    argv = run_args(tmp_path, data_root, "scaled")
    last = tmp_path / "scaled" / "demo" / "stage2" / "last.pth"
    assert load_script("2_train_stage2").main(argv + ["--set", "stage2.epochs=1"]) == 0
    first = torch.load(last, weights_only=True)
    assert first["scaler"]["scale"] == 2.0 ** (10 + first["step"])
    assert load_script("2_train_stage2").main(argv + ["--resume"]) == 0
    second = torch.load(last, weights_only=True)
    assert second["epoch"] == 2 and second["scaler"]["scale"] == 2.0 ** (10 + second["step"])
