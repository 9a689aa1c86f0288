"""Synthetic multi-coil knee-like volumes in the fastMRI layout, and a dataset of them on disk.

Everything is deterministic from a ``numpy.random.Generator``. Coordinates are normalised: the
image grid spans [-1, 1) on both axes (rows = y, downwards; columns = x), and a volume's slices
span z in [-1, 1].
"""
import math
from pathlib import Path

import numpy as np

from lwjax import files
from lwjax.config import Config
from lwjax.data import fastmri
from lwjax.mri.fft import center_slices, fft2c

SYNTHETIC_VERSION = 1  # bump when the synthetic generator changes its output

# Nominal magnitudes of the tissues (proton-density-like contrast, as fastMRI's knee PD scans).
TISSUES = dict(fluid=1.0, fat=0.9, marrow=0.72, cartilage=0.55, muscle=0.33, ligament=0.12,
               cortex=0.04)


def _smooth_field(rng, shape, sigma):
  """Zero-mean, unit-std Gaussian random field of ``shape``, smoothed by a Gaussian of ``sigma``
  (pixels, one per axis; periodic boundaries)."""
  spectrum = np.fft.rfftn(rng.standard_normal(shape))
  for axis, (n, s) in enumerate(zip(shape, sigma)):
    f = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
    spectrum *= np.exp(-2 * (np.pi * f * s) ** 2).reshape([-1 if a == axis else 1
                                                           for a in range(len(shape))])
  field = np.fft.irfftn(spectrum, shape, axes=range(len(shape)))
  return (field - field.mean()) / (field.std() + 1e-12)


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
  """Approximate signed distance (normalised units, negative inside) to an ellipse."""
  c, s = np.cos(angle), np.sin(angle)
  u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
  return (np.hypot(u / ax, v / ay) - 1) * min(ax, ay)


def _segment(x, y, p, q):
  """Distance (normalised units) to the segment from point p to point q."""
  px, py = p
  dx, dy = q[0] - px, q[1] - py
  t = np.clip(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy), 0, 1)
  return np.hypot(x - px - t * dx, y - py - t * dy)


def _slice(d, x, y, z, pixel):
  """Magnitude of the slice at position z of the subject ``d`` (``_draws``), zero outside the body.

  Shapes have soft edges about a pixel wide, so the edges are not staircased on the grid.
  """
  inside = lambda dist: np.clip(0.5 - dist / pixel, 0, 1)
  blend = lambda image, weight, level: (1 - weight) * image + weight * TISSUES[level]
  taper = 1 - 0.1 * (z + 0.3) ** 2  # the anatomy narrows away from its widest slice

  theta = np.arctan2(y, x)
  wobble = sum(a * np.cos(k * theta + p) for k, (a, p) in enumerate(d["outline"], start=2))
  body = _ellipse(x, y, d["shift"][0], d["shift"][1], 0.8 * taper + 0.05, 0.93) - wobble
  fat_layer = inside(body) - inside(body + d["fat_width"])

  # Femur: two condyles and the shaft above them; tibia: the plateau and its shaft below.
  cy = d["joint"] + 0.02 * z
  condyles = np.minimum.reduce([
      _ellipse(x, y, side * d["condyle_dx"] * taper, cy - 0.2, 0.25 * taper, 0.2)
      for side in (-1, 1)] + [_ellipse(x, y, 0, cy - 0.75, 0.24 * taper, 0.6)])
  plateau = np.minimum(_ellipse(x, y, 0, cy + 0.36, 0.46 * taper, 0.3),
                       _ellipse(x, y, 0, cy + 0.8, 0.22 * taper, 0.5))
  plateau = np.maximum(plateau, cy + 0.075 - y)  # flat top of the tibial plateau
  bones = np.minimum(condyles, plateau)
  cortex_width = 0.025
  cartilage = (inside(np.minimum(condyles - 0.035, plateau - 0.03))
               * (1 - inside(bones)) * (np.abs(y - cy - 0.04) < 0.12))
  joint_fluid = inside(np.abs(y - cy - 0.035) - 0.012) * (np.abs(x) < 0.5 * taper)
  menisci = inside(np.minimum.reduce([
      _ellipse(x, y, side * 0.43 * taper, cy + 0.04, 0.09, 0.035) for side in (-1, 1)]))
  cruciate = inside(np.minimum(_segment(x, y, (-0.06, cy - 0.25), (0.05, cy + 0.08)),
                               _segment(x, y, (0.06, cy - 0.22), (-0.03, cy + 0.09))) - 0.015)
  cyst = inside(_ellipse(x, y, d["cyst"][0], cy - 0.55, 0.05 + 0.03 * (1 - z * z), 0.12))

  septa = np.minimum.reduce([_segment(x, y, p, q) for p, q in d["septa"]]) - 0.004
  image = TISSUES["muscle"] * (1 - 0.6 * inside(septa))
  for vx, vy, r in d["vessels"]:
    image = np.maximum(image, TISSUES["fluid"] * inside(_ellipse(x, y, vx, vy, r, r)))
  image = blend(image, fat_layer, "fat")
  image = blend(image, inside(bones), "cortex")
  image = blend(image, inside(bones + cortex_width), "marrow")
  for weight, level in ((cartilage, "cartilage"), (joint_fluid, "fluid"), (menisci, "ligament"),
                        (cruciate, "ligament"), (cyst, "fluid")):
    image = blend(image, weight, level)
  return image * inside(body)


