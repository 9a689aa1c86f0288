"""The memory one training step needs, and the largest batch that fits a budget (paper figure 4).

Layer-wise training fits larger batches than end-to-end training: a stage differentiates a
two-layer net only, and its frozen prefix runs under ``stop_gradient``, so no activation of the
prefix is kept for a backward pass. This module measures that without training: it lowers the
trainer's own jitted step (``loop.make_step`` with the model family's ``abstract_step``: its
loss and solver) on abstract inputs (``jax.ShapeDtypeStruct``, ``jax.eval_shape`` of the
initialisers), compiles it, and reads XLA's buffer assignment (``Compiled.memory_analysis()``).
Nothing is allocated, so it runs on a CPU for any image or network size.

Bytes of a step = argument + output + temp - alias:
  argument: parameters, optimiser state and step counter, the frozen prefix, the batch;
  output: the new state and the scalar measurements;
  temp: everything XLA allocates inside the step: activations kept for the backward pass,
    gradients, optimiser temporaries, convolution workspace;
  alias: outputs written in place of donated inputs (the state is donated), counted once.
Not counted: the compiled code, the runtime's own reservations (CUDA context, the allocator's
fragmentation) and anything else alive in the process, so a budget is the memory free for the
step. The analysis is the backend's JAX runs on: a CPU compile predicts a GPU's only roughly
(other fusions, convolution algorithms and workspaces); ``measure`` on an accelerator runs the
steps and reads the device's peak.

One step is analysed on one device (a one-device mesh): with data parallelism every device holds
the whole state and its share of the batch.

With ``--cache_features`` a stage after the first is the trainer's cached step: its batch
carries the prefix features h (``features`` channels per pixel) and no prefix runs. Not counted
then: the cache itself, which ``--cache_features=device`` keeps on every device (the training
set's h: N x H x W x features floats).
"""
import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lwjax import models
from lwjax.config import Config
from lwjax.config import LAYERWISE
from lwjax.training import loop
from lwjax.training import runtime


@dataclasses.dataclass(frozen=True)
class Network:
  """What one training step trains: an end-to-end net, or stage ``stage`` (1-based) of a method."""
  method: str  # "e2e", "layerwise" or "layerwise_convex"
  depth: int  # CNN: depth of the network this step trains (stage i ends with depth i + 1);
  # unrolled: the iterations it trains through (e2e: --unroll_iters; a stage: 1, every stage alike)
  coils: int = 0  # unrolled model: receive coils of its data-consistency steps; 0: the CNN

  @property
  def stage(self) -> int:
    return self.depth if self.coils else self.depth - 1

  @property
  def label(self) -> str:
    if self.coils:
      return (f"unrolled e2e, {self.depth} iterations" if self.method == "e2e"
              else "unrolled stage (each)")
    return "e2e" if self.method == "e2e" else f"{self.method} stage {self.stage}"


def networks(cfg: Config, coils: int = 15) -> list[Network]:
  """The distinct training steps of the run's model family (``Family.memory_networks``): for the
  CNN e2e, every non-convex stage and every stage of the run's other layer-wise methods; for the
  unrolled model e2e and one stage, with ``coils`` coils."""
  fam = models.family(cfg)
  return [Network(m, d, coils if fam.data_consistency else 0) for m, d in fam.memory_networks(cfg)]


