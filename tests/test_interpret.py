"""Interpretability: filters, active units, and the effective filter as the exact linearisation."""
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
from lwjax import data as data_lib
from lwjax import evaluate
from lwjax import figures
from lwjax import interpret
from lwjax import nets
from lwjax import experiment
from lwjax.models import cnn
from lwjax.training import checkpoints
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[1]
NET = nets.DeepNet(depth=3, features=8, kernel_size=3)


def _params(zero_bias=False):
  """Random parameters of NET; biases too unless ``zero_bias`` (for the effective bias)."""
  shapes = jax.eval_shape(lambda k: nets.init(k, (1, 16, 16, 2), depth=3, features=8,
                                              kernel_size=3), jax.random.key(0))
  rng = np.random.default_rng(0)

  def draw(path, s):
    if path[-1].key == "bias":
      return np.zeros(s.shape, np.float32) if zero_bias else 0.1 * rng.standard_normal(s.shape)
    return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))  # LeCun scale

  return jax.tree.map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


def _image(seed=0):
  return jnp.asarray(np.random.default_rng(100 + seed).standard_normal((16, 16, 2), np.float32))


def test_layer_filters_and_receptive_field():
  params = _params()
  assert [k.shape for k in interpret.layer_filters(params)] == [(3, 3, 2, 8), (3, 3, 8, 8),
                                                                 (1, 1, 8, 2)]
  assert interpret.receptive_radius(params) == (2, 2)
  assert interpret.receptive_field(params, (0, 15)) == (slice(0, 3), slice(13, 18))
  with pytest.raises(ValueError, match="2 coordinates"):
    interpret.receptive_field(params, (1, 0, 15))


def test_active_fraction_counts_positive_relu_units():
  params, x = _params(), _image()[None]
  fractions = interpret.active_fraction(NET, params, x)
  assert len(fractions) == 2 and all(0 < f < 1 for f in fractions)
  for n, fraction in enumerate(fractions, 1):
    # relu(pre) > 0 exactly where pre > 0
    h = jax.jit(nets.prefix_features, static_argnums=(0, 3))(NET, params, x, n)
    assert fraction == pytest.approx(float(jnp.mean(h > 0)))
  maps = interpret.active_maps(NET, params, x)
  assert [m.shape for m in maps] == [(1, 16, 16)] * 2
  assert all(((m >= 0) & (m <= 1)).all() for m in maps)


