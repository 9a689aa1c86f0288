"""Training: the device mesh, the one training loop, checkpoints, and the two methods' drivers.

* ``fit`` is the only training loop. It trains any ``loss_fn(params, frozen, batch)`` with any optax
  solver, data-parallel over a ``jax.sharding.Mesh`` with a "data" axis, saves an orbax checkpoint
  per epoch and resumes from the last one. End-to-end networks and every kind of layer-wise stage
  go through it.
* ``train_e2e`` trains a ``DeepNet`` of a given depth end to end.
* ``train_layerwise`` trains stage after stage: stage i's variables on top of the frozen prefix
  (``nets.prefix_features`` under ``stop_gradient``), then ``stage.to_layer`` appends one ReLU layer.

Everything a run writes lives under ``workdir``:
``checkpoints/<phase>/`` (per-epoch state), ``params/<method>/depth_<d>/`` (finished networks),
``stages/<method>/stage_<i>.json`` (per-stage reports; written last, so a stage with a report is
finished and never retrained), ``metrics.jsonl`` (one line per epoch and per evaluation; the same
records go to ``tensorboard/`` when tensorboardX is installed).
"""
import collections
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwjax import files
from lwjax import console
from lwjax import data as data_lib
from lwjax.data import fastmri
from lwjax.mri import masks
from lwjax import metrics as metrics_lib
from lwjax import nets
from lwjax import config as config_lib
from lwjax import stage as stage_lib
from lwjax import tensorboard
from lwjax.config import Config

Params = Any
FEATURES = "h"  # The key of a layer-wise stage's cached prefix features in its training arrays.


def enable_compilation_cache(path: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in ``path`` (``~`` expanded), unless
  ``JAX_COMPILATION_CACHE_DIR`` already names one; returns the directory in use (None: off)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not path:
    return None
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# XLA's GPU pass that fuses a convolution with its bias add and ReLU into one cuDNN call. On an
# H200 it made the 7x7x256 bfloat16 layer slower: 14.5 ms fused against 11.2 ms for the plain
# convolution followed by XLA's own bias+ReLU fusion (PyTorch: 12.2 ms), and evaluation of the
# depth-5 net 43.0 -> 33.7 ms (BUILD_NOTES, speed). The pass exists only in XLA's GPU pipeline.
CONV_FUSION_PASS = "cudnn-fused-convolution-rewriter"


def configure_xla(conv_fusion: bool) -> str:
  """Sets this process's ``XLA_FLAGS`` before JAX starts its backend; returns them.

  ``conv_fusion=False`` disables ``CONV_FUSION_PASS``. An ``XLA_FLAGS`` that already names
  passes to disable is left as it is (the user's choice wins), and so is everything once the
  backend has started (XLA reads the variable once): both are logged.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if conv_fusion:
    return current
  if "--xla_disable_hlo_passes" in current:
    if CONV_FUSION_PASS not in current:
      logging.info("XLA_FLAGS already disables passes; %s is left on", CONV_FUSION_PASS)
    return current
  from jax._src import xla_bridge  # No public way to ask whether the backend has started.
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    logging.warning("the JAX backend has already started: %s stays as it was", CONV_FUSION_PASS)
    return current
  os.environ["XLA_FLAGS"] = f"{current} --xla_disable_hlo_passes={CONV_FUSION_PASS}".strip()
  return os.environ["XLA_FLAGS"]


# ----------------------------------------------------------------------------------------------
# Mesh and sharding.

def is_primary() -> bool:
  """Whether this process writes the run's files (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def primary_first(fn: Callable[[], Any], what: str) -> Any:
  """``fn()`` on process 0, then on the others, which find what it wrote (data, caches).

  One process: just ``fn()``. Every host of a multi-host run calls this at the same point.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if is_primary() else None
  multihost_utils.sync_global_devices(f"lwjax: {what} ready on process 0")
  return out if is_primary() else fn()


def initialize_distributed(spec: str) -> None:
  """``--distributed``: "" (one host), "auto" (TPU pods, SLURM, Open MPI, Kubernetes: detected),
  or "ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID". Must run before anything touches a device."""
  if not spec:
    return
  # Cross-process collectives of the CPU backend (tests, CPU clusters); GPUs/TPUs have their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if spec == "auto":
    jax.distributed.initialize()
    return
  parts = spec.split(",")
  if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
    raise ValueError(f"--distributed={spec!r}: expected 'auto' or "
                     "'ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID' (e.g. 10.0.0.2:1234,4,0)")
  jax.distributed.initialize(coordinator_address=parts[0], num_processes=int(parts[1]),
                             process_id=int(parts[2]))


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh with a "data" axis over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()[: num_devices or None]
  return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly batch-sharded) global array as NumPy, on every process."""
  if not x.is_fully_addressable:  # Multi-host: gather the other hosts' rows.
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host arrays with a leading batch axis -> global device arrays split over the mesh."""
  sharding = batch_sharded(mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def device_batches(batches: Iterator[dict], mesh: Mesh, prefetch: int = 2) -> Iterator[dict]:
  """Host batches -> sharded device batches, transferred ``prefetch`` batches ahead.

  The transfers are asynchronous, so the next batches travel while the device runs a step.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(put_batch(batch, mesh))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def take_batch(mesh: Mesh):
  """Jitted ``(arrays, idx) -> {k: v[idx]}`` for arrays held on the devices (replicated); the
  batch comes out split over the mesh, as ``put_batch`` would give it."""
  return jax.jit(lambda arrays, idx: {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()},
                 out_shardings=batch_sharded(mesh))


# ----------------------------------------------------------------------------------------------
# Optimiser.

def lr_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
  """``lr * lr_decay ** floor(epoch / lr_decay_every)`` as a function of the step."""
  return optax.exponential_decay(cfg.lr, transition_steps=cfg.lr_decay_every * steps_per_epoch,
                                 decay_rate=cfg.lr_decay, staircase=True)


def adam(cfg: Config, steps_per_epoch: int, weight_decay: float = 0.0):
  """The paper's optimiser: Adam with the step-halving schedule (+ decoupled weight decay)."""
  schedule = lr_schedule(cfg, steps_per_epoch)
  if weight_decay:
    return optax.adamw(schedule, weight_decay=weight_decay)
  return optax.adam(schedule)


# ----------------------------------------------------------------------------------------------
# The training step and loop.

def init_state(params: Params, tx: optax.GradientTransformation) -> dict:
  """The state ``make_step`` trains: ``{"params", "opt", "step"}`` (abstract under
  ``jax.eval_shape``)."""
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


# loss_fn(params, frozen, batch) -> (scalar objective, dict of scalar diagnostics).
LossFn = Callable[[Params, Params, dict], tuple[jax.Array, dict]]


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh):
  """A jitted pure update ``(state, frozen, batch) -> (state, metrics)``, data-parallel on mesh.

  ``state = {"params", "opt", "step"}`` (``init_state``) is replicated and donated; ``frozen``,
  the step's non-trained inputs (a layer-wise prefix; the unrolled model's mask), is replicated
  and read only; the batch is split over the "data" axis. The mean loss
  over the global batch makes XLA insert the cross-device gradient reduction.
  """
  def step(state, frozen, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    measurements = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
                    "param_norm": optax.tree_utils.tree_norm(params),
                    **aux}
    return {"params": params, "opt": opt, "step": state["step"] + 1}, measurements

  rep = replicated(mesh)
  return jax.jit(step, donate_argnums=(0,), in_shardings=(rep, rep, batch_sharded(mesh)),
                 out_shardings=(rep, rep))


