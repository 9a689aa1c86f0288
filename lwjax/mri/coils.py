"""Coil sensitivity maps from the fully sampled k-space centre, NumPy only (float64 inside).

k-space is (C, H, W), centre at (H // 2, W // 2); only the central ``calib`` block is read (an int
for a square, or (rows, columns)). Maps are complex64 (C, H, W) with ``sum_c |S_c|^2 = 1`` where
kept and 0 elsewhere (outside the object and its surroundings).
"""
import numpy as np

from lwjax.mri.fft import center_slices, ifft2c

METHODS = ("espirit", "lowres")


def _calibration(kspace, calib):
  """The central calibration block (C, rows, columns) of kspace (C, H, W) as complex128."""
  kspace = np.asarray(kspace)
  if kspace.ndim != 3:
    raise ValueError(f"kspace: expected (coils, H, W), found shape {kspace.shape}")
  size = (calib, calib) if np.isscalar(calib) else tuple(calib)
  if len(size) != 2 or not all(0 < s <= n for s, n in zip(size, kspace.shape[1:])):
    raise ValueError(f"calib: expected a size within (0, {kspace.shape[1:]}], found {calib}")
  return kspace[(slice(None), *center_slices(kspace.shape[1:], size))].astype(np.complex128)


def _dominant_rows(matrix, threshold):
  """Orthonormal basis (n, cols) of the right singular vectors of ``matrix`` with singular value
  above ``threshold * s_max``, largest first; from the smaller Gram matrix's ``eigh`` (cheaper than
  an SVD, and the kept values lie far above the rounding that squaring costs in float64).
  """
  if matrix.shape[0] <= matrix.shape[1]:
    s2, u = np.linalg.eigh(matrix @ matrix.conj().T)
    scaled = u.conj().T @ matrix  # rows s_j v_j^H
  else:
    s2, v = np.linalg.eigh(matrix.conj().T @ matrix)
    scaled = v.conj().T * np.sqrt(np.clip(s2, 0, None))[:, None]
  keep = np.flatnonzero(s2 > threshold ** 2 * s2[-1])[::-1]
  return scaled[keep] / np.sqrt(s2[keep])[:, None]


def _kernels(region, kernel, threshold):
  """ESPIRiT k-space kernels (n, C, k, k): the calibration matrix's dominant row space.

  Rows of the calibration matrix are all k x k patches of ``region`` (C, rows, columns), flattened
  over (coil, ky, kx); every consistent patch lies in the span of the kept right singular vectors.
  """
  c = region.shape[0]
  patches = np.lib.stride_tricks.sliding_window_view(region, (kernel, kernel), axis=(1, 2))
  matrix = patches.transpose(1, 2, 0, 3, 4).reshape(-1, c * kernel * kernel)
  return _dominant_rows(matrix, threshold).reshape(-1, c, kernel, kernel)


def _operator_coefficients(kernels):
  """Fourier coefficients K (C, C, 2k, 2k) of the image-space ESPIRiT operator.

  ESPIRiT's k-space operator (project every patch onto the kernels' span, average the k^2
  overlapping estimates) is a convolution, so in image space it is a C x C matrix per pixel:
  ``G(r) = k^-2 sum_j h_j(r) h_j(r)^H`` with ``h_j(r) = sum_m v_j(m) exp(2 pi i m.r / N)``.
  G is a trigonometric polynomial of degree k - 1 whose coefficients are the kernels'
  cross-correlations, here on a 2k x 2k (alias-free) grid, index Delta mod 2k.
  """
  k = kernels.shape[-1]
  spectra = np.fft.fft2(kernels, s=(2 * k, 2 * k))
  return np.fft.ifft2(np.einsum("jcab,jdab->cdab", spectra, spectra.conj())) / k ** 2


