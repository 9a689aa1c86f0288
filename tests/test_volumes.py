"""3D: volume patches from the slice pipeline, 3D networks and a 3D convex stage, slice metrics."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax import config as config_lib
from lwjax import data, metrics, nets
from lwjax.models import unrolled
from lwjax.models import cnn
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

SIZE, COILS = 8, 2


def fake_split(slices_per_file=(5, 3, 4), seed=0, with_dc=True):
  """A Split of random slices; file v's slices come in reverse slice order for v = 1."""
  rng = np.random.default_rng(seed)
  rows = [(v, s) for v, n in enumerate(slices_per_file)
          for s in (reversed(range(n)) if v == 1 else range(n))]
  n = len(rows)
  complex_ = lambda *shape: (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(
      np.complex64)
  return data.Split(
      x=rng.normal(size=(n, SIZE, SIZE, 2)).astype(np.float32),
      y=rng.normal(size=(n, SIZE, SIZE, 2)).astype(np.float32),
      mask=np.ones((SIZE, SIZE), bool), ids=[(f"f{v}.h5", s) for v, s in rows],
      scale=rng.uniform(0.5, 2.0, size=n).astype(np.float32),
      volume_index=np.asarray([v for v, _ in rows]),
      maps=complex_(n, COILS, SIZE, SIZE) if with_dc else None,
      kspace=complex_(n, COILS, SIZE, SIZE) if with_dc else None)


def test_to_volumes_shapes_order_and_no_file_mixing():
  split = fake_split()
  vol = data.to_volumes(split, 2)
  # 5 -> 2 patches (1 slice dropped), 3 -> 1, 4 -> 2; never across files.
  assert vol["x"].shape == vol["y"].shape == (5, 2, SIZE, SIZE, 2)
  assert vol["x"].dtype == np.float32
  assert vol["kspace"].shape == vol["maps"].shape == (5, 2, COILS, SIZE, SIZE)
  np.testing.assert_array_equal(vol["volume_index"], [0, 0, 1, 2, 2])
  for patch, v in zip(vol["slices"], vol["volume_index"]):
    assert all(split.volume_index[r] == v for r in patch)
  # Consecutive slices in slice order, whatever the order of the rows.
  numbers = [[split.ids[r][1] for r in patch] for patch in vol["slices"]]
  assert numbers == [[0, 1], [2, 3], [0, 1], [0, 1], [2, 3]]
  # One scale per patch: every slice times scale_slice / scale_patch, max over the patch.
  rows = vol["slices"]
  np.testing.assert_allclose(vol["scale"], split.scale[rows].max(axis=1))
  factor = split.scale[rows] / vol["scale"][:, None]
  np.testing.assert_allclose(vol["x"], split.x[rows] * factor[..., None, None, None], rtol=1e-6)
  np.testing.assert_allclose(vol["y"] * vol["scale"][:, None, None, None, None],
                             split.y[rows] * split.scale[rows][..., None, None, None], rtol=1e-5)
  np.testing.assert_allclose(vol["kspace"], split.kspace[rows] * factor[..., None, None, None],
                             rtol=1e-6)
  np.testing.assert_array_equal(vol["maps"], split.maps[rows])

  assert data.to_volumes(split, 4)["x"].shape[0] == 2  # 5 -> 1, 3 -> 0, 4 -> 1
  assert "kspace" not in data.to_volumes(fake_split(with_dc=False), 3)
  with pytest.raises(ValueError,
                     match=r"--volume_depth=6: .* longest run of consecutive slices "
                           r"of a file \(5;"):
    data.to_volumes(split, 6)
  with pytest.raises(ValueError, match="--volume_depth=0: expected >= 1"):
    data.to_volumes(split, 0)


def test_metrics_are_per_2d_slice_for_volumes():
  rng = np.random.default_rng(1)
  target = rng.uniform(size=(2, 3, 16, 16, 2)).astype(np.float32)
  pred = (target + 0.1 * rng.normal(size=target.shape)).astype(np.float32)
  per_volume = metrics.per_slice(pred=pred, target=target)
  per_slice = metrics.per_slice(pred=pred.reshape(6, 16, 16, 2),
                                target=target.reshape(6, 16, 16, 2))
  for k in ("psnr", "ssim", "nmse"):
    assert per_volume[k].shape == (6,)
    np.testing.assert_allclose(per_volume[k], per_slice[k], rtol=1e-6)


# 3D networks through the trainers.

CFG = config_lib.Config(depth=3, features=4, kernel_size=3, ndim=3, volume_depth=4, batch_size=2,
                        epochs=1, lr=3e-3, log_every=0, method="layerwise_convex,e2e", beta=1e-5,
                        rho=1.0, convex_solver="adam", refit_head=True)


def toy_volumes(n=4, depth=4, size=8, seed=0):
  """x = y + structured corruption along all three axes, so a 3D conv net can reduce the error."""
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(n, depth, size, size, 2)).astype(np.float32)
  x = (y + 0.3 * np.roll(y, 1, axis=1) + 0.3 * np.roll(y, 1, axis=2)).astype(np.float32)
  return {"x": x, "y": y}


