"""The unrolled network (MoDL-style): K iterations of a CNN step and a CG-SENSE data consistency.

  x_0 = x_zf
  z_k = nets.forward(CNN_k, x_k)               (= x_k + residual: the DeepNet's skip adds x_k)
  x_{k+1} = DC_k(z_k) = argmin_x |A x - y|^2 + lambda_k |x - z_k|^2
          = (A^H A + lambda_k I)^{-1} (A^H y + lambda_k z_k)

``A = mask * fft2c(maps * x)`` is the slice's SENSE operator and ``y`` its sampled k-space,
divided by the same per-slice ``scale`` as ``x_zf`` (``data.load_split(with_maps=True,
with_kspace=True)``), so ``A^H y = x_zf``. The DC step is ``sense.cg_sense`` with ``cg_iters``
conjugate-gradient steps started at ``z_k`` (differentiated by unrolling). Each iteration has its
own CNN (a ``nets.DeepNet``, the same forward code as the plain network) and its own
``lambda_k = exp(log_lam_k)``.

Parameters: ``{"iter_0": {"cnn": DeepNet params, "log_lam": ()}, ..., "iter_{K-1}": {...}}``. The
number of iterations is read from the tree (as ``nets.forward`` reads the depth), so one
``forward`` evaluates the end-to-end network and the stage-wise one after any stage.

Arrays: images are channels-last float32 ``(N, *spatial, 2)`` at the interfaces and complex64
inside the DC step; ``kspace`` and ``maps`` are ``(N, *lead, C, H, W)`` complex64 and ``mask`` is
``(H, W)``. For 3D networks (``ndim=3``) images are volume patches ``(N, D, H, W, 2)`` with
``kspace``/``maps`` ``(N, D, C, H, W)`` (``data.to_volumes``): the CNN is 3D and the DC step acts
slice by slice, each slice its own CG system, as a 2D multi-slice acquisition is encoded.

Training (``train_unrolled``), through ``loop.fit``:
* ``--method=e2e`` ("unrolled_e2e"): all iterations jointly. The backward pass runs through every
  CNN and every CG step, so training memory grows with K * (CNN activations + cg_iters * coil
  images).
* ``--method=layerwise`` ("unrolled_stagewise"): stage k trains iteration k (CNN_k and lambda_k)
  to fit the target on the output of iterations < k, which stay frozen. Their output is the
  stage's input, computed once per stage for the training set (``x_in``: one image per example,
  the unrolled analogue of ``--cache_features``), so each stage costs one iteration to train.
  Stage k ends with a k-iteration network in the same layout as the end-to-end one.
"""
import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lwjax import data as data_lib
from lwjax import metrics
from lwjax import nets
from lwjax import stages as stage_lib
from lwjax.config import Config
from lwjax.models import cnn
from lwjax.models import interface
from lwjax.models.interface import Family
from lwjax.mri import sense
from lwjax.training import checkpoints
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

Params = dict
# The run's --method -> its networks' name (summary.json, params/, stages/): e2e trains all
# iterations jointly, layerwise one iteration per stage.
NAMES = {"e2e": "unrolled_e2e", "layerwise": "unrolled_stagewise"}


# ----------------------------------------------------------------------------------------------
# The model.

def num_iters(params: Params) -> int:
  """Iterations of an unrolled parameter tree."""
  return sum(1 for name in params if name.startswith("iter_"))


def lambdas(params: Params) -> list[float]:
  """Every iteration's data-consistency weight, in order."""
  return [float(np.exp(params[f"iter_{k}"]["log_lam"])) for k in range(num_iters(params))]


def dc(z, kspace, maps, mask, lam, *, cg_iters):
  """The data-consistency step on a 2-channel image: ``argmin_x |A x - y|^2 + lam |x - z|^2``.

  ``cg_iters`` CG steps on ``(A^H A + lam I) x = A^H y + lam z``, started at ``z``.
  """
  x = sense.cg_sense(kspace, maps, mask, lam=lam, x0=sense.to_complex(z), iters=cg_iters)
  return sense.to_channels(x)


