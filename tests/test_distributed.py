"""Both stages and inference under torchrun: two CPU processes (gloo) against one process.

Every run is a real `python -m torch.distributed.run` launch in a subprocess, on tiny demo data made once
for the module. Evaluation, pseudo-masks and predictions must not depend on the number of processes.
"""
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_demo_args
from utils.checkpoint import STAGE1_FORMAT, STAGE2_FORMAT, load_checkpoint

pytestmark = pytest.mark.slow  # every test reads one two-process run (about 20 s to train)

# One epoch each. The deeper stage-1 taps, a higher stage-2 lr and more val images make masks non-constant
# after so little training, so the comparisons have teeth.
ONE_EPOCH = ("stage1.epochs=1", "stage1.out_indices=[1,2,3]", "stage2.epochs=1", "stage2.lr=0.1",
             "stage2.train_masks=ground_truth",  # a one-epoch model that surely predicts both classes
             "demo.val_images=8")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script, args, processes, expect_success=True):
    """Run a script in 1 plain process or under torchrun with `processes` CPU processes."""
    if processes == 1:
        command = [sys.executable, script, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_success:
        assert result.returncode == 0, f"{script} with {processes} process(es) failed:\n{result.stderr[-3000:]}"
    return result


def stage_args(root, *extra):
    return tiny_demo_args(root, *ONE_EPOCH, *extra)


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def leftover_temporaries(folder):
    return [p for p in Path(folder).rglob("*") if ".tmp" in p.name or ".rank" in p.name]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Stage 1 then stage 2, one epoch each, trained by two processes; outputs captured before later tests."""
    root = tmp_path_factory.mktemp("ddp")
    stage1 = launch("1_train_stage1.py", stage_args(root), 2)
    stage2 = launch("2_train_stage2.py", stage_args(root), 2)
    runs = root / "runs" / "demo"
    masks = root / "data" / "train" / "pseudo_mask"
    return {"root": root, "stage1_stdout": stage1.stdout, "stage2_stdout": stage2.stdout,
            "stage1": runs / "stage1", "stage2": runs / "stage2", "mask_dir": masks,
            "masks": png_bytes(masks), "manifest": json.loads((masks / "manifest.json").read_text()),
            "stage1_metrics": json.loads((runs / "stage1" / "metrics.json").read_text()),
            "stage2_metrics": json.loads((runs / "stage2" / "metrics.json").read_text()),
            "predictions": png_bytes(runs / "stage2" / "predictions" / "test")}


def test_two_processes_train_each_stage_once(two_process_run):
    run = two_process_run
    for stage, out, fmt, names in (("1", run["stage1"], STAGE1_FORMAT, ["checkpoint.pth"]),
                                   ("2", run["stage2"], STAGE2_FORMAT, ["best.pth", "last.pth"])):
        stdout = run[f"stage{stage}_stdout"]
        assert stdout.count(f"stage {stage} epoch 1:") == 1, "only rank 0 logs"
        assert len((out / "log.csv").read_text().strip().splitlines()) == 2
        for name in names:
            assert load_checkpoint(out / name, fmt)["epoch"] == 1
        assert not leftover_temporaries(out)
    assert run["stage1_stdout"].count("device cpu, 2 process(es)") == 1
    assert run["manifest"]["complete"] is True
    assert run["manifest"]["files"] == sorted(run["masks"]) and len(run["masks"]) == 48
    assert not leftover_temporaries(run["mask_dir"])
    # the per-epoch validation score (in-memory model on both ranks) is the score of the saved best.pth,
    # which holds only if every rank evaluates rank 0's BatchNorm statistics
    with open(run["stage2"] / "log.csv", newline="") as handle:
        logged = next(csv.DictReader(handle))
    assert float(logged["val_miou"]) == round(run["stage2_metrics"]["val"]["miou"], 5)


def test_pseudo_masks_and_cam_scores_do_not_depend_on_process_count(two_process_run):
    run, root = two_process_run, two_process_run["root"]
    args = stage_args(root) + ["--masks-only", "--overwrite"]
    launch("1_train_stage1.py", args, 1)
    one_process = png_bytes(run["mask_dir"])
    one_process_metrics = json.loads((run["stage1"] / "metrics.json").read_text())
    assert one_process == run["masks"], "masks written right after 2-process training differ from 1 process"
    assert one_process_metrics == run["stage1_metrics"]

    launch("1_train_stage1.py", args, 2)
    assert png_bytes(run["mask_dir"]) == one_process
    assert json.loads((run["stage1"] / "metrics.json").read_text()) == one_process_metrics
    assert json.loads((run["mask_dir"] / "manifest.json").read_text()) == run["manifest"]
    assert not leftover_temporaries(run["mask_dir"])


def test_stage2_metrics_and_predictions_do_not_depend_on_process_count(two_process_run):
    """The 2-process run ends by scoring best.pth on val and test; one process scores the same file."""
    run, root = two_process_run, two_process_run["root"]
    best = run["stage2"] / "best.pth"
    launch("2_train_stage2.py", stage_args(root, "stage2.epochs=0", f"stage2.init_from={best}",
                                           f"runs_dir={root / 'one_process'}"), 1)
    out = root / "one_process" / "demo" / "stage2"
    scored = json.loads((out / "metrics.json").read_text())
    assert scored.pop("best_epoch") == 0  # the given model as it is; the 2-process run's file was its epoch 1
    assert scored == {k: v for k, v in run["stage2_metrics"].items() if k != "best_epoch"}
    assert png_bytes(out / "predictions" / "test") == run["predictions"]
    assert sorted(run["predictions"]) == [f"test_{i:04d}.png" for i in range(3)]
    predicted = np.concatenate([np.asarray(Image.open(io.BytesIO(data))).ravel() for data in run["predictions"].values()])
    assert set(np.unique(predicted)) == {0, 1}, "an all-one-class model would make this comparison empty"


def test_batch_not_divisible_by_process_count_is_a_clear_error(two_process_run):
    root = two_process_run["root"]
    result = launch("1_train_stage1.py", stage_args(root, "stage1.batch_size=7", f"runs_dir={root / 'odd'}"), 2,
                    expect_success=False)
    assert result.returncode != 0
    assert "stage1.batch_size=7 is not divisible by the 2 processes" in result.stderr
    assert not (root / "odd" / "demo" / "stage1" / "checkpoint.pth").exists()


def test_inference_with_two_processes_writes_each_output_once(two_process_run):
    root = two_process_run["root"]
    inputs = root / "inference_inputs"
    inputs.mkdir()
    large = sorted((root / "data" / "test" / "img").glob("*.png"))          # larger than the window
    tiles = sorted((root / "data" / "train" / "img").glob("*.png"))[:5]     # batched as tiles
    for path in large + tiles:
        shutil.copy(path, inputs / path.name)
    outputs = {}
    for processes in (1, 2):
        out = root / f"inference_{processes}"
        launch("inference.py", ["--checkpoint", str(two_process_run["stage2"] / "best.pth"), "--input",
                                str(inputs), "--output", str(out), "--device", "cpu", "--batch-size", "2"],
               processes)
        with open(out / "summary.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["file"] for row in rows] == sorted(p.name for p in large + tiles), "one row per input"
        assert all(row["status"] == "ok" for row in rows)
        assert not leftover_temporaries(out)
        outputs[processes] = png_bytes(out)
    expected = {f"{Path(name).stem}_{kind}.png" for name in (p.name for p in large + tiles)
                for kind in ("mask", "overlay")}
    assert set(outputs[2]) == expected
    assert outputs[2] == outputs[1]
