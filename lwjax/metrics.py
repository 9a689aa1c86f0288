"""PSNR, SSIM and NMSE of magnitude images, per slice, and fastMRI's per-volume variant.

As fastMRI's ``evaluate.py`` (scikit-image defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03,
sample covariance), but ``data_range`` is each target slice's maximum (the paper reports
slice-based numbers), so an all-zero target slice has no PSNR or SSIM. The metric functions are
jitted, batched over leading axes, and take ``pred=`` and ``target=`` as keywords only: fastMRI's
order is (target, pred), and a swap silently changes every metric. ``NAMES`` drives every report.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Every reported metric: key -> (name, unit, format of its values).
NAMES = {"psnr": ("PSNR", "dB", ".2f"), "ssim": ("SSIM", "", ".4f"), "nmse": ("NMSE", "", ".4g")}


def label(key: str, what: str = "") -> str:
  """A metric's column or axis label: "PSNR (dB)", or with ``what="gap"`` "PSNR gap (dB)"."""
  name, unit, _ = NAMES[key]
  name = f"{name} {what}" if what else name
  return f"{name} ({unit})" if unit else name


def format_means(means: dict, sep: str = " ") -> str:
  """``{key: value}`` of every metric as one line: "PSNR 25.02 dB SSIM 0.8349 NMSE 0.0203"."""
  return sep.join(f"{name} {means[k]:{fmt}}{' ' + unit if unit else ''}"
                  for k, (name, unit, fmt) in NAMES.items())


def magnitude(x):
  """``(..., 2)`` real/imaginary channels -> ``(...)`` magnitude."""
  if x.shape[-1] != 2:
    raise ValueError(f"expected a last axis of 2 (real, imaginary), got shape {x.shape}")
  return jnp.hypot(x[..., 0], x[..., 1])


def _as_float_pair(pred, target):
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.shape != target.shape or pred.ndim < 2:
    raise ValueError(f"expected two images (..., H, W) of one shape, got {pred.shape} and "
                     f"{target.shape}")
  dtype = jnp.result_type(pred, target, jnp.float32)
  return pred.astype(dtype), target.astype(dtype)


def _data_range(target, data_range):
  """``(...)`` peak value per image: the given scalar / array, or each target image's maximum."""
  if data_range is None:
    return target.max(axis=(-2, -1))
  return jnp.broadcast_to(jnp.asarray(data_range, target.dtype), target.shape[:-2])


@jax.jit
def psnr(*, pred, target, data_range=None):
  """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``: ``(..., H, W) -> (...)``.

  ``data_range`` (scalar or ``(...)``) defaults to each target image's maximum.
  """
  pred, target = _as_float_pair(pred, target)
  mse = jnp.mean(jnp.square(pred - target), axis=(-2, -1))
  return 10 * jnp.log10(jnp.square(_data_range(target, data_range)) / mse)


@jax.jit
def nmse(*, pred, target):
  """Normalised squared error ``||pred - target||^2 / ||target||^2``: ``(..., H, W) -> (...)``."""
  pred, target = _as_float_pair(pred, target)
  return (jnp.sum(jnp.square(pred - target), axis=(-2, -1))
          / jnp.sum(jnp.square(target), axis=(-2, -1)))


def _box_mean(x, size):
  """Mean over every ``size x size`` window of the last two axes, at 'valid' positions only."""
  lead = (1,) * (x.ndim - 2)
  zero = jnp.zeros((), x.dtype)
  for window in ((size, 1), (1, size)):
    x = lax.reduce_window(x, zero, lax.add, lead + window, (1,) * x.ndim, "VALID")
  return x / size**2


@functools.partial(jax.jit, static_argnames=("win_size", "k1", "k2"))
def ssim(*, pred, target, data_range=None, win_size=7, k1=0.01, k2=0.03):
  """Mean structural similarity, as scikit-image's defaults: ``(..., H, W) -> (...)``.

  Averaged over the windows inside the image (scikit-image's crop of ``(win_size - 1) // 2``
  pixels per side); ``data_range`` (scalar or ``(...)``) defaults to each target's maximum.
  """
  pred, target = _as_float_pair(pred, target)
  if win_size % 2 != 1 or win_size > min(target.shape[-2:]):
    raise ValueError(f"win_size must be odd and at most the image size {target.shape[-2:]}, "
                     f"got {win_size}")
  peak = _data_range(target, data_range)[..., None, None]
  # (Co)variances do not change under a shift; removing the mean first keeps float32 from losing
  # them in the cancellation E[x^2] - E[x]^2.
  shift = target.mean(axis=(-2, -1), keepdims=True)
  x, y = pred - shift, target - shift
  mx, my, mxx, myy, mxy = _box_mean(jnp.stack([x, y, x * x, y * y, x * y]), win_size)
  n = win_size**2
  cov_norm = n / (n - 1)
  vx, vy, vxy = (cov_norm * (mxx - mx * mx), cov_norm * (myy - my * my),
                 cov_norm * (mxy - mx * my))
  mx, my = mx + shift, my + shift
  c1, c2 = jnp.square(k1 * peak), jnp.square(k2 * peak)
  s = ((2 * mx * my + c1) * (2 * vxy + c2)
       / ((mx * mx + my * my + c1) * (vx + vy + c2)))
  return s.mean(axis=(-2, -1))


