"""Results tables generated from what a run wrote, never typed by hand.

    python report.py runs/glas_cpu            # one run: every split, with and without post-processing
    python report.py runs/glas_cpu runs/demo  # several runs, one table each
    python report.py runs/glas_cpu_ablation   # the ablation table written by ablate.py

Reads each stage's config.yaml, metrics.json, run.json (wall time, hardware) and log.csv, and the data
root's prepare_summary.json, and prints Markdown: the rows the README shows, with the command that made
them. Figures are percentages of the metrics in metrics.json (mIoU and mean Dice over classes). Each run
folder also gets curves.png: loss and label accuracy (stage 1), loss and val mIoU (stage 2) per epoch from
the log.csv files, the epoch whose model stage 2 kept marked.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from utils.cli import run_main, warn
from utils.config import ConfigError, load_config
from utils.curves import Panel, write_curves
from utils.data.imageio import DataError
from utils.provenance import RUN_RECORD, describe_hardware

STAGES = ("stage1", "stage2")
CURVES = "curves.png"
NAMES = {"stage1": "stage 1: CAM pseudo-masks", "stage2": "stage 2: DPR"}


DAMAGED = "the file was cut short or edited: rerun the step that wrote it"


def read_json(path):
    """A mapping from a JSON file this project wrote, or None when there is none; a damaged one is a DataError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not readable JSON ({str(error).splitlines()[0][:80]}); {DAMAGED}.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not the mapping this project writes; {DAMAGED}.")
    return data


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DataError(f"{path}: not readable YAML; {DAMAGED}.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds no mapping of settings; {DAMAGED}.")
    return data


def read_log(path):
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_stage(folder):
    """config, metrics, run record and log of one stage folder (None where a file is missing)."""
    folder = Path(folder)
    config = read_yaml(folder / "config.yaml")
    rounds = sorted(folder.glob("round*/log.csv"), key=lambda p: int(p.parent.name[5:] or 0))
    return {"config": config, "metrics": read_json(folder / "metrics.json"), "run": read_json(folder / RUN_RECORD),
            "log": read_log(folder / "log.csv"), "round_logs": [read_log(path) for path in rounds]}


def load_run(folder):
    folder = Path(folder)
    stages = {stage: load_stage(folder / stage) for stage in STAGES if (folder / stage / "metrics.json").is_file()}
    if not stages:
        raise DataError(f"{folder}: no stage1/metrics.json or stage2/metrics.json; run the numbered scripts "
                          "first (or point at runs/<name>).")
    config = next((s["config"] for s in stages.values() if s["config"] is not None), None)
    prepare = read_json(Path(config["data"]["root"]) / "prepare_summary.json") if config else None
    return {"folder": folder, "stages": stages, "config": config, "prepare": prepare}


def percent(value):
    return "–" if value is None else f"{100 * value:.1f}"


def held_out_splits(run):
    """Splits scored on whole images, val first, in the order the config lists its test splits."""
    found = {split for stage in run["stages"].values() for split in stage["metrics"].get("images", {})}
    order = ["val"] + list((run["config"] or {}).get("data", {}).get("test_splits", []))
    return [split for split in order if split in found] + sorted(found - set(order))


def stage_name(stage, data):
    """The model's name, saying when stage 2 learnt from the true masks rather than the pseudo-masks (a run of
    0 epochs, which only scores a given model, learnt from neither), and when stage 1's class maps were the
    average of several classifiers'."""
    settings = (data["config"] or {}).get(stage, {})
    if stage == "stage2" and settings.get("train_masks") == "ground_truth" and settings.get("epochs"):
        return f"{NAMES[stage]} on true masks"
    if stage == "stage1" and settings.get("average_cams_with"):
        return f"{NAMES[stage]}, class maps averaged over {len(settings['average_cams_with']) + 1} classifiers"
    if stage == "stage2" and (settings.get("rounds") or 1) > 1:
        return f"{NAMES[stage]}, self-training round {settings['rounds']} of {settings['rounds']}"
    return NAMES[stage]


def stage_label(stage, data):
    """The model's name and which of its epochs was scored; a segmenter scored with flip test-time augmentation
    says so, since its figures are not the single-pass network's."""
    name = stage_name(stage, data)
    settings = (data["config"] or {}).get("stage2", {})
    epochs, best = settings.get("epochs"), data["metrics"].get("best_epoch")
    if (settings.get("rounds") or 1) > 1:  # the run's model is its last round's, trained round_epochs
        epochs = settings.get("round_epochs") or epochs
    if stage != "stage2" or best is None:
        return name
    if epochs == 0:
        scored = "stage2.init_from as it is, not trained"
    elif settings.get("keep_epoch") == "last":
        scored = f"epoch {best} of {epochs}, the last"
    else:
        scored = f"epoch {best} of {epochs}, chosen on val"
    tta = "; flip test-time augmentation" if settings.get("tta_flip") else ""
    return f"{name} ({scored}{tta})"


