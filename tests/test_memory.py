"""The memory analysis of training steps: growth with the batch, the largest batch, the report."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.image import imread

from lwjax import config as config_lib
from lwjax import figures
from lwjax import memory

ROOT = Path(__file__).resolve().parents[1]
# Depth 4: an e2e net of 3 hidden layers; every stage trains 1 (the convex one about 1.5 plain).
CFG = config_lib.Config(image_size=32, depth=4, features=8, kernel_size=3, batch_size=2,
                        method="layerwise_convex,e2e")
BUDGET = 3 * 2**19  # 1.5 MiB: a few tiny examples per step
# The deepest stage of each layer-wise method, and e2e at the same depth (4 compiles each).
NETWORKS = [memory.Network("e2e", 4), memory.Network("layerwise", 4),
            memory.Network("layerwise_convex", 4)]


@pytest.fixture(scope="module")
def analysed():
  return {n.method: memory.analyse(CFG, n, BUDGET, batch_size=CFG.batch_size) for n in NETWORKS}


def test_networks_of_a_config():
  labels = [n.label for n in memory.networks(CFG)]
  assert labels == ["e2e"] + [f"{m} stage {s}" for m in ("layerwise", "layerwise_convex")
                              for s in (1, 2, 3)]
  assert [n.label for n in memory.networks(dataclasses.replace(CFG, method="e2e"))] == [
      "e2e", "layerwise stage 1", "layerwise stage 2", "layerwise stage 3"]
  unrolled = dataclasses.replace(CFG, model="unrolled", method="e2e,layerwise", unroll_iters=3)
  assert [n.label for n in memory.networks(unrolled, coils=4)] == [
      "unrolled e2e, 3 iterations", "unrolled stage (each)"]


def test_step_bytes_grow_with_the_batch(analysed):
  for entry in analysed.values():
    sizes = sorted((int(b), n) for b, n in entry["compiled"].items())
    assert len(sizes) == 4 and [b for b, _ in sizes][:2] == [2, 4]  # the fit, then the search
    totals = [n for _, n in sizes]
    assert totals == sorted(set(totals))  # strictly increasing
    # Linear in the batch: the model the largest-batch search starts from.
    (b1, n1), (b2, n2) = sizes[0], sizes[-1]
    assert (n2 - n1) / (b2 - b1) == pytest.approx(entry["bytes_per_example"], rel=0.05)
    parts = entry["breakdown"]
    assert parts["total"] == parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    assert parts["alias"] > 0  # the donated state is updated in place
    assert entry["step_bytes"] == entry["compiled"][str(CFG.batch_size)] == parts["total"]


def test_max_batch_is_the_largest_that_fits(analysed):
  for entry in analysed.values():
    b = entry["max_batch"]
    assert b >= 2
    assert entry["compiled"][str(b)] <= BUDGET < entry["compiled"][str(b + 1)]


def test_layerwise_stages_need_less_than_e2e(analysed):
  e2e = analysed["e2e"]
  for method in ("layerwise", "layerwise_convex"):
    stage = analysed[method]
    assert stage["stage"] == 3 and stage["depth"] == e2e["depth"] == 4
    assert stage["step_bytes"] < e2e["step_bytes"]
    assert stage["bytes_per_example"] < e2e["bytes_per_example"]
    assert stage["max_batch"] > e2e["max_batch"]
  rep = {"budget_bytes": BUDGET, "batch_size": 2, "backend": "cpu", "e2e": e2e,
         "layerwise": [analysed["layerwise"]], "layerwise_convex": [analysed["layerwise_convex"]]}
  table = memory.format_table(rep)
  assert "| e2e | 4 |" in table and "| layerwise_convex stage 3 | 4 |" in table
  assert f"{analysed['layerwise']['max_batch'] / e2e['max_batch'] - 1:+.0%}" in table


@pytest.mark.parametrize("cache,dtype,h_dtype", [
    ("host", "float32", np.float32), ("disk", "float32", np.float32),
    ("device", "bfloat16", jnp.bfloat16), ("host", "bfloat16", jnp.bfloat16),
    ("disk", "bfloat16", np.float32)])  # A disk cache holds float32 whatever the compute dtype.
def test_a_cached_stage_takes_its_features_with_the_batch(cache, dtype, h_dtype):
  # The trainer's cached step runs no prefix: its arguments hold h (batch x pixels x features)
  # in place of the frozen layers.
  cfg = dataclasses.replace(CFG, compute_dtype=dtype)
  network = memory.Network("layerwise", 3)
  plain = memory.abstract_step(cfg, network, 2)
  cached = memory.abstract_step(dataclasses.replace(cfg, cache_features=cache), network, 2)
  assert set(plain[3]) == {"convs_0"} and cached[3] == {}
  assert cached[4]["h"].shape == (2, 32, 32, 8) and cached[4]["h"].dtype == h_dtype
  frozen = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(plain[3]))
  args = [memory.step_memory(dataclasses.replace(cfg, cache_features=c), network, 2)["argument"]
          for c in ("none", cache)]
  assert args[1] - args[0] == 2 * 32 * 32 * 8 * np.dtype(h_dtype).itemsize - frozen


@pytest.mark.parametrize("true", [0, 1, 2, 7, 13, 40])
@pytest.mark.parametrize("guess", [-2, 0, 1, 6, 7, 8, 13, 14, 100])
def test_largest_fitting(true, guess):
  probes = []
  fits = lambda b: probes.append(b) or b <= true
  assert memory.largest_fitting(fits, guess) == true
  if guess == true >= 1:
    assert probes == [true, true + 1]  # an exact guess costs two compiles


def test_run_steps_on_cpu():
  memory.run_steps(CFG, memory.Network("layerwise", 3), 2, steps=2)  # what --measure runs
  with pytest.raises(RuntimeError, match="accelerator"):
    memory.measure(CFG, {"e2e": {}})


def test_unrolled_steps_and_report(monkeypatch):
  # e2e differentiates through K = 3 iterations (CNN activations and CG steps of each); a stage
  # through one, whichever it is. 3D patches: the coil axis sits after the slice axis.
  cfg = config_lib.Config(model="unrolled", method="e2e,layerwise", image_size=8, depth=2,
                          features=2, kernel_size=3, ndim=3, volume_depth=2, batch_size=2,
                          unroll_iters=3, cg_iters=1)
  e2e_net, stage_net = memory.networks(cfg, coils=2)
  e2e, stage = (memory.step_memory(cfg, n, 2) for n in (e2e_net, stage_net))
  assert set(e2e) == {"argument", "output", "temp", "alias", "total"}
  assert 0 < stage["temp"] < e2e["temp"] and stage["total"] < e2e["total"]
  memory.run_steps(cfg, stage_net, 2, steps=1)  # What --measure runs.

  # The report around the analyses (each analysis is tested above on the CNN).
  monkeypatch.setattr(memory, "analyse", lambda cfg, n, budget, **kw: {
      "method": n.method, "depth": n.depth, "label": n.label, "max_batch": 3 if n.coils else 1,
      "step_bytes": 2**30, "fixed_bytes": 0, "bytes_per_example": 2**20, "compiled": {}})
  rep = memory.report(cfg, BUDGET, coils=2)
  assert rep["config"]["coils"] == 2 and rep["config"]["unroll_iters"] == 3
  assert [e["label"] for e in [rep["e2e"]] + rep["layerwise"]] == [
      "unrolled e2e, 3 iterations", "unrolled stage (each)"]
  assert "| unrolled stage (each) | 1 |" in memory.format_table(rep)


def test_launch_script(tmp_path):
  out = tmp_path / "mem.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # A run in the default workdir of the folder it starts in is not analysed unless named.
  other = dataclasses.replace(CFG, workdir=str(tmp_path / "workdir"), compute_dtype="bfloat16")
  (tmp_path / "workdir").mkdir()
  config_lib.save(other, tmp_path / "workdir" / "config.json")
  done = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "memory.py"), "--image_size=32", "--depth=2",
       "--features=8", "--kernel_size=3", "--batch_size=2", "--method=layerwise,e2e",
       f"--budget_gb={BUDGET / 2**30}", f"--json_out={out}", f"--figure_dir={tmp_path}",
       "--measure"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert rep["budget_bytes"] == BUDGET and "layerwise_convex" not in rep
  assert rep["config"]["compute_dtype"] == CFG.compute_dtype == "float32"
  assert {"max_batch", "bytes_per_example"} <= set(rep["e2e"])
  assert [e["stage"] for e in rep["layerwise"]] == [1]
  # At depth 2 the e2e net is the two-layer net a stage trains: the same memory.
  stage = rep["layerwise"][0]
  assert stage["bytes_per_example"] == pytest.approx(rep["e2e"]["bytes_per_example"], rel=0.05)
  assert "| layerwise stage 1 | 2 |" in done.stdout
  assert "needs an accelerator" in done.stderr
  img = imread(tmp_path / "memory_layerwise.png")
  assert img.shape[:2] == (4 * figures.DPI, 10 * figures.DPI) and img[..., :3].std() > 0.01
  # A run's workdir: its settings, with the flags given replacing them (here the batch size).
  run = dataclasses.replace(CFG, workdir=str(tmp_path / "run"), depth=3, method="e2e")
  (tmp_path / "run").mkdir()
  config_lib.save(run, tmp_path / "run" / "config.json")
  done = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "memory.py"), f"--workdir={run.workdir}",
       "--batch_size=4", f"--budget_gb={BUDGET / 2**30}", f"--json_out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert (rep["e2e"]["depth"], rep["batch_size"]) == (3, 4)
  assert [e["stage"] for e in rep["layerwise"]] == [1, 2]
  assert rep["config"]["image_size"] == 32 and rep["config"]["features"] == 8
  assert (tmp_path / "run" / "figures" / "memory_layerwise.png").is_file()
