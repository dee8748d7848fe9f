import pytest

from utils.config import ConfigError, load_config, parse_override, save_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    from pathlib import Path
    names = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert {"demo", "glas", "digestpath", "wien", "hph"} <= set(names)
    for name in names:
        cfg = load_config(f"configs/{name}.yaml")
        assert len(cfg.data.palette) == len(cfg.data.classes)


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write(tmp_path, "stage1: {epochs: 4}\n"), ["stage1.epochs=2", "stage1.lr=1e-3",
                                                                 "stage2.pretrained=weights.pth"])
    assert cfg.stage1.epochs == 2 and cfg.stage1.lr == pytest.approx(1e-3)
    assert cfg.stage2.pretrained == "weights.pth"
    assert cfg.name == "c"  # name defaults to the file's stem


@pytest.mark.parametrize("text, key", [
    ("stage1: {epoks: 3}\n", "stage1.epoks"),
    ("stage1: {epochs: three}\n", "stage1.epochs"),
    ("stage1: {epochs: -1}\n", "stage1.epochs"),
    ("data: {mask_encoding: rgb}\n", "data.mask_encoding"),
    ("data: {classes: [a, b, c]}\n", "data.palette"),
    ("stage1: 5\n", "stage1"),
    ("data: {mpp: 0}\n", "data.mpp"),
    ("data: {mpp: true}\n", "data.mpp"),
    ("data: {mpp: 20x}\n", "data.mpp"),
    ("data: {split_titles: [Test A]}\n", "data.split_titles"),
    ("data: {split_titles: {test: [A]}}\n", "data.split_titles"),
    ("stage1: {background_cam_scale: 0}\n", "stage1.background_cam_scale"),
    ("data: {background: null}\nstage1: {background_cam_scale: 0.8}\n", "stage1.background_cam_scale"),
])
def test_bad_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="stage1.nope"):
        load_config(None, ["stage1.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("stage1.epochs")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_a_variant_states_only_what_it_changes_on_top_of_its_base(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: recipe\nstage1: {epochs: 7, lr: 0.5}\nstage2: {epochs: 3}\n")
    (tmp_path / "variant.yaml").write_text("base: recipe.yaml\nstage1: {epochs: 2}\n")
    cfg = load_config(tmp_path / "variant.yaml", ["stage2.epochs=4"])
    assert (cfg.stage1.epochs, cfg.stage1.lr, cfg.stage2.epochs) == (2, 0.5, 4)
    assert cfg.name == "variant"  # its own name, not the base file's
    assert "base" not in cfg.to_dict()
    (tmp_path / "typo.yaml").write_text("base: recipes.yaml\n")
    with pytest.raises(ConfigError, match="typo.yaml.*recipes.yaml does not exist"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "recipe.yaml").write_text("base: variant.yaml\n")
    with pytest.raises(ConfigError, match="leads back"):
        load_config(tmp_path / "variant.yaml")
    (tmp_path / "recipe.yaml").write_text("stage1: {epochs: 7}\n")
    (tmp_path / "bad.yaml").write_text("base: recipe.yaml\nstage1: {epoks: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*stage1\.epoks"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/glas.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_training_resolution_is_part_of_the_model_metadata():
    from utils.stage2.predict import segmenter_meta
    from utils.timm_settings import resolve_normalisation

    def meta(*args):
        cfg = load_config(*args)
        resolve_normalisation(cfg, "stage2")
        return segmenter_meta(cfg)

    assert load_config("configs/glas.yaml").data.mpp == pytest.approx(0.62)
    assert load_config("configs/glas_cpu.yaml").data.mpp == pytest.approx(0.62)
    assert load_config(None).data.mpp is None  # unknown unless a config states it
    assert meta("configs/demo.yaml")["mpp"] == pytest.approx(0.5)
    assert meta(None, ["data.mpp=1"])["mpp"] == 1.0
    assert meta(None, ["data.mpp=null"])["mpp"] is None


def test_bf16_on_a_cpu_autocasts_and_warns_only_without_native_support(capsys, monkeypatch):
    import torch

    import utils.runtime as runtime_module
    cfg = load_config("configs/demo.yaml", ["device=cpu", "precision=bf16"])
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    runtime = runtime_module.setup_runtime(cfg)
    assert runtime.amp_dtype == torch.bfloat16 and "warning" not in capsys.readouterr().err
    with runtime.autocast():
        assert torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: False)
    runtime_module.setup_runtime(cfg)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "bf16" in warning and "--set precision=fp32" in warning
    assert "many times slower" in warning
    assert runtime_module.setup_runtime(load_config("configs/demo.yaml", ["device=cpu"])).amp_dtype is None
