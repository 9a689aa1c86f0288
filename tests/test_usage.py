"""Using a trained run: summary.json results first, TensorBoard events, the load-and-apply call,
and launch/reconstruct.py's fastMRI submission files (own masks, bad files)."""
import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import evaluate
from lwjax.data import fastmri
from lwjax import inference
from lwjax.mri import masks
from lwjax.mri import sense
from lwjax.data import synthetic
from lwjax import tensorboard
from lwjax import experiment
from lwjax.models import cnn
from lwjax.training import checkpoints
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = config_lib.Config(
    image_size=32, calib=8, synth_train_subjects=2, synth_val_subjects=1, synth_slices=2,
    synth_coils=4, maps="lowres", depth=3, features=8, kernel_size=3, epochs=2, batch_size=2,
    method="layerwise,e2e", log_every=0, lr=1e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg = dataclasses.replace(TINY, workdir=str(workdir))
  return cfg, experiment.run(cfg, mesh=runtime.make_mesh(2))


def test_summary_leads_with_the_metrics(run):
  cfg, _ = run
  keys = list(json.loads((Path(cfg.workdir) / "summary.json").read_text()))
  assert keys[:3] == ["zero_filled", "layerwise", "e2e"] and keys[-2:] == ["stages", "config"]


def _events(logdir):
  """(tag, step, value or "image") of every summary in the event files of ``logdir`` (TFRecord:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    at = 0
    while at < len(raw):
      (length,) = struct.unpack("<Q", raw[at:at + 8])
      event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
      at += 12 + length + 4
      out += [(v.tag, event.step, "image" if v.HasField("image") else v.simple_value)
              for v in event.summary.value]
  return out


@pytest.mark.skipif(not tensorboard.available(), reason="tensorboardX not installed")
def test_tensorboard_events(run):
  cfg, summary = run
  events = _events(Path(cfg.workdir) / "tensorboard")
  tags = {(tag, step) for tag, step, _ in events}
  for phase in ("layerwise_s1", "layerwise_s2", "e2e_d3"):
    for key in ("loss", "lr", "steps_per_s"):
      assert {(f"train/{phase}/{key}", 1), (f"train/{phase}/{key}", 2)} <= tags, (phase, key)
  assert ("stage/layerwise/passes", 2) in tags  # The stage report's floats.
  value = {(tag, step): v for tag, step, v in events}
  for metric in ("psnr", "ssim", "nmse"):
    assert value[(f"val/{metric}/e2e", 3)] == pytest.approx(summary["e2e"]["3"][metric], rel=1e-5)
    assert value[(f"val/{metric}/layerwise", 2)] == pytest.approx(
        summary["layerwise"]["2"][metric], rel=1e-5)
    assert (f"val/{metric}/zero_filled", 3) in tags
  assert value[("train/e2e_d3/lr", 1)] == pytest.approx(cfg.lr)
  assert {("examples/target", 0), ("examples/e2e", 3), ("examples/layerwise", 2)} <= {
      (t, s) for t, s, v in events if v == "image"}


def test_without_tensorboardx_the_board_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(tensorboard, "tensorboardX", None)
  board = tensorboard.Board(tmp_path / "tb")
  board.record({"phase": "e2e_d2", "epoch": 1, "loss": 1.0})
  board.image("examples/x", np.ones((4, 4)), 0)
  board.close()
  assert not board.enabled and not (tmp_path / "tb").exists()


def test_loaded_network_reconstructs_as_the_trainer_predicts(run):
  cfg, _ = run
  recon = inference.load(cfg.workdir, "e2e")
  assert (recon.method, recon.depth) == ("e2e", 3)
  val = evaluate.validation_split(cfg)
  params = checkpoints.load_params(workdir_lib.params_dir(cfg.workdir, "e2e", 3))
  expected = cnn.predict(cnn.network_template(cfg), params, val.x, mesh=runtime.make_mesh(1),
                           batch_size=4)
  np.testing.assert_allclose(recon(val.x), expected, rtol=1e-4, atol=1e-5)
  # Complex images at another scale: scaled on the way in and back on the way out.
  z = sense.to_complex(val.x) * 7.0
  np.testing.assert_allclose(recon(z), sense.to_complex(expected) * 7.0, rtol=1e-4, atol=1e-4)
  # From k-space, mask and maps: the zero-filled image of the trainer's preparation.
  kspace = fastmri.to_grid(fastmri.read_slice(val.paths[0], 0), cfg.image_size)
  prepared = data_lib.network_input(kspace, val.mask, data_lib.prep_config(cfg))
  np.testing.assert_allclose(recon.from_kspace(kspace, val.mask, prepared["maps"]),
                             sense.to_complex(expected[0]) * prepared["scale"], rtol=1e-3,
                             atol=1e-3 * prepared["scale"])
  with pytest.raises(ValueError, match="--depth=5"):
    inference.load(cfg.workdir, "e2e", 5)
  with pytest.raises(ValueError, match="--method='bogus'"):
    inference.load(cfg.workdir, "bogus")


def _write_file(path, kspace, mask=None):
  """A fastMRI-layout file of ``kspace`` (S, C, H, W); with a ``mask`` (W,) an undersampled one
  (test/challenge layout: the k-space zero elsewhere, a "mask" key, an "acceleration" attr)."""
  rss = np.ones((kspace.shape[0], 32, 32), np.float32)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  if mask is None:
    fastmri.write_volume(path, kspace, rss)
    return path
  fastmri.write_volume(path, kspace * mask, rss, attrs={"acceleration": 4})
  with h5py.File(path, "r+") as f:
    f.create_dataset("mask", data=mask)
  return path


def _volume(seed=3, width=32):
  """Synthetic k-space (2, 4, 64, width): width columns of the k-space centre."""
  volume = synthetic.make_volume(np.random.default_rng(seed), size=32, coils=4, slices=2)
  return fastmri.center_fit(volume["kspace"], (64, width))  # k-space columns: a smaller FOV


def test_an_undersampled_file_with_the_runs_mask_is_reconstructed_as_the_full_file(run, tmp_path):
  cfg, _ = run
  recon = inference.load(cfg.workdir, "e2e")
  run_mask = masks.make_mask("cartesian", (32, 32), 4, seed=1)  # columns only
  kspace = _volume()
  full = _write_file(tmp_path / "in" / "full.h5", kspace)
  under = _write_file(tmp_path / "in2" / "full.h5", kspace, mask=run_mask[0])
  warnings = []
  a = inference.reconstruct_file(recon, full, tmp_path / "a", run_mask, log=warnings.append)
  b = inference.reconstruct_file(recon, under, tmp_path / "b", run_mask, log=warnings.append)
  assert not warnings
  with h5py.File(a) as fa, h5py.File(b) as fb:
    assert list(fa) == ["reconstruction"] and fa["reconstruction"].shape == (2, 32, 32)
    assert fa["reconstruction"].dtype == np.float32
    np.testing.assert_allclose(fb["reconstruction"][()], fa["reconstruction"][()], rtol=1e-3,
                               atol=1e-3 * fa["reconstruction"][()].max())
  other = run_mask[0].copy()
  other[np.flatnonzero(~other)[:3]] = True
  inference.file_inputs(_write_file(tmp_path / "in3" / "o.h5", kspace, mask=other), cfg, run_mask,
                        log=warnings.append)
  assert len(warnings) == 1 and "differs from the one the network was trained with" in warnings[0]


def _reconstruct(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "reconstruct.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_reconstruct_writes_the_submission_layout(run, tmp_path):
  cfg, _ = run
  data = tmp_path / "data"
  _write_file(data / "a_full.h5", _volume(4, width=36))
  test_mask = np.zeros(36, bool)
  test_mask[::3] = test_mask[14:22] = True
  _write_file(data / "b_test.h5", _volume(5, width=36), mask=test_mask)
  out = tmp_path / "out"
  result = _reconstruct(f"--workdir={cfg.workdir}", f"--data_dir={data}", f"--out_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == ["a_full.h5", "b_test.h5"]
  for name in ("a_full.h5", "b_test.h5"):
    with h5py.File(out / name) as f:
      image = f["reconstruction"][()]
      assert image.shape == (2, 32, 32) and image.dtype == np.float32  # reconSpace 32 x 32
      assert np.isfinite(image).all() and image.min() >= 0 and image.max() > 0
  warned = [line for line in result.stderr.splitlines() if "differs from the one" in line]
  assert len(warned) == 1 and "b_test.h5" in warned[0]

  # A bad file is named with training's error, before anything is written.
  (data / "c_bad.h5").write_bytes(b"")
  out2 = tmp_path / "out2"
  result = _reconstruct(f"--workdir={cfg.workdir}", f"--data_dir={data}", f"--out_dir={out2}")
  assert result.returncode == 1
  assert "c_bad.h5: expected an HDF5 file, found an empty one" in result.stderr
  assert not out2.exists()
