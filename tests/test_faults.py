"""Faults a long run meets (issue 23): damaged checkpoints, orphaned workers, unwritable folders,
divergence, bad flags, damaged JSON files and cache entries that are not what they are named."""
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lwjax import files
from lwjax import config as config_lib
from lwjax import experiment
from lwjax.training import checkpoints
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib
from test_train import CFG, fit_e2e, toy_arrays

ROOT = Path(__file__).resolve().parents[1]


def _steps(ckpt_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _damage(kind: str, step_dir: Path) -> None:
  """The damage of issue 23, to one orbax step folder."""
  data = [p for p in (step_dir / "default" / "d").iterdir()]
  if kind == "truncated":
    for p in data:
      with p.open("r+b") as f:
        f.truncate(p.stat().st_size // 3)
  elif kind == "overwritten":
    for p in data:
      p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
  elif kind == "no_manifest":
    for p in step_dir.rglob("manifest.ocdbt"):
      p.unlink()
  elif kind == "no_metadata":
    (step_dir / "default" / "_METADATA").unlink()
  elif kind == "emptied":
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path_factory.mktemp("full")))
  return jax.device_get(fit_e2e(cfg, toy_arrays(), runtime.make_mesh(1), 4).state)


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
  """The workdir of the same phase stopped after epoch 3 (copied by each test)."""
  workdir = tmp_path_factory.mktemp("three")
  fit_e2e(dataclasses.replace(CFG, workdir=str(workdir)), toy_arrays(), runtime.make_mesh(1), 3)
  return workdir


def _copy(three_epochs: Path, tmp_path: Path):
  workdir = tmp_path / "run"
  shutil.copytree(three_epochs, workdir)
  return dataclasses.replace(CFG, workdir=str(workdir)), workdir


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["truncated", "overwritten", "no_manifest", "no_metadata",
                                  "emptied"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_bitwise(
    tmp_path, kind, uninterrupted, three_epochs, caplog):
  cfg, workdir = _copy(three_epochs, tmp_path)
  arrays, mesh = toy_arrays(), runtime.make_mesh(1)
  ckpt_dir = workdir / "checkpoints" / "e2e_test"
  steps = _steps(ckpt_dir)
  assert len(steps) >= 2, "two checkpoints are kept"
  _damage(kind, ckpt_dir / str(steps[-1]))
  with caplog.at_level(logging.INFO):
    resumed = fit_e2e(cfg, arrays, mesh, 4)
  assert resumed.resumed_from == steps[-2]
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and str(ckpt_dir / str(steps[-1])) in lines[0], lines
  assert (workdir / "damaged" / "checkpoints" / "e2e_test" / str(steps[-1])).is_dir()
  _assert_same(uninterrupted, jax.device_get(resumed.state))


def test_no_intact_checkpoint_restarts_the_phase(tmp_path, uninterrupted, three_epochs, caplog):
  cfg, workdir = _copy(three_epochs, tmp_path)
  arrays, mesh = toy_arrays(), runtime.make_mesh(1)
  ckpt_dir = workdir / "checkpoints" / "e2e_test"
  for step in _steps(ckpt_dir):
    _damage("no_metadata", ckpt_dir / str(step))
  with caplog.at_level(logging.INFO):
    resumed = fit_e2e(cfg, arrays, mesh, 4)
  assert resumed.resumed_from == 0
  assert any("no intact checkpoint left" in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records)
  _assert_same(uninterrupted, jax.device_get(resumed.state))


TINY = config_lib.Config(
    image_size=32, calib=8, synth_train_subjects=2, synth_val_subjects=1, synth_slices=2,
    synth_coils=4, maps="lowres", depth=2, features=8, kernel_size=3, epochs=2, batch_size=2,
    method="layerwise,e2e", log_every=0, compilation_cache="", prep_workers=1)


def _run(workdir, **change):
  return experiment.run(dataclasses.replace(TINY, workdir=str(workdir), **change),
                   mesh=runtime.make_mesh(2))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run's workdir and summary."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  return workdir, _run(workdir)


def _files(workdir: Path) -> dict:
  """Every file's mtime and bytes (TensorBoard's event files are new per process, by design)."""
  return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*")
          if p.is_file() and not {"cache", "tensorboard"} & set(p.parts)}


