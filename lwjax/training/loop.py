"""The one training step and loop: ``make_step`` (pure, jitted, donated, data-parallel) and
``fit``, which trains any ``loss_fn(params, frozen, batch)`` with any optax solver, checkpoints,
resumes bit for bit and stops on non-finite values; the optimiser and divergence checks."""
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from lwjax import data as data_lib
from lwjax.config import Config
from lwjax.training import checkpoints
from lwjax.training import feature_cache
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib


Params = Any


# loss_fn(params, frozen, batch) -> (scalar objective, dict of scalar diagnostics).
LossFn = Callable[[Params, Params, dict], tuple[jax.Array, dict]]


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


def init_state(params: Params, tx: optax.GradientTransformation) -> dict:
  """The state ``make_step`` trains: ``{"params", "opt", "step"}`` (abstract under
  ``jax.eval_shape``)."""
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


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

  rep = runtime.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,), in_shardings=(rep, rep, runtime.batch_sharded(mesh)),
                 out_shardings=(rep, rep))


def format_duration(seconds: float) -> str:
  """``seconds`` as H:MM:SS."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# With ``fit``'s ``check``, the longest a phase goes without a checkpoint (seconds).
SAVE_SECONDS = 300


@dataclasses.dataclass
class FitResult:
  state: dict  # {"params", "opt", "step"} after the last epoch
  resumed_from: int  # epoch the run resumed from (0: a fresh start)
  epochs: int  # epochs the phase took (fewer than asked when ``check`` ended it)


def fit(phase: str, loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
        frozen: Params, arrays: dict, *, cfg: Config, mesh: Mesh, epochs: int,
        log: workdir_lib.MetricsLog, full_pass: bool = False,
        check: Optional[Callable[[dict], tuple[bool, dict, dict]]] = None,
        check_every: int = 1) -> FitResult:
  """Train ``params`` for ``epochs`` epochs on ``arrays`` (host arrays with a leading example axis).

  ``full_pass``: every epoch visits every example (the last batch padded with weight-0 rows, the
  batches carry ``weight``: ``data.gather``), for a solver that takes one full-batch step per
  epoch; otherwise the ``n % batch_size`` examples left over by each epoch's shuffle are skipped.

  Resumes from the newest checkpoint in ``WORKDIR/checkpoints/<phase>`` if there is one: the data
  order depends only on (seed, epoch) and the state is restored bit for bit, so a killed run
  ends with the same parameters as an uninterrupted one. A non-finite loss stops the run with
  FloatingPointError before that epoch is saved, so the last good checkpoint is kept.

  ``check``: ``state -> (done, record, state)`` after every ``check_every``-th epoch, and first
  thing when resuming at such an epoch (a certificate): its record is logged, ``done`` ends the
  phase there, training goes on from the state it returns (deterministic: the checkpoint holds
  the state before it). The state is saved after every epoch without ``check``; with it after
  each checked epoch, the last one, and any that ends ``SAVE_SECONDS`` after the previous save.
  """
  n = data_lib.num_examples(arrays)
  spe = data_lib.steps_per_epoch(n, cfg.batch_size, full_pass)
  num_devices = mesh.devices.size
  rep = runtime.replicated(mesh)
  state = jax.device_put(init_state(params, tx), rep)
  frozen = jax.device_put(frozen, rep)

  ckpt_dir = Path(cfg.workdir).absolute() / "checkpoints" / phase
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start, state = checkpoints.restore_intact(manager, state, phase, Path(cfg.workdir).absolute())

  step_fn = make_step(loss_fn, tx, mesh)
  if cfg.data_on_device:
    # The data only: cached features ("h") stay where --cache_features put them.
    host_arrays = {k: v for k, v in arrays.items()
                   if k != feature_cache.FEATURES and not isinstance(v, jax.Array)}
    runtime.check_device_room(sum(v.nbytes for v in host_arrays.values()), mesh,
                       f"--data_on_device: {phase}'s training arrays ({', '.join(host_arrays)})",
                       "use --nodata_on_device (or fewer training slices)")
    arrays = {**arrays, **jax.device_put(host_arrays, rep)}
  # Arrays on the accelerator (--data_on_device, --cache_features=device) are gathered there;
  # the others are gathered on the host and copied ahead of the step.
  resident = {k: v for k, v in arrays.items() if isinstance(v, jax.Array)}
  host = {k: v for k, v in arrays.items() if k not in resident}
  take = runtime.take_batch(mesh) if resident else None

  def checked(epoch: int, state: dict) -> tuple[bool, dict]:
    """(whether the phase is done at ``epoch``, the state to go on from): ``check`` on the
    checked epochs, logged."""
    if check is None or epoch % check_every:
      return False, state
    done, record, state = check(state)
    log.write({"phase": phase, "epoch": epoch, "event": "check", **record})
    logging.info("%s epoch %d/%d: %s", phase, epoch, epochs,
                 ", ".join(f"{k} {v:.3g}" for k, v in record.items()))
    return done, jax.device_put(state, rep)

  t_phase = last_save = time.time()
  end = epochs
  if 0 < start < epochs:
    done, state = checked(start, state)
    end = start if done else epochs
  try:
    for epoch in range(start, end):
      t0 = time.time()
      losses, last = [], {}
      order = data_lib.batch_order(n, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                   num_devices=num_devices, full_pass=full_pass)
      batches = runtime.device_batches(
          (data_lib.gather(host, idx, full_pass_of=n if full_pass else None) for idx in order),
          mesh)
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
                       epochs, i + 1, spe, float(last["loss"]), rate,
                       format_duration(remaining / rate))
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
      trained = epoch + 1 - start
      eta = (time.time() - t_phase) / trained * (epochs - epoch - 1)
      record = {"phase": phase, "epoch": epoch + 1, "step": int(state["step"]),
                "loss": float(losses.mean()), "loss_first_step": float(losses[0]),
                "steps_per_s": spe / dt, "epoch_s": dt,
                "data_wait_frac": data_s / dt,
                **{k: float(v) for k, v in last.items() if k != "loss"}}
      if not full_pass:  # Adam's rate at the epoch's last step (full-pass solvers: their own).
        record["lr"] = float(lr_schedule(cfg, spe)(record["step"] - 1))
      log.write(record)
      logging.info("%s epoch %d/%d loss %.4e (%.2f steps/s, %.1f s/epoch) eta %s", phase,
                   epoch + 1, epochs, record["loss"], record["steps_per_s"], dt,
                   format_duration(eta))
      done, state = checked(epoch + 1, state)
      if done:
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
    return (f"its training loss ended at {end:.4g} (epoch {epochs[-1]['epoch']}), "
            f"{end / start:.3g} times that of its first step ({start:.4g})")
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


# Salts of the initialisation keys: the e2e network of depth d draws from E2E_SALT + d, stage
# index i from STAGE_SALT + i, unrolled iteration k from UNROLLED_SALT + k; so every phase of a
# run has its own key and none depends on which phases ran before it (a resumed run initialises
# the rest as the uninterrupted run did).
E2E_SALT, STAGE_SALT, UNROLLED_SALT = 1000, 2000, 3000


def phase_key(cfg: Config, salt: int) -> jax.Array:
  """The initialisation key of the phase ``salt`` (one of the salts above plus its index)."""
  return jax.random.fold_in(jax.random.key(cfg.seed), salt)