def iteration(net: nets.DeepNet, p: Params, x, kspace, maps, mask, *, cg_iters):
  """One unrolled iteration ``x <- DC(x + CNN(x))`` with ``p = {"cnn", "log_lam"}``."""
  z = nets.forward(net, p["cnn"], x)
  return dc(z, kspace, maps, mask, jnp.exp(p["log_lam"]), cg_iters=cg_iters)


def forward(net: nets.DeepNet, params: Params, x, kspace, maps, mask, *, cg_iters,
            iters: Optional[int] = None):
  """The first ``iters`` iterations (all by default) of the unrolled network on ``x = x_zf``."""
  for k in range(num_iters(params) if iters is None else iters):
    x = iteration(net, params[f"iter_{k}"], x, kspace, maps, mask, cg_iters=cg_iters)
  return x


def init_iteration(net: nets.DeepNet, rng, x_shape, *, dc_lambda) -> Params:
  """One iteration's parameters: random ones of the CNN ``net`` (``cnn.init_params``) and
  ``log_lam = log(dc_lambda)``."""
  return {"cnn": cnn.init_params(net, rng, x_shape),
          "log_lam": jnp.asarray(np.log(dc_lambda), jnp.float32)}


def init(cfg: Config, x_shape, iters: int) -> Params:
  """The run's first ``iters`` iterations (``_init_iteration``: the same for e2e and the stages)
  for inputs ``x_shape`` (N, *spatial, 2)."""
  return {f"iter_{k}": _init_iteration(cfg, k, x_shape) for k in range(iters)}


# ----------------------------------------------------------------------------------------------
# Objectives and the optimiser (for loop.fit: loss_fn(params, frozen, batch)).
# ``frozen = {"mask": (H, W)}``; ``batch = {"x", "y", "kspace", "maps"}`` (+ "x_in" for a stage).

def e2e_loss(net: nets.DeepNet, *, cg_iters: int) -> loop.LossFn:
  """All iterations jointly: ``half_mse(forward(params, x_zf), y)``."""
  def loss_fn(params, frozen, batch):
    pred = forward(net, params, batch["x"], batch["kspace"], batch["maps"], frozen["mask"],
                   cg_iters=cg_iters)
    data_term = stage_lib.half_mse(pred, batch["y"])
    aux = {f"lambda_{k}": jnp.exp(params[f"iter_{k}"]["log_lam"]) for k in range(num_iters(params))}
    return data_term, {"mse": 2 * data_term, **aux}
  return loss_fn


def stage_loss(net: nets.DeepNet, index: int, *, cg_iters: int) -> loop.LossFn:
  """Stage ``index + 1``: iteration ``index`` (``variables = {"iter_<index>": ...}``) on
  ``batch["x_in"]``, the output of the frozen iterations ``0 .. index - 1`` (``x`` for the first).

  The frozen iterations are not in the step at all, so nothing of theirs is differentiated or
  kept for a backward pass (what ``stop_gradient`` on an in-step prefix would give, at the cost of
  one image per example computed once per stage)."""
  def loss_fn(variables, frozen, batch):
    p = variables[f"iter_{index}"]
    pred = iteration(net, p, batch["x_in"], batch["kspace"], batch["maps"], frozen["mask"],
                     cg_iters=cg_iters)
    data_term = stage_lib.half_mse(pred, batch["y"])
    return data_term, {"mse": 2 * data_term, "lambda": jnp.exp(p["log_lam"])}
  return loss_fn


def optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with the run's schedule: the CNNs with ``--weight_decay``; ``log_lam`` without it (a
  decay would pull lambda towards 1) at ``--lambda_lr`` (Adam moves it by about its learning
  rate per step: at 1e-4 lambda changes by ~1% per 100 steps), or not at all with
  ``--nolearn_lambda`` (lambda stays exactly ``--dc_lambda``)."""
  lam_cfg = dataclasses.replace(cfg, lr=cfg.lambda_lr or cfg.lr)
  lam_tx = loop.adam(lam_cfg, steps_per_epoch) if cfg.learn_lambda else optax.set_to_zero()

  def labels(params):
    return {k: {"cnn": jax.tree.map(lambda _: "cnn", v["cnn"]), "log_lam": "lam"}
            for k, v in params.items()}

  return optax.multi_transform(
      {"cnn": loop.adam(cfg, steps_per_epoch, cfg.weight_decay), "lam": lam_tx}, labels)


# ----------------------------------------------------------------------------------------------
# Data and evaluation.

DC_KEYS = ("x", "y", "kspace", "maps")


def dc_arrays(cfg: Config, split: data_lib.Split) -> dict:
  """``x, y, kspace, maps`` of a split: slices, or volume patches of ``--volume_depth`` (3D)."""
  if split.kspace is None or split.maps is None:
    raise ValueError("the unrolled model needs the coil maps and the sampled k-space: load the "
                     "split with data.load_split(..., with_maps=True, with_kspace=True)")
  return data_lib.example_arrays(cfg, split, DC_KEYS)[0]


def _batched(fn, params, arrays: dict, mask, *, mesh, batch_size: int) -> np.ndarray:
  """``fn((params, mask), batch)`` over every example of ``arrays`` in order, on the host (one
  compilation per (fn, mesh): the stage-wise driver evaluates the same prefix for its input and
  for the summary)."""
  return runtime.map_batches(fn, (params, jnp.asarray(mask, jnp.float32)),
                               {k: arrays[k] for k in ("x", "kspace", "maps")}, mesh=mesh,
                               batch_size=batch_size)


@functools.lru_cache(maxsize=32)
def _forward_fn(net: nets.DeepNet, cg_iters: int, iters: int) -> Callable:
  def fn(args, batch):
    params, mask = args
    return forward(net, params, batch["x"], batch["kspace"], batch["maps"], mask,
                   cg_iters=cg_iters, iters=iters)
  return fn


@functools.lru_cache(maxsize=8)
def _cg_sense_fn(iters: int) -> Callable:
  def fn(args, batch):
    _, mask = args
    return sense.to_channels(sense.cg_sense(batch["kspace"], batch["maps"], mask, iters=iters))
  return fn


def predict(net: nets.DeepNet, params: Params, arrays: dict, mask, *, cg_iters: int, mesh,
            batch_size: int, iters: Optional[int] = None) -> np.ndarray:
  """The unrolled network's output (first ``iters`` iterations, all by default) for every
  example of ``arrays`` (``x, kspace, maps``), in order, on the host."""
  iters = num_iters(params) if iters is None else iters
  return _batched(_forward_fn(net, cg_iters, iters), params, arrays, mask, mesh=mesh,
                  batch_size=batch_size)


def cg_sense(arrays: dict, mask, *, iters: int, mesh, batch_size: int) -> np.ndarray:
  """The classical baseline: CG-SENSE (lambda = 0, ``iters`` steps from zero) of every example."""
  return _batched(_cg_sense_fn(iters), {}, arrays, mask, mesh=mesh, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# The drivers.

def _key(cfg: Config, k: int) -> jax.Array:
  """Iteration k's initialisation: the same for the end-to-end and the stage-wise network."""
  return loop.phase_key(cfg, loop.UNROLLED_SALT + k)


def _init_iteration(cfg: Config, k: int, x_shape) -> Params:
  """Iteration k of the run's network, with ``--dc_lambda``."""
  return init_iteration(cnn.network_template(cfg), _key(cfg, k), (1,) + tuple(x_shape[1:]),
                        dc_lambda=cfg.dc_lambda)