def test_rerun_of_a_finished_run_rewrites_nothing(finished):
  workdir, summary = finished
  before = _files(workdir)
  assert _run(workdir) == summary
  assert _files(workdir) == before  # config.json, summary.json, metrics.jsonl, ... untouched
  assert "diverged" not in summary


def test_damaged_finished_network_and_stage_report_are_trained_again(finished, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  (workdir / "params" / "e2e" / "depth_2" / "_METADATA").unlink()
  (workdir / "stages" / "layerwise" / "stage_1.json").write_text('{"mse": 0.1')
  with pytest.raises(checkpoints.DamagedNetwork, match=r"depth_2: the saved network is damaged"):
    checkpoints.load_params(workdir_lib.params_dir(workdir, "e2e", 2))
  with caplog.at_level(logging.WARNING):
    summary = _run(workdir)
  for method in ("e2e", "layerwise"):
    assert summary[method] == finished[1][method]
  assert (workdir / "damaged" / "params" / "e2e" / "depth_2").is_dir()
  assert (workdir / "damaged" / "stages" / "layerwise" / "stage_1.json").is_file()
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "stage_1.json: not valid JSON" in warned and "the saved network is damaged" in warned


def test_diverged_training_is_marked_not_reported(tmp_path):
  summary = _run(tmp_path / "run", method="e2e", lr=100.0)
  why = summary["diverged"]["e2e"]["2"]
  assert "below the zero-filled input's" in why and "times that of its first step" in why
  assert "e2e depth 2" in loop.diverged_message(summary)
  records = files.read_json_lines(tmp_path / "run" / "metrics.jsonl")
  assert any(r.get("event") == "diverged" and r["phase"] == "e2e_d2" for r in records)


def test_loss_divergence_thresholds():
  records = [{"phase": "p", "epoch": 1, "loss": 5.0, "loss_first_step": 1.0},
             {"phase": "p", "epoch": 2, "loss": 9.0},
             {"phase": "p", "epoch": 2, "event": "check", "loss": 1e9}]
  assert loop.loss_divergence(records, "p") is None
  assert "11 times" in loop.loss_divergence(records + [{"phase": "p", "epoch": 3, "loss": 11.0}],
                                             "p")
  zero = {"psnr": 20.0}
  assert loop.network_divergence({"psnr": 10.5}, zero, records, "p") is None
  assert "10.5 dB below" in loop.network_divergence({"psnr": 9.5}, zero, records, "p")


@pytest.mark.parametrize("where", ["workdir", "cache_dir", "readonly"])
def test_unwritable_folder_is_refused_up_front(tmp_path, where):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  if where == "readonly":  # Permission bits do not stop root; /proc refuses everyone.
    change, flag = {"workdir": "/proc" if os.geteuid() == 0 else str(tmp_path / "ro")}, "workdir"
    if os.geteuid() != 0:
      (tmp_path / "ro").mkdir(mode=0o500)
  else:
    change, flag = {where: str(blocker / "sub")}, where
  with pytest.raises(ValueError, match=rf"^--{flag}=.*: cannot write there .*expected a folder"):
    experiment.run(dataclasses.replace(TINY, **{"workdir": str(tmp_path / "w"), **change}),
              mesh=runtime.make_mesh(2))
  assert not (tmp_path / "w").exists()


def test_run_refused_on_its_data_leaves_no_new_workdir(tmp_path):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(ValueError, match="--batch_size"):
    _run(workdir, batch_size=8)  # 4 training slices
  assert not (tmp_path / "new").exists()


_POOL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from lwjax.data import cache as data
if __name__ == "__main__":
  pool = data._worker_pool(2)
  busy = [pool.submit(time.sleep, 120) for _ in range(2)]
  print("ready", flush=True)
  time.sleep(120)
"""


def _children(pid: int) -> set[int]:
  out = set()
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.add(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:  # A zombie (state Z) waits for a reaper: it is gone.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_main_process_leaves_no_preparation_worker(tmp_path):
  script = tmp_path / "pool.py"
  script.write_text(_POOL_SCRIPT.format(root=str(ROOT)))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    children = _children(proc.pid)  # 2 workers and multiprocessing's resource tracker
    assert len(children) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, children)):
      time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "processes outlived the run"
  finally:
    proc.kill()
    for c in children if "children" in locals() else ():
      if _alive(c):
        os.kill(c, signal.SIGKILL)


def test_cache_entry_of_another_slice_is_prepared_again(tmp_path):
  from lwjax import data
  from test_data import CFG as PREP, _assert_same
  data_dir = data.make_synthetic_dataset(tmp_path / "d", train_subjects=1, val_subjects=1,
                                         slices=3, coils=4, size=48)
  cache = tmp_path / "cache"
  first = data.load_split(data_dir, "train", PREP, cache_dir=cache)
  info = data.volume_infos(data_dir, "train")[0]
  a, b = (cache / f"{data.cache_key(info.path, i, PREP, info.attrs)}.npz" for i in (0, 2))
  a_bytes = a.read_bytes()
  a.write_bytes(b.read_bytes())  # the entries of slices 0 and 2 swapped
  b.write_bytes(a_bytes)
  lines = []
  again = data.load_split(data_dir, "train", PREP, cache_dir=cache, log=lines.append)
  _assert_same(first, again)
  mismatch = [line for line in lines if "hold another slice" in line]
  assert len(mismatch) == 1 and mismatch[0].startswith("train: 2 cache entries")
  assert "slice 2 instead of 0" in mismatch[0]
  lines.clear()
  _assert_same(first, data.load_split(data_dir, "train", PREP, cache_dir=cache, log=lines.append))
  assert not [line for line in lines if "hold another slice" in line]  # rewritten right


@pytest.mark.parametrize("change,message", [
    ({"lr": float("inf")}, "--lr=inf: expected a finite number"),
    ({"lr": float("nan")}, "--lr=nan: expected a finite number"),
    ({"beta": float("inf")}, "--beta=inf: expected a finite number"),
    ({"image_size": 0}, "--image_size=0: must be >= 1"),
    ({"synth_slices": 0}, "--synth_slices=0: must be >= 1"),
    ({"synth_coils": 0}, "--synth_coils=0: must be >= 1"),
    ({"synth_noise": float("nan")}, "--synth_noise=nan: expected a finite number"),
    ({"synth_noise": -0.1}, "--synth_noise=-0.1: must be >= 0"),
    ({"max_train_volumes": -1}, "--max_train_volumes=-1: must be >= 0"),
    ({"center_fraction": 0.0}, "--center_fraction=0.0: expected a fraction"),
    ({"mask_seed": -1}, "--mask_seed=-1: must be >= 0"),
])
def test_numeric_flags_are_checked_before_anything_is_written(tmp_path, change, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    _run(tmp_path / "w", **change)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["config.json", "data.json", "summary.json",
                                  "stages/layerwise/stage_1.json", "metrics.jsonl"])
def test_damaged_json_file_is_named_in_the_error(finished, tmp_path, name):
  from lwjax import evaluate
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  path = workdir / name
  path.write_text(path.read_text()[:-40] + "\n")  # cut short, as by a full disk
  cfg = dataclasses.replace(TINY, workdir=str(workdir))
  readers = {"config.json": lambda: evaluate.load_config(workdir),
             "data.json": lambda: _run(workdir),
             "summary.json": lambda: _run(workdir),
             "stages/layerwise/stage_1.json": lambda: evaluate.stage_reports(cfg),
             "metrics.jsonl": lambda: evaluate.read_metrics_log(workdir)}
  with pytest.raises(ValueError, match=re.escape(str(path)) + r": (line \d+ is )?not valid JSON"):
    readers[name]()


def test_kspace_near_float32_maximum_is_explained(tmp_path):
  from lwjax import data
  from lwjax.data import fastmri, synthetic
  volume = synthetic.make_volume(np.random.default_rng(0), size=32, coils=4, slices=2)
  kspace = volume["kspace"] / np.abs(volume["kspace"]).max() * np.float32(3e38)
  (tmp_path / "train").mkdir()
  with np.errstate(over="ignore"):  # The file's "norm" attribute overflows too.
    fastmri.write_volume(tmp_path / "train" / "big.h5", kspace.astype(np.complex64),
                         volume["rss"])
  prep = data.PrepConfig(image_size=32, calib=8, maps="lowres")
  with pytest.raises(fastmri.DataError, match=r"big.h5: key 'kspace', slice [01]: its largest "
                                              r"magnitude, 3e\+38, .* float32's maximum"):
    data.load_split(tmp_path, "train", prep, cache_dir=tmp_path / "cache")
