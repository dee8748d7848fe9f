"""Values of the right type that make no sense stop the run before any work, with one sentence that names the
key, the value, what is allowed and where the value came from; the device and precision are decided in one
place, which refuses what cannot run well.

The walk below covers every numeric setting of utils/settings.py's SETTINGS, those added later included."""
import pytest
import yaml

from conftest import ROOT, load_script, one_line_error, tiny_demo_args
from utils.cli import run_main
from utils.config import ConfigError, load_config
from utils.settings import SETTINGS

NUMERIC = [key for key, (_, allowed) in SETTINGS.items() if allowed.numeric]
EXTREMES = (0, -1, -0.5, 10**12, 1e300, 10**400)


def shaped_like(default, value):
    """The default with every number in it replaced by `value` (a list keeps its length)."""
    if isinstance(default, list):
        return [shaped_like(item, value) for item in default]
    return value


def variants(key, value):
    default = SETTINGS[key][0]
    if default is None:  # an optional setting: a lone number, and a list of three for list-valued ones
        return [value, [value] * 3]
    return [shaped_like(default, value)]


def test_the_walk_sees_the_numeric_settings():
    assert {"seed", "stage1.momentum", "stage1.grad_clip", "stage1.cam_scales", "data.palette", "data.mpp",
            "stage2.max_train_images", "stage2.iicb.tau", "inference.window", "stage1.output_stride"} <= set(NUMERIC)
    assert "device" not in NUMERIC and "stage1.backbone" not in NUMERIC


def test_every_numeric_setting_at_zero_negative_and_huge_validates_or_stops_naming_the_key(capsys):
    """Each case either validates or ends as the scripts end a user's mistake: exit 2 and one sentence that names
    the key, the value's source and what is allowed. Anything else (a traceback) fails the test."""
    def check_only(argv):
        load_config(None, argv)
        return 0

    refused, failures = 0, []
    for key in NUMERIC:
        for extreme in EXTREMES:
            for value in variants(key, extreme):
                written = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
                text = f"{key}={written.strip().removesuffix('...').strip()}"
                with pytest.raises(SystemExit) as stop:
                    run_main(check_only, [text])
                err = capsys.readouterr().err.strip()
                if stop.value.code == 0:
                    continue
                refused += 1
                lines = err.splitlines()
                if stop.value.code != 2 or len(lines) != 1 or f"'{key}'" not in err or f"--set {text}" not in err:
                    failures.append(f"{text}: exit {stop.value.code}: {err[-300:]}")
    assert not failures, "\n".join(failures)
    assert refused > 2 * len(NUMERIC)  # most of these values are nonsense, and refused


def test_every_default_validates_and_every_setting_declares_what_it_accepts():
    load_config(None)
    for key, (default, allowed) in SETTINGS.items():
        assert allowed.text and allowed.clean(default) == default, key


@pytest.mark.parametrize("override, key, allowed", [
    ("stage1.momentum=-0.5", "stage1.momentum", "[0, 1)"),
    ("stage1.grad_clip=-5", "stage1.grad_clip", "above 0"),
    ("stage1.cam_scales=[]", "stage1.cam_scales", "1 to 8 numbers"),
    ("data.palette=[[a,b,c],[0,0,0]]", "data.palette", "0 to 255"),
    ("stage2.max_train_images=0", "stage2.max_train_images", "[1, 1000000], or null"),
    ("device=tpu", "device", "cuda:N"),
    ("stage1.image_size=4", "stage1.image_size", "[16, 16384]"),
    ("stage1.cam_scales=[0]", "stage1.cam_scales", "(0, 4]"),
    ("stage1.cam_scales=[0.1]", "stage1.cam_scales", "stride of 8 px"),  # the 64 px tiles seen at 6.4 px
])
def test_bad_values_stop_stage1_before_any_work(capsys, tmp_path, override, key, allowed):
    stage1 = load_script("1_train_stage1")
    line = one_line_error(capsys, stage1.main, tiny_demo_args(tmp_path, override))
    assert f"'{key}'" in line and f"--set {override}" in line and allowed in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing was made