def train_unrolled(cfg: Config, method: str, arrays: dict, mask, *, mesh,
                   log: workdir_lib.MetricsLog,
                   on_depth: Callable[[int, Params, Optional[dict]], None] = lambda k, p, r: None
                   ) -> Params:
  """Train the ``cfg.unroll_iters``-iteration network end to end or stage by stage.

  Args:
    method: "e2e" (all iterations jointly; saved as ``params/unrolled_e2e/depth_<K>``) or
      "layerwise" (one iteration per stage; ``params/unrolled_stagewise/depth_<k>`` and
      ``stages/unrolled_stagewise/stage_<k>.json`` after stage k).
    arrays: ``x, y, kspace, maps`` with one leading example axis (``dc_arrays``).
    mask: (H, W) sampling mask.
    on_depth: called with (iterations, params, stage report or None) for every finished network:
      once for e2e (no report), after every stage for layerwise (the run evaluates it there).

  Finished networks and stages are loaded, not retrained; an interrupted one resumes from its
  per-epoch checkpoint (``loop.fit``). Returns the final parameters.
  """
  if method not in NAMES:
    raise ValueError(f"method: expected one of {', '.join(NAMES)}, found {method!r}")
  name, iters = NAMES[method], cfg.unroll_iters
  net = cnn.network_template(cfg)
  arrays = {k: arrays[k] for k in DC_KEYS}
  frozen = {"mask": jnp.asarray(mask, jnp.float32)}
  spe = data_lib.steps_per_epoch(len(arrays["x"]), cfg.batch_size)
  x_shape = arrays["x"].shape

  if method == "e2e":
    out = workdir_lib.params_dir(cfg.workdir, name, iters)
    params = checkpoints.load_finished(out, cfg.workdir)  # None: not finished, or set aside
    if params is None:
      params = init(cfg, x_shape, iters)
      result = loop.fit(phase_of(name, iters), e2e_loss(net, cg_iters=cfg.cg_iters),
                             optimizer(cfg, spe), params, frozen, arrays, cfg=cfg, mesh=mesh,
                             epochs=cfg.epochs, log=log)
      params = jax.device_get(result.state["params"])
      checkpoints.save_params(out, params)
    on_depth(iters, params, None)  # No stage report; its lambdas go into summary["lambda"].
    return params

  params: Params = {}
  for k in range(iters):
    finished = workdir_lib.finished_stage(cfg.workdir, name, k + 1, k + 1)
    if finished:
      params = finished[0]
      on_depth(k + 1, *finished)
      continue
    # The frozen iterations' output, once for the whole stage (a deterministic function of the
    # saved prefix, so a resumed stage sees the same input).
    x_in = arrays["x"] if k == 0 else predict(net, params, arrays, mask, cg_iters=cfg.cg_iters,
                                              mesh=mesh, batch_size=cfg.eval_batch_size)
    variables = {f"iter_{k}": _init_iteration(cfg, k, x_shape)}
    result = loop.fit(phase_of(name, k + 1), stage_loss(net, k, cg_iters=cfg.cg_iters),
                           optimizer(cfg, spe), variables, frozen, {**arrays, "x_in": x_in},
                           cfg=cfg, mesh=mesh, epochs=cfg.epochs, log=log)
    params = {**params, **jax.device_get(result.state["params"])}
    on_depth(k + 1, params, workdir_lib.finish_stage(cfg, log, name, k + 1, k + 1, params,
                                                   {"lambda": lambdas(params)[k]}))
  return params


def abstract_step(cfg: Config, method: str, depth: int, batch_size: int, coils: int):
  """``(loss_fn, tx, state, frozen, batch)`` of one training step, ``state``, ``frozen`` and
  ``batch`` abstract (``jax.ShapeDtypeStruct``): what ``memory.step_memory`` compiles.

  ``method`` "e2e": all ``cfg.unroll_iters`` iterations; "layerwise": one stage (one iteration on
  its precomputed input), the same for every stage (``depth`` is not read). ``batch_size``
  examples of ``cfg.spatial`` with ``coils`` coils.
  """
  del depth
  spatial = cfg.spatial
  net = cnn.network_template(cfg)
  iters = cfg.unroll_iters if method == "e2e" else 1
  params = jax.eval_shape(lambda: init(cfg, (1,) + spatial + (2,), iters))
  loss = (e2e_loss(net, cg_iters=cfg.cg_iters) if method == "e2e"
          else stage_loss(net, 0, cg_iters=cfg.cg_iters))
  tx = optimizer(cfg, 1)
  state = jax.eval_shape(lambda p: loop.init_state(p, tx), params)
  image = jax.ShapeDtypeStruct((batch_size,) + spatial + (2,), jnp.float32)
  coil = jax.ShapeDtypeStruct((batch_size,) + spatial[:-2] + (coils,) + spatial[-2:],
                              jnp.complex64)
  batch = {"x": image, "y": image, "kspace": coil, "maps": coil}
  if method != "e2e":
    batch["x_in"] = image
  frozen = {"mask": jax.ShapeDtypeStruct(spatial[-2:], jnp.float32)}
  return loss, tx, state, frozen, batch


