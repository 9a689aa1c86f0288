r"""Benchmark (not a test): the real training loop's throughput and its wait for data.

Runs the project's own drivers (``cnn.train_e2e``, ``cnn.train_layerwise``: the same ``fit``
loop, input pipeline, checkpoints and feature cache as ``launch/train.py``) for a few epochs on
random prepared slices of the configured shape held in host memory, and reads back what the
loop records per epoch in ``metrics.jsonl``:

* ``steps/s`` and images/s of the trainer (compare with the bare step of ``bench_steps.py``);
* ``data_wait_frac``: host time spent producing and transferring the next batch / epoch time.
  The step is dispatched asynchronously, so this is an upper bound on the device's idle time:
  the device waits only when the host's time per step exceeds the step itself.

The first epoch of each phase (it compiles) is left out of the means. ``--runs`` lists
``e2e`` and ``<method>:<cache>`` runs (method ``layerwise`` or ``layerwise_convex``, cache
``none``, ``host``, ``disk`` or ``device``), each optionally with ``+data`` (``--data_on_device``:
the slices in accelerator memory, batches gathered there), each in a fresh working directory;
``other s`` is the run's wall time outside the timed epochs (compilation, the convex stage's
beta_max and certificate passes, computing cached features, saving parameters).

GPU, paper scale (about 2 minutes with compilation):
  python3 bench/bench_pipeline.py --image_size=320 --features=256 --kernel_size=7 --depth=5 \
      --batch_size=8 --slices=48 --epochs=3 --runs=e2e,layerwise_convex:none,layerwise_convex:host

CPU, reduced size:
  python bench/bench_pipeline.py --image_size=64 --features=32 --depth=3 --batch_size=4 \
      --slices=32 --epochs=3 --runs=e2e,layerwise_convex:none,layerwise_convex:host
"""
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This working tree's lwjax.
from lwjax import cli  # noqa: E402
from lwjax import config as config_lib  # noqa: E402
from lwjax import files  # noqa: E402

config_lib.define_flags()
flags.DEFINE_integer("slices", 48, "random training slices held in host memory")
flags.DEFINE_string("runs", "e2e,layerwise_convex:none,layerwise_convex:host",
                    "comma-separated runs: e2e, or <layerwise|layerwise_convex>:<none|host|disk|"
                    "device>; a suffix +data adds --data_on_device")
flags.DEFINE_string("json_out", "", "write the results here as JSON (rewritten after each run)")
flags.DEFINE_string("scratch", "", "parent of the runs' working directories (default: a temp dir)")
FLAGS = flags.FLAGS


def parse_runs(spec: str) -> list:
  out = []
  for token in (t.strip() for t in spec.split(",") if t.strip()):
    on_device = token.endswith("+data")
    method, _, cache = token.removesuffix("+data").partition(":")
    if method == "e2e" and not cache:
      out.append(("e2e", "none", on_device))
    elif method in ("layerwise", "layerwise_convex") and cache in config_lib.FEATURE_CACHES:
      out.append((method, cache, on_device))
    else:
      raise app.UsageError(f"--runs: {token!r} is not e2e or <layerwise|layerwise_convex>:"
                           f"<{'|'.join(config_lib.FEATURE_CACHES)}>, with an optional +data")
  return out