class MetricsLog:
  """Appends JSON lines to ``WORKDIR/metrics.jsonl`` (process 0 only), each stamped with its
  ``time`` (Unix seconds); ``launch/evaluate.py`` draws the training curves from it. With a ``board`` (``tensorboard.Board``) every record also
  goes to TensorBoard."""

  def __init__(self, workdir, board=None):
    self.path = Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.board = board

  def write(self, record: dict) -> None:
    if not is_primary():
      return
    record = {**{k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
                 for k, v in record.items()}, "time": round(time.time(), 3)}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self.board is not None:
      self.board.record(record)

  def records(self) -> list[dict]:
    """Every record written so far (none where this process cannot see the file)."""
    return files.read_json_lines(self.path) if self.path.is_file() else []

  def close(self) -> None:
    if self.board is not None:
      self.board.close()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# With ``fit``'s ``check``, the longest a phase goes without a checkpoint (seconds).
SAVE_SECONDS = 300


@dataclasses.dataclass
class FitResult:
  state: dict  # {"params", "opt", "step"} after the last epoch
  resumed_from: int  # epoch the run resumed from (0: a fresh start)
  epochs: int  # epochs the phase took (fewer than asked when ``check`` ended it)


def set_aside(path: Path, workdir: Path) -> Path:
  """Moves the damaged ``path`` (inside ``workdir``) to ``WORKDIR/damaged/`` (same relative
  path, ``.1``, ``.2``, ... if taken): kept for a look, out of the run's way. Returns where."""
  to = workdir / "damaged" / path.relative_to(workdir)
  for n in range(1, 1000):
    if not to.exists():
      break
    to = to.with_name(f"{path.name}.{n}")
  to.parent.mkdir(parents=True, exist_ok=True)
  os.replace(path, to)
  return to


def _drop_closed_loop_reports() -> None:
  """An unreadable checkpoint fails orbax's restore while tensorstore reads are in flight; each
  read then reports "Event loop is closed" as an unraisable exception, a traceback apiece (also
  after the restore returned). The damage is reported once (``restore_intact``): those reports
  are dropped from now on, nothing else is."""
  hook = sys.unraisablehook
  if getattr(hook, "drops_closed_loop", False):
    return

  def filtered(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)
  filtered.drops_closed_loop = True
  sys.unraisablehook = filtered


def _first_line(error: Exception) -> str:
  """The first line of ``error``'s message (orbax's run to hundreds of lines), at most 300
  characters; its type when it has none."""
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def _finite(tree) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def _reload(manager: ocp.CheckpointManager) -> None:
  """The manager forgets the steps set aside (after every process has seen them moved)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lwjax: damaged checkpoints set aside")
  manager.reload()


def restore_intact(manager: ocp.CheckpointManager, state: dict, phase: str,
                   workdir: Path) -> tuple[int, dict]:
  """``(epoch, state)`` of the newest checkpoint of ``manager`` that restores into ``state``'s
  structure with finite values; ``(0, state)`` when there is none.

  Newer steps that do not (a truncated or overwritten array file, a missing manifest or
  _METADATA, an emptied step folder) are each named in one log line and set aside
  (``set_aside``); with none intact left the phase restarts from its first epoch, with a warning.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = Path(manager.directory) / str(step)
    try:
      # Checked first: orbax, asked to restore a step without it, is left unable to restore the
      # next one.
      if not (step_dir / "default" / "_METADATA").is_file():
        raise ValueError("its default/_METADATA is missing")
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
      if not _finite(restored):
        raise ValueError("it holds NaN or Inf")
    except Exception as e:  # Any failure to read it back: orbax's wording varies with the damage.
      _drop_closed_loop_reports()
      why = _first_line(e)
      damaged.append(step)
      if is_primary() and step_dir.exists():
        to = set_aside(step_dir, workdir)
        logging.warning("%s: the checkpoint of epoch %d in %s is damaged (%s); moved to %s",
                        phase, step, step_dir, why, to)
      _reload(manager)  # A failed restore can leave the manager unable to read the next step.
      continue
    logging.info("%s: resumed from the checkpoint of epoch %d in %s", phase, step,
                 manager.directory)
    return step, restored
  if damaged:
    logging.warning("%s: no intact checkpoint left in %s: the phase restarts from its first "
                    "epoch", phase, manager.directory)
  return 0, state


