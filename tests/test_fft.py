"""Centred orthonormal FFTs: conventions checked against closed forms and float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.mri.fft import array_module, center_slices, fft2c, ifft2c


def _random(shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (3, 6, 10)])
def test_round_trip_and_parseval(shape):
  x = _random(shape)
  np.testing.assert_allclose(ifft2c(fft2c(x)), x, atol=1e-12)
  np.testing.assert_allclose(fft2c(ifft2c(x)), x, atol=1e-12)
  # Orthonormal per 2D image: energy is kept slice by slice.
  np.testing.assert_allclose(np.sum(np.abs(fft2c(x)) ** 2, axis=(-2, -1)),
                             np.sum(np.abs(x) ** 2, axis=(-2, -1)), rtol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9)])
def test_matches_unnormalised_numpy(shape):
  x = _random(shape)
  ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x))) / np.sqrt(x.size)
  np.testing.assert_allclose(fft2c(x), ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9)])
@pytest.mark.parametrize("shift", [(0, 0), (1, -2), (-3, 2)])
def test_closed_forms(shape, shift):
  """A delta at centre + shift has k-space exp(-2 pi i k.shift / N) / sqrt(HW), k centred."""
  h, w = shape
  (a, b), delta = shift, np.zeros(shape, complex)
  delta[h // 2 + a, w // 2 + b] = 1
  ky, kx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
  expected = np.exp(-2j * np.pi * (ky * a / h + kx * b / w)) / np.sqrt(h * w)
  np.testing.assert_allclose(fft2c(delta), expected, atol=1e-12)
  # ... and the inverse maps that plane wave back to the delta.
  np.testing.assert_allclose(ifft2c(expected), delta, atol=1e-12)


def test_axes_3d():
  x = _random((2, 4, 6, 8))
  axes = (-3, -2, -1)
  ref = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes), axes=axes), axes) / np.sqrt(192)
  np.testing.assert_allclose(fft2c(x, axes=axes), ref, atol=1e-12)
  np.testing.assert_allclose(ifft2c(fft2c(x, axes=axes), axes=axes), x, atol=1e-12)


def test_numpy_and_jax_agree():
  x = _random((3, 8, 6)).astype(np.complex64)
  for f in (fft2c, ifft2c):
    out_np, out_jax = f(x), f(jnp.asarray(x))
    assert isinstance(out_np, np.ndarray) and isinstance(out_jax, jax.Array)
    assert out_np.dtype == out_jax.dtype == np.complex64
    np.testing.assert_allclose(np.asarray(out_jax), out_np, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(fft2c)(x)), fft2c(x), atol=1e-5)


def test_array_module():
  assert array_module(np.zeros(2)) is np
  assert array_module(jnp.zeros(2)) is jnp
  assert array_module(np.zeros(2), jnp.zeros(2), None) is jnp


def test_center_slices_keep_the_centre_index():
  for n, s in [(8, 4), (9, 4), (8, 5), (9, 5)]:
    (sl,) = center_slices((n,), (s,))
    assert np.arange(n)[sl][s // 2] == n // 2
