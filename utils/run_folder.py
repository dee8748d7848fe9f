"""A stage's run folder (runs/<name>/<stage>/): checked before any work, and its record kept true to it.

The record, config.yaml, is written with the run's first own output (its first checkpoint), not at start-up,
so a run that stops before then leaves the previous run's files as they were. From then on the folder holds
the new run: the previous run's metrics.json and run.json, which describe a model that is gone, go too. A
checkpoint a run continues from, or uses as it is, must have been made with the network settings in force.
"""
from pathlib import Path

from utils.config import ConfigError, run_dir, save_config, source_of
from utils.files import folder_problem
from utils.provenance import RUN_RECORD

CONFIG_FILE = "config.yaml"
RESULT_FILES = ("metrics.json", RUN_RECORD)

# Settings that shape a stage's network, so a checkpoint only fits a run that has the same ones.
NETWORK_SETTINGS = {
    "stage1": ("data.classes", "stage1.backbone", "stage1.backbone_kwargs", "stage1.ibm", "stage1.ibm_at",
               "stage1.out_indices", "stage1.vit_blocks"),
    "stage2": ("data.classes", "stage2.encoder", "stage2.encoder_kwargs", "stage2.vit_block", "stage2.encoder_stage",
               "stage2.refinement_attention", "stage2.refinement_hidden", "stage2.aux_path"),
}


def check_output_folder(cfg, stage):
    """The stage's folder, once it is known that it can be written: a file where runs_dir or the run's folder
    would be, or a folder that cannot be written, stops the run before any work."""
    folder = run_dir(cfg, stage)
    problem = folder_problem(folder)
    if problem:
        raise ConfigError(f"{source_of(cfg, 'runs_dir')}: 'runs_dir' is {cfg.runs_dir!r}, but the run's folder "
                          f"{folder} cannot be made there ({problem}); set runs_dir to a folder you can write.")
    if cfg.data.pseudo_mask_dir is not None and (problem := folder_problem(cfg.data.pseudo_mask_dir)):
        raise ConfigError(f"{source_of(cfg, 'data.pseudo_mask_dir')}: 'data.pseudo_mask_dir' is "
                          f"{cfg.data.pseudo_mask_dir!r}, which cannot hold pseudo-masks ({problem}).")
    return folder


def announce_rerun(out_dir):
    """One line when the folder holds a finished run: nothing is replaced without a word."""
    if (Path(out_dir) / "metrics.json").is_file():
        print(f"{out_dir} holds a finished run; its files are replaced as this run writes its own (a run that "
              "stops before its first checkpoint leaves them as they are)")


def begin_record(cfg, out_dir):
    """Write config.yaml beside the run's first own output, and remove the previous run's results."""
    out_dir = Path(out_dir)
    for name in RESULT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    save_config(cfg, out_dir / CONFIG_FILE)


def stage1_checkpoint_to_use(cfg, masks_only=False):
    """None when stage 1 trains. With --masks-only or stage1.epochs 0 it does not: the run's checkpoint is used as
    it is, and a run without one stops here, before any work, since an untrained network is never the model."""
    if not masks_only and cfg.stage1.epochs > 0:
        return None
    path = run_dir(cfg, "stage1") / "checkpoint.pth"
    if not path.is_file():
        reason = ("--masks-only writes pseudo-masks from the run's checkpoint" if masks_only else
                  f"{source_of(cfg, 'stage1.epochs')}: 'stage1.epochs' is 0, which uses the run's trained checkpoint "
                  "as it is")
        raise ConfigError(f"{reason}, but {path} does not exist; train stage 1 first (stage1.epochs above 0), or "
                          "check name and runs_dir.")
    return path


def check_resumed_epochs(done, asked, path, setting):
    """--resume continues a run to its end; one asked to end before the epochs its checkpoint has already trained
    would leave a record that describes a shorter run than the model beside it."""
    if done > asked:
        raise ConfigError(f"{path} has already trained {done} epochs, and {setting} asks for {asked}; --resume "
                          f"continues a run to its end: ask for at least {done} epochs, or start a fresh run "
                          "under another name.")


def check_resumed_rounds(saved_config, rounds, path):
    """A self-training run's last.pth belongs to one round of a set number of rounds: resumed with another
    number, it would be trained on the wrong masks under a record of rounds that were never run."""
    saved = (saved_config.get("stage2") or {}).get("rounds", 1) if isinstance(saved_config, dict) else 1
    if saved != rounds:
        raise ConfigError(f"{path} belongs to a run of {saved} self-training round(s), and stage2.rounds asks for "
                          f"{rounds}; --resume continues a run as it was started: set stage2.rounds={saved}, or start "
                          "a fresh run under another name.")


def check_checkpoint_fits(saved_config, cfg, stage, path, action):
    """Refuse a checkpoint made with other network settings than this run's, naming the first that differs.
    `action` says what the checkpoint is for ("--resume continues it")."""
    if not isinstance(saved_config, dict):
        return  # files from before configs were saved in them: the weights' own shapes decide
    for key in NETWORK_SETTINGS[stage]:
        node, found = saved_config, True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                found = False
                break
            node = node[part]
        current = cfg
        for part in key.split("."):
            current = current[part]
        if found and node != current:
            raise ConfigError(f"{path} was made with {key} {node!r}, but this run has {current!r} (from "
                              f"{source_of(cfg, key)}); {action} only with the same network: set {key} back, or "
                              "start a fresh run under another name.")
