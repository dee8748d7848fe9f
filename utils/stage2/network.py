"""The stage-2 segmenter as a config describes it: DPR with its encoder's weights (pretrained, a trained model,
or the stage-1 backbone) and the parts of it that are frozen."""
from pathlib import Path

from models.dpr import DPR
from models.timm_encoder import load_encoder_state
from utils.checkpoint import STAGE1_FORMAT, STAGE2_FORMAT, CheckpointError, load_checkpoint
from utils.config import ConfigError, run_dir
from utils.timm_settings import check_vit_settings, inspect_network
from utils.weight_packages import check_weight_source


def build_segmenter(cfg, use_init_from=True):
    """DPR as the config describes it; later self-training rounds start afresh (use_init_from False): from the
    encoder's pretrained weights, or the stage-1 backbone, as round 1 does without stage2.init_from."""
    s2 = cfg.stage2
    try:
        check_weight_source(s2.pretrained, "stage2.pretrained")
    except ValueError as error:
        raise ConfigError(f"stage2.pretrained: {error}") from None
    facts = inspect_network(cfg, "stage2")
    check_vit_settings(cfg, "stage2", facts)
    try:
        model = DPR(s2.encoder, len(cfg.data.classes), pretrained=s2.pretrained, refine=s2.refinement_attention,
                    aux=s2.aux_path, encoder_kwargs=facts.kwargs, vit_block=s2.vit_block,
                    encoder_stage=s2.encoder_stage, refine_hidden=s2.refinement_hidden,
                    refine_gate_scale=s2.refinement_gate_scale)
    except ValueError as error:
        raise CheckpointError(f"stage2.pretrained: {error}") from None
    init_from = s2.init_from if use_init_from else None
    if init_from:
        state = load_checkpoint(s2.init_from, STAGE2_FORMAT)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"stage2.init_from: {s2.init_from} does not fit a {s2.encoder} DPR with "
                                  f"{len(cfg.data.classes)} classes.") from None
        print(f"starting from {s2.init_from}")
    if s2.encoder_from_stage1 and not init_from:
        start_encoder_from_stage1(cfg, model)
    if s2.frozen_stages:
        if model.size_multiple > 1:
            raise ConfigError("stage2.frozen_stages applies to convolutional encoders; set it to 0 "
                              "(stage2.freeze_encoder freezes a whole Vision Transformer).")
        try:
            model.freeze_encoder_stages(s2.frozen_stages)
        except ValueError as error:
            raise ConfigError(f"stage2.frozen_stages: {error}") from None
    if s2.freeze_encoder:
        model.freeze_encoder()
    if s2.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    return model


def start_encoder_from_stage1(cfg, model):
    """Without pretrained weights, the stage-1 classifier's backbone is the best start the encoder has: it has
    already learnt these tissues from every training tile. The stages the encoder has are copied from it."""
    s1, s2 = cfg.stage1, cfg.stage2
    if s1.backbone != s2.encoder or weight_kwargs(s1.backbone_kwargs) != weight_kwargs(s2.encoder_kwargs):
        raise ConfigError(f"stage2.encoder_from_stage1 needs the same network in both stages; stage1.backbone is "
                          f"{s1.backbone} and stage2.encoder is {s2.encoder} (or their kwargs differ).")
    given = s2.encoder_from_stage1
    path = Path(given) if isinstance(given, str) else run_dir(cfg, "stage1") / "checkpoint.pth"
    if not path.is_file():
        raise ConfigError(f"stage2.encoder_from_stage1: no stage-1 checkpoint at {path}; run "
                          "`python 1_train_stage1.py --config <your config>` first, or set it to false.")
    prefix = "backbone.net."
    state = {key[len(prefix):]: value for key, value in load_checkpoint(path, STAGE1_FORMAT)["model"].items()
             if key.startswith(prefix)}
    try:
        load_encoder_state(model.encoder, s2.encoder, state, f"the stage-1 backbone in {path}", s2.encoder_kwargs)
    except ValueError as error:
        raise CheckpointError(f"stage2.encoder_from_stage1: {error}") from None
    print(f"encoder starts from the stage-1 backbone in {path}")


def weight_kwargs(kwargs):
    """The model kwargs that can change weights: dilation (`output_stride`) changes only how they are applied."""
    return {key: value for key, value in (kwargs or {}).items() if key != "output_stride"}
