"""What a user can count on around a run's files: nothing is overwritten silently, an untrained network is
never scored as the run's model, a run that fails leaves the finished run's record as it was, and mistakes
about files and folders stop with one sentence before any work, never a traceback.

The scripts run in this process through the wrapper their command lines use (utils/cli.run_main)."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, one_line_error, save_png, tiny_demo_args
from models.dpr import DPR
from utils.cli import run_main
from utils.data.imageio import DataError


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def run_script(capsys, name, argv):
    """(exit code, stdout, stderr) of a script run as its command line runs it."""
    with pytest.raises(SystemExit) as stop:
        run_main(load_script(name).main, [str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err[-2000:]
    return stop.value.code, out.out, out.err


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: stage 1 and stage 2, one epoch each, under <tmp>/runs/demo."""
    tmp = tmp_path_factory.mktemp("finished")
    args = tiny_demo_args(tmp, "stage1.epochs=1", "stage2.epochs=1")
    assert load_script("1_train_stage1").main(args) == 0
    assert load_script("2_train_stage2").main(args) == 0
    return tmp


def copy_of(finished, folder):
    """A copy of the finished run and its data, and the command line that points at the copy."""
    shutil.copytree(finished / "data", folder / "data")
    shutil.copytree(finished / "runs", folder / "runs")
    return tiny_demo_args(folder, "stage1.epochs=1", "stage2.epochs=1")


def test_zero_stage1_epochs_uses_the_trained_checkpoint_as_it_is(finished, tmp_path, capsys):
    args = copy_of(finished, tmp_path)
    stage1 = tmp_path / "runs" / "demo" / "stage1"
    before, weights = json.loads((stage1 / "metrics.json").read_text()), digest(stage1 / "checkpoint.pth")
    code, out, _ = run_script(capsys, "1_train_stage1", args + ["--set", "stage1.epochs=0"])
    assert code == 0 and "used as it is" in out and "stage 1 epoch" not in out
    after = json.loads((stage1 / "metrics.json").read_text())
    for split in ("train", "val", "test"):  # scored with the trained network, not a fresh one
        assert after[split]["miou"] == pytest.approx(before[split]["miou"], abs=1e-9), split
    assert digest(stage1 / "checkpoint.pth") == weights
    assert "epochs: 1\n" in (stage1 / "config.yaml").read_text()  # the record describes the checkpoint beside it


def test_zero_stage1_epochs_without_a_checkpoint_stops_in_every_entry_point(tmp_path, capsys):
    args = tiny_demo_args(tmp_path, "stage1.epochs=0")
    checkpoint = str(tmp_path / "runs" / "demo" / "stage1" / "checkpoint.pth")
    for script in ("1_train_stage1", "run_pipeline"):
        line = one_line_error(capsys, load_script(script).main, args)
        assert "--set stage1.epochs=0: 'stage1.epochs' is 0" in line and checkpoint in line, line
    ablation = tmp_path / "ablation"
    line = one_line_error(capsys, load_script("ablate").main, tiny_demo_args(tmp_path) + [
        "--stage1-epochs", "0", "--output", str(ablation)])
    assert "--stage1-epochs 0: 'stage1.epochs' is 0" in line and str(ablation / "stage1_no_ibm") in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists() and not ablation.exists()


def test_a_run_that_fails_after_start_up_keeps_the_finished_runs_record(finished, capsys):
    args = tiny_demo_args(finished, "stage1.epochs=1", "stage2.epochs=1")
    run = finished / "runs" / "demo"
    kept = {path: digest(path) for stage in ("stage1", "stage2") for path in sorted((run / stage).iterdir())
            if path.is_file()}
    missing = ["--set", f"data.root={finished / 'missing'}", "--set", "data.demo=false"]
    for script, extra in (("1_train_stage1", missing), ("2_train_stage2", missing),
                          ("2_train_stage2", ["--set", "stage2.crop_size=200"]),
                          ("2_train_stage2", ["--set", "stage2.epochs=0"])):
        code, _, err = run_script(capsys, script, args + extra)
        assert code == 2 and err.count("error: ") == 1, (extra, err)
    assert {path: digest(path) for path in kept} == kept
    code, table, _ = run_script(capsys, "report", [run])
    assert code == 0 and "stage 2: DPR (epoch 1 of 1, chosen on val)" in table


