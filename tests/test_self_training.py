"""Self-training rounds: a stage-2 model relabels its training images, and the next round learns from them."""
import json

import numpy as np

from conftest import load_script, one_line_error, tiny_demo_args
from utils.data.datasets import train_items
from utils.data.imageio import IGNORE_INDEX, read_mask
from utils.stage1.pseudo_masks import file_sha256, read_manifest


def test_two_rounds_relabel_with_the_labels_and_keep_the_record(tmp_path, capsys):
    stage1, stage2 = load_script("1_train_stage1"), load_script("2_train_stage2")
    args = tiny_demo_args(tmp_path, "stage1.epochs=1", "stage2.epochs=1")
    assert stage1.main(args) == 0
    assert stage2.main(args + ["--set", "stage2.rounds=2", "--set", "stage2.relabel_confidence=0.7"]) == 0
    out = tmp_path / "runs" / "demo" / "stage2"
    for name in ("best.pth", "last.pth", "log.csv", "config.yaml"):
        assert (out / "round1" / name).is_file() and (out / name).is_file(), name
    folder = out / "masks_round2"
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["checkpoint_sha256"] == file_sha256(out / "round1" / "best.pth")
    items = train_items(tmp_path / "data", 2)
    assert sorted(manifest["files"]) == sorted(item.image.with_suffix(".png").name for item in items)
    unlabelled = 0
    for item in items:
        mask = read_mask(folder / item.image.with_suffix(".png").name, "index", 2)
        absent = [c for c in range(2) if not item.label[c]]
        assert not np.isin(mask, absent).any(), item.image.name  # a class the tile's label lacks never appears
        unlabelled += int((mask == IGNORE_INDEX).sum())
    assert unlabelled > 0  # pixels under the confidence bar are left out of the loss
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["self_training"]["rounds"] == 2
    assert 0 <= metrics["self_training"]["relabelled_train"]["2"]["miou"] <= 1

    # resumed with another number of rounds: refused in one sentence, the record untouched
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    line = one_line_error(capsys, stage2.main, args + ["--set", "stage2.rounds=1", "--resume"])
    assert "2 self-training round(s)" in line and "stage2.rounds=2" in line
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    # a round that starts from a trained model: round 1 only scores it, round 2 learns from its masks afresh
    model = out / "round1" / "best.pth"
    again = ["--set", "name=again", "--set", "stage2.rounds=2", "--set", "stage2.epochs=0",
             "--set", "stage2.round_epochs=1", "--set", f"stage2.init_from={model}",
             "--set", "stage2.accept_foreign_pseudo_masks=true"]
    assert stage2.main(args + again) == 0
    again_out = tmp_path / "runs" / "again" / "stage2"
    assert read_manifest(again_out / "masks_round2")["checkpoint_sha256"] == file_sha256(again_out / "round1" / "best.pth")
    assert read_manifest(folder) == manifest  # the first run's masks are its own still
    assert len((tmp_path / "runs" / "again" / "stage2" / "log.csv").read_text().strip().splitlines()) == 2
    # its table names the last round's trained epoch, not round 1's untrained start
    capsys.readouterr()
    assert load_script("report").main([str(tmp_path / "runs" / "again")]) == 0
    table = capsys.readouterr().out
    assert "self-training round 2 of 2 (epoch 1 of 1" in table and "not trained" not in table