def test_the_message_names_the_yaml_or_the_option_the_value_came_from(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage1: {momentum: 0.9, epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"^--set stage1\.epochs=-1: 'stage1\.epochs' is -1, but it must be a whole"):
        load_config(recipe, ["stage1.epochs=-1"])
    (tmp_path / "variant.yaml").write_text("base: recipe.yaml\nstage1: {momentum: 1.5}\n")
    with pytest.raises(ConfigError, match=r"variant\.yaml: 'stage1\.momentum' is 1\.5"):
        load_config(tmp_path / "variant.yaml")
    (tmp_path / "fixed.yaml").write_text("base: recipe.yaml\nstage1: {momentum: 1.5}\n")
    load_config(tmp_path / "fixed.yaml", ["stage1.momentum=0.5"])  # a value replaced later is never judged
    # ablate.py's schedule options are named as the user wrote them
    ablate = load_script("ablate")
    line = one_line_error(capsys, ablate.main, ["--config", str(recipe), "--stage1-epochs", "-1",
                                                "--output", str(tmp_path / "ablation")])
    assert line.startswith("error: --stage1-epochs -1: 'stage1.epochs' is -1") and "recipe.yaml" not in line
    assert not (tmp_path / "ablation").exists()


def test_device_and_precision_that_cannot_run_well_are_refused_in_one_place(capsys, monkeypatch):
    import torch

    import utils.runtime as runtime_module
    stage1, bench = load_script("1_train_stage1"), load_script("bench")
    line = one_line_error(capsys, bench.main, ["--quick", "--device", "tpu"])
    assert "--device tpu: 'device' is 'tpu'" in line
    if not torch.cuda.is_available():
        line = one_line_error(capsys, stage1.main, ["--set", "device=cuda"])
        assert "--set device=cuda: 'device' is 'cuda', but no CUDA GPU is visible" in line
    with pytest.raises(ConfigError, match=r"--set precision=fp16: 'precision' is 'fp16'.*use fp32, or bf16"):
        runtime_module.setup_runtime(load_config(None, ["device=cpu", "precision=fp16"]))
    line = one_line_error(capsys, bench.main, ["--quick", "--device", "cpu", "--precision", "fp16"])
    assert "--precision fp16" in line and "fp32" in line


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from utils.runtime import cpu_has_native_bf16
    avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
    (tmp_path / "avx2").write_text(avx2)
    (tmp_path / "zen4").write_text(avx2.replace("avx2", "avx2 avx512f avx512_bf16"))
    (tmp_path / "sapphire").write_text(avx2.replace("avx2", "avx2 amx_tile amx_bf16"))
    assert not cpu_has_native_bf16(tmp_path / "avx2")
    assert cpu_has_native_bf16(tmp_path / "zen4") and cpu_has_native_bf16(tmp_path / "sapphire")


@pytest.mark.parametrize("override, key", [
    ("data.classes=[background, background]", "data.classes"),  # one name for two classes: outputs clash
    ("data.mean=[123.7, 116.3, 103.5]", "data.mean"),        # 0-255 units where [0, 1] ones belong
    ("num_workers=100000", "num_workers"),
    ("seed=100000000000000000000", "seed"),                   # beyond what torch.manual_seed takes
    ("name=../elsewhere", "name"),
    ("name=", "name"),
    ("stage1.cam_scales=1.0", "stage1.cam_scales"),           # a number where a list belongs
    ("stage1.label_threshold=1", "stage1.label_threshold"),  # no class would ever be present
    ("stage1.head_weights=[0, 0, 0]", "stage1.head_weights"),
    ("stage1.output_stride=12", "stage1.output_stride"),
])
def test_more_nonsense_is_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(ROOT / "configs" / "demo.yaml", [override])


def test_a_config_that_is_no_text_is_one_sentence(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00stage1")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_config(path)


def test_values_the_network_decides_are_checked_when_it_is_described():
    from utils.timm_settings import check_vit_settings, inspect_network
    cfg = load_config(None, ["stage1.backbone=resnet10t", "stage1.out_indices=[0,1,9]"])
    with pytest.raises(ConfigError, match=r"^--set stage1\.out_indices=\[0,1,9\]: .*feature stages are 0 to 4"):
        check_vit_settings(cfg, "stage1", inspect_network(cfg, "stage1"))
    cfg = load_config(None, ["stage1.backbone=resnet10t", "stage1.out_indices=[-3,-2,-1]"])
    check_vit_settings(cfg, "stage1", inspect_network(cfg, "stage1"))  # counted from the end: fine


def test_stage2_batches_hold_two_crops_or_more_per_process():
    from utils.stage2.training_data import check_batch_statistics as check
    with pytest.raises(ConfigError, match="batches of 1 crop per process.*stage2.max_train_images"):
        check(1, 8, 1)  # one labelled image for few-shot training, one crop of it per epoch
    with pytest.raises(ConfigError, match="batches of 1 crop"):
        check(3, 4, 4)
    check(3, 8, 1)
    check(16, 2, 1)