def test_stage2_under_another_name_refuses_pseudo_masks_no_run_of_that_name_made(finished, capsys):
    args = tiny_demo_args(finished, "stage1.epochs=1", "stage2.epochs=1", "name=other")
    line = one_line_error(capsys, load_script("2_train_stage2").main, args)
    assert "stage-1 run 'demo'" in line and "stage2.accept_foreign_pseudo_masks=true" in line
    assert str(finished / "runs" / "other" / "stage1" / "checkpoint.pth") in line
    assert not (finished / "runs" / "other").exists()


def test_resume_with_another_network_names_the_setting_that_differs(finished, capsys):
    args = tiny_demo_args(finished, "stage1.epochs=2", "stage2.epochs=2")
    run = finished / "runs" / "demo"
    kept = {path: digest(path) for path in (run / "stage1" / "checkpoint.pth", run / "stage2" / "last.pth")}
    line = one_line_error(capsys, load_script("1_train_stage1").main,
                          args + ["--resume", "--set", "stage1.backbone=resnet14t"])
    assert "stage1.backbone 'resnet10t'" in line and "'resnet14t' (from --set stage1.backbone=resnet14t)" in line
    line = one_line_error(capsys, load_script("2_train_stage2").main,
                          args + ["--resume", "--set", "stage2.encoder=resnet14t"])
    assert "stage2.encoder 'resnet10t'" in line and "--resume" in line
    assert {path: digest(path) for path in kept} == kept


def test_whole_image_scores_do_not_depend_on_where_an_odd_sized_tile_sorts(finished, tmp_path, capsys):
    scored = []
    for name in ("aaa odd[1, 1].png", "zzz odd[1, 1].png"):
        folder = tmp_path / name[:3]
        args = copy_of(finished, folder)
        save_png(folder / "data" / "train" / "img" / name, np.full((40, 52, 3), 180, np.uint8))
        code, out, _ = run_script(capsys, "1_train_stage1", args + ["--masks-only"])
        assert code == 0 and "over 64x64 px tiles" in out
        scored.append(json.loads((folder / "runs" / "demo" / "stage1" / "metrics.json").read_text()))
    for split in ("val", "test"):
        assert scored[0][split] == scored[1][split]


# ------------------------------------------------------------------ inputs, outputs and model files

CLASSES = ["background", "gland"]


