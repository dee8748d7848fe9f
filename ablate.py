"""The paper's ablation table, rerun on a config: which component adds what, on validation images only.

    python ablate.py --config configs/glas_cpu.yaml                 # every row, the short schedule below
    python ablate.py --config configs/glas_cpu.yaml --rows stage2_iicb no_eta
    python report.py runs/glas_cpu_ablation                         # the table (ablate.py prints it too)

Rows: stage-1 CAMs without and with IBM (pseudo-mask scores on the training tiles and on val), and with IBM
followed by affinity propagation or a dense CRF; stage 2 with plain cross-entropy and with the full IICB loss;
IICB without each of its terms in turn; DPR without its refinement attention and without its auxiliary path;
OEEM's easy-pixel weighting, alone and inside IICB; a second, self-training round. Every stage-2 row starts from the paper's DPR (both
parts on) whatever the config chose, so that each row removes one part of the paper's method (a --set given
here still wins). Every stage-2 row learns from the pseudo-masks of the "with IBM" stage-1 row, and every
row uses the same schedule (--stage1-epochs, --stage2-epochs), which the table states. Test splits are
never scored here. Finished rows are kept; --overwrite redoes them.
"""
import sys
import time
from pathlib import Path

from utils.cli import run_main
from utils.config import ConfigError, base_parser, load_config
from utils.files import folder_problem, write_json
from utils.run_folder import stage1_checkpoint_to_use

IICB_TERMS = {"alpha": "confident cross-entropy", "beta": "uncertainty", "gamma": "smoothness",
              "delta": "compactness and separation", "eta": "soft Dice"}
PLAIN_CE = "{alpha: 1.0, beta: 0.0, gamma: 0.0, delta: 0.0, eta: 0.0, tau: 0.0}"
STAGE1_ROWS = [
    ("stage1_no_ibm", "stage 1: CAMs without IBM", ["stage1.ibm=false"]),
    ("stage1_ibm", "stage 1: CAMs with IBM", ["stage1.ibm=true"]),
    # label refinement the field uses on CAMs (rows run when the config stitches whole training images)
    ("stage1_affinity", "stage 1: CAMs with IBM, then affinity propagation", ["stage1.ibm=true", "stage1.affinity=true"]),
    ("stage1_crf", "stage 1: CAMs with IBM, then a dense CRF", ["stage1.ibm=true", "stage1.crf_iterations=10"]),
]
STAGE2_ROWS = [
    ("stage2_ce", "stage 2: plain cross-entropy", [f"stage2.iicb={PLAIN_CE}"]),
    ("stage2_iicb", "stage 2: full IICB loss", []),
    *[(f"no_{term}", f"stage 2: IICB without {term} ({words})", [f"stage2.iicb.{term}=0.0"])
      for term, words in IICB_TERMS.items()],
    ("no_refinement", "stage 2: DPR without refinement attention", ["stage2.refinement_attention=false"]),
    ("no_aux", "stage 2: DPR without auxiliary path", ["stage2.aux_path=false"]),
    # a peer's loss and self-training beside the paper's
    ("stage2_oeem", "stage 2: OEEM (cross-entropy, easy pixels weighted)",
     [f"stage2.iicb={PLAIN_CE[:-1]}, pixel_weighting: oeem}}"]),
    ("iicb_oeem", "stage 2: full IICB loss, its cross-entropy weighted as OEEM's", ["stage2.iicb.pixel_weighting=oeem"]),
    ("self_training", "stage 2: full IICB loss, a second round on its own masks", ["stage2.rounds=2"]),
]
PAPER_DPR = ["stage2.refinement_attention=true", "stage2.aux_path=true"]  # what the stage-2 rows remove from
SOURCE_ROW = "stage1_ibm"  # the pseudo-masks every stage-2 row learns from
ABLATION_FILE = "ablation.json"


def row_plan(names=None):
    """[(key, label, stage, overrides)] in table order; `names` picks rows (the stage-1 source is always run)."""
    rows = [(k, label, "stage1", o) for k, label, o in STAGE1_ROWS] + [(k, label, "stage2", o)
                                                                       for k, label, o in STAGE2_ROWS]
    if not names:
        return rows
    known = {row[0] for row in rows}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {', '.join(unknown)}; rows are {', '.join(sorted(known))}.")
    wanted = set(names) | ({SOURCE_ROW} if any(r[2] == "stage2" and r[0] in names for r in rows) else set())
    return [row for row in rows if row[0] in wanted]


