"""report.py RUN draws RUN/curves.png from the stages' log.csv files: one panel per stage that has a log."""
import json

import numpy as np
import yaml
from PIL import Image

from conftest import load_script
from utils.curves import DPI, PANEL_INCHES

PANEL_SIZE = (round(PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))


def write_log(path, fields, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(fields)] + [",".join(str(v) for v in row) for row in rows]) + "\n")


def make_run(folder, stage1_rows=None, stage2_rows=None, keep_epoch="best_val", best_epoch=3):
    """A run folder as the numbered scripts leave it, with only what report.py reads."""
    config = {"name": "curves", "data": {"root": str(folder / "no_data")}, "stage2": {"keep_epoch": keep_epoch,
                                                                                        "epochs": 4}}
    scored = {"val": {"miou": 0.8, "mdice": 0.85}, "images": {"val": ["a"]}}
    for stage in ("stage1", "stage2"):
        (folder / stage).mkdir(parents=True, exist_ok=True)
        (folder / stage / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = {**scored, "best_epoch": best_epoch} if stage == "stage2" else scored
        (folder / stage / "metrics.json").write_text(json.dumps(metrics))
    if stage1_rows is not None:
        write_log(folder / "stage1" / "log.csv", ["epoch", "loss", "accuracy", "lr", "seconds"], stage1_rows)
    if stage2_rows is not None:
        write_log(folder / "stage2" / "log.csv", ["epoch", "loss", "val_miou", "val_mdice", "lr", "seconds"],
                  stage2_rows)
    return folder


STAGE1 = [(1, 0.69, 0.55, 0.01, 1.0), (2, 0.52, 0.71, 0.008, 1.0), (3, 0.40, 0.83, 0.005, 1.0)]
STAGE2 = [(1, 0.9, 0.41, 0.5, 0.01, 2.0), (2, 0.6, 0.62, 0.7, 0.007, 2.0), (3, 0.45, 0.78, 0.84, 0.004, 2.0),
          (4, 0.41, 0.74, 0.81, 0.001, 2.0)]


def drawn_columns(picture):
    """Which pixel columns hold anything but white: where panels (axes, curves, text) were drawn."""
    return (np.asarray(picture.convert("RGB")) < 250).any(axis=(0, 2))


def test_both_logs_give_two_panels_side_by_side(tmp_path, capsys):
    report = load_script("report")
    run = make_run(tmp_path / "run", STAGE1, STAGE2)
    assert report.main([str(run)]) == 0
    captured = capsys.readouterr()
    assert "curves.png" in captured.err and "curves.png" not in captured.out  # the Markdown stays as it was
    picture = Image.open(run / "curves.png")
    assert picture.format == "PNG" and picture.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])
    drawn = drawn_columns(picture)
    half = PANEL_SIZE[0]
    assert drawn[:half].mean() > 0.5 and drawn[half:].mean() > 0.5  # both halves carry a panel
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # written under a temporary name first


def test_a_missing_or_empty_log_leaves_its_panel_out(tmp_path, capsys):
    report = load_script("report")
    only_stage2 = make_run(tmp_path / "no_stage1_log", None, STAGE2)
    assert report.main([str(only_stage2)]) == 0
    assert Image.open(only_stage2 / "curves.png").size == PANEL_SIZE

    header_only = make_run(tmp_path / "empty_stage2_log", STAGE1, [])
    assert report.main([str(header_only)]) == 0
    assert Image.open(header_only / "curves.png").size == PANEL_SIZE

    nothing = make_run(tmp_path / "no_logs")
    (nothing / "stage2" / "log.csv").write_text("")  # zero bytes, as a run killed before its first epoch leaves it
    assert report.main([str(nothing)]) == 0
    assert not (nothing / "curves.png").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_the_kept_epoch_is_the_best_one_or_the_last(tmp_path):
    report = load_script("report")
    rows = [dict(zip(["epoch", "loss", "val_miou"], map(str, row))) for row in STAGE2]
    chosen = make_run(tmp_path / "best", STAGE1, STAGE2, best_epoch=3)
    assert report.kept_epoch(chosen / "stage2", rows) == (3, ", best val mIoU")
    last = make_run(tmp_path / "last", STAGE1, STAGE2, keep_epoch="last", best_epoch=None)
    assert report.kept_epoch(last / "stage2", rows) == (4, ", the last")
    unknown = make_run(tmp_path / "unknown", STAGE1, STAGE2, best_epoch=None)
    assert report.kept_epoch(unknown / "stage2", rows) == (None, "")


def test_a_stage_without_scores_gets_no_score_axis():
    """A final model trained without val images logs no val mIoU: its panel has the loss axis only."""
    from matplotlib.figure import Figure

    from utils.curves import Panel, draw_panel
    rows = [{"epoch": str(e), "loss": str(1.0 / e), "val_miou": ""} for e in (1, 2, 3)]
    for scored, expected_axes in ((False, 1), (True, 2)):
        if scored:
            rows = [dict(row, val_miou=str(0.5 + 0.1 * i)) for i, row in enumerate(rows)]
        figure = Figure()
        draw_panel(figure.subplots(), Panel("stage 2: DPR", rows, "val_miou", "val mIoU", 3, ", the last"))
        assert len(figure.axes) == expected_axes
