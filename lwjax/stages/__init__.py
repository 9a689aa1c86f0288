"""The layer-wise stage interface (``Stage``) and the non-convex stage (the ablation).

A stage trains on the frozen features ``h`` (N, *spatial, C_in) of the net built so far, the skip
(zero-filled input, (N, *spatial, 2)) and the target y; ``to_layer`` turns its variables into one
ReLU layer and a 1x1 head in the ``nets.DeepNet`` layout.
"""
import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import optax

from lwjax import nets

Params = Any
# (variables, h, skip, y, weight (N,) or None) -> (objective, dict of scalar diagnostics)
StageLoss = Callable[[Params, jax.Array, jax.Array, jax.Array, Optional[jax.Array]],
                     tuple[jax.Array, dict]]
# () -> iterable of (h, skip, y) batches covering the training set once
FeatureBatches = Callable[[], Iterable[tuple[jax.Array, jax.Array, jax.Array]]]


def half_mse(pred, y, weight=None):
  """``0.5 * mean((pred - y)**2)``; ``weight`` (N,) scales each example (0: padding rows)."""
  sq = jnp.square(pred.astype(jnp.float32) - y)
  if weight is not None:
    sq = sq * weight.reshape(weight.shape + (1,) * (sq.ndim - 1))
  return 0.5 * jnp.mean(sq)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One layer-wise stage; ``h_shape`` is ``(1, *spatial, C_in)``, ``batches`` a FeatureBatches."""
  init: Callable[[jax.Array, tuple], Params]  # (rng, h_shape) -> variables
  loss: StageLoss  # its aux must hold "mse"
  tx: optax.GradientTransformation  # the solver
  to_layer: Callable[[Params], dict]  # -> {"conv": {kernel, bias}, "head": {kernel, bias}}
  # (variables, opt_state) -> the variables to keep (FISTA's iterate lives in its state).
  solution: Callable[[Params, Any], Params] = lambda variables, opt_state: variables
  # (variables, batches) -> (variables, report of floats), once after training.
  finalize: Optional[Callable[[Params, FeatureBatches], tuple[Params, dict]]] = None
  # (batches, h_shape) -> (Stage, report), before training; deterministic: a resume calls it again.
  prepare: Optional[Callable[[FeatureBatches, tuple], tuple["Stage", dict]]] = None
  # h_shape -> what prepare returns, its data-dependent arrays abstract (for the memory planner).
  abstract_prepare: Optional[Callable[[tuple], "Stage"]] = None
  # (solution, batches) -> dict with "rel_gap", the distance to the optimum.
  certificate: Optional[Callable[[Params, FeatureBatches], dict]] = None
  # (variables, opt_state, batches) -> (certificate of the solution, variables): a solver whose
  # loss is refined about a reference point moves it to the certified solution (pfista).
  recenter: Optional[Callable[[Params, Any, FeatureBatches], tuple[dict, Params]]] = None
  epochs: Optional[int] = None  # None: the run's --epochs
  full_pass: bool = False  # every epoch sees every example (the last batch padded, weight 0)


def nonconvex(*, features, kernel_size, ndim, tx, dtype=jnp.float32) -> Stage:
  """The two-layer stage trained as an ordinary net from a random init by ``tx``."""
  module = nets.TwoLayer(features=features, kernel_size=kernel_size, ndim=ndim, dtype=dtype)

  def init(rng, h_shape):
    skip = jnp.zeros(h_shape[:-1] + (module.out_channels,), jnp.float32)
    return module.init(rng, jnp.zeros(h_shape, jnp.float32), skip)["params"]

  def loss(variables, h, skip, y, weight=None):
    data_term = half_mse(module.apply({"params": variables}, h, skip), y, weight)
    return data_term, {"mse": 2.0 * data_term}

  return Stage(init=init, loss=loss, tx=tx,
               to_layer=lambda v: {"conv": v["conv"], "head": v["head"]})
