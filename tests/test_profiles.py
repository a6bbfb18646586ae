"""Device profiles: the shipped files load and cite sources; broken files get one clear
line naming the file and the field; the precision rules refuse what a device lacks."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from dllm_export.cli import main
from dllm_export.device_profiles import (
    all_profiles,
    builtin_profiles,
    load_profile,
    parse_profile,
)
from dllm_export.errors import DllmExportError
from dllm_export.precision import check_precision, peak_key

SHIPPED = {
    "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super", "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb", "jetson-agx-thor", "rtx-3090", "rtx-4090", "rtx-5090", "l4",
    "a100-80gb", "h100-sxm", "h200", "cpu", "cpu-vnni",
}


def test_every_shipped_profile_loads_and_is_named_after_its_file():
    profiles = all_profiles()
    assert {p.name for p in profiles} == SHIPPED
    for profile in profiles:
        assert profile.path.stem == profile.name
        assert 0 < profile.usable_bytes <= profile.memory_gib * (1 << 30)


def test_engine_library_follows_the_device_class():
    libraries = {p.name: p.engine_library for p in all_profiles()}
    assert libraries["cpu"] == "onnxruntime"
    assert {libraries[n] for n in ("rtx-3090", "rtx-4090", "rtx-5090")} == {"tensorrt_rtx"}
    assert {libraries[n] for n in SHIPPED if n.startswith(("jetson", "h1", "h2", "a100", "l4"))} \
        == {"tensorrt"}


def test_jetsons_share_unified_memory_and_orin_nano_has_no_dla():
    profiles = {p.name: p for p in all_profiles()}
    assert all(p.unified_memory for n, p in profiles.items() if n.startswith("jetson"))
    assert profiles["jetson-orin-nano-8gb"].dla_cores == 0
    assert profiles["jetson-agx-orin-64gb"].dla_cores == 2
    assert profiles["jetson-orin-nano-8gb-super"].bandwidth_gbs > \
        profiles["jetson-orin-nano-8gb"].bandwidth_gbs


def test_the_cpu_profile_records_its_measured_nbits_accuracy_level():
    profiles = {p.name: p for p in all_profiles()}
    cpu = profiles["cpu"]
    # bench_quantize on this VM: level 0 (fp32 arithmetic) beat level 4 (int8) for INT4
    assert cpu.nbits_accuracy_level == 0
    assert cpu.sources["quantization.nbits_accuracy_level"].startswith("measured:")
    # ... and on a VNNI CPU int8 arithmetic (level 4) was the faster one
    assert profiles["cpu-vnni"].nbits_accuracy_level == 4
    assert profiles["cpu-vnni"].sources["quantization.nbits_accuracy_level"].startswith(
        "measured:")
    # GPU profiles run no MatMulNBits artifact: they name no level
    assert profiles["h200"].nbits_accuracy_level is None


def _good() -> dict:
    return yaml.safe_load(builtin_profiles()["jetson-orin-nano-8gb"].read_text())


def _write(tmp_path, data) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_users_own_file_loads_by_path(tmp_path):
    data = _good()
    data["name"] = "my-board"
    profile = load_profile(_write(tmp_path, data))
    assert profile.name == "my-board" and profile.path.name == "mine.yaml"


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d["memory"].pop("total_gib"), "memory.total_gib", "is missing"),
    (lambda d: d.update(bandwidth_gbs="fast"), "bandwidth_gbs", "must be float"),
    (lambda d: d.update(dla_cores=True), "dla_cores", "must be int"),
    (lambda d: d.update(precisions=["fp16", "fp12"]), "precisions", "unknown precision 'fp12'"),
    (lambda d: d.update(precisions=["fp16", "fp8"]), "precisions",
     "fp8 needs compute capability 8.9"),
    (lambda d: d["peak_tflops"].pop("fp16"), "peak_tflops.fp16", "needed for precision fp16"),
    (lambda d: d["peak_tflops"].update(fp12=1.0), "peak_tflops.fp12", "not a known precision"),
    (lambda d: d.update(compute_capability="eight"), "compute_capability", "must look like"),
    (lambda d: d.update(engine_library="tensorflow"), "engine_library", "must be one of"),
    (lambda d: d["memory"].update(usable_fraction=1.5), "memory.usable_fraction", "at most 1"),
    (lambda d: d["build"].update(precision="int4"), "build.precision", "float precision"),
    (lambda d: d["sources"].pop("bandwidth_gbs"), "sources.bandwidth_gbs", "is missing"),
    (lambda d: d.update(quantization={"nbits_accuracy_level": 7}),
     "quantization.nbits_accuracy_level", "must be one of 0, 1, 2, 3, 4"),
    (lambda d: d.update(quantization={"nbits_accuracy_level": 0}),
     "sources.quantization.nbits_accuracy_level", "is missing"),
])
def test_a_broken_profile_names_file_and_field(tmp_path, edit, field, words):
    data = _good()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(DllmExportError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: field '{field}'"), message
    assert words in message
    assert "\n" not in message


def test_unreadable_yaml_and_unknown_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(DllmExportError, match="not a readable YAML file"):
        parse_profile(path)
    with pytest.raises(DllmExportError, match="no such device profile .*jetson-orin-nano-8gb"):
        load_profile("jetson-nano-9000")


# --- precision rules --------------------------------------------------------------------


@pytest.mark.parametrize("name, precision, reason", [
    ("jetson-orin-nano-8gb", "fp8",
     "fp8 needs compute capability 8.9 or newer, and this device has 8.7"),
    ("jetson-agx-orin-64gb", "fp4", "fp4 needs compute capability 10.0 or newer"),
    ("rtx-4090", "fp4", "fp4 needs compute capability 10.0 or newer, and this device has 8.9"),
    ("a100-80gb", "fp8", "fp8 needs compute capability 8.9"),
    ("rtx-3090", "fp8", "fp8 needs compute capability 8.9"),
    ("jetson-orin-nano-8gb", "bf16", "does not run bf16 engines"),
    ("cpu", "fp16", "does not run fp16 engines"),
])
def test_a_precision_the_device_lacks_is_refused(name, precision, reason):
    with pytest.raises(DllmExportError) as caught:
        check_precision(load_profile(name), precision)
    assert reason in str(caught.value)
    assert str(caught.value).startswith(name)


@pytest.mark.parametrize("name, precision", [
    ("jetson-orin-nano-8gb", "fp16"), ("jetson-orin-nano-8gb", "int8"),
    ("jetson-orin-nano-8gb", "int4"), ("rtx-4090", "fp8"), ("h100-sxm", "fp8"),
    ("rtx-5090", "fp4"), ("jetson-agx-thor", "fp4"), ("a100-80gb", "bf16"),
])
def test_a_precision_the_device_has_passes(name, precision):
    assert check_precision(load_profile(name), precision) == precision


def test_orin_runs_fp16_int8_int4_only_below_fp32():
    for name in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"):
        assert load_profile(name).precisions == ("fp32", "fp16", "int8", "int4")


def test_unknown_precision_lists_the_known_ones():
    with pytest.raises(DllmExportError, match="unknown precision 'fp6'; choose one of fp32"):
        check_precision(load_profile("h100-sxm"), "fp6")


def test_int4_is_weight_only_and_uses_the_fp16_peak():
    h100 = load_profile("h100-sxm")
    assert peak_key("int4", h100.peak_tflops) == "fp16"
    assert peak_key("fp32", h100.peak_tflops) == "tf32"  # TensorRT allows TF32 by default
    assert peak_key("int4", load_profile("cpu").peak_tflops) == "fp32"


# --- CLI ---------------------------------------------------------------------------------


def test_cli_lists_and_shows_profiles(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["profiles", "--json"])
    assert listed.exit_code == 0, listed.output
    assert "jetson-orin-nano-8gb" in listed.output and "tensorrt_rtx" in listed.output
    table = runner.invoke(main, ["profiles"])
    assert table.exit_code == 0 and "rtx-5090" in table.output
    shown = runner.invoke(main, ["profiles", "show", "jetson-agx-thor"])
    assert shown.exit_code == 0 and "sources:" in shown.output and "2070" in shown.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n")
    failed = runner.invoke(main, ["profiles", "show", str(broken)])
    assert failed.exit_code == 1
    assert "field 'engine_library' is missing" in failed.output
