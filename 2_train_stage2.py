"""Stage 2: train the Dual Path Refinement segmenter with the IICB loss on stage 1's pseudo-masks, keep
the best epoch by validation mIoU, and score it on the test set.

    python 2_train_stage2.py --config configs/glas.yaml [--set stage2.epochs=3] [--resume]

Writes runs/<name>/stage2/{config.yaml, best.pth, best.safetensors, last.pth, log.csv, metrics.json, run.json,
predictions/<split>/, overlays/<split>/, test_samples.png}; with stage2.rounds above 1 (self-training), the
earlier rounds' models and logs in stage2/round<k>/ and the masks of the training images each round learnt
from in stage2/masks_round<k>/. Every figure is computed without post-processing,
and again with the YAML's `postprocess` steps when there are any; the best epoch is chosen on the
validation mIoU without post-processing. A final model trained on every image (`stage2.keep_epoch: last`)
keeps its last epoch instead and needs no validation images; best.pth is then that epoch.

    python 2_train_stage2.py --config configs/glas.yaml --gate-effects

measures, without training, what the refinement attention's channel gate of the run's best.pth does on the
val images (utils/stage2/gate_effects.py) and writes stage2/gate_effects.json.
"""
import sys
from pathlib import Path

from utils.checkpoint import STAGE2_FORMAT, CheckpointError, load_checkpoint
from utils.cli import run_main
from utils.config import ConfigError, base_parser, load_config, run_dir
from utils.data.datasets import check_split_masks, split_items, test_splits
from utils.data.imageio import DataError
from utils.evaluation.metrics import scores
from utils.evaluation.postprocess import class_indices, describe
from utils.files import write_json
from utils.provenance import RUN_RECORD, StepTimer
from utils.run_folder import begin_record
from utils.runtime import cleanup, setup_runtime, start_run
from utils.stage2.evaluation import evaluate, save_test_sheet
from utils.stage2.gate_effects import describe_gate_effects, gate_effects
from utils.stage2.network import build_segmenter
from utils.stage2.predict import load_segmenter
from utils.stage2.relabel import relabel_training_images, round_folder
from utils.stage2.training import train_segmenter
from utils.stage2.training_data import training_pairs, validation_items
from utils.timm_settings import resolve_normalisation


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue training from last.pth")
    parser.add_argument("--gate-effects", action="store_true",
                        help="no training: measure the refinement attention's gates of the run's best.pth on val")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.gate_effects:
        return measure_gate_effects(cfg)
    normalisation = resolve_normalisation(cfg, "stage2")
    timer = StepTimer("stage2")
    runtime = setup_runtime(cfg)
    out_dir = start_run(cfg, runtime, "stage2")
    num_classes = len(cfg.data.classes)
    val_items = validation_items(cfg)
    held_out = {"val": val_items} if val_items else {}
    tests, missing = test_splits(cfg.data.root, cfg.data.test_splits)
    held_out.update(tests)
    for split, items in held_out.items():
        check_split_masks(items, cfg.data.mask_encoding, num_classes, split)
    if runtime.is_main:
        if normalisation:
            print(normalisation)
        if cfg.stage2.keep_epoch == "last":
            print(f"stage2.keep_epoch: last: the model of epoch {cfg.stage2.epochs} is kept"
                  + ("; val is scored for the log only" if "val" in held_out else
                     f" (no validation images in {cfg.data.root}/val)"))
        for split in missing:
            print(f"test split '{split}' is not in {cfg.data.root} (no {split}/img folder); skipped.")

    # Self-training: round 1 learns from stage 1's pseudo-masks; each later round starts afresh and learns from
    # the previous round's predictions on the training images. The last round's files are the run's.
    s2, pairs, relabelled, model, best_path = cfg.stage2, None, {}, None, None
    for round_number in range(1, s2.rounds + 1):
        round_dir = out_dir if round_number == s2.rounds else out_dir / f"round{round_number}"
        label = f" round {round_number}/{s2.rounds}" if s2.rounds > 1 else ""
        if round_number > 1:
            images = training_pairs(cfg)[0]
            masks, confusion = relabel_training_images(cfg, model, images, s2.train_on == "whole_images",
                                                       round_folder(out_dir, round_number), best_path,
                                                       runtime)
            pairs = (images, masks, "index")
            relabelled[str(round_number)] = scores(confusion) if confusion is not None else None
            if runtime.is_main:
                print(f"round {round_number} learns from round {round_number - 1}'s masks of {len(images)} training "
                      f"images in {masks[0].parent}" + (f" (against their true masks: mIoU "
                      f"{relabelled[str(round_number)]['miou']:.4f})" if confusion is not None else ""))
        model = build_segmenter(cfg, use_init_from=round_number == 1)
        epochs = s2.epochs if round_number == 1 or s2.round_epochs is None else s2.round_epochs
        best_path = train_segmenter(cfg, model, runtime, round_dir, val_items, args.resume, pairs, epochs, label)
        best = load_checkpoint(best_path, STAGE2_FORMAT)
        model.load_state_dict(best["model"])
    metrics, postprocessed = {}, {}
    for split, items in held_out.items():
        save_dirs = None if split == "val" else (out_dir / "predictions" / split, out_dir / "overlays" / split)
        raw, cleaned = evaluate(model, items, cfg, runtime, save_dirs, postprocess=True)
        metrics[split] = scores(raw)
        if cleaned is not None:
            postprocessed[split] = scores(cleaned)
    steps = describe(cfg.data.classes, class_indices(cfg.data.classes, cfg.postprocess.fill_holes))
    if postprocessed:
        metrics["postprocessed"] = {"steps": steps, **postprocessed}
    metrics["images"] = {split: [item.stem for item in items] for split, items in held_out.items()}
    metrics["best_epoch"] = best.get("epoch")
    if s2.rounds > 1:
        metrics["self_training"] = {"rounds": s2.rounds, "relabelled_train": relabelled}
    metrics["selected_by"] = ("validation mIoU without post-processing" if cfg.stage2.keep_epoch == "best_val"
                              else "the last epoch (stage2.keep_epoch: last)")
    if runtime.is_main:
        first_test = next(iter(tests), None)
        if first_test is not None:
            save_test_sheet(out_dir / "test_samples.png", tests[first_test], out_dir / "predictions" / first_test,
                            cfg)
        begin_record(cfg, out_dir)  # again: a resumed, finished run is scored with the settings in force
        write_json(out_dir / "metrics.json", metrics)
        for split in held_out:
            line = f"stage 2 on {split}: mIoU {metrics[split]['miou']:.4f}, Dice {metrics[split]['mdice']:.4f}"
            if split in postprocessed:
                line += (f"; with {steps}: mIoU {postprocessed[split]['miou']:.4f}, "
                         f"Dice {postprocessed[split]['mdice']:.4f}")
            print(line)
        write_json(out_dir / RUN_RECORD, timer.record(runtime.device, runtime.world_size, resumed=bool(args.resume)))
        print(f"stage 2 outputs in {out_dir} ({timer.seconds / 60:.1f} min)")
    cleanup(runtime)
    return 0


def measure_gate_effects(cfg):
    """The finished run's channel gate on the val images: as trained, equal for every class, and one gate
    for every window (utils/stage2/gate_effects.py)."""
    path = run_dir(cfg, "stage2") / "best.pth"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train stage 2 first, then measure its gates.")
    items = split_items(cfg.data.root, "val", required=False)
    if not items:
        raise DataError(f"{Path(cfg.data.root) / 'val' / 'img'} holds no images: the gates are measured on the "
                        "val images.")
    runtime = setup_runtime(cfg)
    model, meta = load_segmenter(path, runtime.device)
    try:
        results = gate_effects(model, meta, items, cfg.data.mask_encoding, runtime)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    write_json(path.parent / "gate_effects.json", results)
    print("\n".join(describe_gate_effects(results, meta["classes"])))
    print(f"written to {path.parent / 'gate_effects.json'}")
    cleanup(runtime)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