def fit(phase: str, loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
        frozen: Params, arrays: dict, *, cfg: Config, mesh: Mesh, epochs: int,
        log: MetricsLog, full_pass: bool = False,
        check: Optional[Callable[[dict], tuple[bool, dict]]] = None,
        check_every: int = 1) -> FitResult:
  """Train ``params`` for ``epochs`` epochs on ``arrays`` (host arrays with a leading example axis).

  ``full_pass``: every epoch visits every example (the last batch padded with weight-0 rows, the
  batches carry ``weight``: ``data.gather``), for a solver that takes one full-batch step per
  epoch; otherwise the ``n % batch_size`` examples left over by each epoch's shuffle are skipped.

  Resumes from the newest checkpoint in ``WORKDIR/checkpoints/<phase>`` if there is one: the data
  order depends only on (seed, epoch) and the state is restored bit for bit, so a killed run
  ends with the same parameters as an uninterrupted one. A non-finite loss stops the run with
  FloatingPointError before that epoch is saved, so the last good checkpoint is kept.

  ``check``: ``state -> (done, record)`` after every ``check_every``-th epoch, and first thing
  when resuming at such an epoch (a certificate): its record is logged, ``done`` ends the phase
  there. The state is saved after every epoch without ``check``; with it after each checked
  epoch, the last one, and any that ends ``SAVE_SECONDS`` after the previous save.
  """
  n = data_lib.num_examples(arrays)
  spe = data_lib.steps_per_epoch(n, cfg.batch_size, full_pass)
  num_devices = mesh.devices.size
  rep = replicated(mesh)
  state = jax.device_put(init_state(params, tx), rep)
  frozen = jax.device_put(frozen, rep)

  ckpt_dir = Path(cfg.workdir).absolute() / "checkpoints" / phase
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start, state = restore_intact(manager, state, phase, Path(cfg.workdir).absolute())

  step_fn = make_step(loss_fn, tx, mesh)
  if cfg.data_on_device:
    # The data only: cached features ("h") stay where --cache_features put them.
    host_arrays = {k: v for k, v in arrays.items()
                   if k != FEATURES and not isinstance(v, jax.Array)}
    _check_device_room(sum(v.nbytes for v in host_arrays.values()), mesh,
                       f"--data_on_device: {phase}'s training arrays ({', '.join(host_arrays)})",
                       "use --nodata_on_device (or fewer training slices)")
    arrays = {**arrays, **jax.device_put(host_arrays, rep)}
  # Arrays on the accelerator (--data_on_device, --cache_features=device) are gathered there;
  # the others are gathered on the host and copied ahead of the step.
  resident = {k: v for k, v in arrays.items() if isinstance(v, jax.Array)}
  host = {k: v for k, v in arrays.items() if k not in resident}
  take = take_batch(mesh) if resident else None

  def checked(epoch: int) -> bool:
    """Whether the phase is done at ``epoch``: ``check`` on the checked epochs, logged."""
    if check is None or epoch % check_every:
      return False
    done, record = check(state)
    log.write({"phase": phase, "epoch": epoch, "event": "check", **record})
    logging.info("%s epoch %d/%d: %s", phase, epoch, epochs,
                 ", ".join(f"{k} {v:.3g}" for k, v in record.items()))
    return done

  t_phase = last_save = time.time()
  end = start if 0 < start < epochs and checked(start) else epochs
  try:
    for epoch in range(start, end):
      t0 = time.time()
      losses, last = [], {}
      order = data_lib.batch_order(n, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                   num_devices=num_devices, full_pass=full_pass)
      batches = device_batches((data_lib.gather(host, idx, full_pass_of=n if full_pass else None)
                                for idx in order), mesh)
      data_s = 0.0
      for i in range(spe):
        t_data = time.perf_counter()
        batch = next(batches)
        if take is not None:
          batch = {**batch, **take(resident, np.maximum(order[i], 0))}
        data_s += time.perf_counter() - t_data
        state, last = step_fn(state, frozen, batch)
        losses.append(last["loss"])
        if cfg.log_every and (i + 1) % cfg.log_every == 0 and i + 1 < spe:
          rate = (i + 1) / (time.time() - t0)
          remaining = (epochs - epoch) * spe - (i + 1)
          logging.info("%s epoch %d/%d step %d/%d loss %.4e %.2f steps/s eta %s", phase, epoch + 1,
                       epochs, i + 1, spe, float(last["loss"]), rate, _format_eta(remaining / rate))
      losses = np.asarray(jax.device_get(losses), np.float64)
      last = jax.device_get(last)
      # The loss of a step is that of the parameters before its update: the norms after the
      # epoch's last update are checked too, so a diverged state is never saved.
      bad = ([f"loss {x} at step {i + 1}" for i, x in enumerate(losses) if not np.isfinite(x)][:1]
             or [f"{k} {float(last[k])} after its last step" for k in ("param_norm", "grad_norm")
                 if not np.isfinite(last[k])])
      if bad:
        manager.wait_until_finished()  # The previous epoch's save is the one kept: commit it.
        raise FloatingPointError(
            f"{phase}: non-finite {bad[0]} in epoch {epoch + 1}; the run stopped and kept the "
            f"last good checkpoint (epoch {manager.latest_step() or 0}) in {ckpt_dir}. Lower "
            f"--lr or check the data.")
      if (check is None or (epoch + 1) % check_every == 0 or epoch + 1 == epochs
          or time.time() - last_save > SAVE_SECONDS):
        manager.save(epoch + 1, args=ocp.args.StandardSave(state))
        last_save = time.time()
      dt = time.time() - t0
      done = epoch + 1 - start
      eta = (time.time() - t_phase) / done * (epochs - epoch - 1)
      record = {"phase": phase, "epoch": epoch + 1, "step": int(state["step"]),
                "loss": float(losses.mean()), "loss_first_step": float(losses[0]),
                "steps_per_s": spe / dt, "epoch_s": dt,
                "data_wait_frac": data_s / dt,
                **{k: float(v) for k, v in last.items() if k != "loss"}}
      if not full_pass:  # Adam's rate at the epoch's last step (full-pass solvers: their own).
        record["lr"] = float(lr_schedule(cfg, spe)(record["step"] - 1))
      log.write(record)
      logging.info("%s epoch %d/%d loss %.4e (%.2f steps/s, %.1f s/epoch) eta %s", phase,
                   epoch + 1, epochs, record["loss"], record["steps_per_s"], dt, _format_eta(eta))
      if checked(epoch + 1):
        end = epoch + 1
        break
  finally:  # Also when the loop raises: a save still in flight is committed, not dropped.
    manager.wait_until_finished()
    manager.close()
  diverged = loss_divergence(log.records(), phase)
  if diverged:
    logging.error("%s DIVERGED: %s (lower --lr)", phase, diverged)
    log.write({"phase": phase, "event": "diverged", "reason": diverged})
  return FitResult(state=state, resumed_from=start, epochs=end)


# Divergence that stays finite (thresholds: BUILD_NOTES.md). A phase diverged when its last
# epoch's mean training loss ends this many times above the loss of its first step...
DIVERGED_LOSS_RATIO = 10.0
# ...and a network when its validation PSNR is this many dB below the zero-filled input's.
DIVERGED_PSNR_MARGIN = 10.0


def loss_divergence(records: list[dict], phase: str) -> Optional[str]:
  """Why ``phase`` diverged by its epoch records in the metrics log (None: it did not)."""
  epochs = [r for r in records if r.get("phase") == phase and "event" not in r and "loss" in r]
  first = [r["loss_first_step"] for r in epochs if r["epoch"] == 1 and "loss_first_step" in r]
  if not epochs or not first:
    return None
  start, end = first[-1], epochs[-1]["loss"]
  if end > DIVERGED_LOSS_RATIO * start:
    return (f"its training loss ended at {end:.4g} (epoch {epochs[-1]['epoch']}), {end / start:.3g} "
            f"times that of its first step ({start:.4g})")
  return None


def network_divergence(means: dict, zero_filled: dict, records: list[dict],
                       phase: str) -> Optional[str]:
  """Why a network with validation ``means`` diverged (None: it did not): a PSNR far below the
  zero-filled input's, or its training ``phase``'s ``loss_divergence``."""
  why = []
  if means["psnr"] < zero_filled["psnr"] - DIVERGED_PSNR_MARGIN:
    why.append(f"validation PSNR {means['psnr']:.2f} dB, {zero_filled['psnr'] - means['psnr']:.1f}"
               f" dB below the zero-filled input's {zero_filled['psnr']:.2f} dB")
  loss = loss_divergence(records, phase)
  if loss:
    why.append(f"{phase}: {loss}")
  return "; ".join(why) or None