def phase_of(method: str, iters: int) -> str:
  """The training phase that ended with ``method``'s network of ``iters`` iterations."""
  return f"{method}_k{iters}" if method == NAMES["e2e"] else f"{method}_s{iters}"


def run(cfg: Config, train: data_lib.Split, val: data_lib.Split, *, mesh,
        log: workdir_lib.MetricsLog, summary_path) -> dict:
  """``Family.run`` of the unrolled model: every method of ``cfg``, evaluated on ``val``.

  ``--method=e2e`` trains ``unrolled_e2e`` (evaluated at K iterations), ``layerwise`` trains
  ``unrolled_stagewise`` (evaluated after every stage, i.e. at 1..K iterations). summary.json:
  ``{"zero_filled", "cg_sense" (CG-SENSE, --cg_iters steps from zero), "unrolled_e2e": {K: ...},
  "unrolled_stagewise": {k: ...}, "stages": {"unrolled_stagewise": {k: report}},
  "lambda": {method: {k: [lambda_0, ...]}}, "config"}``; the metric means are per 2D slice.
  """
  summary_path = Path(summary_path)
  net = cnn.network_template(cfg)
  mask = np.asarray(train.mask, np.float32)
  train_arrays, val_arrays = dc_arrays(cfg, train), dc_arrays(cfg, val)
  slice_means = lambda pred: metrics.means(metrics.per_slice(pred=pred, target=val_arrays["y"]))
  summary = {"zero_filled": slice_means(val_arrays["x"]),
             "cg_sense": slice_means(baselines(cfg, val_arrays, mask, mesh)["cg_sense"]),
             "stages": {}, "lambda": {}, "config": dataclasses.asdict(cfg)}
  workdir_lib.write_json(summary_path, workdir_lib.results_first(summary), sort_keys=False)

  def record(method, iters, params, report):
    pred = predict(net, params, val_arrays, mask, cg_iters=cfg.cg_iters, mesh=mesh,
                   batch_size=cfg.eval_batch_size)
    summary["lambda"].setdefault(method, {})[str(iters)] = lambdas(params)
    interface.record_network(summary, summary_path, log, method=method, depth=iters, pred=pred,
                          target=val_arrays["y"],
                          report=report, stage=iters,
                          eval_phase=f"{method}_k{iters}", train_phase=phase_of(method, iters),
                          name=f"{method}, {iters} iterations")

  for method in cfg.methods:
    train_unrolled(cfg, method, train_arrays, mask, mesh=mesh, log=log,
                   on_depth=lambda k, p, r, m=NAMES[method]: record(m, k, p, r))
  return summary


def trained_networks(cfg: Config) -> list[tuple[str, int]]:
  """(name, iterations) of every saved network: e2e at ``--unroll_iters``, stage-wise after each
  stage."""
  out = []
  for method in cfg.methods:
    iters = range(1, cfg.unroll_iters + 1) if method == "layerwise" else [cfg.unroll_iters]
    out += [(NAMES[method], k) for k in iters]
  return out


def predictor(cfg: Config, arrays: dict, mask, mesh) -> Callable[[Params], np.ndarray]:
  net, mask = cnn.network_template(cfg), np.asarray(mask, np.float32)
  return lambda params: predict(net, params, arrays, mask, cg_iters=cfg.cg_iters, mesh=mesh,
                                batch_size=cfg.eval_batch_size)


def baselines(cfg: Config, arrays: dict, mask, mesh) -> dict[str, np.ndarray]:
  return {"cg_sense": cg_sense(arrays, np.asarray(mask, np.float32), iters=cfg.cg_iters,
                               mesh=mesh, batch_size=cfg.eval_batch_size)}


FAMILY = Family(
    name="unrolled", data_consistency=True, image_to_image=False, example_keys=DC_KEYS,
    reference=NAMES["e2e"], depth_unit="iterations", depth_axis="unrolled iterations",
    settings=("unroll_iters", "cg_iters"), trained_networks=trained_networks,
    stage_of=lambda iters: iters, phase_of=phase_of, predictor=predictor, baselines=baselines,
    run=run, memory_networks=lambda cfg: [("e2e", cfg.unroll_iters), ("layerwise", 1)],
    abstract_step=abstract_step)
