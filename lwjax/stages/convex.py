"""The convex layer-wise stage: gated-ReLU group lasso, FISTA, certificate, mapping to a ReLU layer.

The two-layer net ``f(relu(g(h))) + skip`` (g: k x k, f: 1x1) has an exact convex reformulation
(Pilanci & Ergen 2020; Sahiner et al. 2021). With P fixed random gate filters ``U_p`` and gates
``D_p = 1[conv(h, U_p) >= 0]``:

  pred = skip + sum_p D_p * (conv(h, V_p) - conv(h, Z_p))
  objective = 0.5 * mean((pred - y)**2) + beta * sum_{p,c} (|V_pc| + |Z_pc|)
            + rho * sum_{p,c} mean_pixels relu(-(2 D_p - 1) * conv(h, V_pc))  (+ same for Z)

``h`` (N, *spatial, C_in); ``skip``, ``y`` (N, *spatial, C_out); spatial (H, W) or (D, H, W).
V and Z are (*k, C_in, P, C_out); group (p, c), one filter, is one ReLU neuron. beta is per
element of the mean data term (it does not grow with the data); ``beta_max`` zeroes every group.
rho = 0 (FISTA or Adam) is the gated relaxation: it splits each neuron evenly between V and -Z, a
linear unit under the +-1 head, so ``refit_head`` refits the head on the ReLU features. rho > 0
(Adam) drives the solution onto the ReLU cones, where the mapped ReLU layer predicts the same.
"""
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lwjax import nets
from lwjax.stages import precond
from lwjax import stages as stage

Params = Any

# Groups below this fraction of the largest group norm count as zero in the KKT check: Adam never
# reaches exact zeros, and the direction of a vanishing group carries no information.
NEAR_ZERO = 1e-3
# Power iteration approaches the Lipschitz constant from below; FISTA's step is 1/(margin * L).
_LIPSCHITZ_MARGIN = 1.1


# ----------------------------------------------------------------------------------------------
# The model.

