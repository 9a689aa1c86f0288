"""FISTA as an optax transformation: group soft-thresholding and adaptive restart (the "fista"
solver of the convex stage; ``precond`` holds pfista)."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lwjax.stages.gated import group_norms

Params = Any


class FistaState(NamedTuple):
  x: Params  # the iterate x_k, the stage's solution (the params hold the extrapolated point y_k)
  t: jax.Array  # momentum parameter t_k


def group_shrink(variables, threshold):
  """Prox of ``threshold * sum_g |w_g|``: each group scaled by ``max(0, 1 - threshold / |w_g|)``."""
  norms = group_norms(variables)
  scale = jnp.where(norms > threshold, 1 - threshold / jnp.where(norms > 0, norms, 1.0), 0.0)
  return {"v": variables["v"] * scale[0], "z": variables["z"] * scale[1]}


def _vdot(a, b):
  """The inner product of two pytrees of the same structure."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fista(step: float, beta: float) -> optax.GradientTransformation:
  """Accelerated proximal gradient with group soft-thresholding and adaptive restart.

  The params are the extrapolated point ``y_k`` (gradients of the smooth part are taken there);
  the state keeps ``x_{k+1}`` (``fista_solution``). Needs ``params`` in ``update``.
  """
  def init_fn(params):
    # A copy: a training state that donates its buffers must not hold one array twice.
    return FistaState(x=jax.tree.map(jnp.copy, params), t=jnp.ones([], jnp.float32))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("fista needs the params in update()")
    x = group_shrink(jax.tree.map(lambda y, g: y - step * g, params, grads), step * beta)
    dx = jax.tree.map(jnp.subtract, x, state.x)
    # Gradient restart (O'Donoghue & Candes 2015): drop the momentum once it points uphill.
    uphill = _vdot(jax.tree.map(jnp.subtract, params, x), dx) > 0
    t = jnp.where(uphill, 1.0, state.t)
    t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
    y = jax.tree.map(lambda a, b: a + (t - 1) / t_next * b, x, dx)
    return jax.tree.map(jnp.subtract, y, params), FistaState(x, t_next)

  return optax.GradientTransformation(init_fn, update_fn)


def fista_solution(variables, opt_state):
  """The FISTA iterate ``x_k`` held in ``opt_state`` (inside ``optax.MultiSteps`` or a wrapper)."""
  del variables
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, FistaState))
           if isinstance(s, FistaState)]
  if len(found) != 1:
    raise ValueError(f"expected one FistaState in the optimizer state, found {len(found)}")
  return found[0].x