def _fourier_matrix(n, size):
  """(size, n) matrix exp(2 pi i Delta r / size): r = pixel - size // 2, Delta in FFT order."""
  delta = np.fft.fftfreq(n, 1 / n)
  return np.exp(2j * np.pi * np.outer(np.arange(size) - size // 2, delta) / size)


# Power iteration on G^(2^5), 4 times: converged to (lambda_2 / lambda_1)^128, enough where the
# object is cut by the grid's edge and lambda_2 nears lambda_1 (BUILD_NOTES.md, ESPIRiT).
EIG_SQUARINGS, EIG_ITERS = 5, 4


def _top_eigenpairs(g, start, squarings=EIG_SQUARINGS, iters=EIG_ITERS):
  """Dominant eigenpairs of Hermitian PSD matrices g (..., C, C): values (...), vectors (..., C).

  Power iteration on ``g^(2^squarings)``: each squaring doubles the convergence exponent.
  """
  power = g
  for _ in range(squarings):
    power = power @ power
  v = np.broadcast_to(start[:, None], g.shape[:-1] + (1,))
  for _ in range(iters):
    v = power @ v
    v = v / np.maximum(np.linalg.norm(v, axis=-2, keepdims=True), 1e-30)
  value = np.real(np.swapaxes(v.conj(), -1, -2) @ g @ v)[..., 0, 0]
  return value, v[..., 0]


ESPIRIT_KERNEL = 6  # side of the k-space kernels
# The smallest calibration block with useful ESPIRiT maps (BUILD_NOTES.md, Cartesian masks).
ESPIRIT_MIN_CALIB = 2 * ESPIRIT_KERNEL


def espirit(kspace, *, calib=16, kernel=ESPIRIT_KERNEL, threshold=0.02,
            crop=0.95) -> np.ndarray:
  """ESPIRiT coil maps (Uecker et al., MRM 2014), (C, H, W) complex64.

  Kernels: the calibration matrix's right singular vectors above ``threshold * s_max``. Per pixel
  the map is the image-space operator's dominant eigenvector, zero where its eigenvalue is below
  ``crop``; its phase is taken relative to a virtual body coil (the dominant coil combination),
  which keeps it smooth where any single coil is weak.
  """
  region = _calibration(kspace, calib)
  if not 0 < kernel <= min(region.shape[1:]):
    raise ValueError(f"kernel: expected a size in (0, {min(region.shape[1:])}] to fit the "
                     f"calibration block {region.shape[1:]}, found {kernel}")
  c, h, w = np.shape(kspace)
  coeffs = _operator_coefficients(_kernels(region, kernel, threshold))
  fy, fx = _fourier_matrix(2 * kernel, h), _fourier_matrix(2 * kernel, w)
  along_x = np.einsum("cdab,xb->axcd", coeffs, fx).reshape(2 * kernel, -1)  # (2k, W C C)
  virtual = np.linalg.eigh(region.reshape(c, -1) @ region.reshape(c, -1).conj().T)[1][:, -1]
  virtual = virtual * np.exp(-1j * np.angle(virtual[np.argmax(np.abs(virtual))]))
  maps = np.empty((h, w, c), np.complex128)
  values = np.empty((h, w))
  rows = max(1, 2 ** 21 // (w * c * c))  # 32 MiB of operator per block
  for r0 in range(0, h, rows):
    g = (fy[r0:r0 + rows] @ along_x).reshape(-1, w, c, c)
    values[r0:r0 + rows], maps[r0:r0 + rows] = _top_eigenpairs(g, virtual)
  maps = maps * np.exp(-1j * np.angle(maps @ virtual.conj()))[..., None]
  maps[values < crop] = 0
  return maps.transpose(2, 0, 1).astype(np.complex64)


# Below this calibration side low-resolution maps lose the SENSE-combined target's intensity
# (BUILD_NOTES.md, Cartesian masks).
LOWRES_GOOD_CALIB = 8


def lowres(kspace, *, calib=16, floor=0.05) -> np.ndarray:
  """Low-resolution coil maps, (C, H, W) complex64: the Hann-windowed, zero-padded calibration
  block's coil images over their root-sum-of-squares; 0 where the RSS is below ``floor * max``.
  """
  region = _calibration(kspace, calib)
  # No zero end points (n + 2 points, ends dropped): every calibration line counts.
  window = np.outer(*(np.hanning(n + 2)[1:-1] for n in region.shape[1:]))
  padded = np.zeros(np.shape(kspace), np.complex128)
  padded[(slice(None), *center_slices(padded.shape[1:], region.shape[1:]))] = region * window
  images = ifft2c(padded)
  rss = np.sqrt(np.sum(np.abs(images) ** 2, axis=0))
  maps = images / (rss + 1e-12 * rss.max())
  return np.where(rss > floor * rss.max(), maps, 0).astype(np.complex64)


def estimate(kspace, method, *, calib=16) -> np.ndarray:
  """Coil maps (C, H, W) complex64 by ``method`` in ``METHODS``, from the ``calib`` centre."""
  if method == "espirit":
    return espirit(kspace, calib=calib)
  if method == "lowres":
    return lowres(kspace, calib=calib)
  raise ValueError(f"method: expected one of {METHODS}, found {method!r}")