def gate_filters(seed: int, kernel_size, ndim: int, c_in: int, num: int) -> np.ndarray:
  """The fixed gate filters ``U``: (*k, c_in, num) i.i.d. standard normal float32, from ``seed``.

  NumPy: the same on every backend, and a constant in a jitted loss (threefry would be traced
  into, and compiled with, every step).
  """
  shape = nets.kernel_shape(kernel_size, ndim) + (c_in, num)
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def conv(h, kernel, dtype=None):
  """SAME, stride-1 conv without bias: (N, *spatial, I) x (*k, I, O) -> (N, *spatial, O) float32.

  Runs in ``dtype`` (default: ``h``'s) with its output in ``dtype`` too, as flax's layers do, then
  widens it: a float32 result from bf16 operands is not a cuDNN bf16 conv (BUILD_NOTES.md, speed).
  """
  ndim = h.ndim - 2
  sp = "DHW"[3 - ndim:]
  dtype = dtype or h.dtype
  out = jax.lax.conv_general_dilated(
      h.astype(dtype), kernel.astype(dtype), (1,) * ndim, "SAME",
      dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
  return out.astype(jnp.float32)


def gates(h, u):
  """``D = 1[conv(h, U) >= 0]``: (N, *spatial, P) float32 0/1, from float32 operands.

  At the matmul precision in effect: TF32 in GPU training steps, "highest" in ``prepare`` and
  ``finalize``, so a gate near 0 can differ between the two: the certificate is that of the
  float32-exact program (BUILD_NOTES.md, known limits)."""
  return (conv(h.astype(jnp.float32), u) >= 0).astype(jnp.float32)


def kernel(variables):
  """V and Z as one conv kernel (*k, C_in, 2 * P * C_out), channel ``s*P*C_out + p*C_out + c``
  with s = 0 for V_pc and s = 1 for Z_pc."""
  w = jnp.stack([variables["v"], variables["z"]], axis=-3)
  return w.reshape(w.shape[:-3] + (-1,))


def branches(variables, h, dtype=None):
  """``conv(h, V_pc)`` and ``conv(h, Z_pc)``: (N, *spatial, 2, P, C_out), one conv for both."""
  p, c = variables["v"].shape[-2:]
  out = conv(h, kernel(variables), dtype)
  return out.reshape(out.shape[:-1] + (2, p, c))


def _gated_sum(out, d):
  """``sum_p D_p (conv(h, V_p) - conv(h, Z_p))`` from ``branches`` and ``gates``."""
  return jnp.sum(d[..., None] * (out[..., 0, :, :] - out[..., 1, :, :]), axis=-2)


def gated(w, h, d, dtype=None):
  """``sum_p D_p conv(h, W_p)``: (N, *spatial, C_out) for W (*k, C_in, P, C_out) and gates ``d``
  (N, *spatial, P). The gated program sees only W = V - Z: half the channels of ``branches``."""
  p, c = w.shape[-2:]
  out = conv(h, w.reshape(w.shape[:-2] + (p * c,)), dtype)
  return jnp.sum(d[..., None] * out.reshape(out.shape[:-1] + (p, c)), axis=-2)


def _cone_violation(out, d):
  """``relu(-(2 D_p - 1) * conv(h, W_pc))`` per element, W = V, Z: how far each branch of
  ``branches`` lies outside its ReLU cone; (N, *spatial, 2, P, C_out), 0 on the cones."""
  return jax.nn.relu(-(2 * d - 1)[..., None, :, None] * out)


def objective_value(data, norm_sum, cone_penalty, *, beta, rho):
  """The objective from its parts: ``data`` (0.5 mean squared error), ``norm_sum`` (the sum of
  the group norms), ``cone_penalty`` (summed cone violations per pixel)."""
  return data + beta * norm_sum + rho * cone_penalty


def predict(variables, h, skip, u, dtype=None):
  """``skip + sum_p D_p (conv(h, V_p) - conv(h, Z_p))``; ``u`` the gate filters (*k, C_in, P)."""
  w = variables["v"] - variables["z"]
  return skip + gated(w, h, gates(h, u), dtype).astype(skip.dtype)


def group_norms(variables):
  """(2, P, C_out) l2 norms of the V and Z filters; NaN-safe: the gradient at a zero group is 0
  (a subgradient), where that of ``sqrt(sum(w**2))`` would be NaN and break Adam from zero."""
  w = jnp.stack([variables["v"], variables["z"]])
  sq = jnp.sum(jnp.square(w), axis=tuple(range(1, w.ndim - 2)))
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _terms(variables, h, skip, y, u, dtype, weight=None):
  """The objective's parts on one batch (all means over this batch; ``weight``: the data term's
  per-example weights, ``stage.half_mse``)."""
  out = branches(variables, h, dtype)
  d = gates(h, u)
  violation = jnp.sum(_cone_violation(out, d))
  return {"data": stage.half_mse(skip + _gated_sum(out, d), y, weight),
          "cone_penalty": violation / math.prod(out.shape[:-3]),
          "norm_sum": jnp.sum(group_norms(variables)), "violation": violation,
          "magnitude": jnp.sum(jnp.abs(out))}


def objective(variables, h, skip, y, u, *, beta, rho, dtype=None, weight=None):
  """``(objective, aux)`` on one batch; ``u`` the gate filters. aux: "mse", "objective",
  "group_norm_sum", "constraint_violation" (cone violations / sum |conv(h, V_pc)|, 0 on the cones).
  """
  t = _terms(variables, h, skip, y, u, dtype, weight)
  value = objective_value(t["data"], t["norm_sum"], t["cone_penalty"], beta=beta, rho=rho)
  aux = {"mse": 2 * t["data"], "objective": value, "group_norm_sum": t["norm_sum"],
         "constraint_violation": t["violation"] / jnp.maximum(t["magnitude"], 1e-30)}
  return value, aux


# ----------------------------------------------------------------------------------------------
# Back to a ReLU layer.

def to_layer(variables):
  """One ReLU layer and its 1x1 head in the ``nets.DeepNet`` layout: conv ``kernel(variables)``,
  zero bias; head +1 from V_pc and -1 from Z_pc to output c, zero bias (or ``variables["head"]``).
  """
  v = variables["v"]
  ndim = v.ndim - 3
  p, c = v.shape[-2:]
  k = kernel(variables)
  if "head" in variables:
    head = variables["head"]
  else:
    signs = jnp.array([1.0, -1.0], jnp.float32)[:, None, None, None]
    ones = jnp.broadcast_to(jnp.eye(c, dtype=jnp.float32), (2, p, c, c))
    head = {"kernel": (signs * ones).reshape((1,) * ndim + (2 * p * c, c)),
            "bias": jnp.zeros((c,), jnp.float32)}
  return {"conv": {"kernel": k, "bias": jnp.zeros(k.shape[-1:], jnp.float32)}, "head": head}


def relu_features(layer, h, dtype=None):
  """``relu(g(h))`` of a ``to_layer`` layer: (N, *spatial, 2 * P * C_out)."""
  return jax.nn.relu(conv(h, layer["conv"]["kernel"], dtype) + layer["conv"]["bias"])


def _head(layer, z, skip):
  """``skip + head(z)``: the 1x1 head of a ``to_layer`` layer on features z (N, *spatial, F)."""
  w = layer["head"]["kernel"]  # (1, ..., F, C_out)
  return skip + (z @ w.reshape(w.shape[-2:]) + layer["head"]["bias"]).astype(skip.dtype)


def relu_predict(layer, h, skip, dtype=None):
  """The two-layer ReLU net ``f(relu(g(h))) + skip`` of a ``to_layer`` layer."""
  return _head(layer, relu_features(layer, h, dtype), skip)


# ----------------------------------------------------------------------------------------------
# Certificate.

def _np_groups(tree):
  """``{"v", "z"}`` stacked as (2, *k, C_in, P, C_out) float64 NumPy."""
  return np.stack([np.asarray(jax.device_get(tree[k]), np.float64) for k in ("v", "z")])


def _np_group_norms(tree):
  """(2, P, C_out) group norms of ``{"v", "z"}`` in float64 NumPy."""
  return _np_norms(_np_groups(tree))


def _np_norms(w):
  """(2, P, C_out) group norms of groups stacked by ``_np_groups``."""
  return np.sqrt(np.sum(w * w, tuple(range(1, w.ndim - 2))))


def duality_gap(variables, neg_grad, *, data, beta):
  """Duality gap and KKT residual of a point of the gated (rho = 0) program, in float64 NumPy.

  The dual point ``theta = s e`` (e the residual, ``s = min(1, beta / max_g |q_g|)``, q = A^T e)
  is feasible, and ``P - D = 0.5 (1 - s)^2 |e|^2 + sum_g (beta |w_g| - s <w_g, q_g>)``: a sum of
  non-negative terms, free of the cancellation of ``P - D`` computed directly.

  Args:
    variables: ``{"v", "z"}``.
    neg_grad: ``q``, minus the gradient of the data term over the whole training set, same tree.
    data: the data term ``0.5 * mse`` over the whole training set.
    beta: the group-lasso weight (> 0).
  Returns:
    {"objective", "gap", "rel_gap" (gap / objective), "kkt_violation" (RMS over groups of the
    distance of q_g from beta * the subdifferential of |w_g|, over beta; see NEAR_ZERO)}.
  """
  w, q = _np_groups(variables), _np_groups(neg_grad)
  axes = tuple(range(1, w.ndim - 2))
  norms, q_norms = _np_norms(w), _np_norms(q)
  s = min(1.0, beta / q_norms.max()) if q_norms.max() > 0 else 1.0
  objective = objective_value(data, norms.sum(), 0.0, beta=beta, rho=0.0)
  gap = (1 - s) ** 2 * data + np.sum(beta * norms - s * np.sum(w * q, axes))
  nonzero = norms > NEAR_ZERO * norms.max()
  direction = w / np.expand_dims(np.where(nonzero, norms, 1.0), axes)
  dist = np.where(nonzero, np.sqrt(np.sum((q - beta * direction) ** 2, axes)),
                  np.maximum(q_norms - beta, 0.0))
  return {"objective": objective, "gap": gap, "rel_gap": gap / objective,
          "kkt_violation": np.sqrt(np.mean(dist ** 2)) / beta}


def _gate_filters_of(variables, gate_seed):
  """The gate filters of ``variables`` (from their kernel shape, C_in and P); every pass uses it."""
  v = variables["w" if "w" in variables else "v"]
  spatial = v.shape[:-3]
  return gate_filters(gate_seed, spatial, len(spatial), v.shape[-3], v.shape[-2])


@functools.partial(jax.jit, static_argnames=("gate_seed", "refit"))
def _batch_sums(variables, h, skip, y, *, gate_seed, refit):
  """Sums over one batch for ``finalize`` (float32; the caller adds them in float64). ``at_e``,
  ``at_r``: ``A^T e`` and ``A^T r`` (e the residual, r = y - skip), M times minus the data
  gradient at the solution and at zero."""
  u = _gate_filters_of(variables, gate_seed)
  out, transpose = jax.vjp(lambda w: branches(w, h, jnp.float32), variables)
  d = gates(h, u)
  pred = skip + _gated_sum(out, d)
  r, e = y - skip, y - pred
  sign = jnp.array([1.0, -1.0])[:, None, None]
  adjoint = lambda t: transpose(sign * d[..., None, :, None] * t[..., None, None, :])[0]
  both = jax.vmap(adjoint)(jnp.stack([e, r]))
  violation = _cone_violation(out, d)
  layer = to_layer(variables)
  z = relu_features(layer, h, jnp.float32)
  pred_relu = _head(layer, z, skip)
  sums = {"elements": y.size, "pixels": y.size // y.shape[-1],
          "sq_err": jnp.sum(jnp.square(e)), "sq_err_relu": jnp.sum(jnp.square(pred_relu - y)),
          "sq_diff": jnp.sum(jnp.square(pred_relu - pred)),
          "sq_signal": jnp.sum(jnp.square(pred - skip)),
          "violation": jnp.sum(violation), "magnitude": jnp.sum(jnp.abs(out)),
          "at_e": jax.tree.map(lambda a: a[0], both), "at_r": jax.tree.map(lambda a: a[1], both)}
  if refit:
    f = jnp.concatenate([z, jnp.ones(z.shape[:-1] + (1,), z.dtype)], -1)
    f = f.reshape(-1, f.shape[-1])
    sums["gram"] = f.T @ f
    sums["cross"] = f.T @ r.reshape(f.shape[0], -1)
  return sums


@functools.partial(jax.jit, static_argnames="gate_seed")
def _gap_sums(variables, h, skip, y, *, gate_seed):
  """Sums over one batch for ``certificate``: the squared error and ``A^T e`` (one conv and one
  transposed conv of W = V - Z)."""
  u = _gate_filters_of(variables, gate_seed)
  pred, transpose = jax.vjp(lambda w: predict(w, h, skip, u, jnp.float32), variables)
  e = y - pred
  return {"elements": y.size, "sq_err": jnp.sum(jnp.square(e)), "at_e": transpose(e)[0]}


def certificate(variables, feature_batches, *, beta, gate_seed) -> dict:
  """``duality_gap`` of a gated (rho = 0) solution over the training set, in one pass:
  {"objective", "mse", "rel_gap", "kkt_violation"}."""
  vz = {"v": variables["v"], "z": variables["z"]}
  with jax.default_matmul_precision("highest"):
    total = None
    for h, skip, y in feature_batches():
      total = _accumulate(total, _gap_sums(vz, h, skip, y, gate_seed=gate_seed))
  mse = total["sq_err"] / total["elements"]
  cert = duality_gap(vz, jax.tree.map(lambda g: g / total["elements"], total["at_e"]),
                     data=mse / 2, beta=beta)
  return {"objective": float(cert["objective"]), "mse": float(mse),
          "rel_gap": float(cert["rel_gap"]), "kkt_violation": float(cert["kkt_violation"])}


@jax.jit
def _sq_err(layer, h, skip, y):
  return jnp.sum(jnp.square(relu_predict(layer, h, skip, jnp.float32) - y))


def _accumulate(total, sums):
  """``total + sums`` for pytrees of per-batch sums, in float64 NumPy (``total`` None: start)."""
  sums = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(sums))
  return sums if total is None else jax.tree.map(np.add, total, sums)


