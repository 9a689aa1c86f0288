"""The CNN family: a ``nets.DeepNet`` trained end to end (``train_e2e``) or stage by stage
(``train_layerwise``: each stage a ``stage.Stage`` on the frozen prefix, then one more layer)."""
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lwjax import console
from lwjax import data as data_lib
from lwjax import files
from lwjax import metrics as metrics_lib
from lwjax import nets
from lwjax import stages as stage_lib
from lwjax.config import Config
from lwjax.config import LAYERWISE
from lwjax.models import interface
from lwjax.models.interface import Family
from lwjax.training import checkpoints
from lwjax.training import feature_cache
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib


Params = Any


@functools.lru_cache(maxsize=32)
def _forward_fn(net: nets.DeepNet) -> Callable:
  return lambda params, batch: nets.forward(net, params, batch["x"])


def make_forward(net: nets.DeepNet, mesh: Mesh) -> Callable:
  """The jitted evaluation ``(params, {"x": x}) -> output`` that ``predict`` runs per batch."""
  return runtime.sharded(_forward_fn(net), mesh)


def predict(net: nets.DeepNet, params: Params, x: np.ndarray, *, mesh: Mesh,
            batch_size: int) -> np.ndarray:
  """The network's output for every example of ``x`` (N, *spatial, 2), in order, on the host."""
  return runtime.map_batches(_forward_fn(net), params, {"x": x}, mesh=mesh, batch_size=batch_size)


def network_template(cfg: Config) -> nets.DeepNet:
  """The ``DeepNet`` of ``cfg`` (depth, width, kernel, ndim, compute dtype): every method's
  network, and the CNN of every iteration of the unrolled model."""
  return nets.DeepNet(depth=cfg.depth, features=cfg.features, kernel_size=cfg.kernel,
                      ndim=cfg.ndim, dtype=jnp.dtype(cfg.compute_dtype))


def init_params(net: nets.DeepNet, rng, x_shape) -> Params:
  """Random parameters of ``net`` (the template's shape) for inputs ``x_shape`` (N, *spatial, 2)."""
  return nets.init(rng, x_shape, depth=net.depth, features=net.features,
                   kernel_size=net.kernel_size, ndim=net.ndim)


def e2e_loss(net: nets.DeepNet) -> loop.LossFn:
  """End-to-end objective of the deep net: ``half_mse(forward(params, x), y)``."""
  def loss_fn(params, frozen, batch):
    del frozen
    data_term = stage_lib.half_mse(nets.forward(net, params, batch["x"]), batch["y"])
    return data_term, {"mse": 2 * data_term}
  return loss_fn


def stage_loss(net: nets.DeepNet, stage: stage_lib.Stage, index: int) -> loop.LossFn:
  """Objective of layer-wise stage ``index + 1`` (0-based ``index``) on the frozen prefix.

  ``frozen`` holds ``convs_0 .. convs_{index-1}``; the prefix runs under ``stop_gradient``, or
  not at all when the batch carries cached features ``h``.
  """
  def loss_fn(variables, frozen, batch):
    if feature_cache.FEATURES in batch:  # Features cached by the trainer (--cache_features).
      h = batch[feature_cache.FEATURES]
    else:
      h = nets.prefix_features(net, frozen, batch["x"], index)
    return stage.loss(variables, h, batch["x"], batch["y"], batch.get("weight"))
  return loss_fn


def train_e2e(cfg: Config, depth: int, train: dict, *, mesh: Mesh,
              log: workdir_lib.MetricsLog) -> Params:
  """Train a ``DeepNet`` of ``depth`` end to end; returns its parameters (saved under params/)."""
  out = workdir_lib.params_dir(cfg.workdir, "e2e", depth)
  finished = checkpoints.load_finished(out, cfg.workdir)
  if finished is not None:
    return finished
  net = network_template(cfg).clone(depth=depth)
  params = init_params(net, loop.phase_key(cfg, loop.E2E_SALT + depth), (1,) + train["x"].shape[1:])

  spe = data_lib.steps_per_epoch(len(train["x"]), cfg.batch_size)
  result = loop.fit(phase_of("e2e", depth), e2e_loss(net), loop.adam(cfg, spe, cfg.weight_decay),
                    params, {}, {"x": train["x"], "y": train["y"]}, cfg=cfg, mesh=mesh,
                    epochs=cfg.epochs, log=log)
  params = jax.device_get(result.state["params"])
  checkpoints.save_params(out, params)
  return params


