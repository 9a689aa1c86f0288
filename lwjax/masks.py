"""Undersampling masks on the k-space grid, NumPy only.

A mask is a bool array (H, W) over (ky, kx), the last two axes of fastMRI k-space (..., H, W), with
the k-space centre at (H // 2, W // 2). W is the phase-encode direction of 1D Cartesian masks.
"""
import math

import numpy as np

from lwjax.fft import center_slices

KINDS = ("poisson", "cartesian", "equispaced")
DENSITY_SLOPE = 1.0  # Poisson-disc radius growth: r = scale * (1 + DENSITY_SLOPE * rho)
MAX_RADIUS = 8  # pixels: the sampler's memory grows as radius^2 (~0.5 GB on 320 x 320)


def acceleration(mask) -> float:
  """Acceleration of a sampling mask: grid points / sampled points."""
  mask = np.asarray(mask, bool)
  return mask.size / mask.sum()


def _check_accel(accel):
  if not accel > 1:
    raise ValueError(f"accel: expected an acceleration > 1, found {accel}")


def _conflict_pairs(radius, candidates):
  """Pairs (i, j) of candidate pixels (flat indices, both orders) closer than their mean radius."""
  h, w = radius.shape
  r = int(math.ceil(radius[candidates].max()))
  iy, ix = (a.astype(np.int32) for a in np.nonzero(candidates))
  flat = iy * w + ix
  pairs = []
  for dy in range(0, r + 1):
    for dx in range(-r, r + 1):
      if (dy, dx) <= (0, 0) or dy * dy + dx * dx >= r * r:
        continue
      jy, jx = iy + dy, ix + dx
      ok = (jy < h) & (jx >= 0) & (jx < w)
      i, j = flat[ok], jy[ok] * w + jx[ok]
      ok = candidates.flat[j]
      i, j = i[ok], j[ok]
      near = 2 * math.sqrt(dy * dy + dx * dx) < radius.flat[i] + radius.flat[j]
      pairs.append(np.stack([i[near], j[near]]))
  pairs = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), np.int32)
  return np.concatenate([pairs, pairs[::-1]], axis=1)


def _greedy_disc(radius, candidates, priority):
  """Poisson-disc sample: greedy over candidate pixels in ``priority`` order (highest first).

  A pixel is kept unless a kept pixel of higher priority lies closer than the mean of their radii.
  Computed in parallel rounds (Luby): a live pixel that beats all its live conflicting neighbours
  is kept and its neighbours die. This gives exactly the sequential greedy result, vectorised.
  """
  i, j = _conflict_pairs(radius, candidates)
  live = candidates.ravel().copy()
  kept = np.zeros_like(live)
  prio = priority.ravel()
  while live.any():
    both = live[i] & live[j]
    i, j = i[both], j[both]
    beaten = np.zeros_like(live)
    beaten[i[prio[j] > prio[i]]] = True
    winners = live & ~beaten
    kept |= winners
    live &= ~winners
    live[j[winners[i]]] = False
  return kept.reshape(radius.shape)