@jax.jit
def slice_metrics(*, pred, target):
  """PSNR (dB), SSIM and NMSE of every 2D slice of complex 2-channel images.

  Args:
    pred, target: ``(N, H, W, 2)`` images or ``(N, D, H, W, 2)`` volumes (real, imaginary).

  Returns:
    ``{"psnr", "ssim", "nmse"}``, each ``(S,)`` with ``S = N`` (or ``N * D`` for volumes, in
    row-major order), computed on magnitudes with data range = each target slice's maximum.
  """
  if pred.shape != target.shape or pred.ndim not in (4, 5):
    raise ValueError(f"expected (N, H, W, 2) or (N, D, H, W, 2) images of one shape, got "
                     f"{pred.shape} and {target.shape}")
  pred, target = (magnitude(a).reshape(-1, *a.shape[-3:-1]) for a in (pred, target))
  return {"psnr": psnr(pred=pred, target=target), "ssim": ssim(pred=pred, target=target),
          "nmse": nmse(pred=pred, target=target)}


@jax.jit
def volume_metrics(*, pred, target):
  """fastMRI's volume-wise metrics of one volume of magnitude slices ``(S, H, W)``, as its
  ``evaluate.py`` computes them: data range the volume's maximum; PSNR and NMSE over the whole
  volume; SSIM the mean over the slices. Returns ``{"psnr", "ssim", "nmse"}`` scalars."""
  pred, target = _as_float_pair(pred, target)
  if target.ndim != 3:
    raise ValueError(f"expected one volume (S, H, W), got shape {target.shape}")
  # A volume as one (S * H, W) image: the mean over its pixels is the volume's mean.
  flat = lambda a: a.reshape(-1, a.shape[-1])
  return {"psnr": psnr(pred=flat(pred), target=flat(target)),
          "ssim": ssim(pred=pred, target=target, data_range=target.max()).mean(),
          "nmse": nmse(pred=flat(pred), target=flat(target))}


# ----------------------------------------------------------------------------------------------
# On host arrays, as the trainer and the evaluation report them.

def per_slice(*, pred, target, chunk_slices=64) -> dict[str, np.ndarray]:
  """``slice_metrics`` of host arrays: ``{name: (S,) float64}``, S slices (N, or N * D).

  Runs ``chunk_slices`` slices at a time, the last chunk padded (one compiled shape): SSIM's
  intermediates for a whole validation set would not fit a GPU (BUILD_NOTES.md, memory)."""
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape or pred.ndim not in (4, 5):
    raise ValueError(f"expected (N, H, W, 2) or (N, D, H, W, 2) images of one shape, got "
                     f"{pred.shape} and {target.shape}")
  n = len(pred)
  rows = max(1, min(n, chunk_slices // (pred.shape[1] if pred.ndim == 5 else 1)))
  out = {k: [] for k in NAMES}
  for start in range(0, n, rows):
    take = np.minimum(np.arange(start, start + rows), n - 1)
    values = slice_metrics(pred=jnp.asarray(pred[take]), target=jnp.asarray(target[take]))
    kept = min(rows, n - start) * (pred.shape[1] if pred.ndim == 5 else 1)
    for k in NAMES:
      out[k].append(np.asarray(values[k], np.float64)[:kept])
  return {k: np.concatenate(v) for k, v in out.items()}


def per_file(*, pred, target, volumes) -> dict[str, np.ndarray]:
  """fastMRI's volume-wise metrics (``volume_metrics``) of each file's slices.

  ``pred``, ``target``: (N, H, W, 2) slices at their true relative intensities (not each scaled
  by its own maximum); ``volumes`` (N,) their files. Returns ``{name: (V,) float64}``, files in
  ``np.unique(volumes)`` order."""
  pred, target, volumes = np.asarray(pred), np.asarray(target), np.asarray(volumes)
  mag = lambda a, v: magnitude(jnp.asarray(a[volumes == v]))  # One file on the device at a time.
  rows = [volume_metrics(pred=mag(pred, v), target=mag(target, v)) for v in np.unique(volumes)]
  return {k: np.asarray([float(r[k]) for r in rows]) for k in NAMES}


def means(values: dict) -> dict[str, float]:
  """The mean of each metric's values (summary.json's entries)."""
  return {k: float(np.mean(v)) for k, v in values.items()}
