"""The convex stage's certificate (duality gap, KKT residual) and ``finalize`` (ReLU mismatch,
head refit): sums over the training set, added in float64 NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lwjax.stages.gated import (branches, cone_violation, gated_sum, gates, head_predict,
                                objective_value, predict, relu_features, relu_predict, to_layer)

# Groups below this fraction of the largest group norm count as zero in the KKT check: Adam never
# reaches exact zeros, and the direction of a vanishing group carries no information.
NEAR_ZERO = 1e-3


def _np_groups(tree):
  """``{"v", "z"}`` stacked as (2, *k, C_in, P, C_out) float64 NumPy."""
  return np.stack([np.asarray(jax.device_get(tree[k]), np.float64) for k in ("v", "z")])


def np_group_norms(tree):
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


@functools.partial(jax.jit, static_argnames="refit")
def _batch_sums(variables, h, skip, y, u, *, refit):
  """Sums over one batch for ``finalize`` (float32; the caller adds them in float64), ``u`` the
  gate filters. ``at_e``, ``at_r``: ``A^T e`` and ``A^T r`` (e the residual, r = y - skip), M
  times minus the data gradient at the solution and at zero."""
  out, transpose = jax.vjp(lambda w: branches(w, h, jnp.float32), variables)
  d = gates(h, u)
  pred = skip + gated_sum(out, d)
  r, e = y - skip, y - pred
  sign = jnp.array([1.0, -1.0])[:, None, None]
  adjoint = lambda t: transpose(sign * d[..., None, :, None] * t[..., None, None, :])[0]
  both = jax.vmap(adjoint)(jnp.stack([e, r]))
  violation = cone_violation(out, d)
  layer = to_layer(variables)
  z = relu_features(layer, h, jnp.float32)
  pred_relu = head_predict(layer, z, skip)
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


@jax.jit
def _gap_sums(variables, h, skip, y, u):
  """Sums over one batch for ``certificate``: the squared error and ``A^T e`` (one conv and one
  transposed conv of W = V - Z; ``u`` the gate filters)."""
  pred, transpose = jax.vjp(lambda w: predict(w, h, skip, u, jnp.float32), variables)
  e = y - pred
  return {"elements": y.size, "sq_err": jnp.sum(jnp.square(e)), "at_e": transpose(e)[0]}


def certificate(variables, feature_batches, *, beta, u) -> tuple[dict, np.ndarray]:
  """``duality_gap`` of a gated (rho = 0) solution, gate filters ``u``, over the training set in
  one pass, at full float32 precision: ({"objective", "mse", "rel_gap", "kkt_violation"}, the
  data term's gradient in W = V - Z (*k, C_in, P, C_out) float64, which the pass computes anyway).
  """
  vz = {"v": variables["v"], "z": variables["z"]}
  with jax.default_matmul_precision("highest"):
    total = None
    for h, skip, y in feature_batches():
      total = accumulate(total, _gap_sums(vz, h, skip, y, u))
  mse = total["sq_err"] / total["elements"]
  neg_grad = jax.tree.map(lambda g: g / total["elements"], total["at_e"])
  cert = duality_gap(vz, neg_grad, data=mse / 2, beta=beta)
  return ({"objective": float(cert["objective"]), "mse": float(mse),
           "rel_gap": float(cert["rel_gap"]), "kkt_violation": float(cert["kkt_violation"])},
          -neg_grad["v"])


@jax.jit
def _sq_err(layer, h, skip, y):
  return jnp.sum(jnp.square(relu_predict(layer, h, skip, jnp.float32) - y))


def accumulate(total, sums):
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


def finalize_pass(variables, feature_batches, *, beta, rho, u, refit_head):
  """``Stage.finalize``: certificate, ReLU mismatch and the optional head refit (see
  ``convex_stage``); one pass over the training set, two with the refit."""
  vz = {"v": variables["v"], "z": variables["z"]}
  ndim = vz["v"].ndim - 3
  with jax.default_matmul_precision("highest"):
    total = None
    for h, skip, y in feature_batches():
      total = accumulate(total, _batch_sums(vz, h, skip, y, u, refit=refit_head))
    mse = total["sq_err"] / total["elements"]
    norms = np_group_norms(vz)
    report = {
        "objective": objective_value(mse / 2, norms.sum(), total["violation"] / total["pixels"],
                                     beta=beta, rho=rho),
        "mse": mse,
        "constraint_violation": total["violation"] / max(total["magnitude"], 1e-30),
        "relu_mismatch": np.sqrt(total["sq_diff"] / max(total["sq_signal"], 1e-30)),
        "mse_relu": total["sq_err_relu"] / total["elements"],
        "beta_max": np_group_norms(total["at_r"]).max() / total["elements"],
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
