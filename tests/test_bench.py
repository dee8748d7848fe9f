"""bench.py times a dataset config's own networks when given one."""
import json

import bench


def test_bench_times_the_networks_and_precision_of_a_config(tmp_path):
    out = tmp_path / "bench.json"
    # small tiles and batches from the config's own settings: CPUs without bf16 kernels emulate it slowly
    small = ["--set", "stage1.batch_size=2", "--set", "stage1.image_size=32"]
    assert bench.main(["--quick", "--device", "cpu", "--config", "configs/glas_cpu.yaml", *small,
                       "--only", "stage1_train", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["config"] == "configs/glas_cpu.yaml"
    assert written["precision"] == "torch.bfloat16"  # the config's own precision, since none was asked for
    (figure,) = written["results"]
    assert figure["figure"] == "stage1_train" and figure["batch"] == 2 and figure["images_per_s"] > 0
    assert bench.main(["--quick", "--device", "cpu", "--config", "configs/glas_cpu.yaml", "--precision", "fp32",
                       *small, "--only", "stage1_train", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["precision"] == "fp32"


def test_bench_times_stage2_of_a_config_that_starts_it_from_stage1(tmp_path):
    out = tmp_path / "bench.json"  # glas_cpu starts stage 2 from a stage-1 run that a benchmark does not have
    assert bench.main(["--quick", "--device", "cpu", "--config", "configs/glas_cpu.yaml", "--precision", "fp32",
                       "--set", "stage2.crop_size=64", "--only", "stage2_train", "--out", str(out)]) == 0
    (figure,) = json.loads(out.read_text())["results"]
    assert "error" not in figure and figure["batch"] == 8 and figure["images_per_s"] > 0
