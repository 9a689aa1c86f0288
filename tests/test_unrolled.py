"""The unrolled network: data for data consistency, the DC step, lambda, and both trainers."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax import config as config_lib
from lwjax import data, nets
from lwjax.models import unrolled
from lwjax.mri import sense
from lwjax.training import checkpoints
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

SIZE, COILS = 32, 4
PREP = data.PrepConfig(image_size=SIZE, mask="poisson", accel=4.0, calib=8, maps="lowres")
CFG = config_lib.Config(
    image_size=SIZE, depth=3, features=4, kernel_size=3, model="unrolled", method="e2e,layerwise",
    unroll_iters=2, cg_iters=3, dc_lambda=0.05, batch_size=2, epochs=2, lr=1e-2,
    lr_decay_every=10, eval_batch_size=4, log_every=0)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  root = tmp_path_factory.mktemp("unrolled")
  dataset = data.make_synthetic_dataset(root / "data", train_subjects=2, val_subjects=1, slices=2,
                                        coils=COILS, size=SIZE)
  load = lambda split: data.load_split(dataset, split, PREP, cache_dir=root / "cache",
                                       with_maps=True, with_kspace=True)
  return load("train"), load("val")


def tiny_params(iters=2, lam=0.05, fill=0.0):
  """Unrolled parameters with every CNN weight ``fill`` (shapes by ``eval_shape``: no init run).

  With ``fill=0`` each DeepNet is the identity (its skip), so an iteration is the DC step alone.
  """
  cfg = config_lib.Config(depth=3, features=4, kernel_size=3, dc_lambda=lam)
  shapes = jax.eval_shape(lambda: unrolled.init(cfg, (1, SIZE, SIZE, 2), iters))
  params = jax.tree.map(lambda s: jnp.full(s.shape, fill, s.dtype), shapes)
  for k in range(iters):
    params[f"iter_{k}"]["log_lam"] = jnp.asarray(np.log(lam), jnp.float32)
  return params


# Data.


def test_kspace_is_scaled_like_the_input_and_cached(splits, tmp_path, monkeypatch):
  tr, _ = splits
  assert tr.kspace.shape == tr.maps.shape == (4, COILS, SIZE, SIZE)
  assert tr.kspace.dtype == np.complex64
  assert np.all(tr.kspace[:, :, ~tr.mask] == 0)  # only the sampled k-space
  # A^H y is the zero-filled input: k-space and x share the per-slice scale.
  x = tr.x[..., 0] + 1j * tr.x[..., 1]
  np.testing.assert_allclose(sense.zero_filled(tr.kspace, tr.maps, tr.mask), x, atol=2e-6)

  dataset = tmp_path / "data"
  data.make_synthetic_dataset(dataset, train_subjects=1, val_subjects=1, slices=2, coils=COILS,
                              size=SIZE)
  calls = []
  prepare = data.prepare_slice
  monkeypatch.setattr(data.cache, "prepare_slice",
                      lambda *a, **k: calls.append(1) or prepare(*a, **k))
  load = lambda **kw: data.load_split(dataset, "train", PREP, cache_dir=tmp_path / "c", **kw)
  plain = load()
  assert plain.kspace is None and len(calls) == 2
  first = load(with_kspace=True)  # the entries lacked k-space: prepared once more
  assert len(calls) == 4 and first.kspace.shape == (2, COILS, SIZE, SIZE) and first.maps is None
  again = load(with_maps=True, with_kspace=True)  # now read from the cache
  assert len(calls) == 4
  np.testing.assert_array_equal(again.kspace, first.kspace)
  np.testing.assert_array_equal(again.x, plain.x)
  load()  # a maps-less read of a k-space entry is a hit too
  assert len(calls) == 4


# The model.


def test_dc_step_is_the_least_squares_solution(splits):
  tr, _ = splits
  kspace, maps, mask = (np.asarray(a, np.complex128) for a in (tr.kspace[1], tr.maps[1], tr.mask))
  rng = np.random.default_rng(0)
  z = tr.y[1] + 0.1 * rng.normal(size=tr.y[1].shape)  # a prior image near the target
  z_c = z[..., 0] + 1j * z[..., 1]
  lam = 0.05
  # min |A x - y|^2 + lam |x - z|^2 with A as an explicit matrix, in float64: the normal
  # equations (A^H A + lam I) x = A^H y + lam z (condition number <= 1 / lam: the maps are
  # normalised and the FFT orthonormal) solved directly.
  sampled = mask.astype(bool)
  basis = np.eye(SIZE * SIZE).reshape(-1, SIZE, SIZE)
  a = sense.forward(basis, maps, mask)[:, :, sampled].reshape(SIZE * SIZE, -1).T
  assert a.shape == (COILS * sampled.sum(), SIZE * SIZE)
  lhs = a.conj().T @ a + lam * np.eye(SIZE * SIZE)
  rhs = a.conj().T @ kspace[:, sampled].ravel() + lam * z_c.ravel()
  exact = np.linalg.solve(lhs, rhs).reshape(SIZE, SIZE)

  dc = jax.jit(lambda *args: unrolled.dc(*args, lam, cg_iters=30))
  got = dc(jnp.asarray(z, jnp.float32), jnp.asarray(tr.kspace[1]), jnp.asarray(tr.maps[1]),
           jnp.asarray(tr.mask, jnp.float32))
  got = np.asarray(got[..., 0]) + 1j * np.asarray(got[..., 1])
  assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-4


def test_zero_cnn_and_vanishing_lambda_is_cg_sense(splits):
  tr, _ = splits
  params = tiny_params(iters=1, lam=1e-7)
  net = nets.DeepNet(depth=3, features=4, kernel_size=3)
  args = (jnp.asarray(tr.kspace), jnp.asarray(tr.maps), jnp.asarray(tr.mask, jnp.float32))
  forward = jax.jit(lambda p, x, *args: unrolled.forward(net, p, x, *args, cg_iters=8))
  out = forward(params, jnp.asarray(tr.x), *args)
  x_zf = sense.to_complex(jnp.asarray(tr.x))
  expected = jax.jit(lambda x0, *args: sense.cg_sense(*args, x0=x0, iters=8))(x_zf, *args)
  expected = sense.to_channels(expected)  # CG-SENSE (lambda = 0) started at x_zf
  np.testing.assert_allclose(out, expected, atol=1e-4 * float(jnp.abs(expected).max()))
  assert float(jnp.linalg.norm(out - tr.x)) > 0.1 * float(jnp.linalg.norm(tr.x))  # it did work
  # The zero CNN is the identity; a DC step with a large lambda keeps its input.
  keep = forward(tiny_params(iters=1, lam=1e6), jnp.asarray(tr.x), *args)
  np.testing.assert_allclose(keep, tr.x, atol=1e-5)


def test_fixed_lambda_stays_and_learned_lambda_moves():
  params = tiny_params(fill=0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  # Adam's first step moves every learned parameter by about its learning rate (the gradients
  # are all ones); no weight decay on lambda; --lambda_lr=0 means --lr.
  for learn, lambda_lr, expected in ((False, 0.0, 0.0), (True, 0.0, -CFG.lr), (True, 0.3, -0.3)):
    cfg = dataclasses.replace(CFG, learn_lambda=learn, lambda_lr=lambda_lr, weight_decay=0.1)
    tx = unrolled.optimizer(cfg, steps_per_epoch=1)
    updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    for k in range(2):
      head, old_head = new[f"iter_{k}"]["cnn"]["head"], params[f"iter_{k}"]["cnn"]["head"]
      # The CNN moves by --lr plus decoupled weight decay (AdamW: lr * (1 + wd * p), p = 0.5)
      # whatever lambda's learning rate.
      np.testing.assert_allclose(head["bias"] - old_head["bias"], -CFG.lr * (1 + 0.1 * 0.5),
                                 rtol=1e-3)
      moved = float(new[f"iter_{k}"]["log_lam"] - params[f"iter_{k}"]["log_lam"])
      assert moved == pytest.approx(expected, rel=1e-3, abs=0)


# Training through the run's trainers.


def test_e2e_and_stagewise_run(splits, tmp_path):
  tr, va = splits
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path), epochs=1)
  mesh = runtime.make_mesh(2)
  summary = unrolled.run(cfg, tr, va, mesh=mesh, log=workdir_lib.MetricsLog(tmp_path),
                         summary_path=tmp_path / "summary.json")
  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert set(summary["unrolled_e2e"]) == {"2"} and set(summary["unrolled_stagewise"]) == {"1", "2"}
  assert set(summary["stages"]["unrolled_stagewise"]) == {"1", "2"}
  for entry in (summary["zero_filled"], summary["cg_sense"], summary["unrolled_e2e"]["2"]):
    assert set(entry) == {"psnr", "ssim", "nmse"} and all(np.isfinite(list(entry.values())))
  assert len(summary["lambda"]["unrolled_e2e"]["2"]) == 2

  load = lambda method, k: checkpoints.load_params(workdir_lib.params_dir(tmp_path, method, k))
  stage1, stage2, e2e = load("unrolled_stagewise", 1), load("unrolled_stagewise", 2), load(
      "unrolled_e2e", 2)
  # Stage 2 trained iteration 1 on top of iteration 0 without changing it ...
  for a, b in zip(jax.tree.leaves(stage1["iter_0"]), jax.tree.leaves(stage2["iter_0"])):
    np.testing.assert_array_equal(a, b)
  # ... and ends with the end-to-end network's layout; both started from the same init.
  assert jax.tree.map(np.shape, stage2) == jax.tree.map(np.shape, e2e)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  epochs = {r["phase"]: r for r in records if "epoch" in r}
  assert set(epochs) == {"unrolled_e2e_k2", "unrolled_stagewise_s1", "unrolled_stagewise_s2"}
  # The gradient reached every lambda (Adam moved each by about lr per step) and was finite.
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in epochs.values())
  steps = len(tr.x) // cfg.batch_size
  for lams in (summary["lambda"]["unrolled_e2e"]["2"],
               summary["lambda"]["unrolled_stagewise"]["2"]):
    moved = np.abs(np.log(np.asarray(lams) / cfg.dc_lambda))
    assert np.all(moved > 1e-3 * cfg.lr) and np.all(moved < 3 * cfg.lr * steps)

  # A finished run is loaded, not retrained.
  seen = {}
  again = unrolled.train_unrolled(cfg, "layerwise", unrolled.dc_arrays(cfg, tr), tr.mask,
                                  mesh=mesh, log=workdir_lib.MetricsLog(tmp_path),
                                  on_depth=lambda k, p, r: seen.setdefault(k, r))
  assert sorted(seen) == [1, 2] and seen[2]["lambda"] == summary["stages"][
      "unrolled_stagewise"]["2"]["lambda"]
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stage2)):
    np.testing.assert_array_equal(a, b)


def test_validate_unrolled_and_3d_settings():
  for change, flag in [({"model": "modl"}, "model"), ({"method": "layerwise_convex"}, "method"),
                       ({"e2e_depths": "2,3"}, "e2e_depths"), ({"unroll_iters": 0}, "unroll_iters"),
                       ({"dc_lambda": 0.0}, "dc_lambda"), ({"lambda_lr": -1.0}, "lambda_lr"),
                       ({"cg_iters": 0}, "cg_iters"),
                       ({"ndim": 4}, "ndim"), ({"volume_depth": 0}, "volume_depth")]:
    with pytest.raises(ValueError, match=f"--{flag}="):
      config_lib.validate(dataclasses.replace(CFG, **change), num_devices=1)
  # A flagfile's CNN depths give the unrolled model its own advice, not the CNN's.
  with pytest.raises(ValueError, match="leave --e2e_depths empty"):
    config_lib.validate(dataclasses.replace(CFG, e2e_depths="2,3,4,5"), num_devices=1)
  config_lib.validate(CFG, num_devices=1)
  config_lib.validate(dataclasses.replace(CFG, model="cnn", method="layerwise_convex", ndim=3),
                      num_devices=1)
