"""The whole pipeline on one config: stage 1, stage 2, then inference on the test images.

    python run_pipeline.py --config configs/demo.yaml [--set stage1.epochs=3 ...]

Each step is the numbered script of the same name, run in this process with the same settings.
"""
import importlib
import sys
from pathlib import Path

from utils.cli import run_main
from utils.config import base_parser, load_config, run_dir
from utils.run_folder import stage1_checkpoint_to_use


def step(script, argv):
    print(f"\n=== {script} {' '.join(argv)}", flush=True)
    module = importlib.import_module(script)
    code = module.main(argv)
    if code:
        raise SystemExit(code)


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # validate once, before any work
    stage1_checkpoint_to_use(cfg)  # with stage1.epochs 0, the run's checkpoint must be there
    common = ["--config", args.config] + [arg for text in args.overrides for arg in ("--set", text)]
    step("1_train_stage1", common)
    step("2_train_stage2", common)
    stage2 = run_dir(cfg, "stage2")
    images = first_test_images(cfg)
    if images is None:
        print(f"\nno test images in {cfg.data.root} ({', '.join(cfg.data.test_splits) or 'no data.test_splits'}); "
              "inference skipped.")
    else:
        step("inference", inference_argv(cfg, stage2 / "best.pth", images))
    print(f"\ndone: stage-1 and stage-2 metrics in {run_dir(cfg, 'stage1')}/metrics.json and "
          f"{stage2}/metrics.json; masks and overlays in {run_dir(cfg, 'inference')}; "
          f"results table: python report.py {run_dir(cfg, 'stage1').parent}")
    return 0


def first_test_images(cfg):
    """The image folder of the first test split that exists, or None."""
    for split in cfg.data.test_splits:
        folder = Path(cfg.data.root) / split / "img"
        if folder.is_dir():
            return folder
    return None


def inference_argv(cfg, checkpoint, images):
    """inference.py's command line for the config's `inference` settings (window and overlap default to
    the checkpoint's own)."""
    argv = ["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(run_dir(cfg, "inference")),
            "--overwrite", "--device", cfg.device, "--batch-size", str(cfg.inference.batch_size)]
    if cfg.inference.window is not None:
        argv += ["--window", str(cfg.inference.window)]
    if cfg.inference.overlap is not None:
        argv += ["--overlap", str(cfg.inference.overlap)]
    return argv


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_main(main, sys.argv[1:])
