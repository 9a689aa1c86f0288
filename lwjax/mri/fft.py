"""Centred orthonormal FFTs for NumPy and JAX arrays.

k-space and image arrays are (..., H, W) with the DC sample and the image centre at index
(H // 2, W // 2): ``fft2c(x) = fftshift(fftn(ifftshift(x), norm="ortho"))`` over the chosen axes.
"""
import jax
import jax.numpy as jnp
import numpy as np


def array_module(*xs):
  """``jax.numpy`` if any argument is a JAX array (or tracer), else ``numpy``."""
  return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def fft2c(x, axes=(-2, -1)):
  """Centred orthonormal FFT over ``axes`` (any number of them): image -> k-space."""
  xp = array_module(x)
  return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"),
                         axes=axes)


def ifft2c(x, axes=(-2, -1)):
  """Centred orthonormal inverse FFT over ``axes``: k-space -> image."""
  xp = array_module(x)
  return xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"),
                         axes=axes)


def center_slices(shape, size):
  """Slices selecting the centred ``size`` block of a grid ``shape``: start ``n // 2 - s // 2`` per
  axis, so the centre index ``n // 2`` maps to ``s // 2`` (crop and zero-pad both use it)."""
  return tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(shape, size))