def diverged_message(summary: dict) -> Optional[str]:
  """One line naming every network summary.json marks diverged (None: none is)."""
  marked = [f"{m} depth {d} ({why})" for m, by_depth in summary.get("diverged", {}).items()
            for d, why in by_depth.items()]
  if not marked:
    return None
  return (f"{len(marked)} network(s) diverged, marked so in summary.json (and report.md): "
          + "; ".join(marked) + ". Their metrics are not results: lower --lr")


# ----------------------------------------------------------------------------------------------
# Evaluation with the one forward code.

@functools.lru_cache(maxsize=32)
def _sharded(fn: Callable, mesh: Mesh) -> Callable:
  """``fn(args, batch)`` jitted for ``mesh`` (args replicated, the batch split), once per pair."""
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=batch_sharded(mesh))


def map_batches(fn: Callable, args, arrays: dict, *, mesh: Mesh, batch_size: int) -> np.ndarray:
  """``fn(args, batch)`` over every example of ``arrays`` (host arrays with a leading example
  axis), in order: the outputs' rows on the host. Batches of ``batch_size`` (rounded up to the
  device count) split over ``mesh``; the last is padded and the padding dropped."""
  batch_size = _round_up(batch_size, mesh.devices.size)
  jitted = _sharded(fn, mesh)
  args = jax.device_put(args, replicated(mesh))
  out = []
  for batch in data_lib.eval_batches(arrays, batch_size):
    valid = batch.pop("valid")
    out.append(to_host(jitted(args, put_batch(batch, mesh)))[valid])
  return np.concatenate(out)


@functools.lru_cache(maxsize=32)
def _forward_fn(net: nets.DeepNet) -> Callable:
  return lambda params, batch: nets.forward(net, params, batch["x"])


def make_forward(net: nets.DeepNet, mesh: Mesh) -> Callable:
  """The jitted evaluation ``(params, {"x": x}) -> output`` that ``predict`` runs per batch."""
  return _sharded(_forward_fn(net), mesh)


def predict(net: nets.DeepNet, params: Params, x: np.ndarray, *, mesh: Mesh,
            batch_size: int) -> np.ndarray:
  """The network's output for every example of ``x`` (N, *spatial, 2), in order, on the host."""
  return map_batches(_forward_fn(net), params, {"x": x}, mesh=mesh, batch_size=batch_size)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Finished networks and stage reports on disk.

def params_dir(workdir, method: str, depth: int) -> Path:
  return Path(workdir).absolute() / "params" / method / f"depth_{depth}"


def save_params(path: Path, params: Params) -> None:
  """Save a finished network (orbax writes to a temporary directory and renames at the end)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


class DamagedNetwork(ValueError):
  """A finished network's folder (``params_dir``) that cannot be read back."""


def load_params(path: Path) -> Params:
  if not path.exists():
    raise FileNotFoundError(f"{path}: no saved network there (was the run finished?)")
  try:
    return ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax's wording varies with the damage.
    _drop_closed_loop_reports()
    raise DamagedNetwork(f"{path}: the saved network is damaged ({_first_line(e)}); "
                         "launch/train.py with the run's flags sets it aside and trains it "
                         "again") from None


def load_finished(path: Path, workdir) -> Optional[Params]:
  """The finished network in ``path``, or None when there is none or it is damaged (then set
  aside, with a warning, to be trained again)."""
  if not path.exists():
    return None
  try:
    return load_params(path)
  except DamagedNetwork as e:
    logging.warning("%s: moved to %s", e, set_aside(path, Path(workdir).absolute()))
    return None


def write_json(path: Path, value, sort_keys: bool = True) -> None:
  """``files.write_json`` on process 0 of a multi-host run (every process holds the same value)."""
  if is_primary():
    files.write_json(path, value, sort_keys)


def record_eval(summary: dict, summary_path: Path, log: MetricsLog, method: str, depth: int,
                means: dict, report: Optional[dict] = None, *, stage: int, phase: str) -> dict:
  """Put one network's validation means (and its stage report) into summary.json and the log
  (unless ``summary``, read back from a rerun's summary.json, holds them already)."""
  if summary.get(method, {}).get(str(depth)) != means:
    log.write({"phase": phase, "event": "eval", **means})
  summary.setdefault(method, {})[str(depth)] = means
  if report:
    summary["stages"].setdefault(method, {})[str(stage)] = report
  write_json(summary_path, results_first(summary), sort_keys=False)
  return means


def results_first(summary: dict) -> dict:
  """summary.json's keys in reading order: the baselines and every method's metrics by depth,
  then the stage reports, then the configuration."""
  tail = ("stages", "config")
  return {**{k: v for k, v in summary.items() if k not in tail},
          **{k: summary[k] for k in tail if k in summary}}


# ----------------------------------------------------------------------------------------------
# The two methods.

def example_arrays(cfg: Config, split: data_lib.Split,
                   keys: tuple[str, ...] = ("x", "y")) -> tuple[dict, np.ndarray]:
  """The examples the networks of ``cfg`` train and are evaluated on, and their slices.

  Slices, or for 3D networks volume patches of ``--volume_depth`` consecutive slices of one file
  (``data.to_volumes``: slices that fill no patch are dropped). Returns
  ``({key: array}, slices)``, ``slices`` the examples' slices as indices into ``split``, in the
  order of the examples flattened to slices."""
  if cfg.ndim == 3:
    volumes = data_lib.to_volumes(split, cfg.volume_depth)
    return {k: volumes[k] for k in keys}, volumes["slices"].reshape(-1)
  return {k: getattr(split, k) for k in keys}, np.arange(len(split.x))


def network_template(cfg: Config) -> nets.DeepNet:
  """The ``DeepNet`` of ``cfg`` (depth, width, kernel, ndim, compute dtype): every method's
  network, and the CNN of every iteration of the unrolled model."""
  return nets.DeepNet(depth=cfg.depth, features=cfg.features, kernel_size=cfg.kernel,
                      ndim=cfg.ndim, dtype=jnp.dtype(cfg.compute_dtype))


# Salts of the initialisation keys: the e2e network of depth d draws from E2E_SALT + d, stage
# index i from STAGE_SALT + i, unrolled iteration k from UNROLLED_SALT + k; so every phase of a
# run has its own key and none depends on which phases ran before it (a resumed run initialises
# the rest as the uninterrupted run did).
E2E_SALT, STAGE_SALT, UNROLLED_SALT = 1000, 2000, 3000


def phase_key(cfg: Config, salt: int) -> jax.Array:
  """The initialisation key of the phase ``salt`` (one of the salts above plus its index)."""
  return jax.random.fold_in(jax.random.key(cfg.seed), salt)


def e2e_loss(net: nets.DeepNet) -> LossFn:
  """End-to-end objective of the deep net: ``half_mse(forward(params, x), y)``."""
  def loss_fn(params, frozen, batch):
    del frozen
    data_term = stage_lib.half_mse(nets.forward(net, params, batch["x"]), batch["y"])
    return data_term, {"mse": 2 * data_term}
  return loss_fn