def _refit(gram, cross, ndim):
  """Least-squares 1x1 head from the normal equations, with a tiny ridge: ``gram`` (F+1, F+1) and
  ``cross`` (F+1, C_out) of the features with a column of ones appended (the bias) against r."""
  ridge = 1e-6 * np.trace(gram) / len(gram) + 1e-30
  w = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross)
  return {"kernel": jnp.asarray(w[:-1].reshape((1,) * ndim + w[:-1].shape), jnp.float32),
          "bias": jnp.asarray(w[-1], jnp.float32)}


# ----------------------------------------------------------------------------------------------
# FISTA as an optax transformation.

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


@functools.partial(jax.jit, static_argnames="gate_seed")
def _adjoint(variables, h, t, *, gate_seed):
  """``A^T t`` summed over one batch: A is the gated conv operator (the prediction minus skip),
  ``t`` (N, *spatial, C_out); ``variables`` only give the shapes."""
  u = _gate_filters_of(variables, gate_seed)
  zero = jnp.zeros_like(t)
  return jax.vjp(lambda w: predict(w, h, zero, u, jnp.float32), variables)[1](t)[0]


@functools.partial(jax.jit, static_argnames="gate_seed")
def _normal_op(variables, h, *, gate_seed):
  """``A^T A w`` summed over one batch."""
  u = _gate_filters_of(variables, gate_seed)
  zero = jnp.zeros(h.shape[:-1] + variables["v"].shape[-1:], jnp.float32)
  out, vjp = jax.vjp(lambda w: predict(w, h, zero, u, jnp.float32), variables)
  return vjp(out)[0]


