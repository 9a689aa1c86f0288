"""SENSE encoding operator, its adjoint and CG-SENSE.

Shapes: image ``x`` (..., H, W) complex, coil maps ``maps`` (..., C, H, W), k-space ``y``
(..., C, H, W), sampling ``mask`` broadcastable to (H, W). Every function takes NumPy or JAX arrays
and returns the same kind (JAX if any argument is a JAX array), so the host pipeline and the jitted
unrolled network share this code.
"""
import jax
import numpy as np

from lwjax.mri.fft import array_module, fft2c, ifft2c


def to_channels(z):
  """(...) complex image -> (..., 2) float32 (real, imaginary): the networks' representation."""
  xp = array_module(z)
  return xp.stack([xp.real(z), xp.imag(z)], axis=-1).astype(xp.float32)


def to_complex(x):
  """(..., 2) real/imaginary channels -> (...) complex64 (each part exactly, infinities too)."""
  if isinstance(x, jax.Array):
    return jax.lax.complex(x[..., 0].astype(np.float32), x[..., 1].astype(np.float32))
  out = np.empty(x.shape[:-1], np.complex64)
  out.real, out.imag = x[..., 0], x[..., 1]
  return out


def forward(x, maps, mask):
  """``A x = mask * fft2c(maps * x)``: image (..., H, W) -> coil k-space (..., C, H, W)."""
  return mask * fft2c(maps * x[..., None, :, :])


def adjoint(y, maps, mask):
  """``A^H y = sum_c conj(maps_c) * ifft2c(mask * y_c)``: (..., C, H, W) -> (..., H, W)."""
  xp = array_module(y, maps, mask)
  return xp.sum(xp.conj(maps) * ifft2c(mask * y), axis=-3)


def zero_filled(kspace, maps, mask):
  """SENSE zero-filled image (..., H, W) of the coil k-space (..., C, H, W)."""
  return adjoint(kspace, maps, mask)


def normal(x, maps, mask, lam=0.0):
  """``(A^H A + lam I) x`` for an image x (..., H, W)."""
  return adjoint(forward(x, maps, mask), maps, mask) + lam * x


def _dot(xp, a, b):
  """Per-image real inner product Re<a, b> over (H, W), shaped (..., 1, 1) to broadcast."""
  return xp.real(xp.sum(xp.conj(a) * b, axis=(-2, -1), keepdims=True))


def _ratio(xp, num, den, ok):
  """num / den where ``ok``, else 0; the double ``where`` keeps gradients finite where not ok."""
  return xp.where(ok, num / xp.where(ok, den, 1), 0)


def cg_sense(kspace, maps, mask, *, lam=0.0, x0=None, iters=10):
  """Solves ``(A^H A + lam I) x = A^H y + lam x0`` by ``iters`` conjugate-gradient steps.

  Each image of the batch is its own system. Starts from ``x0`` (default zeros): with ``lam > 0``
  the MoDL data-consistency step around a prior ``x0``. A fixed iteration count, so it jits and
  differentiates. Returns the image (..., H, W).
  """
  xp = array_module(kspace, maps, mask, x0)
  b = adjoint(kspace, maps, mask)
  if x0 is None:
    x = xp.zeros_like(b)
  else:
    x = x0 + xp.zeros_like(b)  # broadcast x0 to the batch shape of b
    b = b + lam * x0
  r = b - normal(x, maps, mask, lam)
  # Unit initial residual, and no steps below eps of it: a converged float32 CG would underflow
  # the squared residuals, and the step ratios' gradients (num / den^2) would be NaN.
  rs = _dot(xp, r, r)
  started = rs > 0
  scale = xp.where(started, xp.sqrt(xp.where(started, rs, 1)), 1)
  x, r = x / scale, r / scale
  rs = started.astype(rs.dtype)
  tiny = xp.finfo(rs.dtype).eps ** 2

  def step(_, state):
    x, r, p, rs = state
    ap = normal(p, maps, mask, lam)
    pap = _dot(xp, p, ap)
    active = rs > tiny
    alpha = _ratio(xp, rs, pap, active & (pap > 0))
    x = x + alpha * p
    r = r - alpha * ap
    rs_new = _dot(xp, r, r)
    return x, r, r + _ratio(xp, rs_new, rs, active) * p, rs_new

  state = (x, r, r, rs)
  if xp is np:
    for i in range(iters):
      state = step(i, state)
  else:  # one traced step, not ``iters`` copies: compile time does not grow with ``iters``
    state = jax.lax.fori_loop(0, iters, step, state)
  return state[0] * scale