def stage_loss(net: nets.DeepNet, stage: stage_lib.Stage, index: int) -> LossFn:
  """Objective of layer-wise stage ``index + 1`` (0-based ``index``) on the frozen prefix.

  ``frozen`` holds ``convs_0 .. convs_{index-1}``; the prefix runs under ``stop_gradient``, or
  not at all when the batch carries cached features ``h``.
  """
  def loss_fn(variables, frozen, batch):
    if FEATURES in batch:  # Features cached by the trainer (--cache_features).
      h = batch[FEATURES]
    else:
      h = nets.prefix_features(net, frozen, batch["x"], index)
    return stage.loss(variables, h, batch["x"], batch["y"], batch.get("weight"))
  return loss_fn


def train_e2e(cfg: Config, depth: int, train: dict, *, mesh: Mesh, log: MetricsLog) -> Params:
  """Train a ``DeepNet`` of ``depth`` end to end; returns its parameters (saved under params/)."""
  out = params_dir(cfg.workdir, "e2e", depth)
  finished = load_finished(out, cfg.workdir)
  if finished is not None:
    return finished
  net = network_template(cfg).clone(depth=depth)
  params = nets.init(phase_key(cfg, E2E_SALT + depth), (1,) + train["x"].shape[1:], depth=depth,
                     features=cfg.features, kernel_size=cfg.kernel, ndim=net.ndim)

  spe = data_lib.steps_per_epoch(len(train["x"]), cfg.batch_size)
  result = fit(phase_of("e2e", depth), e2e_loss(net), adam(cfg, spe, cfg.weight_decay), params, {},
               {"x": train["x"], "y": train["y"]}, cfg=cfg, mesh=mesh, epochs=cfg.epochs, log=log)
  params = jax.device_get(result.state["params"])
  save_params(out, params)
  return params


def _nonconvex_stage(cfg: Config, num_examples: int, index: int) -> stage_lib.Stage:
  del index  # Every non-convex stage is built alike.
  spe = data_lib.steps_per_epoch(num_examples, cfg.batch_size)
  return stage_lib.nonconvex(features=cfg.features, kernel_size=cfg.kernel, ndim=cfg.ndim,
                             tx=adam(cfg, spe, cfg.weight_decay),
                             dtype=jnp.dtype(cfg.compute_dtype))


def _convex_stage(cfg: Config, num_examples: int, index: int) -> stage_lib.Stage:
  from lwjax import convex  # The convex stage is only needed by this method.
  fista = cfg.convex_solver != "adam"  # One full-batch step per epoch, over every example.
  spe = data_lib.steps_per_epoch(num_examples, cfg.batch_size)
  return convex.convex_stage(
      features=cfg.features, kernel_size=cfg.kernel, ndim=cfg.ndim, beta=cfg.beta, rho=cfg.rho,
      solver=cfg.convex_solver, tx=adam(cfg, spe),
      gate_seed=cfg.gate_seed + index, refit_head=cfg.refit_head, fista_iters=cfg.fista_iters,
      steps_per_epoch=data_lib.steps_per_epoch(num_examples, cfg.batch_size, full_pass=fista),
      relative_beta=cfg.beta_relative, metric_samples=cfg.metric_samples,
      num_examples=num_examples, init=cfg.convex_init, dtype=jnp.dtype(cfg.compute_dtype),
      precision=None if cfg.convex_precision == "default" else cfg.convex_precision)


# Every layer-wise method (``config.LAYERWISE``): ``(cfg, num_examples, index) -> Stage``. A new
# stage kind is a ``stage.Stage`` factory, an entry here and its name in ``config.LAYERWISE``.
STAGES: dict[str, Callable[[Config, int, int], stage_lib.Stage]] = {
    "layerwise": _nonconvex_stage,
    "layerwise_convex": _convex_stage,
}


def make_stage(method: str, cfg: Config, num_examples: int,
               index: int = 0) -> stage_lib.Stage:
  """Stage ``index + 1`` of the layer-wise ``method`` (a key of ``STAGES``) configured from
  ``cfg``, for a training set of ``num_examples`` examples (the optimisers' steps per epoch).

  Each convex stage draws its own gate filters (seed ``--gate_seed + index``).
  """
  if method not in STAGES:
    raise ValueError(f"unknown layer-wise method {method!r}: expected one of {', '.join(STAGES)}")
  return STAGES[method](cfg, num_examples, index)


def stage_report_path(workdir, method: str, index: int) -> Path:
  return Path(workdir).absolute() / "stages" / method / f"stage_{index}.json"


def finished_stage(workdir, method: str, index: int,
                   depth: int) -> Optional[tuple[Params, dict]]:
  """``(params, report)`` of stage ``index`` (1-based) of ``method`` if it is finished (its
  report exists), the network of ``depth`` it ended with; None otherwise. A damaged report or
  network is set aside, with a warning, and the stage trained again (from its checkpoints)."""
  report_path = stage_report_path(workdir, method, index)
  if not report_path.exists():
    return None
  try:
    report = files.read_json(report_path)
  except ValueError as e:
    logging.warning("%s: moved to %s", e, set_aside(report_path, Path(workdir).absolute()))
    return None
  params = load_finished(params_dir(workdir, method, depth), workdir)
  if params is None:
    logging.warning("%s: stage %d has a report but no intact network: trained again", method,
                    index)
    set_aside(report_path, Path(workdir).absolute())
    return None
  return params, report


def finish_stage(cfg: Config, log: MetricsLog, method: str, index: int, depth: int,
                 params: Params, report: dict) -> dict:
  """Saves a finished stage: the network of ``depth`` it ends with, a ``stage_done`` log line and,
  last, its report (floats), whose presence marks the stage finished. Returns the report."""
  save_params(params_dir(cfg.workdir, method, depth), params)
  report = {k: float(v) for k, v in report.items()}
  log.write({"phase": f"{method}_s{index}", "event": "stage_done", **report})
  write_json(stage_report_path(cfg.workdir, method, index), report)
  return report


@functools.lru_cache(maxsize=32)
def _prefix_fn(net: nets.DeepNet, n: int) -> Callable:
  """The jitted ``(layers, x) -> h_n``, one per (net, n): a convex stage runs the prefix over the
  data several times (beta_max, each FISTA power iteration, certificate, head refit), and a new
  jitted function per pass would recompile (and on a GPU re-autotune) it every time."""
  return jax.jit(lambda f, x: nets.prefix_features(net, f, x, n))


def _features(net: nets.DeepNet, layers: Params, inputs, n: int,
              batch_size: int) -> Iterator[jax.Array]:
  """``h_n`` of the layers ``convs_0 .. convs_{n-1}`` on ``inputs``, batch by batch (on device):
  (batch, *spatial, features) each."""
  prefix = _prefix_fn(net, n)
  for start in range(0, len(inputs), batch_size):
    yield prefix(layers, jnp.asarray(inputs[start:start + batch_size]))


