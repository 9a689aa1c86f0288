"""The training loop: data parallelism, resumption, NaN handling, and the layer-wise driver."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import nets
from lwjax import experiment
from lwjax.models import cnn
from lwjax.training import feature_cache
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

CFG = config_lib.Config(depth=3, features=4, kernel_size=3, batch_size=4, epochs=3, lr=3e-3,
                        lr_decay_every=2, log_every=0, method="layerwise,e2e")


def toy_arrays(n=8, size=8, seed=0):
  """x = y + structured corruption, so a conv net can reduce the error."""
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(n, size, size, 2)).astype(np.float32)
  x = (y + 0.5 * np.roll(y, 1, axis=1)).astype(np.float32)
  return {"x": x, "y": y}


def fit_e2e(cfg, arrays, mesh, epochs, phase="e2e_test"):
  net = cnn.network_template(cfg)
  params = nets.init(jax.random.key(0), (1,) + arrays["x"].shape[1:], depth=cfg.depth,
                     features=cfg.features, kernel_size=cfg.kernel_size)
  spe = len(arrays["x"]) // cfg.batch_size
  return loop.fit(phase, cnn.e2e_loss(net), loop.adam(cfg, spe), params, {}, arrays, cfg=cfg,
                   mesh=mesh, epochs=epochs, log=workdir_lib.MetricsLog(cfg.workdir))


def test_loss_decreases_and_metrics_are_logged(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path))
  arrays = toy_arrays()
  fit_e2e(cfg, arrays, runtime.make_mesh(1), epochs=4)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  assert records[-1]["loss"] < records[0]["loss"]
  assert {"grad_norm", "param_norm", "steps_per_s", "mse"} <= set(records[0])


def test_one_and_four_devices_agree(tmp_path):
  assert jax.device_count() >= 4, "conftest sets 4 simulated CPU devices"
  arrays = toy_arrays()
  results = []
  for n in (1, 4):
    cfg = dataclasses.replace(CFG, workdir=str(tmp_path / f"dev{n}"))
    results.append(jax.device_get(fit_e2e(cfg, arrays, runtime.make_mesh(n), epochs=2).state))
  for a, b in zip(jax.tree.leaves(results[0]["params"]), jax.tree.leaves(results[1]["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_resume_is_bitwise(tmp_path):
  arrays = toy_arrays()
  mesh = runtime.make_mesh(2)
  full = fit_e2e(dataclasses.replace(CFG, workdir=str(tmp_path / "full")), arrays, mesh, 4)
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path / "split"))
  fit_e2e(cfg, arrays, mesh, 2)
  resumed = fit_e2e(cfg, arrays, mesh, 4)
  assert resumed.resumed_from == 2
  for a, b in zip(jax.tree.leaves(jax.device_get(full.state)),
                  jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path))
  arrays = toy_arrays()
  mesh = runtime.make_mesh(1)
  fit_e2e(cfg, arrays, mesh, 1)
  bad = dict(arrays, y=arrays["y"].copy())
  bad["y"][3, 0, 0, 0] = np.inf
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* epoch 2.*epoch 1"):
    fit_e2e(cfg, bad, mesh, 3)
  ckpts = sorted(p.name for p in (tmp_path / "checkpoints" / "e2e_test").iterdir())
  assert ckpts == ["1"]


def test_a_diverged_last_update_is_never_saved(tmp_path):
  # Every loss is finite (a step's loss is that of the parameters before its update), but the
  # last update of epoch 2 makes the parameters infinite: the run stops there, and epoch 1's
  # checkpoint, whose save was still in flight, is committed.
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path))
  arrays = toy_arrays()
  net = cnn.network_template(cfg)
  params = nets.init(jax.random.key(0), (1,) + arrays["x"].shape[1:], depth=cfg.depth,
                     features=cfg.features, kernel_size=cfg.kernel_size)
  blow_up = optax.scale_by_schedule(lambda count: jnp.where(count == 3, jnp.inf, 1.0))
  tx = optax.chain(optax.sgd(1e-3), blow_up)  # 2 steps per epoch: update 3 ends epoch 2
  with pytest.raises(FloatingPointError, match=r"non-finite param_norm inf .* epoch 2.*epoch 1"):
    loop.fit("e2e_test", cnn.e2e_loss(net), tx, params, {}, arrays, cfg=cfg,
              mesh=runtime.make_mesh(1), epochs=3, log=workdir_lib.MetricsLog(cfg.workdir))
  ckpts = sorted(p.name for p in (tmp_path / "checkpoints" / "e2e_test").iterdir())
  assert ckpts == ["1"]


def test_layerwise_freezes_the_prefix_and_ends_as_a_deep_net(tmp_path):
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path), method="layerwise", epochs=2)
  arrays = toy_arrays()
  seen = {}
  params = cnn.train_layerwise(
      cfg, "layerwise", arrays, mesh=runtime.make_mesh(2), log=workdir_lib.MetricsLog(tmp_path),
      on_depth=lambda d, p, r: seen.setdefault(d, jax.device_get(p)))
  assert sorted(seen) == [2, 3]
  # Stage 2 trained on top of stage 1's layer without changing it.
  np.testing.assert_array_equal(seen[2]["convs_0"]["kernel"], params["convs_0"]["kernel"])
  e2e = nets.init(jax.random.key(0), (1, 8, 8, 2), depth=3, features=4, kernel_size=3)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, e2e)
  # A finished stage is loaded, not retrained: a second call reads the saved reports.
  again = cnn.train_layerwise(cfg, "layerwise", arrays, mesh=runtime.make_mesh(2),
                                log=workdir_lib.MetricsLog(tmp_path))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_the_prefix_is_compiled_once_for_every_pass(monkeypatch):
  # A convex stage runs the frozen prefix over the data several times (beta_max, FISTA's power
  # iterations, certificate, refit): each pass must reuse one compiled function.
  traces = []
  prefix = nets.prefix_features
  monkeypatch.setattr(nets, "prefix_features", lambda *a: traces.append(1) or prefix(*a))
  feature_cache._prefix_fn.cache_clear()
  net = cnn.network_template(CFG)
  params = nets.init(jax.random.key(0), (1, 8, 8, 2), depth=3, features=4, kernel_size=3)
  x = toy_arrays()["x"]
  passes = [np.concatenate(list(feature_cache.prefix_batches(net, params, x, 2, 4))) for _ in range(3)]
  assert len(traces) == 1
  np.testing.assert_array_equal(passes[0], passes[2])
  np.testing.assert_allclose(passes[0], prefix(net, params, x, 2), rtol=1e-5, atol=1e-6)


def test_config_names_every_kind_the_code_builds():
  # config keeps plain tuples (no JAX import for --help); they must name what the code builds.
  import subprocess
  import sys
  from lwjax.mri import coils, masks
  from lwjax.stages import convex
  assert set(config_lib.LAYERWISE) == set(cnn.STAGES)
  assert set(config_lib.SOLVERS) == set(convex.SOLVERS)
  assert config_lib.MASKS == masks.KINDS and config_lib.MAPS == coils.METHODS
  loaded = subprocess.run([sys.executable, "-c", "import sys, lwjax.config; print('jax' in "
                           "sys.modules)"], capture_output=True, text=True, check=True).stdout
  assert loaded.strip() == "False"


def test_validate_rejects_bad_settings():
  for change, flag in [({"method": "layerwise,sgd"}, "method"), ({"depth": 1}, "depth"),
                       ({"batch_size": 6}, "batch_size"), ({"mask": "radial"}, "mask"),
                       ({"convex_solver": "fista", "rho": 1.0}, "rho"),
                       ({"convex_precision": "tf32"}, "convex_precision"),
                       ({"features": 6, "method": "layerwise_convex"}, "features"),
                       ({"kernel_size": 4}, "kernel_size"),
                       ({"ndim": 3, "kernel_depth": 2}, "kernel_depth"),
                       ({"beta": 0.0, "method": "e2e,layerwise_convex"}, "beta"),
                       ({"beta": 1.0, "method": "layerwise_convex"}, "beta"),
                       ({"lr_decay": -1.0}, "lr_decay"), ({"lr_decay": 1.5}, "lr_decay"),
                       ({"lr_decay_every": 0}, "lr_decay_every"),
                       ({"weight_decay": -1.0}, "weight_decay"),
                       ({"fista_iters": 0}, "fista_iters")]:
    with pytest.raises(ValueError, match=f"--{flag}="):
      config_lib.validate(dataclasses.replace(CFG, **change), num_devices=4)
  # A flagfile's e2e depths beyond a smaller --depth would train networks nobody compares.
  with pytest.raises(ValueError, match=r"--e2e_depths='2,3,4,5': deeper than --depth=3; .*"
                                       r"\(e.g. --e2e_depths=2,3\)"):
    config_lib.validate(dataclasses.replace(CFG, e2e_depths="2,3,4,5"), num_devices=4)
  config_lib.validate(dataclasses.replace(CFG, e2e_depths="2,3,4,5", method="layerwise"),
                      num_devices=4)  # no e2e network is trained: nothing to refuse
  config_lib.validate(CFG, num_devices=4)
  config_lib.validate(dataclasses.replace(CFG, beta=0.0, method="e2e"), num_devices=4)
  config_lib.validate(dataclasses.replace(CFG, beta=1.0, beta_relative=False,
                                          method="layerwise_convex"), num_devices=4)


@pytest.mark.parametrize("cache", ["host", "disk", "device"])
def test_cached_features_give_the_same_network(tmp_path, cache):
  arrays = toy_arrays()
  results = {}
  mesh = runtime.make_mesh(4 if cache == "device" else 1)  # Device caches are copied to each device.
  for mode in ("none", cache):
    cfg = dataclasses.replace(CFG, workdir=str(tmp_path / mode), method="layerwise", epochs=2,
                              cache_features=mode)
    results[mode] = cnn.train_layerwise(cfg, "layerwise", arrays, mesh=mesh,
                                          log=workdir_lib.MetricsLog(cfg.workdir))
  for a, b in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results[cache])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if cache == "disk":
    h = np.load(tmp_path / "disk" / "features" / "layerwise" / "h_1.npy")
    assert h.shape == (8, 8, 8, 4) and np.all(h >= 0)


def test_take_batch_gathers_on_device_and_splits_over_the_mesh():
  mesh = runtime.make_mesh(4)
  h = np.random.default_rng(0).normal(size=(10, 3, 3, 2)).astype(np.float32)
  resident = {"h": jax.device_put(h, runtime.replicated(mesh))}
  idx = np.array([7, 2, 9, 0])
  out = runtime.take_batch(mesh)(resident, idx)["h"]
  np.testing.assert_array_equal(np.asarray(out), h[idx])
  assert out.sharding.is_equivalent_to(runtime.batch_sharded(mesh), out.ndim)


def test_device_cache_that_does_not_fit_is_refused_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(runtime, "free_device_bytes", lambda device: 1000)  # 1 kB free per device
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path), method="layerwise", epochs=1,
                            cache_features="device")
  with pytest.raises(ValueError, match=r"--cache_features=device: the features h_1 need .* GiB"):
    cnn.train_layerwise(cfg, "layerwise", toy_arrays(), mesh=runtime.make_mesh(1),
                          log=workdir_lib.MetricsLog(cfg.workdir))
  assert not (tmp_path / "checkpoints" / "layerwise_s2").exists()


def test_data_on_device_trains_the_same_networks(tmp_path, monkeypatch):
  # Batches gathered on the devices are the batches gathered on the host: the same steps, bit
  # for bit (e2e, and a FISTA stage whose padded full-pass batches carry weights).
  arrays = toy_arrays(n=10)
  cfg = dataclasses.replace(CFG, depth=2, epochs=1, convex_solver="fista", rho=0.0, fista_iters=2,
                            batch_size=4)
  mesh = runtime.make_mesh(2)
  results, host_keys = {}, set()
  gather = data_lib.gather
  monkeypatch.setattr(data_lib, "gather", lambda arrays, *a, **k: host_keys.update(arrays) or
                      gather(arrays, *a, **k))
  for on in (False, True):
    host_keys.clear()
    run_cfg = dataclasses.replace(cfg, data_on_device=on, workdir=str(tmp_path / str(on)))
    log = workdir_lib.MetricsLog(run_cfg.workdir)
    results[on] = (cnn.train_e2e(run_cfg, 2, arrays, mesh=mesh, log=log),
                   cnn.train_layerwise(run_cfg, "layerwise_convex", arrays, mesh=mesh, log=log))
    assert host_keys == (set() if on else {"x", "y"})  # Where the batches were gathered.
  for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
    np.testing.assert_array_equal(a, b)
  # Host-cached features stay on the host (--cache_features decides where they live).
  host_keys.clear()
  cached = dataclasses.replace(cfg, depth=3, epochs=1, data_on_device=True, cache_features="host",
                               workdir=str(tmp_path / "cached"))
  cnn.train_layerwise(cached, "layerwise", arrays, mesh=mesh,
                        log=workdir_lib.MetricsLog(cached.workdir))
  assert host_keys == {"h"}

  monkeypatch.setattr(runtime, "free_device_bytes", lambda device: 1000)  # 1 kB free per device
  cfg = dataclasses.replace(cfg, data_on_device=True, workdir=str(tmp_path / "full"))
  with pytest.raises(ValueError, match=r"--data_on_device: e2e_d2's training arrays \(x, y\) "
                                       r"need .* GiB on every device"):
    cnn.train_e2e(cfg, 2, arrays, mesh=mesh, log=workdir_lib.MetricsLog(cfg.workdir))


def test_a_workdir_refuses_other_data_but_not_moved_data(tmp_path):
  # --data_dir may change between a run and its resumption (the data moved), the data may not.
  tiny = config_lib.Config(
      image_size=16, calib=4, synth_train_subjects=1, synth_val_subjects=1, synth_slices=2,
      synth_coils=2, maps="lowres", depth=2, features=4, kernel_size=3, epochs=1, batch_size=2,
      method="e2e", log_every=0, workdir=str(tmp_path / "run"))
  experiment.run(tiny, mesh=runtime.make_mesh(1))
  record = json.loads((tmp_path / "run" / "data.json").read_text())
  assert record["train"]["files"] == [["synth_train_000.h5", 2]]
  assert len(record["val"]["scale"]) == 2

  moved = tmp_path / "moved"
  (tmp_path / "run" / "data").rename(moved)
  # Resumed from the moved data, held on disk this time (a setting a resumed run may change),
  # named relative to the working directory: config.json names it absolutely, for evaluate.py.
  relative = os.path.relpath(moved)
  experiment.run(dataclasses.replace(tiny, data_dir=relative, host_data="disk"),
            mesh=runtime.make_mesh(1))
  saved = config_lib.load(tmp_path / "run" / "config.json").data_dir
  assert os.path.isabs(saved) and os.path.samefile(saved, moved)

  other = data_lib.make_synthetic_dataset(
      tmp_path / "other", train_subjects=1, val_subjects=1, slices=2, coils=2, size=16, seed=7)
  with pytest.raises(ValueError, match=r"data.json: this workdir was trained on other train data: "
                                       r"the files have the same names but other content"):
    experiment.run(dataclasses.replace(tiny, data_dir=str(other)), mesh=runtime.make_mesh(1))
  (other / "val" / "synth_val_000.h5").rename(other / "val" / "another.h5")
  (other / "train" / "synth_train_000.h5").unlink()
  (moved / "train" / "synth_train_000.h5").rename(other / "train" / "synth_train_000.h5")
  with pytest.raises(ValueError, match=r"other val data: synth_val_000.h5 \(2 slices\) there, "
                                       r"another.h5 \(2\) now;"):
    experiment.run(dataclasses.replace(tiny, data_dir=str(other)), mesh=runtime.make_mesh(1))


def test_runs_share_a_slice_cache_folder(tmp_path):
  # --cache_dir: a second run (another workdir) on the same data prepares nothing again.
  data_dir = data_lib.make_synthetic_dataset(tmp_path / "data", train_subjects=1, val_subjects=1,
                                             slices=2, coils=2, size=16, seed=0)
  logs = {}
  for run in ("a", "b"):
    cfg = dataclasses.replace(CFG, image_size=16, calib=4, maps="lowres", data_dir=str(data_dir),
                              workdir=str(tmp_path / run), cache_dir=str(tmp_path / "shared"),
                              prep_workers=1)
    logs[run] = []
    experiment.load_data(cfg, log=logs[run].append)
  done = lambda run: [m for m in logs[run] if "prepared 2/2" in m]
  assert done("a") == ["train: prepared 2/2 slices (0 from cache)",
                       "val: prepared 2/2 slices (0 from cache)"]
  assert done("b") == ["train: prepared 2/2 slices (2 from cache)",
                       "val: prepared 2/2 slices (2 from cache)"]
  assert len(list((tmp_path / "shared").glob("*.npz"))) == 4
  assert not (tmp_path / "a" / "cache").exists()


def test_settings_refused_by_the_data_leave_the_workdir_free(tmp_path):
  # A command refused on its data (batch larger than the data, 3D patches deeper than the files)
  # writes no config.json, so the corrected command runs in the same workdir.
  tiny = config_lib.Config(
      image_size=16, calib=4, synth_train_subjects=1, synth_val_subjects=1, synth_slices=2,
      synth_coils=2, maps="lowres", depth=2, features=4, kernel_size=3, epochs=1, batch_size=2,
      method="e2e", log_every=0, workdir=str(tmp_path / "run"))
  for bad, needle in (({"batch_size": 3}, r"--batch_size=3: expected 1..2"),
                      ({"ndim": 3, "volume_depth": 3},
                       r"--volume_depth=3: .*longest run of consecutive slices of a file \(2;")):
    with pytest.raises(ValueError, match=needle):
      experiment.run(dataclasses.replace(tiny, **bad), mesh=runtime.make_mesh(1))
    assert not (tmp_path / "run" / "config.json").exists()
  # A training file also in val (a symlink): refused as a subject in two splits.
  leak = tmp_path / "leak"
  data_lib.make_synthetic_dataset(leak, train_subjects=1, val_subjects=1, slices=2, coils=2,
                                  size=16)
  (leak / "val" / "copy.h5").symlink_to(leak / "train" / "synth_train_000.h5")
  with pytest.raises(ValueError, match=r"copy.h5 \(val\) is the same file as"):
    experiment.run(dataclasses.replace(tiny, data_dir=str(leak)), mesh=runtime.make_mesh(1))
  assert not (tmp_path / "run" / "config.json").exists()
  experiment.run(tiny, mesh=runtime.make_mesh(1))
  assert config_lib.load(tmp_path / "run" / "config.json") == tiny


def test_fista_takes_full_batch_steps_whatever_the_batch_size(tmp_path):
  # 10 examples: batches of 4 and 6 leave 2 and 4 over (the last batch is padded with weight-0
  # rows), 10 divides them. FISTA's gradient is over every example: all three solve one problem.
  cfg = dataclasses.replace(CFG, depth=2, method="layerwise_convex", convex_solver="fista",
                            rho=0.0, fista_iters=30)
  arrays = toy_arrays(n=10)
  results = {}
  for b in (4, 6, 10):
    run_cfg = dataclasses.replace(cfg, batch_size=b, workdir=str(tmp_path / f"b{b}"))
    params = cnn.train_layerwise(run_cfg, "layerwise_convex", arrays, mesh=runtime.make_mesh(2),
                                   log=workdir_lib.MetricsLog(run_cfg.workdir))
    report = json.loads(workdir_lib.stage_report_path(run_cfg.workdir, "layerwise_convex", 1).read_text())
    results[b] = (params, report)
  ref_params, ref = results[10]
  for b in (4, 6):
    params, report = results[b]
    assert report["objective"] == pytest.approx(ref["objective"], rel=1e-4), b
    assert report["rel_gap"] == pytest.approx(ref["rel_gap"], rel=1e-2, abs=1e-6), b
    for a, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-5 * np.abs(r).max())


def test_a_bad_validation_split_fails_before_the_training_split_is_prepared(tmp_path):
  # Preparing the training files (ESPIRiT) can take hours at paper scale: a missing val folder
  # or a damaged val file must not be found only after that.
  data_dir = data_lib.make_synthetic_dataset(tmp_path / "data", train_subjects=2, val_subjects=1,
                                             slices=2, coils=4, size=32, seed=0)
  cfg = dataclasses.replace(CFG, image_size=32, calib=8, maps="lowres", data_dir=str(data_dir),
                            workdir=str(tmp_path / "run"))
  (data_dir / "val" / "bad.h5").write_text("not hdf5")
  with pytest.raises(data_lib.fastmri.DataError, match=r"val/bad.h5: expected an HDF5 file"):
    experiment.load_data(cfg)
  for f in (data_dir / "val").iterdir():
    f.unlink()
  (data_dir / "val").rmdir()
  with pytest.raises(data_lib.fastmri.DataError, match=r"expected fastMRI multi-coil .h5 files "
                                                       r"for split 'val'"):
    experiment.load_data(cfg)
  assert not list((tmp_path / "run" / "cache").glob("*.npz"))


def _convex_run(tmp_path, name, **overrides):
  settings = dict(method="layerwise_convex", depth=2, features=8, convex_solver="pfista",
                  metric_samples=0, certify_every=5, fista_iters=200)
  cfg = dataclasses.replace(CFG, workdir=str(tmp_path / name), **{**settings, **overrides})
  log = workdir_lib.MetricsLog(cfg.workdir)
  params = cnn.train_layerwise(cfg, "layerwise_convex", toy_arrays(n=12), mesh=runtime.make_mesh(1),
                                 log=log)
  report = json.loads(workdir_lib.stage_report_path(cfg.workdir, "layerwise_convex", 1).read_text())
  lines = [json.loads(line) for line in log.path.read_text().splitlines()]
  return params, report, [r for r in lines if r.get("event") == "check"]


def test_a_convex_stage_stops_at_its_target_gap_and_resumes_at_a_check(tmp_path):
  params, report, checks = _convex_run(tmp_path, "full", target_gap=1e-5)
  gaps = [r["rel_gap"] for r in checks]
  # Certified every 5 passes until the target, then stopped: the report says after how many.
  assert [r["epoch"] for r in checks] == list(range(5, 5 * len(checks) + 1, 5))
  assert gaps[-1] <= 1e-5 < min(gaps[:-1]) and gaps[0] > 1e-3
  assert report["passes"] == checks[-1]["epoch"] < 200
  assert report["rel_gap"] <= 1e-5 and report["target_gap"] == 1e-5
  # Killed after the stopping check's checkpoint: the rerun checks first, stops, and ends with
  # the same network bit for bit.
  killed = tmp_path / "killed"
  _convex_run(tmp_path, "killed", target_gap=1e-5)
  for path in (killed / "stages", killed / "params"):
    shutil.rmtree(path)
  again, report_again, rechecks = _convex_run(tmp_path, "killed", target_gap=1e-5)
  assert rechecks[-1]["epoch"] == rechecks[-2]["epoch"] == report["passes"]
  assert report_again == report
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  # Cut off at an earlier check (a run of 10 passes): the rerun recentres pfista's loss at that
  # check's certificate first, as the uninterrupted run did there, and ends the same bit for bit.
  cut = tmp_path / "cut"
  _convex_run(tmp_path, "cut", target_gap=1e-5, fista_iters=10)
  for path in (cut / "stages", cut / "params"):
    shutil.rmtree(path)
  again, report_again, _ = _convex_run(tmp_path, "cut", target_gap=1e-5)
  assert report_again == report
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  # In bfloat16 steps only the recentring at each check (pfista's refinement) certifies: the
  # run must go on from the state its check returns.
  _, report_bf16, _ = _convex_run(tmp_path, "bf16", target_gap=1e-5, compute_dtype="bfloat16")
  assert report_bf16["passes"] < 50 and report_bf16["rel_gap"] <= 1e-5
  # With --target_gap=0 the stage runs every pass, certified along the way.
  _, report_all, checks_all = _convex_run(tmp_path, "all", target_gap=0.0, fista_iters=40)
  assert report_all["passes"] == 40 and len(checks_all) == 8
