"""Step 0: raw GlaS (or any folders of images with masks) -> the data layout the numbered scripts read.

    python 0_prepare_data.py --config configs/glas.yaml --raw ../shared/data/glas

Writes into the config's data.root: labelled training patches (prepare.patch_size, prepare.stride),
held-out validation images and the test images with class-index masks. See utils/data/prepare.py.
"""
from utils.cli import run_main
from utils.config import ConfigError, base_parser, load_config, source_of
from utils.data.prepare import prepare_dataset
from utils.files import folder_problem


def main(argv=None):
    parser = base_parser("Turn raw images and masks into the train/val/test layout.",
                         default_config="configs/glas.yaml")
    parser.add_argument("--raw", required=True,
                        help="raw folder: GlaS files (prepare.mode glas) or train/, val/, test/ (generic)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove files in data.root left by a preparation with other settings")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    problem = folder_problem(cfg.data.root)
    if problem:  # found before any image is read
        raise ConfigError(f"{source_of(cfg, 'data.root')}: 'data.root' is {cfg.data.root!r}, where the prepared data "
                          f"cannot be written ({problem}).")
    prepare_dataset(cfg, args.raw, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_main(main)