def free_device_bytes(device) -> Optional[int]:
  """Bytes the allocator of ``device`` can still hand out, or None where it does not say (CPU)."""
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _check_device_room(need: int, mesh: Mesh, what: str, instead: str) -> None:
  """Refuses to hold ``need`` bytes on every device unless 20% of the free memory stays for the
  step; the error says ``what`` needs them and what to do ``instead``."""
  free = [free_device_bytes(d) for d in mesh.local_devices]  # Others are asked by their host.
  known = [f for f in free if f is not None]
  if known and need > 0.8 * min(known):
    raise ValueError(f"{what} need {need / 2**30:.2f} GiB on every device, "
                     f"{min(known) / 2**30:.2f} GiB are free; {instead}")


def cached_features(cfg: Config, method: str, index: int, batches: Iterator[jax.Array],
                    shape: tuple, *, mesh: Mesh):
  """All training examples' ``h_index`` (N, *spatial, features), held as ``--cache_features`` says.

  "host" keeps them in memory; "disk" in ``WORKDIR/features/<method>/h_<index>.npy``, written to a
  temporary file and renamed when complete (a killed run leaves no file that looks finished) and
  read back memory-mapped, so only the batches in use occupy host memory; "device" in accelerator
  memory (a full copy on every device of ``mesh``), where the trainer gathers each batch without
  a copy from the host.
  """
  if cfg.cache_features == "host":
    return np.concatenate([np.asarray(b) for b in batches])
  if cfg.cache_features == "device":
    # Filled in place batch by batch (the buffer is donated), so the peak is one cache + a batch.
    put = jax.jit(lambda buf, b, i: jax.lax.dynamic_update_slice_in_dim(buf, b, i, 0),
                  donate_argnums=0)
    buf, start = None, 0
    for batch in batches:
      if buf is None:
        _check_device_room(math.prod(shape) * batch.dtype.itemsize, mesh,
                           f"--cache_features=device: the features h_{index}",
                           "use --cache_features=host or disk (or fewer training slices)")
        buf = jax.device_put(jnp.zeros(shape, batch.dtype), replicated(mesh))
      buf = put(buf, batch, start)
      start += len(batch)
    return buf
  return primary_first(lambda: _disk_features(cfg, method, index, batches, shape),
                       f"features h_{index}")


def _disk_features(cfg: Config, method: str, index: int, batches: Iterator[jax.Array],
                   shape: tuple) -> np.ndarray:
  path = Path(cfg.workdir).absolute() / "features" / method / f"h_{index}.npy"
  if path.exists():
    cached = np.load(path, mmap_mode="r")
    if cached.shape == shape:
      return cached
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npy")
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
  start = 0
  for batch in batches:
    out[start:start + len(batch)] = np.asarray(batch)
    start += len(batch)
  out.flush()
  del out
  os.replace(tmp, path)
  return np.load(path, mmap_mode="r")


def _stage_batches(net: nets.DeepNet, frozen: Params, arrays: dict, index: int,
                   batch_size: int) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
  """(h, skip, y) over the training set in order, for a stage's prepare and finalize passes
  (``stage.FeatureBatches``): h is ``arrays``' cached features if it holds them, else the output
  of the ``index`` frozen layers; skip is the input x."""
  n = len(arrays["x"])
  if FEATURES in arrays:
    hs = (arrays[FEATURES][i:i + batch_size] for i in range(0, n, batch_size))
  else:
    hs = _features(net, frozen, arrays["x"], index, batch_size)
  for start, h in zip(range(0, n, batch_size), hs):
    yield (jnp.asarray(h), jnp.asarray(arrays["x"][start:start + batch_size]),
           jnp.asarray(arrays["y"][start:start + batch_size]))


def _gap_check(cfg: Config, stage: stage_lib.Stage, feature_batches: stage_lib.FeatureBatches
               ) -> Optional[Callable[[dict], tuple[bool, dict]]]:
  """``fit``'s check of a stage with a certificate: its solution's duality gap, done once it is
  at most ``--target_gap`` (never with 0); None for a stage without one."""
  if stage.certificate is None:
    return None

  def check(state):
    cert = stage.certificate(stage.solution(state["params"], state["opt"]), feature_batches)
    return 0 < cfg.target_gap and cert["rel_gap"] <= cfg.target_gap, cert
  return check


def train_layerwise(cfg: Config, method: str, train: dict, *, mesh: Mesh, log: MetricsLog,
                    on_depth: Callable[[int, Params, dict], None] = lambda d, p, r: None) -> Params:
  """Train ``cfg.depth - 1`` stages of ``method``; returns the deep network's parameters.

  Stage i (1-based) trains hidden layer i and its own head on ``h_{i-1}`` of the frozen prefix;
  after it the network has depth i + 1 and ``on_depth(depth, params, report)`` is called (the run
  evaluates it there). A stage whose report exists is loaded, not retrained.

  With ``--cache_features`` the prefix runs once per stage over the training set (one layer on
  top of the previous stage's cached features) instead of in every step, so every stage costs
  the same as the first, at the price of holding N x H x W x features floats (on the devices,
  in host memory or on disk).
  """
  net = network_template(cfg)
  n = len(train["x"])
  params: dict = {}
  h_cached = None  # h_index of every training example, when --cache_features is on
  for index in range(cfg.depth - 1):  # index: the frozen prefix's layers
    number, depth = index + 1, index + 2  # stage ``number`` ends with a network of ``depth``
    finished = finished_stage(cfg.workdir, method, number, depth)
    if finished:
      params = finished[0]
      on_depth(depth, *finished)
      continue
    frozen = {k: v for k, v in params.items() if k.startswith("convs_")}
    arrays = {"x": train["x"], "y": train["y"]}
    if cfg.cache_features != "none" and index > 0:
      if h_cached is None:  # Resumed here: the whole prefix, once.
        batches = _features(net, frozen, train["x"], index, cfg.batch_size)
      else:  # One more layer on top of the previous stage's features.
        batches = _features(net, {"convs_0": frozen[f"convs_{index - 1}"]}, h_cached, 1,
                            cfg.batch_size)
      h_cached = cached_features(cfg, method, index, batches,
                                 (n,) + train["x"].shape[1:-1] + (cfg.features,), mesh=mesh)
      arrays[FEATURES], frozen = h_cached, {}
    stage = make_stage(method, cfg, n, index=index)
    h_shape = (1,) + train["x"].shape[1:-1] + (2 if index == 0 else cfg.features,)

    feature_batches = functools.partial(_stage_batches, net, frozen, arrays, index,
                                        cfg.batch_size)
    report = {}
    if stage.prepare is not None:
      stage, report = stage.prepare(feature_batches, h_shape)
    variables = stage.init(phase_key(cfg, STAGE_SALT + index), h_shape)
    result = fit(phase_of(method, depth), stage_loss(net, stage, index), stage.tx, variables,
                 frozen, arrays, cfg=cfg, mesh=mesh, epochs=stage.epochs or cfg.epochs, log=log,
                 full_pass=stage.full_pass, check=_gap_check(cfg, stage, feature_batches),
                 check_every=cfg.certify_every)
    variables = jax.device_get(stage.solution(result.state["params"], result.state["opt"]))
    if stage.finalize is not None:
      variables, final_report = stage.finalize(variables, feature_batches)
      report.update(final_report)
    report["passes"] = result.epochs
    if stage.certificate is not None:
      report["target_gap"] = cfg.target_gap
      logging.info("%s stage %d: relative duality gap %.2e after %d passes: its objective is "
                   "certified within %.2g%% of the stage's optimum", method, number,
                   report["rel_gap"], result.epochs, 100 * report["rel_gap"])
      if report["rel_gap"] > cfg.target_gap > 0:
        logging.warning("%s stage %d ended %d passes in at a relative duality gap of %.2e, above "
                        "--target_gap=%g: it is not certified (raise --fista_iters)", method,
                        number, result.epochs, report["rel_gap"], cfg.target_gap)
    params = nets.stack_layer(params, jax.device_get(stage.to_layer(variables)), index)
    on_depth(depth, params, finish_stage(cfg, log, method, number, depth, params, report))
  return params