def results_rows(run):
    """(header, rows): one row per stage without post-processing, then one with it where it was set."""
    splits = held_out_splits(run)
    titles = (run["config"] or {}).get("data", {}).get("split_titles") or {}
    header = ["model", "post-processing"] + [f"{titles.get(split, split)} {m}" for split in splits
                                             for m in ("mIoU", "Dice")]
    rows = []
    for stage, data in run["stages"].items():
        metrics = data["metrics"]
        variants = [("none", metrics)]
        if metrics.get("postprocessed"):
            variants.append((metrics["postprocessed"].get("steps") or "yes", metrics["postprocessed"]))
        labels = [(stage_label(stage, data), stage_name(stage, data), variants)]
        refined = metrics.get("refined")
        if refined:  # stage 1's pseudo-masks after affinity propagation or a CRF: rows of their own
            name = f"stage 1: pseudo-masks after {refined.get('steps')}"
            labels.append((name, name, [("none", refined)] + ([(variants[1][0], refined["postprocessed"])]
                                                              if refined.get("postprocessed") and len(variants) > 1
                                                              else [])))
        for label, plain_name, kinds in labels:
            for name, values in kinds:
                row = [label if name == "none" else plain_name, name]
                for split in splits:
                    scored = values.get(split)
                    row += [percent(scored["miou"]), percent(scored["mdice"])] if scored else ["–", "–"]
                rows.append(row)
    return header, rows


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def minutes(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def wall_times(run):
    """'prepare 19 s, stage 1 15.1 min, stage 2 18.9 min; total 34.3 min' from the recorded times."""
    parts, total = [], 0.0
    if run["prepare"] and run["prepare"].get("seconds") is not None:
        parts.append(f"prepare {minutes(run['prepare']['seconds'])}")
        total += run["prepare"]["seconds"]
    for stage, data in run["stages"].items():
        if data["run"]:
            note = " (resumed: this part only)" if data["run"].get("resumed") else ""
            parts.append(f"{stage.replace('stage', 'stage ')} {minutes(data['run']['seconds'])}{note}")
            total += data["run"]["seconds"]
    return (", ".join(parts) + f"; total {minutes(total)}") if parts else "not recorded"


def hardware_line(run):
    seen = []
    for data in run["stages"].values():
        if data["run"]:
            text = describe_hardware(data["run"]["hardware"])
            software = data["run"].get("software", {})
            text += f", torch {software.get('torch', '?')}"
            if software.get("commit"):
                text += f", commit {software['commit']}"
            if text not in seen:
                seen.append(text)
    return "; ".join(seen) or "not recorded"


def extra_lines(run):
    lines = []
    stage1 = run["stages"].get("stage1")
    if stage1 and "train" in stage1["metrics"]:
        train = stage1["metrics"]["train"]
        lines.append(f"Pseudo-masks on the training tiles (pixels they leave unlabelled not scored): mIoU "
                     f"{percent(train['miou'])}, Dice {percent(train['mdice'])}.")
    if stage1 and "train_whole" in stage1["metrics"]:
        whole, refined = stage1["metrics"]["train_whole"], (stage1["metrics"].get("refined") or {}).get("train_whole")
        lines.append("Pseudo-masks of the whole training images stage 2 learns from, against their true masks: "
                     + (f"mIoU {percent(refined['miou'])} after {stage1['metrics']['refined']['steps']}, "
                        f"{percent(whole['miou'])} before." if refined else f"mIoU {percent(whole['miou'])}."))
    stage2 = run["stages"].get("stage2") or {}
    for number, log in enumerate(stage2.get("round_logs") or [], start=1):
        curve = val_curve(log)
        if curve:
            lines.append(f"Self-training round {number}: " + curve[0].lower() + curve[1:])
    for number, values in ((stage2.get("metrics") or {}).get("self_training") or {}).get("relabelled_train",
                                                                                           {}).items():
        if values:
            lines.append(f"Masks of the training images that round {number} learnt from, against their true masks: "
                         f"mIoU {percent(values['miou'])}.")
    curve = val_curve(stage2.get("log") or [])
    if curve:
        lines.append(curve)
    counts = [f"{split} {len(names)}" for split, names in
              next(iter(run["stages"].values()))["metrics"].get("images", {}).items()]
    if counts:
        lines.append("Whole images scored: " + ", ".join(counts) + ".")
    return lines


def val_curve(log, tail=5):
    """How steady stage 2's val mIoU was over the epochs, from its log: the best epoch, and the range and mean
    of the last `tail` epochs (what a noisier or steadier choice of epoch would have given)."""
    values = [float(row["val_miou"]) for row in log if row.get("val_miou")]
    if not values:
        return None
    best = max(range(len(values)), key=values.__getitem__)
    last = values[-tail:]
    return (f"Stage-2 val mIoU over its {len(values)} epochs: best {percent(values[best])} (epoch {best + 1}); "
            f"last {len(last)} epochs {percent(min(last))}–{percent(max(last))} "
            f"(mean {percent(sum(last) / len(last))}).")


def render_run(run, command):
    name = (run["config"] or {}).get("name", run["folder"].name)
    header, rows = results_rows(run)
    text = [f"### {name}", "", f"`{command}`", "", markdown(header, rows), ""]
    text += extra_lines(run)
    text += [f"Wall time: {wall_times(run)}.", f"Hardware: {hardware_line(run)}.", ""]
    return "\n".join(text)


def kept_epoch(stage2_folder, log):
    """(epoch, legend note) of the model stage 2 kept: metrics.json's best_epoch, or the last logged epoch when
    the run kept its last one; (None, "") when neither is known."""
    metrics = read_json(Path(stage2_folder) / "metrics.json") or {}
    config = read_yaml(Path(stage2_folder) / "config.yaml")
    best = metrics.get("best_epoch")
    if ((config or {}).get("stage2") or {}).get("keep_epoch") == "last":
        epochs = [int(row["epoch"]) for row in log if str(row.get("epoch", "")).isdigit()]
        epoch = best or (epochs[-1] if epochs else None)
        return epoch, ", the last" if epoch is not None else ""
    return best, ", best val mIoU" if best is not None else ""


def write_run_curves(folder):
    """RUN/curves.png from the stages' logs; a stage without a log (or with an empty one) gets no panel.
    Returns the picture's path, or None when there was nothing to draw."""
    folder = Path(folder)
    stage1_log, stage2_log = read_log(folder / "stage1" / "log.csv"), read_log(folder / "stage2" / "log.csv")
    epoch, note = kept_epoch(folder / "stage2", stage2_log)
    panels = [Panel("stage 1: classifier", stage1_log, "accuracy", "label accuracy"),
              Panel("stage 2: DPR", stage2_log, "val_miou", "val mIoU", epoch, note)]
    try:
        drawn = write_curves(folder / CURVES, panels)
    except ImportError:
        warn(f"matplotlib is not installed, so {folder / CURVES} was not drawn; pip install matplotlib.")
        return None
    return folder / CURVES if drawn else None


def load_ablation(folder):
    """An ablation folder written by ablate.py: its plan, and each finished row's stage files."""
    folder = Path(folder)
    plan = read_json(folder / "ablation.json")
    rows = []
    for row in plan["rows"]:
        stage_folder = folder / row["key"] / row["stage"]
        rows.append({**row, **(load_stage(stage_folder) if (stage_folder / "metrics.json").is_file()
                               else {"metrics": None, "run": None, "config": None, "log": []})})
    return {"folder": folder, "plan": plan, "rows": rows}


def beside_config_schedule(plan):
    """How the ablation's schedule stands to the config's own, or nothing where the config cannot be read now."""
    try:
        cfg = load_config(plan["config"], plan.get("overrides", []))
    except ConfigError:
        return ""
    own = (cfg.stage1.epochs, cfg.stage2.epochs)
    if own == (plan["schedule"]["stage1_epochs"], plan["schedule"]["stage2_epochs"]):
        return " (the config's own schedule)"
    return f" (the config's own: stage 1 {own[0]}, stage 2 {own[1]})"


def render_ablation(ablation, command):
    """The ablation table: val mIoU and Dice of every row (pseudo-mask scores for stage-1 rows), its wall time."""
    plan = ablation["plan"]
    schedule = plan["schedule"]
    header = ["row", "train pseudo-mask mIoU", "val mIoU", "val Dice", "wall time"]
    rows, total, hardware = [], 0.0, None
    for row in ablation["rows"]:
        metrics, record = row["metrics"], row["run"]
        if metrics is None:
            rows.append([row["label"], "–", "not run", "–", "–"])
            continue
        train = percent(metrics["train"]["miou"]) if row["stage"] == "stage1" and "train" in metrics else ""
        val = metrics.get("val")
        seconds = record["seconds"] if record else None
        total += seconds or 0.0
        hardware = hardware or (describe_hardware(record["hardware"]) if record else None)
        rows.append([row["label"], train, percent(val["miou"]) if val else "–", percent(val["mdice"]) if val else "–",
                     minutes(seconds) if seconds is not None else "–"])
    text = [f"### Ablation: {plan['config']}", "", f"`{command}`", "", markdown(header, rows), "",
            f"Schedule of every row: stage 1 {schedule['stage1_epochs']} epochs, stage 2 {schedule['stage2_epochs']} "
            f"epochs{beside_config_schedule(plan)}; stage-2 rows learn from the pseudo-masks of "
            f"'{plan['source_row']}'. Validation images only; no test split is scored.",
            f"Total wall time {minutes(total)} on {hardware or 'unrecorded hardware'}.", ""]
    return "\n".join(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (runs/<name>) with stage1/ and stage2/ in them, or "
                                                "ablation folders written by ablate.py")
    args = parser.parse_args(argv)
    for folder in args.runs:
        try:
            report_folder(folder)
        except DataError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:  # files of another shape
            raise DataError(f"{folder}: its files are not as this project writes them ({type(error).__name__}: "
                            f"{str(error)[:80]}); {DAMAGED}.") from None
    return 0


def report_folder(folder):
    command = f"python report.py {folder}"
    if (Path(folder) / "ablation.json").is_file():
        print(render_ablation(load_ablation(folder), command))
    else:
        print(render_run(load_run(folder), command))
        curves = write_run_curves(folder)
        if curves is not None:
            print(f"training curves: {curves}", file=sys.stderr)  # stdout stays the Markdown alone


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