def _draws(rng):
  """The per-subject anatomy: sizes, offsets and the positions of fine structures."""
  uniform = lambda lo, hi, n=None: rng.uniform(lo, hi, n)
  angles = uniform(0, 2 * np.pi, 6)
  radii = uniform(0.6, 0.85, 6)
  return dict(
      outline=[(uniform(0.005, 0.02), uniform(0, 2 * np.pi)) for _ in range(3)],
      shift=uniform(-0.03, 0.03, 2), fat_width=uniform(0.04, 0.08), joint=uniform(-0.08, 0.08),
      condyle_dx=uniform(0.18, 0.22), cyst=uniform(-0.1, 0.1, 2),
      septa=[((r * np.cos(a), r * np.sin(a)),
              (0.7 * r * np.cos(a + 0.3), 0.7 * r * np.sin(a + 0.3)))
             for r, a in zip(radii, angles)],
      vessels=[(side * uniform(0.4, 0.65), uniform(-0.8, 0.8), uniform(0.008, 0.025))
               for side in (-1, 1, -1, 1, -1, 1)])


def phantom(rng, size, *, slices=1) -> np.ndarray:
  """Knee-like complex phantom volume, (slices, size, size) complex128, zero outside the body.

  Tissues (``TISSUES``): subcutaneous fat, muscle with septa and small vessels, femur and tibia
  (dark cortex, fatty marrow), cartilage, joint fluid, menisci, cruciate ligaments, a fluid cyst.
  Magnitudes are modulated by random fields (a fine texture of a few pixels, a smooth bias), and
  the phase is a smooth random field of a few radians. Shapes and fields vary smoothly from slice
  to slice over z in [-1, 1], so the volume is usable as 3D data.
  """
  draws = _draws(rng)
  pixel = 2.0 / size
  y, x = np.meshgrid((np.arange(size) - size // 2) * pixel, (np.arange(size) - size // 2) * pixel,
                     indexing="ij")
  z = np.linspace(-1, 1, slices) if slices > 1 else np.zeros(1)
  dz = max(slices / 8, 1e-3)  # fields decorrelate over ~1/8 of the volume's slices
  pad = math.ceil(3 * dz)  # no wrap-around: the first and last slices are not neighbours
  field = lambda s: _smooth_field(rng, (slices + 2 * pad, size, size),
                                  (dz, s * size, s * size))[pad:pad + slices]
  texture = 1 + 0.04 * field(0.01) + 0.04 * field(0.03)
  bias = 1 + 0.1 * field(0.25)
  phase = 1.5 * field(0.2) + 0.5 * field(0.06)
  magnitude = np.stack([_slice(draws, x, y, zi, pixel) for zi in z]) * texture * bias
  return magnitude * np.exp(1j * phase)


def coil_maps(size, coils, *, rng=None) -> np.ndarray:
  """Smooth receive sensitivities, (coils, size, size) complex128 with sum_c |S_c|^2 = 1.

  Coils sit on a ring around the object (radius 1.4 in normalised units; jittered when ``rng`` is
  given); the magnitude falls off like a loop coil's on-axis field and each coil has a smooth
  (linear plus constant) phase.
  """
  rng = np.random.default_rng(0) if rng is None else rng
  pixel = 2.0 / size
  y, x = np.meshgrid((np.arange(size) - size // 2) * pixel, (np.arange(size) - size // 2) * pixel,
                     indexing="ij")
  angles = 2 * np.pi * (np.arange(coils) + rng.uniform(-0.2, 0.2, coils)) / coils
  ring = 1.4 + rng.uniform(-0.1, 0.1, coils)
  cx, cy = ring * np.cos(angles), ring * np.sin(angles)
  depth = 0.9
  dist2 = (x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2
  magnitude = (depth ** 2 / (dist2 + depth ** 2)) ** 1.5
  tilt = rng.uniform(-1, 1, (coils, 2))
  phase = (rng.uniform(-np.pi, np.pi, coils)[:, None, None]
           + tilt[:, 0, None, None] * x + tilt[:, 1, None, None] * y)
  maps = magnitude * np.exp(1j * phase)
  return maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))


def make_volume(rng, *, size=320, coils=15, slices=16, readout_oversampling=2,
                noise_std=0.01) -> dict:
  """One synthetic subject as fastMRI would store it.

  Returns a dict with
    kspace: (slices, coils, readout_oversampling * size, size + size // 8) complex64: the coil
      images (object in the central size x size) zero-padded as an oversampled readout and a
      padded phase-encode axis, Fourier transformed, plus complex Gaussian noise of standard
      deviation ``noise_std * max|image|`` (E|n|^2 = std^2);
    image: (slices, size, size) complex64, the noise-free ground truth on the grid;
    maps: (coils, size, size) complex64, the sensitivities on the grid (sum_c |S_c|^2 = 1);
    rss: (slices, size, size) float32, root-sum-of-squares of the noisy, fully sampled coil images
      cropped to the grid (fastMRI's ``reconstruction_rss``).
  Cropping ``ifft2c(kspace)`` to the central size x size gives ``maps * image`` plus noise.
  """
  image = phantom(rng, size, slices=slices)
  maps = coil_maps(size, coils, rng=rng)
  raw = (readout_oversampling * size, size + size // 8)
  grid = center_slices(raw, (size, size))
  std = noise_std * np.abs(image).max()
  kspace = np.empty((slices, coils) + raw, np.complex64)
  rss = np.empty((slices, size, size), np.float32)
  for s in range(slices):
    # White noise drawn in the image domain: the orthonormal FFT maps it to the same k-space noise.
    noise = rng.standard_normal((coils,) + raw + (2,), dtype=np.float32)
    coil_images = noise.view(np.complex64)[..., 0] * np.float32(std / np.sqrt(2))
    coil_images[(..., *grid)] += maps * image[s]
    kspace[s] = fft2c(coil_images)
    rss[s] = np.sqrt(np.sum(np.abs(coil_images[(..., *grid)]) ** 2, axis=0))
  return dict(kspace=kspace.astype(np.complex64), image=image.astype(np.complex64),
              maps=maps.astype(np.complex64), rss=rss.astype(np.float32))


def make_synthetic_dataset(out_dir, *, train_subjects, val_subjects, slices, coils, size,
                           seed=0, noise_std=0.01) -> Path:
  """Writes a synthetic multi-coil dataset as ``out_dir/{train,val}/synth_<split>_<i>.h5``.

  One file per subject, each from its own seed ``[seed, split, subject]``. A manifest recording the
  arguments is written last: a finished dataset with the same arguments is reused, anything else is
  rewritten.
  """
  if train_subjects < 1 or val_subjects < 1:
    raise ValueError(f"train_subjects, val_subjects: expected >= 1, found "
                     f"{train_subjects}, {val_subjects}")
  out_dir = Path(out_dir)
  manifest = out_dir / "manifest.json"
  args = dict(version=SYNTHETIC_VERSION, train_subjects=train_subjects,
              val_subjects=val_subjects, slices=slices, coils=coils, size=size, seed=seed,
              noise_std=noise_std)
  plan = {split: [out_dir / split / f"synth_{split}_{i:03d}.h5" for i in range(n)]
          for split, n in (("train", train_subjects), ("val", val_subjects))}
  try:
    done = files.read_json(manifest) == args
  except (OSError, ValueError):
    done = False
  if done and all(f.is_file() for paths in plan.values() for f in paths):
    return out_dir
  manifest.unlink(missing_ok=True)
  for code, (split, paths) in enumerate(plan.items()):
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    for stale in set((out_dir / split).glob("synth_*.h5")) - set(paths):
      stale.unlink()
    for i, file in enumerate(paths):
      volume = make_volume(np.random.default_rng([seed, code, i]), size=size, coils=coils,
                           slices=slices, noise_std=noise_std)
      fastmri.write_volume(file, volume["kspace"], volume["rss"],
                           patient_id=f"synth-{split}-{i:03d}")
  files.write_json(manifest, args)
  return out_dir


def synthetic_dataset(cfg: Config, out_dir) -> Path:
  """``make_synthetic_dataset`` of ``cfg``'s ``synth_*`` settings at ``image_size``."""
  return make_synthetic_dataset(
      out_dir, train_subjects=cfg.synth_train_subjects, val_subjects=cfg.synth_val_subjects,
      slices=cfg.synth_slices, coils=cfg.synth_coils, size=cfg.image_size, seed=cfg.synth_seed,
      noise_std=cfg.synth_noise)