# ----------------------------------------------------------------------------------------------
# A whole run: data, every method at every depth, summary.json.

# Fields that may change when a run is resumed; any other change would mix two experiments.
_RESUMABLE_FIELDS = {"log_every", "eval_batch_size", "workdir", "data_dir", "cache_dir",
                     "cache_features", "data_on_device", "compilation_cache", "conv_fusion",
                     "host_data", "distributed", "prep_workers"}


def writable_folder(path: Path, flag: str) -> Optional[Path]:
  """Creates the folder ``path`` if it is missing and checks that a file can be written in it;
  raises ValueError naming ``--flag`` and the path otherwise (as root, permission bits do not
  tell: a file is written and removed). Returns the topmost folder it created (None: none)."""
  missing = [p for p in (path, *path.parents) if not p.exists()]
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".lwjax_write_test_", dir=path)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    if missing and missing[-1].is_dir():
      shutil.rmtree(missing[-1], ignore_errors=True)
    raise ValueError(f"--{flag}={path}: cannot write there ({e.strerror or e}): expected a folder "
                     "this user can create and write files in") from None
  return missing[-1] if missing else None


def _check_resume(cfg: Config, workdir: Path) -> None:
  """Refuses settings that differ from those of the run in ``workdir`` (its config.json)."""
  path = workdir / "config.json"
  if path.exists():
    old = dataclasses.asdict(config_lib.load(path))
    new = dataclasses.asdict(cfg)
    changed = sorted(k for k in new if k not in _RESUMABLE_FIELDS and old.get(k) != new[k])
    if changed:
      raise ValueError(
          f"{path}: this workdir holds a run with other settings ("
          + ", ".join(f"--{k}: {old.get(k)!r} there, {new[k]!r} now" for k in changed)
          + "); use another --workdir or the same flags")


def _check_examples(cfg: Config, train: data_lib.Split, val: data_lib.Split,
                    num_devices: int) -> dict[str, int]:
  """The settings that depend on the data (--batch_size, --volume_depth) and disjoint splits,
  checked before the run writes its config.json: a refused command, corrected, must not find the
  workdir taken. Returns how many slices of each split the examples hold (3D: the patches')."""
  if cfg.ndim == 3:  # volume_patches raises when no patch fits.
    held = {name: data_lib.volume_patches(s, cfg.volume_depth).size
            for name, s in (("train", train), ("val", val))}
  else:
    held = {"train": len(train.x), "val": len(val.x)}
  examples = held["train"] // (cfg.volume_depth if cfg.ndim == 3 else 1)
  data_lib.check_batch_size(examples, cfg.batch_size, num_devices)
  data_lib.check_disjoint({"train": train, "val": val})
  return held


def _check_same_data(workdir: Path, splits: dict[str, data_lib.Split]) -> None:
  """Refuses to go on with a run on other data than it started on; the first run writes
  ``WORKDIR/data.json``. ``--data_dir`` may change (the data moved), the data may not."""
  path = workdir / "data.json"
  record = {name: data_lib.data_record(split) for name, split in splits.items()}
  if not path.exists():
    write_json(path, record)
    return
  old = files.read_json(path)
  for name, new in record.items():
    difference = data_lib.data_difference(old.get(name, {"files": [], "scale": []}), new)
    if difference:
      raise ValueError(f"{path}: this workdir was trained on other {name} data: {difference}; "
                       "use another --workdir, or the data it was trained on")


def data_folder(cfg: Config) -> Path:
  """The run's data: ``cfg.data_dir``, or without it the synthetic dataset in WORKDIR/data."""
  return Path(cfg.data_dir) if cfg.data_dir else Path(cfg.workdir).absolute() / "data"


def prep_config(cfg: Config) -> data_lib.PrepConfig:
  """The data-preparation settings of ``cfg`` (``PrepConfig``'s fields are ``Config`` fields)."""
  return data_lib.PrepConfig(**{f.name: getattr(cfg, f.name)
                                for f in dataclasses.fields(data_lib.PrepConfig)})


def _load_data(cfg: Config, log, splits: tuple[str, ...]) -> tuple[data_lib.Split, ...]:
  workdir = Path(cfg.workdir).absolute()
  prep = prep_config(cfg)
  mask = data_lib.checked_mask(prep)  # Bad mask or map settings fail before any data is read.
  warning = data_lib.calibration_warning(prep, mask)
  if warning:
    logging.warning("%s", warning)
  data_dir = cfg.data_dir
  if not data_dir:
    log(f"synthetic data: {cfg.synth_train_subjects} + {cfg.synth_val_subjects} files of "
        f"{cfg.synth_slices} slices, {cfg.synth_coils} coils, {cfg.image_size}x{cfg.image_size} "
        f"in {data_folder(cfg)} (generated once, then reused)")
    data_dir = data_lib.make_synthetic_dataset(
        data_folder(cfg), train_subjects=cfg.synth_train_subjects,
        val_subjects=cfg.synth_val_subjects, slices=cfg.synth_slices, coils=cfg.synth_coils,
        size=cfg.image_size, seed=cfg.synth_seed, noise_std=cfg.synth_noise)
  limits = {"train": cfg.max_train_volumes, "val": cfg.max_val_volumes}
  for split in splits[1:]:  # A missing or bad file fails now, not after preparing the others.
    data_lib.volume_infos(data_dir, split, limits[split] or None)
  dc = cfg.model == "unrolled"  # Data consistency needs the coil maps and the sampled k-space.
  cache_dir = Path(cfg.cache_dir).expanduser().absolute() if cfg.cache_dir else workdir / "cache"
  return tuple(data_lib.load_split(data_dir, split, prep, cache_dir=cache_dir,
                                   max_volumes=limits[split] or None, with_maps=dc,
                                   with_kspace=dc, workers=cfg.prep_workers,
                                   storage=cfg.host_data, log=log)
               for split in splits)