def test_3d_deep_net_trains_end_to_end_through_fit(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path))
  arrays = toy_volumes()
  net = nets.DeepNet(depth=3, features=4, kernel_size=3, ndim=3)
  params = nets.init(jax.random.key(0), (1,) + arrays["x"].shape[1:], depth=3, features=4,
                     kernel_size=3, ndim=3)
  assert params["convs_0"]["kernel"].shape == (3, 3, 3, 2, 4)
  result = loop.fit("e2e_3d", cnn.e2e_loss(net), loop.adam(cfg, 2), params, {}, arrays,
                     cfg=cfg, mesh=runtime.make_mesh(2), epochs=1, log=workdir_lib.MetricsLog(tmp_path))
  assert int(result.state["step"]) == 2
  out = nets.forward(net, jax.device_get(result.state["params"]), arrays["x"])
  assert out.shape == arrays["x"].shape and np.all(np.isfinite(out))


def test_3d_convex_stages_train_through_train_layerwise(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path))
  assert cnn.network_template(cfg).ndim == 3
  arrays = toy_volumes()
  seen = {}
  params = cnn.train_layerwise(cfg, "layerwise_convex", arrays, mesh=runtime.make_mesh(2),
                                 log=workdir_lib.MetricsLog(tmp_path),
                                 on_depth=lambda d, p, r: seen.setdefault(d, (p, r)))
  assert sorted(seen) == [2, 3]
  # Each convex stage became one 3D ReLU layer of `features` channels; the first stayed frozen.
  assert params["convs_0"]["kernel"].shape == (3, 3, 3, 2, 4)
  assert params["convs_1"]["kernel"].shape == (3, 3, 3, 4, 4)
  assert params["head"]["kernel"].shape == (1, 1, 1, 4, 2)
  np.testing.assert_array_equal(seen[2][0]["convs_0"]["kernel"], params["convs_0"]["kernel"])
  report = seen[3][1]
  assert "relu_mismatch" in report and all(np.isfinite(v) for v in report.values())
  net = nets.DeepNet(depth=3, features=4, kernel_size=3, ndim=3)
  out = nets.forward(net, params, arrays["x"])
  assert out.shape == arrays["x"].shape and np.all(np.isfinite(out))


def test_unrolled_3d_applies_data_consistency_per_slice():
  """A 3D unrolled iteration = the 3D CNN, then each slice's own 2D DC step."""
  split = fake_split(slices_per_file=(4, 4))
  split.mask[::2] = False
  vol = data.to_volumes(split, 2)
  cfg = config_lib.Config(depth=2, features=4, kernel_size=3, ndim=3, cg_iters=4)
  net = cnn.network_template(cfg)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), jax.eval_shape(
      lambda: unrolled.init(cfg, (1, 2, SIZE, SIZE, 2), iters=1)))
  params["iter_0"]["log_lam"] = jnp.log(jnp.float32(0.1))
  args = [jnp.asarray(vol[k]) for k in ("kspace", "maps")] + [jnp.asarray(split.mask, jnp.float32)]
  run = jax.jit(lambda p, x, *a: unrolled.forward(net, p, x, *a, cg_iters=4))
  out = run(params, jnp.asarray(vol["x"]), *args)
  assert out.shape == vol["x"].shape

  z = nets.forward(net, params["iter_0"]["cnn"], jnp.asarray(vol["x"]))  # (M, 2, H, W, 2)
  flat = lambda a: a.reshape((-1,) + a.shape[2:])  # volumes -> slices
  per_slice = jax.jit(lambda *a: unrolled.dc(*a, 0.1, cg_iters=4))(
      flat(z), flat(args[0]), flat(args[1]), args[2])
  np.testing.assert_allclose(flat(out), per_slice, rtol=1e-5, atol=1e-6)


# Anisotropic 3D kernels (--kernel_depth): a 1 x k x k kernel must act slice by slice.

def test_kernel_depth_one_is_the_2d_network_on_every_slice():
  x = toy_volumes(n=2, depth=3, size=8)["x"]
  p3 = nets.init(jax.random.key(3), (1,) + x.shape[1:], depth=3, features=4, kernel_size=(1, 3, 3),
                 ndim=3)
  assert p3["convs_0"]["kernel"].shape == (1, 3, 3, 2, 4)
  p2 = jax.tree.map(lambda w: w[0] if w.ndim == 5 else w, p3)  # drop the depth axis of kernels
  out3 = nets.forward(nets.DeepNet(features=4, kernel_size=(1, 3, 3), ndim=3), p3, x)
  out2 = nets.forward(nets.DeepNet(features=4, kernel_size=3, ndim=2), p2,
                      x.reshape(-1, 8, 8, 2)).reshape(x.shape)
  np.testing.assert_allclose(out3, out2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="expected 3 extents"):
    nets.kernel_shape((3, 3), 3)


def test_kernel_depth_reaches_every_stage_and_is_validated(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path), kernel_depth=1, kernel_size=3)
  assert cfg.kernel == (1, 3, 3)
  params = cnn.train_layerwise(cfg, "layerwise_convex", toy_volumes(),
                                 mesh=runtime.make_mesh(2), log=workdir_lib.MetricsLog(tmp_path))
  assert params["convs_0"]["kernel"].shape == (1, 3, 3, 2, 4)
  assert params["convs_1"]["kernel"].shape == (1, 3, 3, 4, 4)
  e2e = cnn.train_e2e(dataclasses.replace(cfg, workdir=str(tmp_path / "e2e")), 3, toy_volumes(),
                        mesh=runtime.make_mesh(2), log=workdir_lib.MetricsLog(tmp_path / "e2e"))
  assert e2e["convs_1"]["kernel"].shape == (1, 3, 3, 4, 4)
  with pytest.raises(ValueError, match="--kernel_depth=3: applies to 3D"):
    config_lib.validate(dataclasses.replace(CFG, ndim=2, kernel_depth=3), num_devices=2)
