"""launch/train.py as a user runs it: flag errors, summary.json, and resuming after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size=32", "--synth_train_subjects=2", "--synth_val_subjects=1",
        "--synth_slices=2", "--synth_coils=4", "--maps=lowres", "--calib=8", "--features=8",
        "--kernel_size=3", "--batch_size=2", "--log_every=0", "--lr=1e-3",
        "--compilation_cache="]  # Off: the tests write nothing outside their tmp_path.


def train_cmd(workdir, *extra):
  return [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}", *TINY, *extra]


def run(cmd, env_extra=None, **kwargs):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", **(env_extra or {}))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # It would win over --compilation_cache.
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        **kwargs)


@pytest.mark.parametrize("flags,needle", [
    (["--method=layerwise,sgd"], "--method="),
    (["--depth=1"], "--depth="),
    (["--mask=radial"], "--mask="),
    (["--batch_size=3"], "--batch_size="),
    (["--flagfile=does_not_exist.flags"], "does_not_exist.flags"),
])
def test_invalid_flags_fail_before_any_work(tmp_path, flags, needle):
  workdir = tmp_path / "w"
  result = run(train_cmd(workdir, *flags))
  assert result.returncode != 0
  assert needle in result.stderr
  assert not (workdir / "data").exists()


def load_params_npz(workdir, method, depth):
  from lwjax.training import checkpoints
  from lwjax.training import workdir as workdir_lib
  import jax
  return [np.asarray(a) for a in jax.tree.leaves(
      checkpoints.load_params(workdir_lib.params_dir(workdir, method, depth)))]


def test_summary_and_resume_after_sigkill(tmp_path):
  flags = ["--method=layerwise,e2e", "--depth=2", "--epochs=3"]
  full = tmp_path / "full"
  result = run(train_cmd(full, *flags))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((full / "summary.json").read_text())
  assert set(summary["zero_filled"]) == {"psnr", "ssim", "nmse"}
  assert set(summary["layerwise"]) == {"2"} and set(summary["e2e"]) == {"2"}
  for entry in (summary["layerwise"]["2"], summary["e2e"]["2"]):
    assert set(entry) == {"psnr", "ssim", "nmse"} and np.isfinite(list(entry.values())).all()

  # Kill the same run after its first checkpoint, start it again, compare with the full run.
  # Both starts share a persistent compilation cache (every compile cached): the first writes
  # the steps it compiled, the resumed run loads them, and the networks are the same.
  killed = tmp_path / "killed"
  cache = tmp_path / "jax_cache"
  cache_env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             **cache_env)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.Popen(train_cmd(killed, *flags, f"--compilation_cache={cache}"), cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = killed / "checkpoints" / "layerwise_s1"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if first.exists() and any(p.name.isdigit() for p in first.iterdir()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "params" / "e2e").exists(), "the run finished before it was killed"
  assert any(cache.iterdir())  # What the resumed run can load.
  result = run(train_cmd(killed, *flags, f"--compilation_cache={cache}"), env_extra=cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"compilation cache: {cache}" in result.stderr
  for method in ("layerwise", "e2e"):
    for a, b in zip(load_params_npz(full, method, 2), load_params_npz(killed, method, 2)):
      np.testing.assert_array_equal(a, b)
  assert json.loads((killed / "summary.json").read_text())["e2e"] == summary["e2e"]

  # The same workdir with other settings is refused, naming the setting.
  result = run(train_cmd(killed, "--method=layerwise,e2e", "--depth=2", "--epochs=4"))
  assert result.returncode != 0 and "--epochs" in result.stderr


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_train_the_same_networks_as_one(tmp_path):
  # Two processes of 2 CPU devices each (--distributed) against one process of 4 devices: the
  # same global mesh, so the same networks; process 0 alone writes the files.
  flags = ["--method=layerwise_convex,e2e", "--depth=3", "--e2e_depths=3", "--epochs=2",
           "--fista_iters=2", "--synth_slices=4", "--batch_size=4", "--cache_features=device"]
  one = tmp_path / "one"
  env4 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
              JAX_PLATFORMS="cpu")
  result = subprocess.run(train_cmd(one, *flags), cwd=ROOT, env=env4, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  two = tmp_path / "two"
  port = free_port()
  env2 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(train_cmd(two, *flags, f"--distributed=localhost:{port},2,{pid}"),
                            cwd=ROOT, env=env2, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "4 x cpu" in outs[0][1]  # the mesh spans both processes' devices

  s1 = json.loads((one / "summary.json").read_text())
  s2 = json.loads((two / "summary.json").read_text())
  for method in ("layerwise_convex", "e2e"):
    for key in ("psnr", "ssim", "nmse"):
      np.testing.assert_allclose(s2[method]["3"][key], s1[method]["3"][key], rtol=1e-3)
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  epochs = [(r["phase"], r["epoch"]) for r in records if "epoch_s" in r]
  assert len(epochs) == len(set(epochs)) == 3 * 2  # e2e_d3 + 2 stages, 2 epochs, once each
  assert not (two / "features").exists()


def test_configure_xla_disables_conv_fusion_and_keeps_the_users_flags():
  script = """if True:
    import json, os
    from lwjax.training import runtime
    from lwjax.training import checkpoints
    from lwjax.training import workdir as workdir_lib
    out = {}
    os.environ["XLA_FLAGS"] = "--xla_disable_hlo_passes=foo"
    out["users_passes"] = runtime.configure_xla(False)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out["fusion_on"] = runtime.configure_xla(True)
    out["set"] = runtime.configure_xla(False)
    import jax
    out["devices"] = jax.device_count()  # XLA accepted the combined flags.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out["started"] = runtime.configure_xla(False)
    print(json.dumps(out))
  """
  result = run([sys.executable, "-c", script])
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  from lwjax.training import runtime
  assert out["users_passes"] == "--xla_disable_hlo_passes=foo"
  assert out["fusion_on"] == "--xla_force_host_platform_device_count=2"
  assert out["set"].split() == ["--xla_force_host_platform_device_count=2",
                                f"--xla_disable_hlo_passes={runtime.CONV_FUSION_PASS}"]
  assert out["devices"] == 2
  assert out["started"] == "--xla_force_host_platform_device_count=2"  # Too late: left alone.
  assert "already started" in result.stderr