def load_data(cfg: Config, log=logging.info,
              splits: tuple[str, ...] = ("train", "val")) -> tuple[data_lib.Split, ...]:
  """The run's splits, in the order asked (synthetic data in WORKDIR/data without data_dir).

  Every host of a multi-host run holds all of them; process 0 generates and prepares first, the
  others then read its files and slice cache."""
  return primary_first(lambda: _load_data(cfg, log, splits), "data")


def phase_of(method: str, depth: int) -> str:
  """The training phase that ended with ``method``'s network of ``depth``: e2e_d<depth>, or
  the layer-wise stage <method>_s<depth - 1>."""
  return f"e2e_d{depth}" if method == "e2e" else f"{method}_s{depth - 1}"


def network_finished(cfg: Config, method: str, depth: int) -> bool:
  """Whether the network of ``method`` and ``depth`` is trained (a rerun loads it): an e2e
  network's parameters, or the report of the layer-wise stage that ends with it."""
  if method == "e2e":
    return params_dir(cfg.workdir, method, depth).exists()
  return stage_report_path(cfg.workdir, method, depth - 1).exists()


def _example_slice(images: np.ndarray) -> np.ndarray:
  """The middle example of (N, *spatial, 2) images as one (H, W, 2) slice (3D: its middle
  plane), the one TensorBoard shows."""
  image = images[len(images) // 2]
  return image[image.shape[0] // 2] if image.ndim == 4 else image


def run(cfg: Config, *, mesh: Optional[Mesh] = None) -> dict:
  """Train every method of ``cfg`` and evaluate each at every depth; returns summary.json's dict."""
  mesh = mesh or make_mesh()
  config_lib.validate(cfg, mesh.devices.size)
  if cfg.data_dir:  # config.json must name the data from wherever it is read (launch/evaluate.py).
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))
  workdir = Path(cfg.workdir).absolute()
  created = writable_folder(workdir, "workdir")
  try:
    if cfg.cache_dir:
      writable_folder(Path(cfg.cache_dir).expanduser().absolute(), "cache_dir")
    _check_resume(cfg, workdir)
    logging.info("devices: %d x %s; workdir %s", mesh.devices.size, jax.devices()[0].platform,
                 workdir)
    train, val = load_data(cfg)
    held = _check_examples(cfg, train, val, mesh.devices.size)
    _check_same_data(workdir, {"train": train, "val": val})
  except Exception:
    if created is not None and is_primary():  # A refused run leaves no new workdir behind.
      shutil.rmtree(created, ignore_errors=True)
    raise
  config_path = workdir / "config.json"  # Only now: a command refused above leaves no run.
  if is_primary() and not (config_path.exists()
                           and files.read_json(config_path) == dataclasses.asdict(cfg)):
    config_lib.save(cfg, config_path)
  logging.info("data: %d training slices from %d files, %d validation slices from %d files, "
               "grid %s, mask %s x%.2f", len(train.x), len(set(train.volume_index.tolist())),
               len(val.x), len(set(val.volume_index.tolist())), train.x.shape[1:3], cfg.mask,
               masks.acceleration(train.mask))
  if cfg.ndim == 3:
    logging.info("3D: patches of %d slices hold %d of %d training and %d of %d validation slices "
                 "(slices that fill no patch, at a file's end or before a skipped slice, are "
                 "dropped)", cfg.volume_depth, held["train"], len(train.x), held["val"],
                 len(val.x))
  log = MetricsLog(workdir, board=tensorboard.Board(workdir / "tensorboard", enabled=is_primary()))
  summary_path = workdir / "summary.json"
  if cfg.model == "unrolled":
    from lwjax import unrolled  # Its own driver: the data-consistency steps need k-space and maps.
    try:
      return unrolled.run(cfg, train, val, mesh=mesh, log=log, summary_path=summary_path)
    finally:
      log.close()

  (train_arrays, _), (val_arrays, _) = example_arrays(cfg, train), example_arrays(cfg, val)
  # A rerun starts from the summary of the networks finished so far: the same values again.
  previous = files.read_json(summary_path) if summary_path.is_file() else {}
  summary = {**previous,
             "zero_filled": metrics_lib.means(metrics_lib.per_slice(pred=val_arrays["x"],
                                                                    target=val_arrays["y"])),
             "stages": previous.get("stages", {}), "config": dataclasses.asdict(cfg)}
  net = network_template(cfg)
  progress = console.Progress(console.plan(cfg, lambda m, d: network_finished(cfg, m, d)))
  example = lambda images: metrics_lib.magnitude(_example_slice(images))  # TensorBoard's
  for name, images in (("zero_filled", val_arrays["x"]), ("target", val_arrays["y"])):
    log.board.image(f"examples/{name}", example(images), 0)
  for depth in range(2, cfg.depth + 1):
    for key, value in summary["zero_filled"].items():
      log.board.scalar(f"val/{key}/zero_filled", value, depth)

  def record(method, depth, params, report=None):
    progress.end(method, depth)
    pred = predict(net, params, val_arrays["x"], mesh=mesh, batch_size=cfg.eval_batch_size)
    log.board.image(f"examples/{method}", example(pred), depth)
    per_slice = metrics_lib.per_slice(pred=pred, target=val_arrays["y"])
    means = metrics_lib.means(per_slice)
    why = network_divergence(means, summary["zero_filled"], log.records(),
                             phase_of(method, depth))
    if why:
      summary.setdefault("diverged", {}).setdefault(method, {})[str(depth)] = why
      logging.error("%s depth %d DIVERGED: %s; its metrics are not a result", method, depth, why)
    record_eval(summary, summary_path, log, method, depth, means, report, stage=depth - 1,
                phase=f"{method}_d{depth}")
    logging.info("%s depth %d: %s (zero-filled %.2f dB)", method, depth,
                 metrics_lib.format_means(means), summary["zero_filled"]["psnr"])
    if method != "e2e" and depth < cfg.depth:
      progress.start(method, depth + 1)

  write_json(summary_path, results_first(summary), sort_keys=False)
  for method in cfg.methods:
    if method == "e2e":
      for depth in cfg.depths_e2e:
        progress.start("e2e", depth)
        record("e2e", depth, train_e2e(cfg, depth, train_arrays, mesh=mesh, log=log))
    else:
      progress.start(method, 2)
      train_layerwise(cfg, method, train_arrays, mesh=mesh, log=log,
                      on_depth=lambda d, p, r, m=method: record(m, d, p, r))
  log.close()
  return summary