def row_applies(row, cfg):
    """Label-refinement rows act on whole training images, and the CRF row needs its package: rows a config
    cannot run are left out with one line."""
    from utils.stage1.crf import crf_available
    key = row[0]
    reason = None
    if key in ("stage1_affinity", "stage1_crf") and not cfg.stage1.stitch_whole_images:
        reason = "the config does not stitch whole training images (stage1.stitch_whole_images)"
    elif key == "stage1_crf" and not crf_available():
        reason = "pydensecrf2 is not installed (requirements-crf.txt)"
    if reason:
        print(f"--- {key}: left out, {reason}")
    return reason is None


def row_settings(args, folder, key, stage, overrides, base_overrides, stage1_start=False):
    """The settings of one row, each with where it comes from: its own run folder, val only, the shared schedule.
    stage1_start: the config starts stage 2 from stage 1, which for every stage-2 row is the shared one."""
    settings = [(text, "ablate.py (the paper's DPR)") for text in PAPER_DPR] if stage == "stage2" else []
    settings += [(text, f"--set {text}") for text in base_overrides]
    settings += [(f"runs_dir={folder}", f"the ablation folder {folder}"), (f"name={key}", f"ablation row {key}"),
                 ("data.test_splits=[]", "ablate.py (val only)"),
                 (f"stage1.epochs={args.stage1_epochs}", f"--stage1-epochs {args.stage1_epochs}"),
                 (f"stage2.epochs={args.stage2_epochs}", f"--stage2-epochs {args.stage2_epochs}")]
    source = key if stage == "stage1" else SOURCE_ROW
    settings.append((f"data.pseudo_mask_dir={folder / source / 'pseudo_mask'}", f"ablation row {key}"))
    if stage == "stage2":  # the shared pseudo-masks are the source row's, not made under this row's name
        settings.append(("stage2.accept_foreign_pseudo_masks=true", f"ablation row {key}"))
    if stage == "stage2" and stage1_start:
        settings.append((f"stage2.encoder_from_stage1={folder / source / 'stage1' / 'checkpoint.pth'}",
                         f"ablation row {key}"))
    return settings + [(text, f"ablation row {key}") for text in overrides]


def row_arguments(args, folder, key, stage, overrides, base_overrides, stage1_start=False):
    """The stage script's command line for one row (row_settings as --set options)."""
    settings = row_settings(args, folder, key, stage, overrides, base_overrides, stage1_start)
    return ["--config", args.config] + [part for text, _ in settings for part in ("--set", text)]


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="run only these rows (default: all)")
    parser.add_argument("--stage1-epochs", type=int, default=4, help="stage-1 epochs of every row (default: 4)")
    parser.add_argument("--stage2-epochs", type=int, default=3, help="stage-2 epochs of every row (default: 3)")
    parser.add_argument("--output", help="ablation folder (default: <runs_dir>/<name>_ablation)")
    parser.add_argument("--overwrite", action="store_true", help="rerun rows that already finished")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # validated once, before any row runs
    folder = Path(args.output or Path(cfg.runs_dir) / f"{cfg.name}_ablation")
    problem = folder_problem(folder)
    if problem:
        raise ConfigError(f"the ablation folder {folder} cannot be written ({problem}); choose another with --output.")
    plan = [row for row in row_plan(args.rows) if row_applies(row, cfg)]
    for key, _, stage, overrides in plan:  # every row's settings checked before the first row runs
        row = load_config(args.config, row_settings(args, folder, key, stage, overrides, args.overrides,
                                                     bool(cfg.stage2.encoder_from_stage1)))
        finished = (folder / key / stage / "metrics.json").is_file() and not args.overwrite
        if stage == "stage1" and not finished:
            stage1_checkpoint_to_use(row)  # with --stage1-epochs 0, the row's trained checkpoint must be there
    record = {"config": str(args.config), "overrides": list(args.overrides),
              "schedule": {"stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs},
              "source_row": SOURCE_ROW,
              "rows": [{"key": k, "label": label, "stage": stage, "overrides": o} for k, label, stage, o in plan]}
    write_json(folder / ABLATION_FILE, record)
    started = time.perf_counter()
    for key, label, stage, overrides in plan:
        done = folder / key / stage / "metrics.json"
        if done.is_file() and not args.overwrite:
            print(f"--- {key}: finished before, kept ({done})")
            continue
        print(f"\n--- {key}: {label}", flush=True)
        script = "1_train_stage1" if stage == "stage1" else "2_train_stage2"
        code = __import__(script).main(row_arguments(args, folder, key, stage, overrides, args.overrides,
                                                           bool(cfg.stage2.encoder_from_stage1)))
        if code:
            return code
    print(f"\nablation finished in {(time.perf_counter() - started) / 60:.1f} min\n")
    import report
    print(report.render_ablation(report.load_ablation(folder), f"python report.py {folder}"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_main(main, sys.argv[1:])