def phase_rows(metrics_path: Path, cfg) -> list:
  """Per phase: means over its epochs after the first (which includes compilation)."""
  epochs = {}
  for rec in files.read_json_lines(metrics_path):
    if "epoch_s" in rec:
      epochs.setdefault(rec["phase"], []).append(rec)
  rows = []
  for phase, recs in epochs.items():
    timed = recs[1:] or recs
    sps = statistics.mean(r["steps_per_s"] for r in timed)
    rows.append({"phase": phase, "epochs_timed": len(timed), "steps_per_s": sps,
                 "img_per_s": sps * cfg.batch_size, "ms_per_step": 1e3 / sps,
                 "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in timed),
                 "first_epoch_s": recs[0]["epoch_s"],
                 "epoch_s": statistics.mean(r["epoch_s"] for r in timed)})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  import numpy as np
  from lwjax.training import runtime
  from lwjax.training import workdir as workdir_lib
  from lwjax.models import cnn
  cli.quiet_library_logs()
  runtime.configure_xla(FLAGS.conv_fusion)  # As launch/train.py does.

  runs = parse_runs(FLAGS.runs)
  base = config_lib.from_flags()
  mesh = runtime.make_mesh()
  config_lib.validate(base, mesh.devices.size)
  rng = np.random.default_rng(0)
  shape = (FLAGS.slices, base.image_size, base.image_size, 2)
  arrays = {"x": rng.standard_normal(shape, np.float32),
            "y": rng.standard_normal(shape, np.float32)}
  dev = jax.devices()[0]
  report = {"device": f"{mesh.devices.size} x {dev.device_kind} ({dev.platform})",
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "config": dataclasses.asdict(base), "slices": FLAGS.slices, "runs": []}
  print(f"device: {report['device']}; {FLAGS.slices} slices of {shape[1:]}; depth {base.depth}, "
        f"{base.features} channels, {base.kernel_size}x{base.kernel_size}, batch "
        f"{base.batch_size}, {base.epochs} epochs, {base.compute_dtype}", flush=True)
  scratch = Path(FLAGS.scratch or tempfile.mkdtemp(prefix="lwjax_pipeline_"))
  for method, cache, on_device in runs:
    name = f"{cache}{'+data' * on_device}"
    workdir = scratch / f"{method}_{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    # A FISTA-type convex stage takes --fista_iters passes: here --epochs, like every phase.
    cfg = dataclasses.replace(base, workdir=str(workdir), cache_features=cache,
                              data_on_device=on_device, fista_iters=base.epochs)
    log = workdir_lib.MetricsLog(workdir)
    t0 = time.perf_counter()
    if method == "e2e":
      cnn.train_e2e(cfg, cfg.depth, arrays, mesh=mesh, log=log)
    else:
      cnn.train_layerwise(cfg, method, arrays, mesh=mesh, log=log)
    wall = time.perf_counter() - t0
    rows = phase_rows(log.path, cfg)
    timed = sum(r["epoch_s"] * r["epochs_timed"] for r in rows)
    run = {"method": method, "cache_features": cache, "data_on_device": on_device,
           "wall_s": wall,
           "other_s": wall - timed, "phases": rows}
    if cache != "none":
      run["cache_bytes_per_stage"] = (FLAGS.slices * cfg.image_size ** 2 * cfg.features * 4)
    report["runs"].append(run)
    for r in rows:
      print(f"{method:17s} {name:11s} {r['phase']:20s} {r['ms_per_step']:9.1f} ms/step "
            f"{r['img_per_s']:8.1f} img/s  data wait {r['data_wait_frac']:.3f}  "
            f"(first epoch {r['first_epoch_s']:.1f} s)", flush=True)
    print(f"{method} {name}: {wall:.1f} s wall, {run['other_s']:.1f} s outside timed epochs",
          flush=True)
    if FLAGS.json_out:
      workdir_lib.write_json(Path(FLAGS.json_out), report)
  if not FLAGS.scratch:
    shutil.rmtree(scratch, ignore_errors=True)

  print("\n| run | phase | ms/step | img/s | data wait | first epoch (s) |")
  print("|---|---|---|---|---|---|")
  for run in report["runs"]:
    for r in run["phases"]:
      data = " +data" if run["data_on_device"] else ""
      print(f"| {run['method']} ({run['cache_features']}{data}) | {r['phase']} "
            f"| {r['ms_per_step']:.1f} | {r['img_per_s']:.1f} | {r['data_wait_frac']:.3f} "
            f"| {r['first_epoch_s']:.1f} |")
  return 0


if __name__ == "__main__":
  app.run(main)
