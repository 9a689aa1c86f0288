"""Undersampling masks on the k-space grid, NumPy only.

A mask is a bool array (H, W) over (ky, kx), the last two axes of fastMRI k-space (..., H, W), with
the k-space centre at (H // 2, W // 2). W is the phase-encode direction of 1D Cartesian masks.
"""
import math

import numpy as np

from lwjax.mri.fft import center_slices

KINDS = ("poisson", "cartesian", "equispaced")
ATTEMPTS = 30  # Bridson's candidates per active sample before it retires (sigpy's max_attempts)
SEED_SPACING = 32  # pixels between the initial samples the fronts grow from


def acceleration(mask) -> float:
  """Acceleration of a sampling mask: grid points / sampled points."""
  mask = np.asarray(mask, bool)
  return mask.size / mask.sum()


def _check_accel(accel):
  if not accel > 1:
    raise ValueError(f"accel: expected an acceleration > 1, found {accel}")


def calib_distance(shape, calib) -> np.ndarray:
  """``|k|``, (H, W): distance from the ``calib`` block (``center_slices``), 0 inside it.

  Per axis, the pixel distance to the block's nearest row / column divided by its largest value
  on the grid (1 at the grid's farthest edge); ``|k|`` is the hypot of the two.
  """
  axes = []
  for n, c in zip(shape, calib):
    lo = n // 2 - c // 2
    d = np.maximum(np.maximum(lo - np.arange(n), np.arange(n) - (lo + c - 1)), 0)
    axes.append(d / max(d.max(), 1))
  return np.hypot(axes[0][:, None], axes[1][None, :])


def _radii(k, slope, shape):
  """Exclusion radii (ry, rx) in pixels, each shaped as ``k``: ``1 + slope * |k|`` scaled by
  ``n / max(H, W)`` per axis of the (H, W) ``shape`` (isotropic in normalised k-space, as sigpy),
  at least 1."""
  h, w = shape
  r = 1 + slope * k
  return np.maximum(r * h / max(h, w), 1), np.maximum(r * w / max(h, w), 1)


class _Grid:
  """A (H, W) grid padded by ``pad`` on each side, flattened: neighbours are constant offsets."""

  def __init__(self, shape, pad):
    self.shape, self.pad = shape, pad
    self.width = shape[1] + 2 * pad
    self.size = (shape[0] + 2 * pad) * self.width

  def flat(self, iy, ix):
    return (iy + self.pad) * self.width + ix + self.pad

  def padded(self, a, fill):
    return np.pad(a, self.pad, constant_values=fill).ravel()


def _conflicts(grid, taken, ry, rx, qy, qx, reach):
  """(n,) bool: points (qy, qx) lying inside the exclusion ellipse of a ``taken`` pixel.

  ``taken``, ``ry``, ``rx``: padded flat grids; ``reach`` = ceil of the largest radius.
  """
  cy, cx = np.floor(qy).astype(np.int64), np.floor(qx).astype(np.int64)
  base = grid.flat(cy, cx)
  uy, ux = qy - cy, qx - cx
  hit = np.zeros(qy.shape, bool)
  todo = np.arange(qy.size)
  # Nearest pixels first, dropping each point at its first hit: most points are decided early.
  offsets = sorted(((dy, dx) for dy in range(1 - reach, reach + 1)
                    for dx in range(1 - reach, reach + 1)),
                   key=lambda d: (d[0] - 0.5)**2 + (d[1] - 0.5)**2)
  for dy, dx in offsets:
    p = base[todo] + dy * grid.width + dx
    near = taken[p]
    i, p = todo[near], p[near]
    inside = np.square((uy[i] - dy) / ry[p]) + np.square((ux[i] - dx) / rx[p]) < 1
    hit[i[inside]] = True
    todo = todo[~hit[todo]]
  return hit