def _needs_prepare() -> optax.GradientTransformation:
  def fail(*args, **kwargs):
    raise RuntimeError("this convex stage sets its solver up (FISTA's step size, a relative "
                       "beta) in Stage.prepare: call it first")
  return optax.GradientTransformation(fail, fail)


# ----------------------------------------------------------------------------------------------
# The stage.

SOLVERS = ("pfista", "fista", "adam")


def convex_stage(*, features, kernel_size, ndim=2, beta, rho, solver="adam", tx=None, gate_seed=0,
                 out_channels=2, refit_head=False, fista_iters=None, steps_per_epoch=1,
                 relative_beta=False, power_iters=None, metric_samples=64, metric_floor=1e-6,
                 num_examples=None, init="zeros", dtype=jnp.float32,
                 precision=None) -> stage.Stage:
  """The convex layer-wise stage ("layerwise_convex") as a ``stage.Stage``.

  Args:
    features: hidden channels of the mapped ReLU layer, ``2 * P * out_channels``.
    kernel_size, ndim: k and the spatial dimensions (2: NHWC, 3: NDHWC).
    beta: group-lasso weight (> 0); with ``relative_beta`` a fraction of this stage's ``beta_max``
      (found in ``prepare``: each stage's features have their own scale).
    rho: ReLU-cone penalty (>= 0); 0 is the gated-ReLU relaxation.
    solver: "pfista" (FISTA in the metric of the input's patch covariance, ``precond``), "fista"
      or "adam" (``tx``, any rho). The FISTAs take one iteration per epoch, full-batch, rho = 0.
    tx: Adam with the run's schedule; required for "adam", unused by the FISTAs.
    gate_seed: seed of the fixed gate filters (give each stage its own).
    refit_head: let ``finalize`` refit the 1x1 head on the ReLU features by least squares.
    fista_iters: FISTA iterations (the stage's epochs, at most); None: the run's epochs.
    steps_per_epoch: minibatches accumulated into one FISTA gradient
      (``data.steps_per_epoch(n, batch_size, full_pass=True)``).
    power_iters: power-iteration passes for the Lipschitz constant; None: 20 fista, 10 pfista.
    metric_samples: pfista: patches per patch dimension for the covariance; 0: every patch.
    metric_floor: pfista: covariance eigenvalues are clipped below at this fraction of the largest.
    num_examples: pfista: training examples; None: counted in ``prepare`` (one more pass).
    init: "zeros" or "random" (a seeded normal start); both end at the same optimum.
    dtype: compute dtype of the V/Z conv (gates, certificate and refit use float32).
    precision: ``jax.default_matmul_precision`` of the training step's convs; None: the default.

  Returns:
    The stage. With a FISTA its ``tx`` works only after ``prepare``, which returns the stage to
    train and a report ({"beta_max", "beta"}, {"lipschitz"}, {"metric_rows", "metric_clipped"}).
    ``finalize`` reports "objective", "mse", "rel_gap" and "kkt_violation" (rho = 0),
    "constraint_violation", "relu_mismatch" (|pred_relu - pred| / |pred - skip|, may exceed 1),
    "mse_relu", "beta_max", "active_groups" and, with ``refit_head``, "mse_refit" (the returned
    variables then carry the refit head).
  """
  if features % (2 * out_channels):
    raise ValueError(f"features ({features}) must be divisible by 2 * out_channels "
                     f"({2 * out_channels}): one V and one Z neuron per arrangement and output")
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
  if solver != "adam" and rho != 0:
    raise ValueError(f"{solver} solves the gated relaxation (rho = 0) only, got rho = {rho}")
  if solver == "adam" and tx is None:
    raise ValueError("solver='adam' needs tx (Adam with the run's schedule)")
  if init not in ("zeros", "random"):
    raise ValueError(f"init must be 'zeros' or 'random', got {init!r}")
  program = Program(
      num=features // (2 * out_channels), out_channels=out_channels,
      kernel_shape=nets.kernel_shape(kernel_size, ndim), beta=beta, rho=rho, solver=solver,
      gate_seed=gate_seed, refit_head=refit_head, fista_iters=fista_iters,
      steps_per_epoch=steps_per_epoch, relative_beta=relative_beta,
      power_iters=power_iters or (10 if solver == "pfista" else 20),
      metric_samples=metric_samples, metric_floor=metric_floor, num_examples=num_examples,
      init_kind=init, dtype=None if dtype is None else jnp.dtype(dtype), precision=precision)
  # Adam's state does not depend on beta, so the memory planner can compile its real step before
  # ``prepare``; the FISTAs' steps need the data.
  return _stage(program, tx if solver == "adam" else _needs_prepare(),
                prepared=solver == "adam" and not relative_beta)


