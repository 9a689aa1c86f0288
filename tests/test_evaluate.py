"""Evaluation of a tiny finished run: eval.json agrees with summary.json; figures, report exist."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import evaluate
from lwjax import report as report_lib
from lwjax import figures
from lwjax import metrics
from lwjax import experiment
from lwjax.training import runtime

ROOT = Path(__file__).resolve().parents[1]
TINY = config_lib.Config(
    image_size=32, calib=8, synth_train_subjects=2, synth_val_subjects=1, synth_slices=2,
    synth_coils=4, maps="lowres", depth=3, features=8, kernel_size=3, epochs=1, batch_size=2,
    method="layerwise_convex,e2e", fista_iters=20, log_every=0)


def _mesh():
  return runtime.make_mesh(2)  # the subprocess below sees 2 devices too


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  summary = experiment.run(dataclasses.replace(TINY, workdir=str(workdir)), mesh=_mesh())
  return workdir, summary, evaluate.run(workdir, mesh=_mesh())


def _leaves(tree, prefix=()):
  """(path, {metric: value}) of every metric entry of a summary.json-like tree."""
  if set(tree) == set(evaluate.METRICS):
    return [(prefix, tree)]
  return [leaf for k, v in tree.items() for leaf in _leaves(v, prefix + (k,))]


def test_eval_json_matches_summary(finished_run):
  workdir, summary, result = finished_run
  assert json.loads((workdir / "eval.json").read_text()) == result
  networks = [("zero_filled",), ("layerwise_convex", "2"), ("layerwise_convex", "3"), ("e2e", "3")]
  assert sorted(p for p, _ in _leaves(result["mean"])) == sorted(networks)
  per_slice = dict(_leaves(result["per_slice"]))
  n = len(result["slices"])
  assert n == 2 and all(isinstance(f, str) and isinstance(s, int) for f, s in result["slices"])
  for path, means in _leaves(result["mean"]):
    expected = summary
    for key in path:
      expected = expected[key]
    for metric, value in means.items():
      values = np.asarray(per_slice[path][metric])
      assert values.shape == (n,) and np.isfinite(values).all()
      assert value == pytest.approx(expected[metric], abs=1e-5), (path, metric)
      assert value == pytest.approx(values.mean(), rel=1e-12)
    assert (np.asarray(per_slice[path]["ssim"]) <= 1).all()
    assert (np.asarray(per_slice[path]["nmse"]) >= 0).all()
  assert set(result["examples"]) <= set(range(n)) and len(result["examples"]) == 2


def test_volume_metrics_follow_fastmri_per_file(finished_run):
  # fastMRI's evaluate.py in float64 scikit-image on the zero-filled baseline of every file, and
  # each network's per-file values averaged into volume_mean.
  workdir, _, result = finished_run
  val = evaluate.validation_split(evaluate.load_config(workdir))
  assert result["volumes"] == list(dict.fromkeys(name for name, _ in val.ids))
  mag = lambda a: np.hypot(a[..., 0], a[..., 1]).astype(np.float64)
  for v, name in enumerate(result["volumes"]):
    rows = val.volume_index == v
    # The slices' true intensities: each was divided by its own scale.
    x, y = (mag(a[rows]) * val.scale[rows][:, None, None] for a in (val.x, val.y))
    peak = y.max()
    expected = {"psnr": peak_signal_noise_ratio(y, x, data_range=peak),
                "ssim": np.mean([structural_similarity(t, p, data_range=peak)
                                 for t, p in zip(y, x)]),
                "nmse": np.sum((y - x) ** 2) / np.sum(y ** 2)}
    for metric, value in expected.items():
      assert result["per_volume"]["zero_filled"][metric][v] == pytest.approx(value, rel=1e-4)
  assert sorted(p for p, _ in _leaves(result["volume_mean"])) == sorted(
      p for p, _ in _leaves(result["mean"]))
  for path, means in _leaves(result["volume_mean"]):
    values = dict(_leaves(result["per_volume"]))[path]
    for metric, value in means.items():
      assert len(values[metric]) == len(result["volumes"])
      assert value == pytest.approx(np.mean(values[metric]), rel=1e-12)
  assert "## fastMRI's volume-wise convention" in (workdir / "report.md").read_text()


def test_other_data_is_evaluated_beside_the_run_not_over_it(finished_run, tmp_path):
  workdir, _, result = finished_run
  own = (workdir / "eval.json").read_bytes()
  assert result["own_data"] and result["data_dir"] == "" and result["skipped"] == []
  # The run's own data moved elsewhere is still its data: evaluated into the workdir.
  moved = tmp_path / "moved"
  shutil.copytree(workdir / "data", moved)
  cfg = evaluate.load_config(workdir, data_dir=str(moved))
  assert evaluate.output_dir(cfg, evaluate.validation_split(cfg)) == (workdir, True)
  # A run without data.json (older runs): its config.json's data is its own.
  (workdir / "data.json").rename(tmp_path / "data.json")
  try:
    cfg = evaluate.load_config(workdir)
    assert evaluate.output_dir(cfg, evaluate.validation_split(cfg)) == (workdir, True)
    cfg = evaluate.load_config(workdir, data_dir=str(moved))
    assert evaluate.output_dir(cfg, None) == (workdir / "eval_moved", False)
    # Another file limit than the run's, on its synthetic files: _first<n> only if n cuts them.
    files = len(data_lib.fastmri.list_volumes(workdir / "data", "val"))
    for n in (files, files + 5):
      cfg = evaluate.load_config(workdir, max_val_volumes=n)
      assert evaluate.output_dir(cfg, None) == (workdir / "eval_synthetic", False)
  finally:
    (tmp_path / "data.json").rename(workdir / "data.json")
  # Other data (another seed): its own folder; the run's evaluation stays as it was.
  other = data_lib.make_synthetic_dataset(
      tmp_path / "knee", train_subjects=1, val_subjects=1, slices=2, coils=TINY.synth_coils,
      size=TINY.image_size, seed=TINY.synth_seed + 1)
  got = evaluate.run(workdir, mesh=_mesh(), data_dir=str(other))
  out = workdir / "eval_knee"
  assert (workdir / "eval.json").read_bytes() == own
  assert json.loads((out / "eval.json").read_text()) == got
  assert got["data_dir"] == str(other) and not got["own_data"]
  assert got["mean"]["e2e"]["3"]["psnr"] != result["mean"]["e2e"]["3"]["psnr"]
  report = (out / "report.md").read_text()
  assert f"Data: {other} (not the run's validation data)" in report
  for link in ("figures/metrics_vs_depth.png", "figures/examples.png"):
    assert f"]({link})" in report and (out / link).is_file()
  # Another folder of the same name is not written over that evaluation.
  shutil.copytree(other, tmp_path / "elsewhere" / "knee")
  with pytest.raises(ValueError, match=r"eval_knee/eval.json: holds the evaluation of .*knee, not "
                                       r"of .*elsewhere/knee; choose another folder with "
                                       r"--out_dir"):
    evaluate.run(workdir, mesh=_mesh(), data_dir=str(tmp_path / "elsewhere" / "knee"))


def test_evaluation_can_take_another_number_of_files(finished_run, tmp_path):
  # A run trained with --max_val_volumes evaluates other data with that limit unless told
  # otherwise, and says so; here the run used all files, and the override takes one.
  workdir = finished_run[0]
  other = data_lib.make_synthetic_dataset(
      tmp_path / "brain", train_subjects=1, val_subjects=2, slices=2, coils=TINY.synth_coils,
      size=TINY.image_size, seed=TINY.synth_seed + 2)
  logged = []
  got = evaluate.run(workdir, mesh=_mesh(), log=logged.append, data_dir=str(other),
                     max_val_volumes=1)
  assert len(got["volumes"]) == 1
  assert any("val: using the first 1 of 2 files" in line for line in logged)
  assert len(evaluate.run(workdir, mesh=_mesh(), data_dir=str(other))["volumes"]) == 2
  # Each in its own folder: neither evaluation writes over the other.
  for folder, files in (("eval_brain_first1", 1), ("eval_brain", 2)):
    assert len(json.loads((workdir / folder / "eval.json").read_text())["volumes"]) == files
  # A limit the folder does not reach (a run's --max_val_volumes=6 carrying over) cuts nothing.
  cfg = evaluate.load_config(workdir, data_dir=str(other), max_val_volumes=6)
  assert evaluate.output_dir(cfg, evaluate.validation_split(cfg)) == (workdir / "eval_brain",
                                                                      False)


def test_volume_metrics_group_slices_by_file():
  rng = np.random.default_rng(0)
  pred, target = (rng.random((5, 16, 16, 2)).astype(np.float32) for _ in range(2))
  volumes = np.array([1, 0, 1, 0, 1])
  got = metrics.per_file(pred=pred, target=target, volumes=volumes)
  for v in (0, 1):
    mag = lambda a: np.hypot(a[volumes == v, ..., 0], a[volumes == v, ..., 1]).astype(np.float64)
    p, t = mag(pred), mag(target)
    assert got["psnr"][v] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=t.max()),
                                           abs=1e-4)


def _check_png(path, width_in, height_in):
  img = imread(path)
  assert img.shape[:2] == (round(height_in * figures.DPI), round(width_in * figures.DPI))
  assert img.min() >= 0 and img.max() <= 1
  assert img[..., :3].std() > 0.01 and img[..., :3].min() < 0.5  # not a blank canvas


def test_figures(finished_run):
  workdir, _, result = finished_run
  fig = workdir / "figures"
  _check_png(fig / "metrics_vs_depth.png", 10, 4)
  _check_png(fig / "training_curves.png", 8, 4.5)
  # zero-filled, one column per method, target; an image row and an error row per slice.
  _check_png(fig / "examples.png", figures.PANEL * 4, figures.PANEL * 2 * len(result["examples"]))


def test_report(finished_run):
  workdir, _, result = finished_run
  report = (workdir / "report.md").read_text()
  slice_part, volume_part = report.split("## fastMRI's volume-wise convention")
  table = lambda text: {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
                        for line in text.splitlines() if line.startswith("| ")}
  rows, volume_rows = table(slice_part), table(volume_part)
  for method, depth in [("layerwise_convex", 2), ("layerwise_convex", 3), ("e2e", 3)]:
    psnr = result["mean"][method][str(depth)]["psnr"]
    assert f"{psnr:.2f} ±" in rows[(method, str(depth))]
    ssim = result["volume_mean"][method][str(depth)]["ssim"]
    assert f"{ssim:.4f} ±" in volume_rows[(method, str(depth))]
  gap = result["mean"]["layerwise_convex"]["3"]["psnr"] - result["mean"]["e2e"]["3"]["psnr"]
  assert f"| {gap:+.2f} |" in rows[("layerwise_convex", "3")]
  assert "layerwise_convex: stage reports" in report  # the convex stages' certificates
  # Every figure of a convex stage report is explained in one sentence.
  reports = evaluate.stage_reports(evaluate.load_config(workdir))["layerwise_convex"]
  keys = {k for r in reports.values() for k in r}
  assert {"rel_gap", "kkt_violation", "constraint_violation", "relu_mismatch", "mse_relu",
          "active_groups", "beta_max", "passes"} <= keys <= set(report_lib.STAGE_KEYS), keys
  for key in keys:
    assert f"- `{key}`: {report_lib.STAGE_KEYS[key]}" in report
  # The mask's acceleration: synthetic headers say every column was acquired.
  mask = evaluate.validation_split(evaluate.load_config(workdir)).mask
  grid = mask.size / mask.sum()
  assert result["acceleration"] == {"grid": pytest.approx(grid), "acquired": [grid, grid]}
  assert f"mask poisson x4 ({grid:.2f} on the grid, {grid:.2f} over the k-space columns" in report
  for link in ("figures/metrics_vs_depth.png", "figures/examples.png",
               "figures/training_curves.png"):
    assert f"]({link})" in report and (workdir / link).is_file()


def _launch(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_launch_script_writes_the_same_evaluation(finished_run):
  workdir, _, result = finished_run
  (workdir / "eval.json").unlink()
  done = _launch(f"--workdir={workdir}", "--eval_batch_size=2")
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.loads((workdir / "eval.json").read_text())
  expected = dict(_leaves(result["mean"]))
  assert sorted(p for p, _ in _leaves(again["mean"])) == sorted(expected)
  for path, a in _leaves(again["mean"]):
    b = expected[path]
    for metric in a:
      assert a[metric] == pytest.approx(b[metric], abs=1e-5), (path, metric)
  assert "PSNR" in done.stdout


def test_launch_script_names_a_missing_workdir(tmp_path):
  done = _launch(f"--workdir={tmp_path / 'nowhere'}")
  assert done.returncode != 0 and str(tmp_path / "nowhere") in done.stderr


def test_missing_config_or_network_is_named(finished_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    evaluate.run(tmp_path)
  config_lib.save(dataclasses.replace(TINY, workdir=str(tmp_path)), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "params" / "layerwise_convex")):
    evaluate.run(tmp_path)
  with pytest.raises(ValueError, match="depth"):
    evaluate.load_config(finished_run[0], depth=5)


def test_representative_slices():
  psnr = np.array([30.0, 10.0, 20.0, 25.0, 15.0, 35.0, 40.0, 5.0, 28.0, 33.0, 12.0])
  median, low = evaluate.representative_slices(psnr)
  assert psnr[median] == np.median(psnr)
  assert psnr[low] == 10.0  # nearest the 10th percentile of 11 values: the 2nd smallest
  assert evaluate.representative_slices(np.array([1.0])) == [0]


@pytest.mark.parametrize("changes, networks", [
    (dict(model="unrolled", unroll_iters=2, depth=2, method="layerwise,e2e", cg_iters=3),
     [("zero_filled",), ("cg_sense",), ("unrolled_stagewise", "1"), ("unrolled_stagewise", "2"),
      ("unrolled_e2e", "2")]),
    (dict(ndim=3, volume_depth=2, synth_slices=3, batch_size=1, method="layerwise,e2e"),
     [("zero_filled",), ("layerwise", "2"), ("layerwise", "3"), ("e2e", "3")]),
])
def test_unrolled_and_3d_runs_evaluate_like_their_trainer(tmp_path, changes, networks):
  # The trainer's summary.json (its own prediction code) and evaluate's eval.json must agree.
  cfg = dataclasses.replace(TINY, workdir=str(tmp_path), **changes)
  summary = experiment.run(cfg, mesh=runtime.make_mesh(1))
  result = evaluate.run(tmp_path, mesh=runtime.make_mesh(1))
  assert sorted(p for p, _ in _leaves(result["mean"])) == sorted(networks)
  for path, means in _leaves(result["mean"]):
    expected = summary
    for key in path:
      expected = expected[key]
    for metric, value in means.items():
      assert value == pytest.approx(expected[metric], abs=1e-5), (path, metric)
  # What launch/evaluate.py prints: a line per baseline and per network.
  lines = evaluate.mean_lines(result["mean"])
  assert len(lines) == len(networks) and all("PSNR" in line for line in lines)
  assert ("cg_sense   : PSNR" in "\n".join(lines)) == (changes.get("model") == "unrolled")
  # 3D: the file's 3 slices give one patch of 2; its last slice is not evaluated.
  assert [index for _, index in result["slices"]] == [0, 1]
  assert (tmp_path / "figures" / "examples.png").is_file()
  report = (tmp_path / "report.md").read_text()
  assert ("CG-SENSE" in report) == (changes.get("model") == "unrolled")