def _first_free(grid, taken, ry, rx, ay, ax, reach, rng, first_try=4):
  """Each active sample's first free candidate among ``ATTEMPTS``: (n,) found, its (qy, qx).

  Candidates are uniform over the annulus of 1 to 2 radii around (ay, ax); ``first_try`` of them
  are drawn first, the rest only for the samples that found none (most that will find one do).
  """
  h, w = grid.shape
  found = np.zeros(ay.size, bool)
  qy, qx = np.zeros(ay.size), np.zeros(ay.size)
  rows = np.arange(ay.size)
  for tries in (first_try, ATTEMPTS - first_try):
    cell = grid.flat(ay[rows], ax[rows])
    v = np.sqrt(1 + 3 * rng.random((rows.size, tries)))
    t = 2 * np.pi * rng.random((rows.size, tries))
    cy = ay[rows, None] + v * ry[cell][:, None] * np.sin(t)
    cx = ax[rows, None] + v * rx[cell][:, None] * np.cos(t)
    ok = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    ok[ok] = ~_conflicts(grid, taken, ry, rx, cy[ok], cx[ok], reach)
    hit = ok.any(axis=1)
    first = ok.argmax(axis=1)[hit]
    found[rows[hit]] = True
    qy[rows[hit]], qx[rows[hit]] = cy[hit, first], cx[hit, first]
    rows = rows[~hit]
  return found, qy[found], qx[found]


def _bridson(k, slope, rng):
  """Bridson's Poisson-disc sampling with radii ``_radii(k, slope)``, (H, W) bool.

  As sigpy's: an active sample draws up to ``ATTEMPTS`` candidates uniformly over the annulus of
  1 to 2 radii around it and keeps the first whose pixel (its position rounded down onto the
  grid) lies outside every sample's exclusion ellipse; a sample that finds none retires. Here
  every active sample draws in the same round, the fronts start from a jittered lattice of seeds,
  and candidates of one round that exclude one another keep the one of highest random priority
  (the others retry next round).
  """
  h, w = k.shape
  ry, rx = _radii(k, slope, k.shape)
  reach = int(math.ceil(max(ry.max(), rx.max())))
  grid = _Grid((h, w), reach + 1)
  ryp, rxp = grid.padded(ry, 1.0), grid.padded(rx, 1.0)
  taken = np.zeros(grid.size, bool)
  owner = np.full(grid.size, -1, np.int64)

  def accept(qy, qx):
    """Keeps the candidates (n,) that exclude no candidate of higher priority; returns (n,) bool."""
    order = rng.permutation(qy.size)
    cells = grid.flat(np.floor(qy).astype(np.int64), np.floor(qx).astype(np.int64))
    owner[cells[order]] = order  # One candidate per pixel: the last written, a random one.
    keep = owner[cells] == np.arange(qy.size)
    rank = np.empty(qy.size, np.int64)
    rank[order] = np.arange(qy.size)
    cy, cx = np.floor(qy).astype(np.int64), np.floor(qx).astype(np.int64)
    uy, ux = qy - cy, qx - cx
    for dy in range(-reach, reach + 1):
      for dx in range(-reach, reach + 1):
        if dy == dx == 0:
          continue
        p = cells + dy * grid.width + dx
        j = owner[p]
        other = (j >= 0) & keep
        jj = np.where(other, j, 0)
        # Either candidate inside the other's pixel's ellipse: the earlier one in ``order`` yields.
        inside = ((np.square((uy - dy) / ryp[p]) + np.square((ux - dx) / rxp[p]) < 1)
                  | (np.square((uy[jj] + dy) / ryp[cells]) + np.square((ux[jj] + dx) / rxp[cells])
                     < 1))
        keep &= ~(other & inside & keep[jj] & (rank[jj] > rank))
    owner[cells] = -1
    taken[cells[keep]] = True
    return keep

  # Seeds: one per SEED_SPACING square, at a random position in it.
  sy, sx = np.meshgrid(np.arange(0, h, SEED_SPACING), np.arange(0, w, SEED_SPACING), indexing="ij")
  qy = np.minimum(sy.ravel() + rng.random(sy.size) * SEED_SPACING, h - 1e-6)
  qx = np.minimum(sx.ravel() + rng.random(sx.size) * SEED_SPACING, w - 1e-6)
  keep = accept(qy, qx)
  ay, ax = np.floor(qy[keep]).astype(np.int64), np.floor(qx[keep]).astype(np.int64)
  while ay.size:
    found, qy, qx = _first_free(grid, taken, ryp, rxp, ay, ax, reach, rng)
    keep = accept(qy, qx)
    new_y, new_x = np.floor(qy[keep]).astype(np.int64), np.floor(qx[keep]).astype(np.int64)
    ay, ax = np.concatenate([ay[found], new_y]), np.concatenate([ax[found], new_x])
  return taken.reshape(h + 2 * grid.pad, -1)[grid.pad:-grid.pad, grid.pad:-grid.pad]