@dataclasses.dataclass(frozen=True)
class Program:
  """``convex_stage``'s settings, without the data; ``beta`` is absolute once ``relative_beta``
  is False (``_prepare`` makes it so)."""
  num: int  # P, the arrangements (gate filters)
  out_channels: int  # C_out
  kernel_shape: tuple[int, ...]  # (*k)
  beta: float
  rho: float
  solver: str  # one of SOLVERS
  gate_seed: int
  refit_head: bool
  fista_iters: Optional[int]
  steps_per_epoch: int
  relative_beta: bool
  power_iters: int
  metric_samples: int
  metric_floor: float
  num_examples: Optional[int]
  init_kind: str  # "zeros" | "random"
  dtype: Any  # of the V/Z conv (None: that of h)
  precision: Optional[str]  # of the training step's convs (None: the default)

  def shape(self, c_in: int) -> tuple[int, ...]:
    """Shape of V, of Z and of W = V - Z: (*k, C_in, P, C_out)."""
    return self.kernel_shape + (c_in, self.num, self.out_channels)

  def init(self, rng, h_shape):
    """``{"w": W}`` for pfista, else ``{"v": V, "z": Z}``: zeros, or normal with std 1 / sqrt(d)."""
    shape = self.shape(h_shape[-1])
    names = ("w",) if self.solver == "pfista" else ("v", "z")
    if self.init_kind == "zeros":  # One array each: a donated state must not hold one twice.
      return {k: jnp.zeros(shape, jnp.float32) for k in names}
    scale = 1 / math.sqrt(math.prod(shape[:-2]))
    keys = jax.random.split(rng, len(names))
    return {k: scale * jax.random.normal(key, shape, jnp.float32) for k, key in zip(names, keys)}

  def loss(self, variables, h, skip, y, weight=None):
    """The objective at ``precision`` (its gradient too); the FISTAs get its smooth part only
    (their prox handles the group lasso), pfista in W = V - Z."""
    with jax.default_matmul_precision(self.precision):
      return self._loss(variables, h, skip, y, weight)

  def _loss(self, variables, h, skip, y, weight):
    u = _gate_filters_of(variables, self.gate_seed)
    if self.solver == "pfista":
      pred = skip + gated(variables["w"], h, gates(h, u), self.dtype).astype(skip.dtype)
      data = stage.half_mse(pred, y, weight)
      return data, {"mse": 2 * data}
    value, aux = objective(variables, h, skip, y, u, beta=self.beta, rho=self.rho,
                           dtype=self.dtype, weight=weight)
    return (0.5 * aux["mse"] if self.solver == "fista" else value), aux

  def certificate(self, variables, feature_batches):
    """``Stage.certificate``: see ``certificate``."""
    return certificate(variables, feature_batches, beta=self.beta, gate_seed=self.gate_seed)

  def finalize(self, variables, feature_batches):
    """``Stage.finalize``: see ``_finalize``."""
    return _finalize(variables, feature_batches, beta=self.beta, rho=self.rho,
                     gate_seed=self.gate_seed, refit_head=self.refit_head)


