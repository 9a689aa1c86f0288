"""FISTA in the metric of a convex stage's patch covariance: the solver that certifies a stage.

The gated program is a group lasso in ``W = V - Z`` whose Gram matrix is as ill-conditioned as
the patch covariance of the stage input (DESIGN.md section 2b). FISTA in the fixed metric
``H = L * ((I_P + c 1 1^T) (x) I_C_out (x) S)``, ``S = Q diag(lam) Q^T`` the patch covariance,
converges at the rate of the far better conditioned ``H^-1/2 K H^-1/2``. With c = 0 the metric is
diagonal in the basis Q, so each group's prox in it is exact (``metric_prox``) and the iteration
is elementwise. c = 1 also takes out the gates' common mode: P gates, each open on about half the
pixels and independent of the others, couple the groups as ``(I + 1 1^T) / 4``. Its prox
(``coupled_prox``) couples the P groups of an output channel through their sum only: a few
diagonal Newton steps on a (d, C_out) dual variable, warm-started from the last pass.

Shapes: ``d = prod(k) * C_in`` (one patch), G groups = P * C_out; W flattened to (d, G), column
``p * C_out + c`` for gate p and output c.
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class Metric(NamedTuple):
  """The metric ``(I_P + coupling 1 1^T) (x) I (x) basis @ diag(scale) @ basis.T`` of one stage
  (arrays, or ShapeDtypeStructs for the memory planner): ``basis`` (d, d) orthonormal, ``scale``
  (d,) > 0, ``coupling`` >= 0 (0: separable by group)."""
  basis: Any
  scale: Any
  coupling: float = 0.0


# ----------------------------------------------------------------------------------------------
# The metric from the data.

def patch_rows(num_pixels: int, rows: int, example: int, seed: int) -> np.ndarray:
  """The pixels (flat indices, sorted) of one example whose patches enter the covariance:
  ``rows`` drawn without replacement, seeded by (seed, example); all of them when rows >= pixels."""
  if rows >= num_pixels:
    return np.arange(num_pixels)
  return np.sort(np.random.default_rng((seed, example)).choice(num_pixels, rows, replace=False))


@functools.partial(jax.jit, static_argnames="kernel_shape")
def _patch_gram(h, rows, kernel_shape):
  """``X^T X`` of the k x k patches of ``h`` (N, *spatial, C) at ``rows`` (R, 1 + ndim): example
  and position of each patch; X (R, d) ordered like a conv kernel (*k, C) flattened. Float32."""
  ndim = len(kernel_shape)
  hp = jnp.pad(h.astype(jnp.float32), [(0, 0)] + [(k // 2, k // 2) for k in kernel_shape]
               + [(0, 0)])
  offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel_shape], indexing="ij"),
                     -1).reshape(-1, ndim)
  pos = rows[:, None, 1:] + offsets[None]  # (R, prod(k), ndim): SAME padding puts patch i at i
  x = hp[(rows[:, None, 0],) + tuple(pos[..., a] for a in range(ndim))].reshape(len(rows), -1)
  return jnp.matmul(x.T, x, precision=_HIGHEST)


def patch_covariance(feature_batches: Callable, kernel_shape: tuple[int, ...], *,
                     rows_per_example: int, seed: int) -> tuple[np.ndarray, int]:
  """``S = X^T X / R`` (d, d) float64 over ``rows_per_example`` patches of every example of the
  stage input (all of its pixels when that is at least as many); returns (S, R)."""
  total, count, example = None, 0, 0
  for h, _, _ in feature_batches():
    spatial = h.shape[1:-1]
    picks = []
    for i in range(len(h)):
      flat = patch_rows(int(np.prod(spatial)), rows_per_example, example + i, seed)
      picks.append(np.column_stack([np.full(len(flat), i)] + list(np.unravel_index(flat, spatial))))
    rows = np.concatenate(picks).astype(np.int32)
    gram = _patch_gram(h, jnp.asarray(rows), tuple(kernel_shape))
    total = gram if total is None else total + gram  # summed on the device: one copy at the end
    count += len(rows)
    example += len(h)
  return np.asarray(jax.device_get(total), np.float64) / count, count


# Above this patch dimension the eigendecomposition runs on the accelerator in float32 (NumPy's
# float64 one grows as d^3 on the host CPU).
_HOST_EIGH_MAX = 2048


def factorise(s: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
  """``S = Q diag(lam) Q^T``: (Q (d, d), lam (d,)), eigenvalues clipped below at ``floor`` times
  the largest (the null space of a rank-deficient S gets a finite metric)."""
  if len(s) <= _HOST_EIGH_MAX:
    lam, q = np.linalg.eigh(s)
  else:
    lam, q = (np.asarray(a, np.float64) for a in jnp.linalg.eigh(jnp.asarray(s, jnp.float32)))
  lam = np.maximum(lam, floor * lam.max())
  return q, lam


# ----------------------------------------------------------------------------------------------
# The prox and the solver.

def _shrink(z, a, beta, iters: int = 48):
  """The factor f (d, G) of ``metric_prox(z, a, beta) = f * z``: per column,
  ``f_i = a_i s / (a_i s + beta)`` (0 where ``|a z| <= beta``), ``s`` the root of
  ``sum_i (a_i z_i)^2 / (a_i s + beta)^2 = 1`` (decreasing in s), which lies in
  ``[(|a z| - beta) / max a, (|a z| - beta) / min a]``: found by bisection on log s."""
  b = a[:, None] * z
  nb = jnp.sqrt(jnp.sum(b * b, axis=0))
  excess = jnp.maximum(nb - beta, 0.0)
  lo = excess / jnp.max(a)
  hi = excess / jnp.min(a)
  tiny = jnp.finfo(z.dtype).tiny

  def bisect(_, bounds):
    lo, hi = bounds
    mid = jnp.sqrt(jnp.maximum(lo, tiny)) * jnp.sqrt(hi)
    above = jnp.sum(jnp.square(b / (a[:, None] * mid + beta)), axis=0) > 1  # root above mid
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, bisect, (lo, hi))
  s = jnp.sqrt(jnp.maximum(lo, tiny)) * jnp.sqrt(hi)
  return jnp.where(nb > beta, a[:, None] * s / (a[:, None] * s + beta), 0.0)


def metric_prox(z, a, beta):
  """Per column g of ``z`` (d, G): ``argmin_u 0.5 (u - z)^T diag(a) (u - z) + beta |u|``
  (``_shrink``)."""
  return _shrink(z, a, beta) * z


def _common(v, num: int):
  """(d, P * C_out) -> (d, C_out): the sum over the P gates of each output channel."""
  return v.reshape(v.shape[0], num, -1).sum(axis=1)


def _spread(m, num: int):
  """(d, C_out) -> (d, P * C_out): ``m`` repeated for each of the P gates."""
  return jnp.tile(m, (1, num))


def metric_dot(v, w, scale, coupling: float, num: int):
  """``<v, w>`` in the metric ``diag(scale) (x) (I_P + coupling 1 1^T)``; v, w (d, P * C_out)."""
  out = jnp.sum(scale[:, None] * v * w)
  if coupling:
    out = out + coupling * jnp.sum(scale[:, None] * _common(v, num) * _common(w, num))
  return out


def metric_solve(g, scale, coupling: float, num: int):
  """``H^-1 g`` for ``H = diag(scale) (x) (I_P + coupling 1 1^T)`` (Sherman-Morrison in P)."""
  if coupling:
    g = g - coupling / (1 + num * coupling) * _spread(_common(g, num), num)
  return g / scale[:, None]


COUPLED_ITERS = 8  # diagonal Newton steps of ``coupled_prox`` per pass


def coupled_prox(z, a, beta, coupling: float, num: int, nu, iters: int = COUPLED_ITERS):
  """``argmin_u beta sum_g |u_g| + 0.5 |u - z|^2_H``, ``H = diag(a) (x) (I_P + c 1 1^T)``, from
  the dual ``nu`` (d, C_out) of the coupling term; returns (u, nu).

  ``(c/2) |sum_p (u_p - z_p)|_a^2 = max_nu <nu, sum_p (u_p - z_p)> - |nu|_{1/a}^2 / (2c)``; for a
  fixed nu each group's prox is ``metric_prox(z - nu / a)``, and nu solves
  ``nu = c a sum_p (u_p - z_p)``: each step is Newton's on that equation with the groups'
  Jacobians kept to their diagonals ``f_p / a`` (``_shrink``). Exact in one step when every
  group is zero or beta = 0; the certificate does not depend on how well it converges.
  """
  def shifted(nu):
    return z - _spread(nu, num) / a[:, None]

  def step(_, nu):
    v = shifted(nu)
    f = _shrink(v, a, beta)
    residual = coupling * a[:, None] * _common(f * v - z, num) - nu
    return nu + residual / (1 + coupling * _common(f, num))

  nu = jax.lax.fori_loop(0, iters, step, nu)
  return metric_prox(shifted(nu), a, beta), nu


class PfistaState(NamedTuple):
  x: jax.Array  # (d, G) the iterate x_k in the metric's basis: the stage's solution
  y: jax.Array  # (d, G) the extrapolated point y_k in the basis (the params hold basis @ y_k)
  t: jax.Array  # momentum parameter t_k
  basis: jax.Array  # (d, d) Q
  scale: jax.Array  # (d,) the metric in the basis: L_H * eigenvalues of S
  nu: jax.Array  # (d, C_out) the dual of the coupling term in the last prox (zeros: c = 0)


def _flat(w):
  """W (*k, C_in, P, C_out) as (d, G)."""
  return w.reshape(-1, w.shape[-2] * w.shape[-1])


def _materialize(a):
  """An array of the metric; zeros for a ShapeDtypeStruct (the planner traces shapes only)."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jnp.zeros(a.shape, a.dtype)
  return jnp.asarray(a, jnp.float32)