def compiled_memory(compiled) -> dict:
  """XLA's buffer assignment of a compiled function: ``{"argument", "output", "temp", "alias",
  "total"}`` in bytes, ``total = argument + output + temp - alias`` (donated inputs reused as
  outputs count once); empty where the backend reports none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def abstract_step(cfg: Config, network: Network, batch_size: int):
  """``(loss_fn, tx, state, frozen, batch)`` of the trainer's step for ``network``; ``state``,
  ``frozen`` and ``batch`` abstract (``jax.ShapeDtypeStruct``), ``batch_size`` examples."""
  return models.family(cfg).abstract_step(cfg, network.method, network.depth, batch_size,
                                          network.coils)


def step_memory(cfg: Config, network: Network, batch_size: int, *, mesh=None) -> dict:
  """XLA's buffer assignment of one training step of ``network`` at ``batch_size``.

  Returns ``compiled_memory``'s dict. Compiles the step (seconds), allocates nothing.
  """
  loss_fn, tx, state, frozen, batch = abstract_step(cfg, network, batch_size)
  step = loop.make_step(loss_fn, tx, mesh or runtime.make_mesh(1))
  return compiled_memory(step.lower(state, frozen, batch).compile())


def largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
  """The largest ``b >= 0`` with ``fits(b)``, for ``fits`` true up to some b and false after.

  Probes ``guess`` and its neighbour first (a linear fit is usually exact), then widens by
  doubling and bisects, so a wrong guess costs a few probes more.
  """
  first = max(guess, 1)
  lo, hi = 0, None  # fits(lo) (or lo == 0); hi is None or not fits(hi)
  probe = first
  while hi is None or hi - lo > 1:
    if fits(probe):
      lo = probe
    else:
      hi = probe
    if hi is None:
      probe = lo + 1 if lo == first else 2 * lo
    else:
      probe = hi - 1 if (lo, hi) == (0, first) else (lo + hi) // 2
  return lo


def analyse(cfg: Config, network: Network, budget_bytes: int, *, batch_size: int,
            mesh=None) -> dict:
  """The step's bytes at ``batch_size``, its linear model and the largest batch within budget.

  ``bytes(b) = fixed + b * per_example`` is fitted from batch sizes b and 2b, b = ``max(batch_size,
  2)`` (at 1 XLA drops loops over the examples, such as the convex stage's CPU filter gradient);
  the largest batch it predicts is confirmed by compiling it and the next one (and searched
  further if the model was off), so ``bytes(max_batch) <= budget < bytes(max_batch + 1)`` holds
  for the compiled steps themselves. Returns a JSON-ready dict; ``compiled`` holds every
  analysed batch size's bytes.
  """
  compiled: dict[int, dict] = {}

  def total(b):
    if b not in compiled:
      compiled[b] = step_memory(cfg, network, b, mesh=mesh)
    return compiled[b]["total"]

  b1 = max(batch_size, 2)
  per_example = (total(2 * b1) - total(b1)) / b1
  if per_example <= 0:
    raise ValueError(f"{network.label}: step memory does not grow with the batch "
                     f"({total(b1)} bytes at {b1}, {total(2 * b1)} at {2 * b1})")
  fixed = total(b1) - b1 * per_example
  max_batch = largest_fitting(lambda b: total(b) <= budget_bytes,
                              math.floor((budget_bytes - fixed) / per_example))
  step_bytes = total(batch_size)
  entry = {"method": network.method, "depth": network.depth, "label": network.label,
           "max_batch": max_batch,
           "bytes_per_example": round(per_example), "fixed_bytes": round(fixed),
           "batch_size": batch_size, "step_bytes": step_bytes,
           "breakdown": compiled[batch_size],
           "compiled": {str(b): compiled[b]["total"] for b in sorted(compiled)}}
  if network.method != "e2e":
    entry = {"stage": network.stage, **entry}
  return entry


def report(cfg: Config, budget_bytes: int, *, coils: int = 15,
           log: Callable[[str], None] = lambda s: None, mesh=None) -> dict:
  """Every network of ``networks(cfg, coils)`` analysed at ``cfg.batch_size`` against
  ``budget_bytes``.

  Returns ``{"budget_bytes", "batch_size", "backend", "config", "e2e": entry,
  "layerwise": [entry per stage], "layerwise_convex": [...] (if the run trains it)}`` with the
  entries of ``analyse``.
  """
  fam = models.family(cfg)
  keys = ("model", "image_size", "ndim", "volume_depth", "depth", "features", "kernel_size",
          "compute_dtype") + fam.settings
  out = {"budget_bytes": int(budget_bytes), "batch_size": cfg.batch_size,
         "backend": jax.default_backend(), "config": {k: getattr(cfg, k) for k in keys}}
  if fam.data_consistency:
    out["config"]["coils"] = coils
  for network in networks(cfg, coils):
    entry = analyse(cfg, network, budget_bytes, batch_size=cfg.batch_size, mesh=mesh)
    log(f"{network.label}: {entry['step_bytes'] / 2**30:.3g} GiB at batch {cfg.batch_size}, "
        f"max batch {entry['max_batch']}")
    if network.method == "e2e":
      out["e2e"] = entry
    else:
      out.setdefault(network.method, []).append(entry)
  return out


def entries(rep: dict) -> list[tuple[str, dict]]:
  """(label, entry) of every analysed network of a ``report``, e2e first."""
  analysed = [rep["e2e"]] + [e for m in LAYERWISE for e in rep.get(m, [])]
  return [(e["label"], e) for e in analysed]


def format_table(rep: dict) -> str:
  """The report as a Markdown table (also readable on a console)."""
  e2e = rep["e2e"]["max_batch"]
  b = rep["batch_size"]
  lines = [f"One training step on one {rep['backend']} device (XLA's compiled memory analysis); "
           f"budget {rep['budget_bytes'] / 2**30:.3g} GiB.",
           "",
           f"| network | depth | step at batch {b} (GiB) | fixed (MiB) | per example (MiB) | "
           "max batch | vs e2e |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for label, e in entries(rep):
    gain = f"{e['max_batch'] / e2e - 1:+.0%}" if e2e and e is not rep["e2e"] else ""
    lines.append(f"| {label} | {e['depth']} | {e['step_bytes'] / 2**30:.3g} | "
                 f"{e['fixed_bytes'] / 2**20:.3g} | {e['bytes_per_example'] / 2**20:.3g} | "
                 f"{e['max_batch']} | {gain} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Measurement on an accelerator.

def run_steps(cfg: Config, network: Network, batch_size: int, *, steps: int = 3,
              mesh=None) -> None:
  """Runs ``steps`` real training steps of ``network`` on zeros (for a measured peak)."""
  mesh = mesh or runtime.make_mesh(1)
  loss_fn, tx, state, frozen, batch = abstract_step(cfg, network, batch_size)
  # The same shapes as the analysed step, now allocated (the values do not change the memory).
  materialise = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  params, frozen = materialise(state["params"]), materialise(frozen)
  state = jax.device_put(loop.init_state(params, tx), runtime.replicated(mesh))
  batch = runtime.put_batch({k: np.zeros(v.shape, v.dtype) for k, v in batch.items()}, mesh)
  step = loop.make_step(loss_fn, tx, mesh)
  for _ in range(steps):
    state, measurements = step(state, frozen, batch)
  jax.block_until_ready((state, measurements))


def memory_stats() -> Optional[dict]:
  """The first device's allocator statistics (bytes_in_use, peak_bytes_in_use since the process
  started, ...); None where the backend does not report them (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return stats if stats and "peak_bytes_in_use" in stats else None


def measure(cfg: Config, rep: dict, *, steps: int = 3, log: Callable[[str], None] = lambda s: None
            ) -> list[dict]:
  """Runs every analysed step at ``batch_size`` and at ``max_batch`` and reads the device's peak.

  ``measured`` is the peak minus what was in use before the steps. JAX has no reset of the peak
  counter, so the steps run in increasing order of predicted bytes and a measurement counts only
  when it raised the peak (None otherwise: the step needed at most an earlier step's peak).
  Needs an accelerator that reports memory statistics (RuntimeError otherwise).
  """
  if memory_stats() is None:
    raise RuntimeError(f"measuring needs an accelerator that reports memory statistics; "
                       f"{jax.devices()[0].platform} does not")
  coils = rep["config"].get("coils", 0)  # The unrolled model's; 0: the CNN.
  runs = sorted({(e["compiled"][str(b)], label, e["method"], e["depth"], b)
                 for label, e in entries(rep) for b in (rep["batch_size"], e["max_batch"]) if b})
  out = []
  for predicted, label, method, depth, b in runs:
    before = memory_stats()
    run_steps(cfg, Network(method, depth, coils), b, steps=steps)
    peak = memory_stats()["peak_bytes_in_use"]
    measured = peak - before["bytes_in_use"] if peak > before["peak_bytes_in_use"] else None
    out.append({"network": label, "batch": b, "predicted": predicted, "measured": measured})
    log(f"{label} batch {b}: predicted {predicted / 2**30:.3g} GiB, measured "
        + (f"{measured / 2**30:.3g} GiB" if measured else "no higher than the previous peak"))
  return out