def _stage(program: Program, tx: optax.GradientTransformation, *, prepared: bool) -> stage.Stage:
  """The ``stage.Stage`` of ``program`` solved by ``tx``; unless ``prepared``, its ``prepare``
  sets the absolute beta and the FISTAs' steps from the data (``_prepare``)."""
  st = stage.Stage(init=program.init, loss=program.loss, tx=tx, to_layer=to_layer,
                   finalize=program.finalize,
                   certificate=program.certificate if program.rho == 0 else None)
  if program.solver != "adam":
    solution = precond.pfista_solution if program.solver == "pfista" else fista_solution
    st = dataclasses.replace(st, solution=solution, epochs=program.fista_iters, full_pass=True)
  if not prepared:
    st = dataclasses.replace(st, prepare=functools.partial(_prepare, program, tx),
                             abstract_prepare=functools.partial(_abstract_prepare, program, tx))
  return st


def _fista_tx(program: Program, inner: optax.GradientTransformation):
  """``inner`` on the gradient accumulated over an epoch's ``steps_per_epoch`` minibatches."""
  return optax.MultiSteps(inner, every_k_schedule=program.steps_per_epoch
                          ).gradient_transformation()


def _abstract_prepare(program: Program, tx, h_shape) -> stage.Stage:
  """What ``_prepare`` returns, pfista's metric abstract: for the memory planner, never trained."""
  program = dataclasses.replace(program, relative_beta=False)
  if program.solver == "pfista":
    d = math.prod(program.shape(h_shape[-1])[:-2])
    metric = precond.Metric(jax.ShapeDtypeStruct((d, d), jnp.float32),
                            jax.ShapeDtypeStruct((d,), jnp.float32))
    tx = _fista_tx(program, precond.pfista(program.beta, metric))
  elif program.solver == "fista":
    tx = _fista_tx(program, fista(1.0, program.beta))
  return _stage(program, tx, prepared=True)