def pfista(beta: float, metric: Optional[Metric]) -> optax.GradientTransformation:
  """Accelerated proximal gradient in ``metric`` with adaptive restart, on params ``{"w": W}``
  (other entries, such as the convex stage's reference point, stay as they are).

  One update: ``z = y - H^-1 Q^T grad`` (``metric_solve``), ``x+`` its prox in H
  (``metric_prox``, or ``coupled_prox`` when the metric couples the gates), momentum; the params
  move to ``Q y+``. Its state holds the metric (``init`` needs it; ``update`` reads it from the
  state), so a resumed stage continues in the very metric it started in.
  """
  def init_fn(params):
    if metric is None:
      raise RuntimeError("this convex stage builds its metric from the data in Stage.prepare: "
                         "call it first")
    basis, scale = _materialize(metric.basis), _materialize(metric.scale)
    y = jnp.matmul(basis.T, _flat(params["w"]), precision=_HIGHEST)
    nu = jnp.zeros((len(y), params["w"].shape[-1]), jnp.float32)
    return PfistaState(x=y, y=jnp.copy(y), t=jnp.ones([], jnp.float32), basis=basis, scale=scale,
                       nu=nu)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("pfista needs the params in update()")
    g = jnp.matmul(state.basis.T, _flat(grads["w"]), precision=_HIGHEST)
    a, c, num = state.scale, metric.coupling, params["w"].shape[-2]
    z = state.y - metric_solve(g, a, c, num)
    if c:
      x, nu = coupled_prox(z, a, beta, c, num, state.nu)
    else:
      x, nu = metric_prox(z, a, beta), state.nu
    dx = x - state.x
    # Gradient restart (O'Donoghue & Candes 2015) in the metric: drop the momentum once it
    # points uphill.
    uphill = metric_dot(state.y - x, dx, a, c, num) > 0
    t = jnp.where(uphill, 1.0, state.t)
    t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
    y = x + (t - 1) / t_next * dx
    w = jnp.matmul(state.basis, y, precision=_HIGHEST).reshape(params["w"].shape)
    updates = {**jax.tree.map(jnp.zeros_like, params), "w": w - params["w"]}  # "ref": unchanged
    return updates, state._replace(x=x, y=y, t=t_next, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def pfista_solution(variables, opt_state):
  """The iterate ``x_k`` of the ``PfistaState`` in ``opt_state`` as ``{"v": W / 2, "z": -W / 2}``:
  the gated program only sees V - Z, and the even split keeps ``to_layer``'s +-1 head and the
  head refit's ``relu(+-u)`` features as for FISTA from zero."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PfistaState))
           if isinstance(s, PfistaState)]
  if len(found) != 1:
    raise ValueError(f"expected one PfistaState in the optimizer state, found {len(found)}")
  state = found[0]
  w = jnp.matmul(state.basis, state.x, precision=_HIGHEST).reshape(variables["w"].shape)
  return {"v": w / 2, "z": -w / 2}