def poisson_disc(shape, accel, *, calib=(16, 16), seed=0, tol=0.05, crop_corner=True) -> np.ndarray:
  """Variable-density 2D Poisson-disc mask with a fully sampled centre, (H, W) bool.

  Grid points are visited in a random order (from ``seed``) and kept unless a kept point lies
  closer than their mean radius ``r = scale * (1 + DENSITY_SLOPE * rho)`` pixels, ``rho`` the
  normalised distance from the k-space centre (1 at the edge midpoints). Where ``r <= 1`` every
  point is kept, so the density falls from fully sampled at the centre to about ``1 / r^2``
  outside. ``scale`` is bisected until the acceleration ``H * W / samples`` is within ``tol``
  (relative) of ``accel``; the visiting order is the same at every step, so the mask is a
  deterministic function of the arguments. The ``calib`` block is always sampled. As SigPy's
  ``mri.poisson`` (used for the paper's masks), ``crop_corner`` leaves k-space outside the
  inscribed ellipse (``rho >= 1``) unsampled.
  """
  _check_accel(accel)
  h, w = shape
  calib = (calib, calib) if np.isscalar(calib) else tuple(calib)
  if not all(0 < c <= n for c, n in zip(calib, shape)):
    raise ValueError(f"calib: expected a calibration region within (0, {shape}], found {calib}")
  if math.prod(calib) * accel >= h * w:
    raise ValueError(f"accel: {accel} is out of reach, the {calib} calibration region alone "
                     f"samples more than 1/{accel} of the {shape} grid")
  ky, kx = np.meshgrid((np.arange(h) - h // 2) / (h / 2), (np.arange(w) - w // 2) / (w / 2),
                       indexing="ij")
  rho = np.hypot(ky, kx)
  candidates = rho < 1 if crop_corner else np.ones(shape, bool)
  calib_mask = np.zeros(shape, bool)
  calib_mask[center_slices(shape, calib)] = True
  densest = acceleration(candidates | calib_mask)
  if accel < densest * (1 - tol):
    raise ValueError(f"accel: {accel} is out of reach, a {'corner-cropped ' * crop_corner}mask "
                     f"sampling every pixel has acceleration {densest:.3f}")
  priority = np.random.default_rng(seed).permutation(h * w).reshape(shape)

  def sample(scale):
    return _greedy_disc(scale * (1 + DENSITY_SLOPE * rho), candidates & ~calib_mask,
                        priority) | calib_mask

  # Bracket the scale by doubling from 1, then bisect: a needlessly large scale means large radii,
  # hence many conflict pairs.
  scale_max = MAX_RADIUS / (1 + DENSITY_SLOPE * rho[candidates].max())
  scale, lo, hi, best = 1.0, 0.0, None, None
  for _ in range(64):
    mask = sample(scale)
    error = acceleration(mask) / accel - 1
    if best is None or abs(error) < abs(best[0]):
      best = (error, mask)
    if abs(error) <= tol / 2:
      break
    if error < 0 and scale >= scale_max:
      raise ValueError(f"accel: {accel} on a {shape} grid needs Poisson-disc radii above "
                       f"MAX_RADIUS={MAX_RADIUS} pixels")
    lo, hi = (scale, hi) if error < 0 else (lo, scale)
    scale = min(2 * scale, scale_max) if hi is None else (lo + hi) / 2
  if abs(best[0]) > tol:
    raise ValueError(f"accel: {accel} not reached within tol={tol} on a {shape} grid "
                     f"(best {acceleration(best[1]):.3f})")
  return best[1]


def cartesian(shape, accel, *, center_fraction=0.04, seed=0, equispaced=False) -> np.ndarray:
  """fastMRI-style 1D mask, (H, W) bool: whole phase-encode columns (last axis) are sampled.

  A centred block of ``round(W * center_fraction)`` columns is fully sampled; the others are drawn
  at random (or, ``equispaced``, on a lattice with a seeded offset) so that ``W / columns`` is
  within 5% of ``accel``: the column count is exact, ``round(W / accel)``, not a Bernoulli draw as
  in fastMRI's ``RandomMaskFunc``.
  """
  _check_accel(accel)
  h, w = shape
  if not 0 < center_fraction <= 1:
    raise ValueError(f"center_fraction: expected a fraction in (0, 1], found {center_fraction}")
  num_low = max(1, round(w * center_fraction))
  total = round(w / accel)
  if num_low > total:
    raise ValueError(f"accel: {accel} is out of reach, the centre block of {num_low} columns "
                     f"(center_fraction={center_fraction}) alone samples more than 1/{accel} of "
                     f"{w} columns")
  if abs(w / total / accel - 1) > 0.05:
    raise ValueError(f"accel: {accel} is out of reach within 5% on {w} columns "
                     f"(nearest: {w}/{total} = {w / total:.3f})")
  columns = np.zeros(w, bool)
  columns[center_slices((w,), (num_low,))] = True
  rng = np.random.default_rng(seed)
  if equispaced:
    columns |= _lattice(columns, total, rng.random())
  else:
    columns[rng.choice(np.flatnonzero(~columns), total - num_low, replace=False)] = True
  return np.broadcast_to(columns, shape).copy()


def _lattice(center, total, offset):
  """Columns ``round((offset + k) * s)``, the spacing ``s`` bisected so ``center | lattice`` has
  ``total`` columns (or the nearest count reached)."""
  w = center.size

  def columns(s):
    picked = np.zeros(w, bool)
    picked[np.round((offset + np.arange(math.ceil(w / s))) * s).astype(int) % w] = True
    return picked

  lo, hi = 1.0, float(w)
  best = columns(hi)
  for _ in range(60):
    s = (lo + hi) / 2
    picked = columns(s)
    count = (center | picked).sum()
    if abs(count - total) < abs((center | best).sum() - total):
      best = picked
    if count == total:
      break
    lo, hi = (s, hi) if count > total else (lo, s)
  return best


def make_mask(kind, shape, accel, *, seed=0, calib=16, center_fraction=0.04) -> np.ndarray:
  """The (H, W) bool mask of ``kind`` in ``KINDS``: ``calib`` is the Poisson disc's fully sampled
  centre side, ``center_fraction`` the Cartesian masks' fraction of centre columns."""
  if kind == "poisson":
    return poisson_disc(shape, accel, calib=(calib, calib), seed=seed)
  if kind in ("cartesian", "equispaced"):
    return cartesian(shape, accel, center_fraction=center_fraction, seed=seed,
                     equispaced=kind == "equispaced")
  raise ValueError(f"kind: expected one of {KINDS}, found {kind!r}")