def _prepare(program: Program, tx, feature_batches, h_shape) -> tuple[stage.Stage, dict]:
  """``Stage.prepare``: ``beta_max`` (one pass, ``relative_beta``), then the FISTAs' Lipschitz
  constant (``power_iters`` passes; pfista's metric first, one pass). Returns (stage, report)."""
  report, shape = {}, program.shape(h_shape[-1])
  with jax.default_matmul_precision("highest"):
    if program.relative_beta:
      report["beta_max"] = _beta_max(feature_batches, shape, program.gate_seed)
      if not report["beta_max"] > 0:  # Else beta = 0 would pass unchecked and divide later.
        raise ValueError(f"convex stage: beta_max = {report['beta_max']} over the training set: "
                         f"its gated features are zero everywhere (an empty previous layer: "
                         f"every group pruned, --beta too large?) or the target equals the skip; "
                         f"there is nothing to fit")
      report["beta"] = program.beta * report["beta_max"]
      program = dataclasses.replace(program, beta=report["beta"], relative_beta=False)
    if program.solver == "fista":
      report["lipschitz"] = _lipschitz(feature_batches, shape, program.gate_seed,
                                       program.power_iters)
      step = 1.0 / (_LIPSCHITZ_MARGIN * report["lipschitz"])
      tx = _fista_tx(program, fista(step, program.beta))
    elif program.solver == "pfista":
      metric, metric_report = _metric(program, feature_batches, shape)
      report.update(metric_report)
      tx = _fista_tx(program, precond.pfista(program.beta, metric))
  return _stage(program, tx, prepared=True), report