def stage2_file(path, **meta_changes):
    """An untrained stage-2 model file with the given metadata changes."""
    meta = {"encoder": "resnet10t", "classes": CLASSES, "palette": [[239, 239, 239], [190, 61, 42]],
            "mean": [0.5] * 3, "std": [0.25] * 3, "window": 32, "overlap": 0.25, "background": 0, **meta_changes}
    torch.manual_seed(0)
    torch.save({"format": "ibdr-stage2", "model": DPR("resnet10t", len(meta["classes"])).state_dict(),
                "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return stage2_file(tmp_path_factory.mktemp("model") / "best.pth")


def tile(seed, size=(24, 24)):
    return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def infer(model_file, inputs, output, *extra):
    return [str(a) for a in ("--checkpoint", model_file, "--input", inputs, "--output", output, "--device", "cpu",
                             *extra)]


def test_inference_refuses_inputs_whose_outputs_would_share_a_name(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    save_png(inputs / "a.png", tile(0))
    Image.fromarray(tile(1)).save(inputs / "a.jpg")
    Image.fromarray(tile(2)).save(inputs / "a_png.tif")
    line = one_line_error(capsys, load_script("inference").main, infer(model_file, inputs, tmp_path / "out"))
    assert "'a.jpg' and 'a.png' would both write 'a_mask.png'" in line
    assert not (tmp_path / "out").exists()  # found when the inputs are listed, before any work
    (inputs / "a.jpg").unlink()
    code, out, _ = run_script(capsys, "inference", infer(model_file, inputs, tmp_path / "out"))
    assert code == 0 and "2 done" in out
    assert {p.name for p in (tmp_path / "out").glob("*_mask.png")} == {"a_mask.png", "a_png_mask.png"}
    # two class names that make one file name: their probability maps would share it
    clashing = stage2_file(tmp_path / "clash.pth", classes=["gland 1", "gland_1"])
    line = one_line_error(capsys, load_script("inference").main,
                          infer(clashing, inputs, tmp_path / "probs", "--save-probs"))
    assert "a_prob_gland_1.png" in line and not (tmp_path / "probs").exists()


def test_training_and_held_out_images_whose_names_clash_are_refused(tmp_path):
    from utils.data.datasets import split_items, train_items
    save_png(tmp_path / "train" / "img" / "dup[1, 1].png", tile(0))
    Image.fromarray(tile(1)).save(tmp_path / "train" / "img" / "dup[1, 1].jpg")
    with pytest.raises(DataError, match=r"'dup\[1, 1\].jpg' and 'dup\[1, 1\].png' share the name 'dup'"):
        train_items(tmp_path, 2)
    for name in ("a.png", "A.bmp"):  # one name to macOS and Windows
        save_png(tmp_path / "val" / "img" / name, tile(2))
        save_png(tmp_path / "val" / "mask" / name, np.zeros((24, 24), np.uint8))
    with pytest.raises(DataError, match=r"'A.bmp' and 'a.png' share the name 'a'"):
        split_items(tmp_path, "val")


def test_a_file_name_that_is_not_utf8_is_one_sentence(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    save_png(inputs / "good.png", tile(0))
    with open(os.fsencode(inputs) + b"/bad\xff\xfename.png", "wb") as handle:
        handle.write((inputs / "good.png").read_bytes())
    line = one_line_error(capsys, load_script("inference").main, infer(model_file, inputs, tmp_path / "out"))
    assert "bad\\xff\\xfename.png" in line and "UTF-8" in line and not (tmp_path / "out").exists()
    from utils.data.imageio import list_images
    with pytest.raises(DataError, match="not valid UTF-8"):
        list_images(inputs)


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    save_png(inputs / "a.png", tile(0))
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me\n")
    for output in (taken, taken / "masks"):
        line = one_line_error(capsys, load_script("inference").main, infer(model_file, inputs, output))
        assert f"--output {output}" in line and f"{taken} is a file" in line
    assert taken.read_text() == "keep me\n"
    line = one_line_error(capsys, load_script("1_train_stage1").main,
                          tiny_demo_args(tmp_path, f"runs_dir={taken}"))
    assert f"--set runs_dir={taken}: 'runs_dir'" in line and f"{taken} is a file" in line
    assert not (tmp_path / "data").exists()


def test_report_on_damaged_run_files_is_one_sentence(tmp_path, capsys):
    stage = tmp_path / "run" / "stage1"
    stage.mkdir(parents=True)
    for text, expected in (('{"val": {"miou": 0.5', "not readable JSON"), ("", "not readable JSON"),
                           ("[1, 2]", "holds a list"), ('{"val": 3, "images": {"val": ["a"]}}', "not as this project")):
        (stage / "metrics.json").write_text(text)
        line = one_line_error(capsys, load_script("report").main, [str(tmp_path / "run")])
        assert expected in line and "run" in line, line
    (stage / "metrics.json").write_text('{"images": {}}')
    (stage / "config.yaml").write_text("- just\n- a list\n")
    line = one_line_error(capsys, load_script("report").main, [str(tmp_path / "run")])
    assert str(stage / "config.yaml") in line


@pytest.mark.parametrize("changes, expected", [
    ({"window": 0}, "window 0"),
    ({"palette": [[239, 239, 239]]}, "1 colours for 2 classes"),
    ({"overlap": 1.5}, "overlap 1.5"),
    ({"background": 7}, "background 7"),
    ({"std": [0.0, 0.2, 0.2]}, "std [0.0, 0.2, 0.2]"),
])
def test_tampered_model_metadata_is_refused_when_the_file_is_loaded(tmp_path, capsys, changes, expected):
    inputs = tmp_path / "in"
    save_png(inputs / "a.png", tile(0))
    tampered = stage2_file(tmp_path / "tampered.pth", **changes)
    line = one_line_error(capsys, load_script("inference").main, infer(tampered, inputs, tmp_path / "out"))
    assert str(tampered) in line and expected in line and "re-export" in line
    assert not (tmp_path / "out").exists()


def test_a_runs_first_checkpoint_replaces_the_previous_record_whole(tmp_path, capsys):
    """From its first checkpoint on, the folder holds the new run: the previous run's metrics, which describe a
    model that is gone, go with its config, and the rerun says so at start-up."""
    from utils.config import load_config
    from utils.run_folder import announce_rerun, begin_record
    for name in ("metrics.json", "run.json", "config.yaml"):
        (tmp_path / name).write_text("{}\n")
    announce_rerun(tmp_path)
    assert "holds a finished run" in capsys.readouterr().out
    begin_record(load_config(None, ["stage1.epochs=3"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert "epochs: 3" in (tmp_path / "config.yaml").read_text()


def check_records(folder, data_root):
    """Every record of a run describes exactly the files beside it: config.yaml, log.csv and metrics.json against
    the checkpoints, the pseudo-masks' manifest against its checkpoint, settings and files."""
    import csv

    import yaml
    from utils.checkpoint import STAGE1_FORMAT, STAGE2_FORMAT, load_checkpoint
    from utils.stage1.pseudo_masks import file_sha256, mask_settings
    stage1, stage2 = folder / "stage1", folder / "stage2"

    def rows(path):
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    config1 = yaml.safe_load((stage1 / "config.yaml").read_text())
    checkpoint1 = load_checkpoint(stage1 / "checkpoint.pth", STAGE1_FORMAT)
    assert config1["stage1"]["epochs"] == checkpoint1["epoch"] == len(rows(stage1 / "log.csv"))
    manifest = json.loads((data_root / "train" / "pseudo_mask" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["checkpoint_sha256"] == file_sha256(stage1 / "checkpoint.pth")
    assert manifest["settings"] == mask_settings(config1["stage1"])
    on_disk = sorted(p.name for p in (data_root / "train" / "pseudo_mask").glob("*.png"))
    assert manifest["files"] == on_disk
    config2 = yaml.safe_load((stage2 / "config.yaml").read_text())
    last = load_checkpoint(stage2 / "last.pth", STAGE2_FORMAT)
    best = load_checkpoint(stage2 / "best.pth", STAGE2_FORMAT)
    log = rows(stage2 / "log.csv")
    assert config2["stage2"]["epochs"] == last["epoch"] == len(log) == int(log[-1]["epoch"])
    metrics = json.loads((stage2 / "metrics.json").read_text())
    assert metrics["best_epoch"] == best["epoch"]
    assert sorted(p.stem for p in (stage2 / "predictions" / "test").glob("*.png")) == sorted(metrics["images"]["test"])


def test_reruns_resumes_and_partial_runs_leave_every_record_true(finished, tmp_path, capsys):
    """Run; resume both stages to more epochs; ask a resume for fewer (refused, nothing changed); remake the
    pseudo-masks with other settings; rerun stage 2 on a subset: after each, every record fits its files."""
    args = copy_of(finished, tmp_path)
    run, data = tmp_path / "runs" / "demo", tmp_path / "data"
    check_records(run, data)
    more = args + ["--set", "stage1.epochs=2", "--set", "stage2.epochs=2", "--resume"]
    assert run_script(capsys, "1_train_stage1", more)[0] == 0
    assert run_script(capsys, "2_train_stage2", more)[0] == 0
    check_records(run, data)
    before = {p: digest(p) for p in sorted(run.rglob("*")) if p.is_file()}
    for script, setting in (("1_train_stage1", "stage1.epochs=1"), ("2_train_stage2", "stage2.epochs=1")):
        code, _, err = run_script(capsys, script, more + ["--set", setting])
        last = err.strip().splitlines()[-1]
        assert code == 2 and "has already trained 2 epochs" in last and "at least 2" in last
    assert {p: digest(p) for p in sorted(run.rglob("*")) if p.is_file()} == before  # nothing touched
    # the pseudo-mask step again, with another CAM setting; stage 2 then refuses masks its run did not learn from
    assert run_script(capsys, "1_train_stage1", more[:-1] + ["--masks-only", "--set", "stage1.cam_flip=false"])[0] == 0
    again = args + ["--set", "stage2.epochs=1", "--set", "stage2.max_train_images=24"]
    assert run_script(capsys, "2_train_stage2", again + ["--set", "stage1.epochs=2"])[0] == 0
    check_records(run, data)
    assert "cam_flip: false" in (run / "stage1" / "config.yaml").read_text()
    # --resume where nothing was saved yet says so, and trains from the start
    elsewhere = again + ["--set", f"runs_dir={tmp_path / 'elsewhere'}", "--set", "stage1.epochs=2", "--resume",
                         "--set", "stage2.accept_foreign_pseudo_masks=true"]  # no stage-1 run there
    code, out, err = run_script(capsys, "2_train_stage2", elsewhere)
    assert code == 0, err[-500:]
    assert "--resume: no " in out and "starts at epoch 1" in out
    assert (tmp_path / "elsewhere" / "demo" / "stage2" / "last.pth").is_file()