@pytest.mark.parametrize("pixel", [(8, 7), (0, 0), (15, 3)])
@pytest.mark.parametrize("out_channel", [0, 1, None])
def test_effective_filter_reproduces_the_output_without_biases(pixel, out_channel):
  # Without biases the net is positively homogeneous: out_p - x_p = J_p . x exactly (Euler).
  params, x = _params(zero_bias=True), _image()
  jac = interpret.effective_filter(NET, params, x, pixel, out_channel)
  assert jac.shape == (16, 16, 2)
  out = nets.forward(NET, params, x[None])[0]
  residual = out[pixel] - x[pixel]
  u = (jnp.eye(2)[out_channel] if out_channel is not None
       else out[pixel] / jnp.linalg.norm(out[pixel]))
  assert float(jnp.sum(jac * x)) == pytest.approx(float(u @ residual), rel=1e-4, abs=1e-6)
  # Nothing outside the receptive field (radius 2) reaches the pixel.
  r, c = pixel
  outside = np.ones((16, 16), bool)
  outside[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = False
  assert not jac[outside].any() and jac[~outside].any()


@pytest.mark.parametrize("pixel", [(8, 7), (15, 3)])
def test_effective_filter_is_the_jacobian_row(pixel):
  # With biases the net is affine around x: the row equals the full-image Jacobian's, and a
  # small step along any direction changes the pixel by J . d.
  params, x = _params(), _image(1)
  jac = interpret.effective_filter(NET, params, x, pixel, out_channel=1)
  f = jax.jit(lambda z: nets.forward(NET, params, z[None])[0][pixel][1] - z[pixel][1])
  np.testing.assert_allclose(jac, jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)
  d = _image(7)
  eps = 1e-3
  assert float((f(x + eps * d) - f(x - eps * d)) / (2 * eps)) == pytest.approx(
      float(jnp.sum(jac * d)), rel=1e-2, abs=1e-3)


NET3 = nets.DeepNet(depth=3, features=4, kernel_size=(3, 5, 5), ndim=3)  # radius (2, 4, 4)


def test_effective_filter_with_even_kernels():
  # XLA's SAME pads k//2 after and (k-1)//2 before: an even kernel's field is lopsided.
  net = nets.DeepNet(depth=3, features=4, kernel_size=4)
  params = nets.init(jax.random.key(2), (1, 12, 12, 2), depth=3, features=4, kernel_size=4)
  x = _image(3)[:12, :12]
  pixel = (5, 6)
  jac = interpret.effective_filter(net, params, x, pixel, out_channel=0)
  f = jax.jit(lambda z: nets.forward(net, params, z[None])[0][pixel][0] - z[pixel][0])
  np.testing.assert_allclose(jac, jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pixel", [(2, 6, 5), (0, 11, 0)])
def test_effective_filter_3d(pixel):
  # Anisotropic 3D kernels: the row is the full-volume Jacobian's, zero outside the receptive
  # field (2 planes, 4 pixels in-plane), and without biases it reproduces the output (Euler).
  params = nets.init(jax.random.key(3), (1, 5, 12, 12, 2), depth=3, features=4,
                     kernel_size=(3, 5, 5), ndim=3)
  assert interpret.receptive_radius(params) == (2, 4, 4)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((5, 12, 12, 2)), jnp.float32)
  jac = interpret.effective_filter(NET3, params, x, pixel, out_channel=0)
  f = jax.jit(lambda z: nets.forward(NET3, params, z[None])[0][pixel][0] - z[pixel][0])
  np.testing.assert_allclose(jac, jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)
  outside = np.ones(x.shape[:-1], bool)
  outside[tuple(slice(max(p - r, 0), p + r + 1) for p, r in zip(pixel, (2, 4, 4)))] = False
  assert not jac[outside].any() and jac[~outside].any()
  unbiased = jax.tree.map_with_path(
      lambda path, a: jnp.zeros_like(a) if path[-1].key == "bias" else a, params)
  jac = interpret.effective_filter(NET3, unbiased, x, pixel, out_channel=1)
  out = nets.forward(NET3, unbiased, x[None])[0]
  assert float(jnp.sum(jac * x)) == pytest.approx(float(out[pixel][1] - x[pixel][1]),
                                                  rel=1e-4, abs=1e-6)


def test_filter_tiles():
  rng = np.random.default_rng(0)
  first = rng.normal(size=(3, 3, 2, 8))
  first[..., 5] *= 10  # the strongest unit comes first
  tiles, titles, signed = interpret.filter_tiles(first, max_filters=3)
  assert signed and len(tiles) == 6 and titles[:2] == ["5 re", "5 im"]
  np.testing.assert_array_equal(tiles[1], first[:, :, 1, 5])
  kernel3 = rng.normal(size=(3, 3, 3, 2, 4))
  tiles, titles, signed = interpret.filter_tiles(kernel3, max_filters=1)
  strongest = int(np.argmax(interpret.unit_norms(kernel3)))
  assert signed and titles == [f"{strongest} re", f"{strongest} im"]
  np.testing.assert_array_equal(tiles[1], kernel3[1, :, :, 1, strongest])  # the centre plane
  tiles, titles, signed = interpret.filter_tiles(rng.normal(size=(3, 3, 8, 4)))
  assert not signed and len(tiles) == 4 and all(t.shape == (3, 3) and (t >= 0).all() for t in tiles)


TINY = config_lib.Config(
    image_size=32, calib=8, synth_train_subjects=1, synth_val_subjects=1, synth_slices=2,
    synth_coils=4, maps="lowres", depth=3, features=8, kernel_size=3, epochs=1, batch_size=2,
    method="e2e", e2e_depths="2,3", log_every=0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  experiment.run(dataclasses.replace(TINY, workdir=str(workdir)), mesh=runtime.make_mesh(2))
  return workdir


def _check_png(path, tiles_wide, tiles_high, tile=figures.TILE, bar=0.0):
  img = imread(path)  # Every grid here has titles: a band of TITLE inches above each row.
  assert img.shape[:2] == (round(tiles_high * (tile + figures.TITLE) * figures.DPI),
                           round(tiles_wide * (tile + bar) * figures.DPI))
  assert img.min() >= 0 and img.max() <= 1 and img[..., :3].std() > 0.01


def test_run_draws_every_figure(workdir):
  result = interpret.run(workdir, pixel=(10, 20))
  out_dir = workdir / "figures" / "interpret" / "e2e_d3"
  assert json.loads((out_dir / "interpret.json").read_text()) == result
  assert (result["method"], result["depth"], result["pixel"]) == ("e2e", 3, [10, 20])
  assert len(result["active_fraction"]) == 2
  assert all(0 <= f <= 1 for f in result["active_fraction"])
  # An e2e net has biases: the pixel is the filter response plus the effective bias.
  e = result["effective_filter"]
  assert e["response"] + e["bias"] == pytest.approx(e["residual"], abs=1e-6)
  _check_png(out_dir / "filters_layer1.png", 16, 1)  # 8 units x (re, im)
  _check_png(out_dir / "filters_layer2.png", 8, 1)
  _check_png(out_dir / "active_units.png", 2, 1)
  # Legible: 4-inch panels (1200 x 425 pixels), not 1.25-inch tiles.
  _check_png(out_dir / "effective_filter.png", 3, 1, tile=figures.LARGE)
  _check_png(out_dir / "effective_filter_zoom.png", 2, 1, tile=figures.LARGE,
             bar=figures.COLORBAR)
  assert set(result["figures"].values()) == {str(p) for p in out_dir.glob("*.png")}


def test_run_rejects_what_the_run_does_not_have(workdir):
  with pytest.raises(ValueError, match="--method='layerwise'"):
    interpret.run(workdir, method="layerwise")
  with pytest.raises(ValueError, match=r"expected one method the run trained \(one of them\)"):
    interpret.run(workdir, method="e2e,layerwise")  # a training flagfile's --method
  with pytest.raises(ValueError, match="--depth=4"):
    interpret.run(workdir, depth=4)
  with pytest.raises(ValueError, match="--slice=5"):
    interpret.run(workdir, slice_index=5)
  with pytest.raises(ValueError, match="--pixel"):
    interpret.run(workdir, pixel=(40, 0))


def test_an_unfinished_run_shows_its_deepest_trained_network(workdir, tmp_path):
  d3 = workdir_lib.params_dir(workdir, "e2e", 3)
  d3.rename(tmp_path / "d3")  # as if the run were still training it
  try:
    assert interpret.run(workdir, out_dir=tmp_path / "out")["depth"] == 2
    with pytest.raises(ValueError, match=r"--depth=3: the run has e2e networks of depth \[2, 3\], "
                                         r"of which \[2\] are trained"):
      interpret.run(workdir, depth=3)
  finally:
    (tmp_path / "d3").rename(d3)


def test_other_data_is_drawn_beside_the_runs_figures(workdir, tmp_path):
  own = interpret.run(workdir)
  other = data_lib.make_synthetic_dataset(
      tmp_path / "knee", train_subjects=1, val_subjects=1, slices=2, coils=TINY.synth_coils,
      size=TINY.image_size, seed=TINY.synth_seed + 1)
  got = interpret.run(workdir, data_dir=str(other))
  assert (own["own_data"], got["own_data"], got["data_dir"]) == (True, False, str(other))
  out = workdir / "eval_knee" / "figures" / "interpret" / "e2e_d3"
  assert json.loads((out / "interpret.json").read_text()) == got
  mine = workdir / "figures" / "interpret" / "e2e_d3" / "interpret.json"
  assert json.loads(mine.read_text()) == own


def test_launch_script(workdir, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(ROOT / "launch" / "interpret.py"), f"--workdir={workdir}",
         "--method=e2e", "--slice=1", "--pixel=3,4", f"--out_dir={tmp_path}"]
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "interpret.json").read_text())
  assert result["pixel"] == [3, 4] and result["slice"][1] == 1
  assert (tmp_path / "effective_filter.png").is_file()
  done = subprocess.run(cmd[:2] + [f"--workdir={tmp_path / 'nowhere'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and str(tmp_path / "nowhere") in done.stderr


def test_run_3d_draws_the_patch_that_holds_the_slice(tmp_path):
  # 3 slices, patches of 2: the patch holds slices 0 and 1; slice 2 is in none.
  cfg = dataclasses.replace(TINY, workdir=str(tmp_path), ndim=3, volume_depth=2, synth_slices=3,
                            kernel_depth=1, batch_size=1)
  experiment.run(cfg, mesh=runtime.make_mesh(1))
  result = interpret.run(tmp_path, slice_index=1, pixel=(10, 20), out_dir=tmp_path / "fig")
  assert result["slice"][1] == 1 and result["pixel"] == [1, 10, 20]
  assert result["receptive_radius"] == [0, 2, 2]  # 1x3x3 kernels see one plane
  assert [f["shape"] for f in result["filters"]] == [[1, 3, 3, 2, 8], [1, 3, 3, 8, 8]]
  e = result["effective_filter"]
  assert e["response"] + e["bias"] == pytest.approx(e["residual"], abs=1e-6)
  # A 1xkxk network is the 2D network on each plane: its effective filter lives in the
  # pixel's plane, and the figures show that plane.
  params = checkpoints.load_params(workdir_lib.params_dir(tmp_path, "e2e", 3))
  val = evaluate.validation_split(evaluate.load_config(tmp_path))
  net = cnn.network_template(evaluate.load_config(tmp_path))
  patch = np.stack([val.x[0], val.x[1]])
  jac = interpret.effective_filter(net, params, patch, (1, 10, 20))
  assert not jac[0].any() and jac[1].any()
  _check_png(tmp_path / "fig" / "active_units.png", 2, 1)
  _check_png(tmp_path / "fig" / "effective_filter_zoom.png", 2, 1,  # one plane: Re, Im
             tile=figures.LARGE, bar=figures.COLORBAR)
  with pytest.raises(ValueError, match="--slice=2 .* in no volume patch"):
    interpret.run(tmp_path, slice_index=2)