def _metric(program: Program, feature_batches, shape) -> tuple[precond.Metric, dict]:
  """pfista's metric ``L_H * margin * (I (x) S)`` in S's eigenbasis, and its report: ``L_H``,
  the patches of the covariance estimate and the eigenvalues of S raised to the floor."""
  d = math.prod(shape[:-2])
  num_examples = program.num_examples or sum(len(h) for h, _, _ in feature_batches())
  rows = (-(-program.metric_samples * d // num_examples) if program.metric_samples
          else np.iinfo(np.int32).max)
  s, count = precond.patch_covariance(feature_batches, program.kernel_shape,
                                      rows_per_example=rows, seed=program.gate_seed)
  basis, lam = precond.factorise(s, program.metric_floor)
  lipschitz = _metric_lipschitz(feature_batches, shape, program.gate_seed, basis, lam,
                                program.power_iters)
  if not lipschitz > 0:
    raise ValueError(f"convex stage: pfista's power iteration found A^T A = 0: {_EMPTY}")
  scale = _LIPSCHITZ_MARGIN * lipschitz * lam
  report = {"lipschitz": lipschitz, "metric_rows": count,
            "metric_clipped": int(np.sum(lam <= program.metric_floor * lam.max()))}
  return precond.Metric(basis.astype(np.float32), scale.astype(np.float32)), report


_EMPTY = ("the stage's gated features are zero everywhere (an empty previous layer: every group "
          "pruned, --beta too large?); there is nothing to fit")


def _beta_max(feature_batches, shape, gate_seed):
  """``max_g |A_g^T r| / M`` over the training set (r = y - skip): the smallest beta at which
  the all-zero point is optimal."""
  zero = {"v": jnp.zeros(shape, jnp.float32), "z": jnp.zeros(shape, jnp.float32)}
  acc, elements = None, 0
  for h, skip, y in feature_batches():
    acc = _accumulate(acc, _adjoint(zero, h, y - skip, gate_seed=gate_seed))
    elements += y.size
  return float(_np_group_norms(acc).max() / elements)


def _normal(feature_batches, w, gate_seed):
  """``A^T A w / M`` over the training set for W = ``w`` (*k, C_in, P, C_out) (the gated
  operator of W = V - Z)."""
  acc, elements = None, 0
  vz = {"v": w, "z": jnp.zeros_like(w)}
  for h, skip, _ in feature_batches():
    g = _normal_op(vz, h, gate_seed=gate_seed)["v"]
    acc = g if acc is None else acc + g
    elements += skip.size
  return acc / elements


def _lipschitz(feature_batches, shape, gate_seed, iters):
  """Largest eigenvalue of ``A^T A / M`` over the training set by power iteration, from a
  seeded start (deterministic, as ``Stage.prepare`` must be)."""
  start = np.random.default_rng((gate_seed, 1)).standard_normal((2,) + shape, dtype=np.float32)
  w = {"v": jnp.asarray(start[0]), "z": jnp.asarray(start[1])}
  lipschitz = 0.0
  for _ in range(iters):
    norm = optax.tree_utils.tree_norm(w)
    if not norm > 0:  # A^T A w = 0 for a random w: no features (an empty previous layer).
      raise ValueError(f"convex stage: FISTA's power iteration found A^T A = 0: {_EMPTY}")
    # A = [A_W, -A_W] on (V, Z): A^T A (v, z) = (K (v - z), -K (v - z)).
    g = _normal(feature_batches, (w["v"] - w["z"]) / norm, gate_seed)
    w = {"v": g, "z": -g}
    # |A^T A w| / M with |w| = 1: a lower bound on L.
    lipschitz = float(optax.tree_utils.tree_norm(w))
  return lipschitz


def _metric_lipschitz(feature_batches, shape, gate_seed, basis, lam, iters):
  """``L_H``, the largest eigenvalue of ``S^-1 K`` (K = A^T A / M on W, S = Q diag(lam) Q^T), by
  seeded power iteration in S's basis: the last Rayleigh quotient, a lower bound."""
  q = jnp.asarray(basis, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)[:, None]
  v = jnp.asarray(np.random.default_rng((gate_seed, 1)).standard_normal(
      (len(lam), shape[-2] * shape[-1]), dtype=np.float32))
  quotient = 0.0
  for _ in range(iters):
    v = v / jnp.sqrt(jnp.sum(lam * v * v))  # unit length in the metric
    kw = _normal(feature_batches, jnp.matmul(q, v).reshape(shape), gate_seed)
    kv = jnp.matmul(q.T, kw.reshape(v.shape))
    quotient = float(jnp.sum(v * kv))
    if not quotient > 0:
      return quotient
    v = kv / lam
  return quotient


def _finalize(variables, feature_batches, *, beta, rho, gate_seed, refit_head):
  """``Stage.finalize``: certificate, ReLU mismatch and the optional head refit (see
  ``convex_stage``); one pass over the training set, two with the refit."""
  vz = {"v": variables["v"], "z": variables["z"]}
  ndim = vz["v"].ndim - 3
  with jax.default_matmul_precision("highest"):
    total = None
    for h, skip, y in feature_batches():
      total = _accumulate(total, _batch_sums(vz, h, skip, y, gate_seed=gate_seed,
                                             refit=refit_head))
    mse = total["sq_err"] / total["elements"]
    norms = _np_group_norms(vz)
    report = {
        "objective": objective_value(mse / 2, norms.sum(), total["violation"] / total["pixels"],
                                     beta=beta, rho=rho),
        "mse": mse,
        "constraint_violation": total["violation"] / max(total["magnitude"], 1e-30),
        "relu_mismatch": np.sqrt(total["sq_diff"] / max(total["sq_signal"], 1e-30)),
        "mse_relu": total["sq_err_relu"] / total["elements"],
        "beta_max": _np_group_norms(total["at_r"]).max() / total["elements"],
        "active_groups": np.sum(norms > NEAR_ZERO * norms.max())}
    if rho == 0:
      # With rho > 0 the multipliers of the active cone constraints are unknown, and the gap of
      # a dual point built from the gradient stays loose: only the gated program gets one.
      cert = duality_gap(vz, jax.tree.map(lambda g: g / total["elements"], total["at_e"]),
                         data=mse / 2, beta=beta)
      report.update(rel_gap=cert["rel_gap"], kkt_violation=cert["kkt_violation"])
    if refit_head:
      vz["head"] = _refit(total["gram"], total["cross"], ndim)
      layer = to_layer(vz)
      sq = sum(float(_sq_err(layer, h, skip, y)) for h, skip, y in feature_batches())
      report["mse_refit"] = sq / total["elements"]
  return vz, {k: float(v) for k, v in report.items()}
