"""The convex stage's gated-ReLU program: gates, conv, objective, mapping to a ReLU layer.

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
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lwjax import nets
from lwjax import stages as stage


# ----------------------------------------------------------------------------------------------
# The model.

def gate_filters(seed: int, kernel_size, ndim: int, c_in: int, num: int) -> np.ndarray:
  """The fixed gate filters ``U``: (*k, c_in, num) i.i.d. standard normal float32, from ``seed``.

  NumPy: the same on every backend, and a constant in a jitted loss (threefry would be traced
  into, and compiled with, every step).
  """
  shape = nets.kernel_shape(kernel_size, ndim) + (c_in, num)
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def whiten(u, basis, lam) -> np.ndarray:
  """Gate filters ``u`` (*k, C_in, P) whitened by the patch covariance ``S = Q diag(lam) Q^T``
  (``basis`` Q (d, d), ``lam`` (d,) > 0): ``S^-1/2 u``, float32.

  Gaussian filters of smooth inputs give near-duplicate gates that follow the patches' low
  frequencies; whitened ones weigh every direction of the input equally, so the gates are close
  to independent and the program far better conditioned (BUILD_NOTES.md, the certified stage).
  """
  flat = np.asarray(u, np.float64).reshape(len(lam), -1)
  q = np.asarray(basis, np.float64)
  return ((q / np.sqrt(np.asarray(lam, np.float64))) @ (q.T @ flat)).reshape(u.shape).astype(
      np.float32)


def conv(h, kernel, dtype=None):
  """SAME, stride-1 conv without bias: (N, *spatial, I) x (*k, I, O) -> (N, *spatial, O) float32.

  Runs in ``dtype`` (default: ``h``'s) with its output in ``dtype`` too, as flax's layers do, then
  widens it: a float32 result from bf16 operands is not a cuDNN bf16 conv (BUILD_NOTES.md, speed).
  Its kernel gradient is ``filter_gradient`` (on the CPU, no transposed copy of a wide h), at
  the matmul precision in effect here.
  """
  return _conv((dtype or h.dtype, jax.config.jax_default_matmul_precision), h, kernel)


def _conv_value(dtype, h, kernel, padding="SAME"):
  ndim = h.ndim - 2
  sp = "DHW"[3 - ndim:]
  out = jax.lax.conv_general_dilated(
      h.astype(dtype), kernel.astype(dtype), (1,) * ndim, padding,
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


def gated_sum(out, d):
  """``sum_p D_p (conv(h, V_p) - conv(h, Z_p))`` from ``branches`` and ``gates``."""
  return jnp.sum(d[..., None] * (out[..., 0, :, :] - out[..., 1, :, :]), axis=-2)


def gated(w, h, d, dtype=None):
  """``sum_p D_p conv(h, W_p)``: (N, *spatial, C_out) for W (*k, C_in, P, C_out) and gates ``d``
  (N, *spatial, P). The gated program sees only W = V - Z: half the channels of ``branches``."""
  p, c = w.shape[-2:]
  out = conv(h, w.reshape(w.shape[:-2] + (p * c,)), dtype)
  return jnp.sum(d[..., None] * out.reshape(out.shape[:-1] + (p, c)), axis=-2)


def filter_gradient(h, t, kernel_shape, dtype=None):
  """``sum_{n, x} patch(h)[n, x, k, i] * t[n, x, o]``: the gradient in the kernel of
  ``conv(h, K, dtype)`` for the output cotangent ``t`` (N, *spatial, O); (*k, I, O) float32.

  The batched transposed conv of autodiff, except on the CPU where h has more channels than t:
  there one example at a time (``_filter_gradient_by_example``).
  """
  dtype = dtype or h.dtype
  h, t = h.astype(dtype), t.astype(dtype)
  kernel_shape = tuple(kernel_shape)
  batched = functools.partial(_filter_gradient_batched, kernel_shape)
  if h.shape[-1] <= t.shape[-1]:
    return batched(h, t)
  return jax.lax.platform_dependent(
      h, t, cpu=functools.partial(_filter_gradient_by_example, kernel_shape), default=batched)


def _filter_gradient_batched(kernel_shape, h, t):
  kernel = jax.ShapeDtypeStruct(kernel_shape + (h.shape[-1], t.shape[-1]), h.dtype)
  grad, = jax.linear_transpose(lambda k: _conv_value(h.dtype, h, k), kernel)(
      t.astype(jnp.float32))
  return grad.astype(jnp.float32)


def _filter_gradient_by_example(kernel_shape, h, t):
  """XLA's CPU conv wants the contracted axis innermost, so the batched gradient copies h and t
  transposed (N innermost): for a wide h one more stage input per example. Here each example
  is one conv with t_n (O, *s, 1) as its input (a transposed copy of one example of the
  narrower operand) and h_n (*s, 1, I) as its kernel, as it lies in memory. That correlates
  the other way round: the result has its spatial axes reversed, for the forward pads swapped.
  """
  ndim = h.ndim - 2
  pads = jax.lax.padtype_to_pads(h.shape[1:-1], kernel_shape, (1,) * ndim, "SAME")

  def add_example(total, example):
    hn, tn = example  # (*s, I), (*s, O)
    out = _conv_value(h.dtype, jnp.moveaxis(tn, -1, 0)[..., None], hn[..., None, :],
                      [(hi, lo) for lo, hi in pads])  # (O, *k reversed, I)
    return total + out, None

  zero = jnp.zeros((t.shape[-1],) + kernel_shape + (h.shape[-1],), jnp.float32)
  total, _ = jax.lax.scan(add_example, zero, (h, t))
  total = jnp.flip(total, axis=tuple(range(1, ndim + 1)))
  return jnp.moveaxis(total, 0, -1)  # (*k, I, O)


# ``how`` = (dtype, matmul precision): the backward pass is traced after the caller's precision
# context has closed, so it carries the precision the forward pass saw.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(how, h, kernel):
  return _conv_value(how[0], h, kernel)


def _conv_fwd(how, h, kernel):
  return _conv_value(how[0], h, kernel), (h, kernel)


def _conv_bwd(how, res, g):
  (dtype, precision), (h, kernel) = how, res
  with jax.default_matmul_precision(precision):
    grad_k = filter_gradient(h, g, kernel.shape[:-2], dtype).astype(kernel.dtype)
    # h's cotangent (XLA drops it where, as for a stage's frozen input, nothing needs it).
    grad_h, = jax.linear_transpose(lambda x: _conv_value(dtype, x, kernel), h)(g)
  return grad_h, grad_k


_conv.defvjp(_conv_fwd, _conv_bwd)


def cone_violation(out, d):
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
  violation = jnp.sum(cone_violation(out, d))
  return {"data": stage.half_mse(skip + gated_sum(out, d), y, weight),
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


def head_predict(layer, z, skip):
  """``skip + head(z)``: the 1x1 head of a ``to_layer`` layer on features z (N, *spatial, F)."""
  w = layer["head"]["kernel"]  # (1, ..., F, C_out)
  return skip + (z @ w.reshape(w.shape[-2:]) + layer["head"]["bias"]).astype(skip.dtype)


def relu_predict(layer, h, skip, dtype=None):
  """The two-layer ReLU net ``f(relu(g(h))) + skip`` of a ``to_layer`` layer."""
  return head_predict(layer, relu_features(layer, h, dtype), skip)
