"""What a layer-wise stage is, and the non-convex stage (the ablation).

A stage sees the frozen features ``h = h_{i}`` (N, *spatial, C_in) of the network built so far, the
skip (the zero-filled input x, (N, *spatial, 2)) and the target y, and trains its own variables.
When it is done, ``to_layer`` turns them into one hidden ReLU layer and a 1x1 head in the
``DeepNet`` layout (``nets.stack_layer``), so every stage of every kind plugs into one training
loop (``train.fit``) and one forward code (``nets.forward``).
"""
import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import optax

from lwjax import nets

Params = Any
# (variables, h, skip, y, weight) -> (objective to minimise, dict of scalar diagnostics); weight
# (N,) or None: per-example weights of the data term (``half_mse``).
StageLoss = Callable[[Params, jax.Array, jax.Array, jax.Array, Optional[jax.Array]],
                     tuple[jax.Array, dict]]
# () -> iterable of (h, skip, y) batches covering the training set once
FeatureBatches = Callable[[], Iterable[tuple[jax.Array, jax.Array, jax.Array]]]


def half_mse(pred, y, weight=None):
  """The data term of every objective here: ``0.5 * mean((pred - y)**2)`` over all elements.

  ``weight`` (N,): each example's squared errors count ``weight[i]`` times (the padding of a
  full-pass epoch weighs 0, ``data.gather``).
  """
  sq = jnp.square(pred.astype(jnp.float32) - y)
  if weight is not None:
    sq = sq * weight.reshape(weight.shape + (1,) * (sq.ndim - 1))
  return 0.5 * jnp.mean(sq)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One layer-wise stage: its variables, objective, solver and the way back to a ReLU layer.

  Attributes:
    init: ``(rng, h_shape) -> variables``, ``h_shape = (1, *spatial, C_in)`` the stage's input
      features (the prefix's output, or the 2-channel image for stage 1).
    loss: ``(variables, h, skip, y, weight=None) -> (scalar objective, aux)``: ``h`` (B, *spatial,
      C_in), ``skip`` and ``y`` (B, *spatial, 2), ``weight`` (B,) or None; ``aux`` must contain
      ``"mse"``. ``train.stage_loss`` wraps it as the loop's ``train.LossFn``.
    tx: the solver as an optax transformation (Adam, or FISTA for the convex stage).
    to_layer: ``variables -> {"conv": {"kernel", "bias"}, "head": {"kernel", "bias"}}``.
    solution: ``(variables, opt_state) -> variables`` to keep; FISTA's iterate lives in its state.
    finalize: optional ``(variables, feature_batches) -> (variables, report)`` run once after
      training over the whole training set: certificates, head refits. ``report`` is a flat dict
      of floats that goes to the metrics log and summary.json.
    prepare: optional ``(feature_batches, h_shape) -> (Stage, report)`` run before training, for a
      solver that needs a pass over the data first (FISTA's step size from a power iteration).
      It must be deterministic: a resumed run calls it again and must get the same stage.
    abstract_prepare: with ``prepare``, ``h_shape -> Stage``: what ``prepare`` returns, its
      data-dependent arrays abstract (``jax.ShapeDtypeStruct``), for the memory planner.
    certificate: optional ``(solution, feature_batches) -> dict`` with "rel_gap": how far a
      solution is from the stage's optimum (a convex stage's duality gap), in one pass.
    epochs: passes over the training data for this stage; None means the run's ``--epochs``.
    full_pass: every epoch must see every example (a full-batch solver: FISTA accumulates one
      gradient per epoch); ``train.fit`` then pads the last batch with weight-0 rows.
  """
  init: Callable[[jax.Array, tuple], Params]
  loss: StageLoss
  tx: optax.GradientTransformation
  to_layer: Callable[[Params], dict]
  solution: Callable[[Params, Any], Params] = lambda variables, opt_state: variables
  finalize: Optional[Callable[[Params, FeatureBatches], tuple[Params, dict]]] = None
  prepare: Optional[Callable[[FeatureBatches, tuple], tuple["Stage", dict]]] = None
  abstract_prepare: Optional[Callable[[tuple], "Stage"]] = None
  certificate: Optional[Callable[[Params, FeatureBatches], dict]] = None
  epochs: Optional[int] = None
  full_pass: bool = False


def nonconvex(*, features, kernel_size, ndim, tx, dtype=jnp.float32) -> Stage:
  """The two-layer stage trained as an ordinary net: random init, ``tx`` (Adam + weight decay)."""
  module = nets.TwoLayer(features=features, kernel_size=kernel_size, ndim=ndim, dtype=dtype)

  def init(rng, h_shape):
    skip = jnp.zeros(h_shape[:-1] + (module.out_channels,), jnp.float32)
    return module.init(rng, jnp.zeros(h_shape, jnp.float32), skip)["params"]

  def loss(variables, h, skip, y, weight=None):
    data_term = half_mse(module.apply({"params": variables}, h, skip), y, weight)
    return data_term, {"mse": 2.0 * data_term}

  return Stage(init=init, loss=loss, tx=tx,
               to_layer=lambda v: {"conv": v["conv"], "head": v["head"]})
