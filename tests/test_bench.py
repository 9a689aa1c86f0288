"""Smoke tests of the benchmarks (tiny sizes): they call the trainer's internals and must keep
working when those change. Speed itself is never asserted here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size=16", "--features=4", "--kernel_size=3", "--depth=3"]


def run(script, *args):
  result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *TINY, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_bench_pipeline_reports_every_phase(tmp_path):
  out = tmp_path / "pipeline.json"
  run("bench_pipeline.py", "--batch_size=4", "--slices=8", "--epochs=2",
      "--runs=e2e+data,layerwise:device,layerwise_convex:host", f"--json_out={out}",
      f"--scratch={tmp_path / 'runs'}")
  report = json.loads(out.read_text())
  phases = {(r["method"], r["cache_features"], r["data_on_device"]):
            [p["phase"] for p in r["phases"]] for r in report["runs"]}
  assert phases == {("e2e", "none", True): ["e2e_d3"],
                    ("layerwise", "device", False): ["layerwise_s1", "layerwise_s2"],
                    ("layerwise_convex", "host", False): ["layerwise_convex_s1",
                                                          "layerwise_convex_s2"]}
  for r in report["runs"]:
    for p in r["phases"]:
      assert p["epochs_timed"] == 1 and p["steps_per_s"] > 0 and 0 <= p["data_wait_frac"] <= 1


def test_bench_steps_measures_each_step(tmp_path):
  out = tmp_path / "steps.json"
  run("bench_steps.py", "--torch=false", "--num_devices=1", "--batch_sizes=4", "--repeats=2",
      "--peak_size=256", "--steps=e2e,layerwise_convex_cached,eval", f"--json_out={out}")
  rows = {r["step"]: r for r in json.loads(out.read_text())["results"]}
  assert set(rows) == {"e2e", "layerwise_convex_cached", "eval"}
  for r in rows.values():
    assert "error" not in r, r.get("error_detail")
    assert r["ms"] > 0 and r["conv_flops"] > 0 and r["memory_bytes"] > 0
  # XLA's count of the compiled step leaves out the multiply-adds on zero padding (a quarter of
  # a 3x3 conv's at 16x16): at most the hand count of the convolutions, and not far below it.
  assert 0.6 < rows["e2e"]["flops"] / rows["e2e"]["conv_flops"] <= 1.01


def test_bench_steps_times_3d_steps(tmp_path):
  out = tmp_path / "steps3d.json"
  run("bench_steps.py", "--ndim=3", "--volume_depth=4", "--kernel_depth=3", "--depth=2",
      "--torch=false", "--num_devices=1", "--batch_sizes=2", "--repeats=1", "--warmup=1",
      "--min_time_s=0", "--peak_size=256", "--steps=e2e,layerwise_convex_s1", f"--json_out={out}")
  rows = {r["step"]: r for r in json.loads(out.read_text())["results"]}
  assert set(rows) == {"e2e", "layerwise_convex_s1"}
  for r in rows.values():
    assert "error" not in r, r.get("error_detail")
    # The hand count is the 3D one (3x3x3 kernels over 4 x 16 x 16 patches): XLA's count of the
    # compiled step is it less the padding's multiply-adds (a 2D count would be 12x too small).
    assert 0.6 < r["flops"] / r["conv_flops"] <= 1.01, r["step"]
  refused = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_steps.py"), *TINY,
                            "--ndim=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0 and "PyTorch reference (bench/torch_ref.py) is 2D only" in (
      refused.stderr + refused.stdout)


def test_bench_layers_times_every_layer_kind(tmp_path):
  out = tmp_path / "layers.json"
  run("bench_layers.py", "--torch=false", "--num_devices=1", "--batch_sizes=2", "--repeats=2",
      f"--json_out={out}")
  rows = json.loads(out.read_text())["rows"]
  assert [(r["layer"], r["mode"]) for r in rows] == [
      (kind, mode) for kind in ("first", "hidden", "head") for mode in ("fwd", "fwd+bwd")]
  assert all("error" not in r and r["ms"] > 0 and r["tflop"] > 0 for r in rows)


def test_bench_steps_agrees_with_pytorch(tmp_path):
  # The PyTorch reference is a benchmark-only dependency: this runs where torch is installed.
  pytest.importorskip("torch")
  out = tmp_path / "check.json"
  run("bench_steps.py", "--torch=true", "--check=true", "--num_devices=1", "--batch_sizes=1",
      "--repeats=1", "--warmup=1", "--min_time_s=0", "--peak_size=256", "--steps=eval",
      f"--json_out={out}")
  check = json.loads(out.read_text())["check"]
  assert "error" not in check, check.get("detail")
  assert check["agree"] and check["max_rel_diff"] < 1e-4