def poisson_disc(shape, accel, *, calib=(16, 16), seed=0, tol=0.01, crop_corner=True) -> np.ndarray:
  """Variable-density 2D Poisson-disc mask with a fully sampled centre, (H, W) bool, as
  ``sigpy.mri.poisson`` draws it.

  Exclusion radius ``1 + s * |k|`` pixels (``|k|`` from ``calib_distance``): density falls as
  about ``1 / (1 + s * |k|)^2``. The ``calib`` block is fully sampled; with ``crop_corner`` the
  corners ``|k| >= 1`` are empty. The slope ``s`` is searched until ``H * W / samples`` is within
  ``tol`` (relative; at least 1.5 samples) of ``accel``; every try restarts from ``seed``, so the
  mask is a deterministic function of the arguments.
  """
  _check_accel(accel)
  h, w = shape
  calib = (calib, calib) if np.isscalar(calib) else tuple(calib)
  if not all(0 < c <= n for c, n in zip(calib, shape)):
    raise ValueError(f"calib: expected a calibration region within (0, {shape}], found {calib}")
  if math.prod(calib) * accel >= h * w:
    raise ValueError(f"accel: {accel} is out of reach, the {calib} calibration region alone "
                     f"samples more than 1/{accel} of the {shape} grid")
  k = calib_distance(shape, calib)
  support = k < 1 if crop_corner else np.ones(shape, bool)
  calib_mask = np.zeros(shape, bool)
  calib_mask[center_slices(shape, calib)] = True

  def sample(slope):
    return (_bridson(k, slope, np.random.default_rng(seed)) & support) | calib_mask

  # A model of the sample count, ``c / (ry * rx)`` per pixel (a disc packing), proposes each slope;
  # ``c`` is refitted to every sample drawn, and the tries keep a bracket on the slope.
  free = support & ~calib_mask
  ky = k[free]
  model = lambda slope, c: calib_mask.sum() + np.minimum(c / np.prod(_radii(ky, slope, shape), 0),
                                                          1).sum()
  target = h * w / accel
  tol = max(tol, 1.5 / target)  # A tiny grid's counts step by more than tol: 1.5 samples will do.
  lo, hi, c, best = 0.0, float(max(shape)), 0.7, None
  if model(0.0, c) < target and acceleration(densest := sample(0.0)) > accel * (1 + tol):
    raise ValueError(f"accel: {accel} is out of reach, the densest Poisson disc on a {shape} grid "
                     f"has acceleration {acceleration(densest):.3f}")
  for _ in range(32):
    a, b = lo, hi
    for _ in range(48):  # Bisect the model within the bracket.
      mid = (a + b) / 2
      a, b = (mid, b) if model(mid, c) > target else (a, mid)
    slope = (a + b) / 2 if lo < a and b < hi else (lo + hi) / 2
    mask = sample(slope)
    count = mask.sum()
    error = math.log(h * w / count / accel)
    if best is None or abs(error) < abs(best[0]):
      best = (error, mask)
    if abs(error) <= math.log1p(tol):
      return mask
    lo, hi = (slope, hi) if error < 0 else (lo, slope)
    c *= max(count - calib_mask.sum(), 1) / (model(slope, c) - calib_mask.sum())
    if hi - lo < 1e-6 * max(shape):
      break
  raise ValueError(f"accel: {accel} not reached within tol={tol} on a {shape} grid "
                   f"(best {acceleration(best[1]):.3f})")


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
  """Columns ``round((offset + k) * s)`` inside ``[0, W)``, the spacing ``s`` bisected so
  ``center | lattice`` has ``total`` columns (or the nearest count reached). Columns past the edge
  are dropped, not wrapped round: a wrapped one could land next to another."""
  w = center.size

  def columns(s):
    picked = np.zeros(w, bool)
    at = np.round((offset + np.arange(math.ceil(w / s) + 1)) * s).astype(int)
    picked[at[at < w]] = True
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