def _nonconvex_stage(cfg: Config, num_examples: int, index: int) -> stage_lib.Stage:
  del index  # Every non-convex stage is built alike.
  spe = data_lib.steps_per_epoch(num_examples, cfg.batch_size)
  return stage_lib.nonconvex(features=cfg.features, kernel_size=cfg.kernel, ndim=cfg.ndim,
                             tx=loop.adam(cfg, spe, cfg.weight_decay),
                             dtype=jnp.dtype(cfg.compute_dtype))


def _convex_stage(cfg: Config, num_examples: int, index: int) -> stage_lib.Stage:
  from lwjax.stages import convex  # The convex stage is only needed by this method.
  fista = cfg.convex_solver != "adam"  # One full-batch step per epoch, over every example.
  spe = data_lib.steps_per_epoch(num_examples, cfg.batch_size)
  return convex.convex_stage(
      features=cfg.features, kernel_size=cfg.kernel, ndim=cfg.ndim, beta=cfg.beta, rho=cfg.rho,
      solver=cfg.convex_solver, tx=loop.adam(cfg, spe),
      gate_seed=cfg.gate_seed + index, gates=cfg.gate_filters, refit_head=cfg.refit_head,
      fista_iters=cfg.fista_iters,
      steps_per_epoch=data_lib.steps_per_epoch(num_examples, cfg.batch_size, full_pass=fista),
      relative_beta=cfg.beta_relative, metric_samples=cfg.metric_samples,
      coupling=cfg.metric_coupling, num_examples=num_examples, init=cfg.convex_init,
      dtype=jnp.dtype(cfg.compute_dtype),
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


def _gap_check(cfg: Config, stage: stage_lib.Stage, feature_batches: stage_lib.FeatureBatches
               ) -> Optional[Callable[[dict], tuple[bool, dict, dict]]]:
  """``fit``'s check of a stage with a certificate: its solution's duality gap, done once it is
  at most ``--target_gap`` (never with 0), and the state ``Stage.recenter`` leaves; None for a
  stage without one."""
  if stage.certificate is None:
    return None

  def check(state):
    if stage.recenter is None:
      cert = stage.certificate(stage.solution(state["params"], state["opt"]), feature_batches)
    else:
      cert, params = stage.recenter(state["params"], state["opt"], feature_batches)
      state = {**state, "params": params}
    return 0 < cfg.target_gap and cert["rel_gap"] <= cfg.target_gap, cert, state
  return check


def train_layerwise(cfg: Config, method: str, train: dict, *, mesh: Mesh,
                    log: workdir_lib.MetricsLog,
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
    finished = workdir_lib.finished_stage(cfg.workdir, method, number, depth)
    if finished:
      params = finished[0]
      on_depth(depth, *finished)
      continue
    frozen = {k: v for k, v in params.items() if k.startswith("convs_")}
    arrays = {"x": train["x"], "y": train["y"]}
    if cfg.cache_features != "none" and index > 0:
      if h_cached is None:  # Resumed here: the whole prefix, once.
        batches = feature_cache.prefix_batches(net, frozen, train["x"], index, cfg.batch_size)
      else:  # One more layer on top of the previous stage's features.
        batches = feature_cache.prefix_batches(net, {"convs_0": frozen[f"convs_{index - 1}"]},
                                               h_cached, 1, cfg.batch_size)
      h_cached = feature_cache.cached_features(cfg, method, index, batches,
                                 (n,) + train["x"].shape[1:-1] + (cfg.features,), mesh=mesh)
      arrays[feature_cache.FEATURES], frozen = h_cached, {}
    stage = make_stage(method, cfg, n, index=index)
    h_shape = (1,) + train["x"].shape[1:-1] + (2 if index == 0 else cfg.features,)

    feature_batches = functools.partial(feature_cache.stage_batches, net, frozen, arrays, index,
                                        cfg.batch_size)
    report = {}
    if stage.prepare is not None:
      stage, report = stage.prepare(feature_batches, h_shape)
    variables = stage.init(loop.phase_key(cfg, loop.STAGE_SALT + index), h_shape)
    result = loop.fit(phase_of(method, depth), stage_loss(net, stage, index), stage.tx, variables,
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
        # No check ran: pfista's steps were never recentred (their precision's floor holds).
        advice = ("lower --certify_every" if stage.recenter and result.epochs < cfg.certify_every
                  else "raise --fista_iters")
        logging.warning("%s stage %d ended %d passes in at a relative duality gap of %.2e, above "
                        "--target_gap=%g: it is not certified (%s)", method, number,
                        result.epochs, report["rel_gap"], cfg.target_gap, advice)
    params = nets.stack_layer(params, jax.device_get(stage.to_layer(variables)), index)
    on_depth(depth, params,
             workdir_lib.finish_stage(cfg, log, method, number, depth, params, report))
  return params


def phase_of(method: str, depth: int) -> str:
  """The training phase that ended with ``method``'s network of ``depth``: e2e_d<depth>, or
  the layer-wise stage <method>_s<depth - 1>."""
  return f"e2e_d{depth}" if method == "e2e" else f"{method}_s{depth - 1}"


def network_finished(cfg: Config, method: str, depth: int) -> bool:
  """Whether the network of ``method`` and ``depth`` is trained (a rerun loads it): an e2e
  network's parameters, or the report of the layer-wise stage that ends with it."""
  if method == "e2e":
    return workdir_lib.params_dir(cfg.workdir, method, depth).exists()
  return workdir_lib.stage_report_path(cfg.workdir, method, depth - 1).exists()


def _example_slice(images: np.ndarray) -> np.ndarray:
  """The middle example of (N, *spatial, 2) images as one (H, W, 2) slice (3D: its middle
  plane), the one TensorBoard shows."""
  image = images[len(images) // 2]
  return image[image.shape[0] // 2] if image.ndim == 4 else image


def run(cfg: Config, train: data_lib.Split, val: data_lib.Split, *, mesh: Mesh,
        log: workdir_lib.MetricsLog, summary_path: Path) -> dict:
  """Train every method of ``cfg`` and evaluate each network on ``val`` at every depth, as it is
  finished (summary.json rewritten each time); returns summary.json's dict."""
  train_arrays = data_lib.example_arrays(cfg, train)[0]
  val_arrays = data_lib.example_arrays(cfg, val)[0]
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
    interface.record_network(summary, summary_path, log, method=method, depth=depth, pred=pred,
                          target=val_arrays["y"], report=report, stage=depth - 1,
                          eval_phase=f"{method}_d{depth}", train_phase=phase_of(method, depth),
                          name=f"{method} depth {depth}")
    if method != "e2e" and depth < cfg.depth:
      progress.start(method, depth + 1)

  workdir_lib.write_json(summary_path, workdir_lib.results_first(summary), sort_keys=False)
  for method in cfg.methods:
    if method == "e2e":
      for depth in cfg.depths_e2e:
        progress.start("e2e", depth)
        record("e2e", depth, train_e2e(cfg, depth, train_arrays, mesh=mesh, log=log))
    else:
      progress.start(method, 2)
      train_layerwise(cfg, method, train_arrays, mesh=mesh, log=log,
                      on_depth=lambda d, p, r, m=method: record(m, d, p, r))
  return summary


# ----------------------------------------------------------------------------------------------
# The family's interface (models.interface.Family).

def trained_networks(cfg: Config) -> list[tuple[str, int]]:
  """(method, depth) of every network a finished run saves: e2e at ``--e2e_depths``, each
  layer-wise method at every depth from 2 to ``--depth``."""
  return [(method, depth) for method in cfg.methods
          for depth in (cfg.depths_e2e if method == "e2e" else range(2, cfg.depth + 1))]


def predictor(cfg: Config, arrays: dict, mask, mesh: Mesh) -> Callable[[Params], np.ndarray]:
  del mask  # The CNN sees the zero-filled image only.
  net = network_template(cfg)
  return lambda params: predict(net, params, arrays["x"], mesh=mesh,
                                batch_size=cfg.eval_batch_size)


def memory_networks(cfg: Config) -> list[tuple[str, int]]:
  """e2e at ``--depth``, every non-convex stage (paper figure 4's layer-wise reference), and every
  stage of the other layer-wise methods the run trains (by the depth each ends with)."""
  layerwise = ["layerwise"] + [m for m in LAYERWISE if m != "layerwise" and m in cfg.methods]
  return [("e2e", cfg.depth)] + [(m, d) for m in layerwise for d in range(2, cfg.depth + 1)]


def abstract_step(cfg: Config, method: str, depth: int, batch_size: int, coils: int = 0):
  """``(loss_fn, tx, state, frozen, batch)`` of the trainer's step for ``method``'s network of
  ``depth`` (a stage: the one that ends with it); ``state``, ``frozen`` and ``batch`` abstract
  (``jax.ShapeDtypeStruct``), ``batch_size`` examples. With ``--cache_features`` a stage after
  the first is the cached step: h comes with the batch and no prefix runs."""
  del coils  # No data consistency.
  template = network_template(cfg)
  x_shape = (1,) + cfg.spatial + (2,)
  deep = jax.eval_shape(lambda k: init_params(template.clone(depth=depth), k, x_shape),
                        jax.random.key(0))
  image = jax.ShapeDtypeStruct((batch_size,) + cfg.spatial + (2,), jnp.float32)
  batch = {"x": image, "y": image}
  if method == "e2e":
    loss_fn, tx, params, frozen = e2e_loss(template), loop.adam(cfg, 1, cfg.weight_decay), deep, {}
  else:
    index = depth - 2
    stage = make_stage(method, cfg, num_examples=cfg.batch_size, index=index)
    h_shape = x_shape[:-1] + (2 if index == 0 else cfg.features,)
    if stage.abstract_prepare is not None:  # A solver built from the data: its shapes only.
      stage = stage.abstract_prepare(h_shape)
    params = jax.eval_shape(lambda k: stage.init(k, h_shape), jax.random.key(0))
    frozen = {f"convs_{i}": deep[f"convs_{i}"] for i in range(index)}
    loss_fn, tx = stage_loss(template, stage, index), stage.tx
    if index > 0 and cfg.cache_features != "none":
      # h in the dtype the prefix computes it in (disk caches hold float32).
      h = jax.eval_shape(lambda f, x: nets.prefix_features(template, f, x, index), frozen, image)
      dtype = jnp.float32 if cfg.cache_features == "disk" else h.dtype
      batch[feature_cache.FEATURES], frozen = jax.ShapeDtypeStruct(h.shape, dtype), {}
  state = jax.eval_shape(lambda p: loop.init_state(p, tx), params)
  return loss_fn, tx, state, frozen, batch


FAMILY = Family(
    name="cnn", data_consistency=False, image_to_image=True, example_keys=("x", "y"),
    reference="e2e", depth_unit="layers", depth_axis="depth (conv layers)", settings=(),
    trained_networks=trained_networks, stage_of=lambda depth: depth - 1, phase_of=phase_of,
    predictor=predictor, baselines=lambda cfg, arrays, mask, mesh: {}, run=run,
    memory_networks=memory_networks, abstract_step=abstract_step)
