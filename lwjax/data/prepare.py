"""How raw k-space becomes a network's input and target: ``PrepConfig``, the run's mask, one slice.

A prepared slice is the network's input and target on the ``image_size`` grid: ``x`` the SENSE
zero-filled image, ``y`` the SENSE combination of the fully sampled coil images with the same maps,
both (h, w, 2) float32 (real, imaginary) divided by ``scale = max |x|``.
"""
import dataclasses
import functools
from typing import Optional

import numpy as np

from lwjax.config import Config
from lwjax.mri import coils, masks, sense
from lwjax.mri.fft import center_slices

# The ``Config`` fields that decide how a slice is prepared (``PrepConfig``'s fields).
PREP_FIELDS = ("image_size", "mask", "accel", "calib", "center_fraction", "mask_seed", "maps",
               "min_map_coverage")


def _config_field(name: str) -> tuple:
  """(name, type, field) of ``Config``'s field ``name``, with its default."""
  (f,) = [f for f in dataclasses.fields(Config) if f.name == name]
  return name, f.type, dataclasses.field(default=f.default)


_PREP_DOC = """How raw k-space becomes (x, y): the grid, the sampling mask and the coil maps.

  The ``PREP_FIELDS`` of ``Config``, with Config's types and defaults (``prep_config(cfg)``).
  ``calib`` is the side of the fully sampled k-space centre of the Poisson masks and of the coil
  maps' calibration region (maps use less where the mask samples less: :func:`calib_size`).
  ``center_fraction`` is the fraction of fully sampled centre columns of the 1D Cartesian masks.
  ``min_map_coverage``: a slice whose coil maps are non-zero on less than this fraction of the
  grid is skipped: ESPIRiT finds no coil sensitivity on a noise-only edge slice, so there is
  nothing to reconstruct there. It is applied when slices are loaded (``load_split``), to the
  coverage their cache entries record, so changing it prepares nothing again.
  """
PrepConfig = dataclasses.make_dataclass(
    "PrepConfig", [_config_field(name) for name in PREP_FIELDS], frozen=True,
    namespace={"__module__": __name__, "__doc__": _PREP_DOC})


def prep_config(cfg: Config) -> PrepConfig:
  """The data-preparation settings of a run's ``cfg``."""
  return PrepConfig(**{name: getattr(cfg, name) for name in PREP_FIELDS})


class EmptySlice(ValueError):
  """A slice with nothing to reconstruct (all-zero k-space, or coil maps that cover too little of
  the grid): skipped with a log line, never trained or evaluated on."""


def calibration_warning(cfg: PrepConfig, mask: np.ndarray) -> Optional[str]:
  """Why the coil maps of ``cfg`` with its ``mask`` (``checked_mask``) will be poor though they
  can be made (None: they will not): low-resolution maps from a calibration block smaller than
  ``coils.LOWRES_GOOD_CALIB``."""
  if cfg.maps != "lowres":
    return None
  calib = calib_size(mask, cfg.calib)
  if min(calib) >= coils.LOWRES_GOOD_CALIB:
    return None
  return (f"--maps=lowres from a {calib[0]}x{calib[1]} calibration block (--mask={cfg.mask}, "
          f"--calib={cfg.calib}, --center_fraction={cfg.center_fraction:g}): maps this coarse "
          "lose intensity in the target itself (8-coil phantoms: the 5th percentile of |target| "
          "/ RSS over the object is 0.96 at 8x8, 0.92 at 16x6, 0.64 at 16x2); a block of at "
          f"least {coils.LOWRES_GOOD_CALIB}x{coils.LOWRES_GOOD_CALIB} keeps it")


def mask_for(cfg: PrepConfig) -> np.ndarray:
  """The run's sampling mask, (image_size, image_size) bool.

  One fixed mask per run (seeded by ``mask_seed``) for every slice and subject, train and val, as a
  scan protocol would use: the network learns one aliasing pattern and the mask is stored once
  (``Split.mask``). fastMRI's PyTorch loaders instead draw a new Cartesian mask per slice.
  """
  try:
    return _mask(cfg.mask, cfg.image_size, cfg.accel, cfg.mask_seed, cfg.calib,
                 cfg.center_fraction).copy()
  except ValueError as e:  # ``masks`` names its arguments; a user knows the flags.
    raise ValueError(f"--mask={cfg.mask} --accel={cfg.accel} --calib={cfg.calib} "
                     f"--center_fraction={cfg.center_fraction} --image_size={cfg.image_size}: "
                     f"{e}") from e


# A run asks for its mask at start-up and once per split; a paper-size Poisson disc is slow to
# draw (BUILD_NOTES.md, masks), so each is drawn once per process.
@functools.lru_cache(maxsize=8)
def _mask(kind, size, accel, seed, calib, center_fraction) -> np.ndarray:
  return masks.make_mask(kind, (size, size), accel, seed=seed, calib=calib,
                         center_fraction=center_fraction)


def checked_mask(cfg: PrepConfig) -> np.ndarray:
  """``mask_for(cfg)``, after checking that the settings can make coil maps at all; raises
  ValueError naming the flags (before any file is read: no data file is to blame)."""
  mask = mask_for(cfg)
  calib = calib_size(mask, cfg.calib)
  if cfg.maps == "espirit" and min(calib) < coils.ESPIRIT_MIN_CALIB:
    raise ValueError(
        f"--maps=espirit needs a fully sampled k-space centre of at least "
        f"{coils.ESPIRIT_MIN_CALIB}x{coils.ESPIRIT_MIN_CALIB}; --mask={cfg.mask} with --calib="
        f"{cfg.calib}, --center_fraction={cfg.center_fraction} at --image_size={cfg.image_size} "
        f"samples {calib[0]}x{calib[1]}: raise --center_fraction (1D masks) or --calib (Poisson), "
        "or use --maps=lowres")
  return mask


def calib_size(mask, calib) -> tuple[int, int]:
  """The largest fully sampled centred block (rows, columns) of ``mask``, each side at most
  ``calib``: the coil maps' calibration region (as BART's ecalib finds it).

  A 4x Cartesian mask of 320 columns samples 13 centre lines, all rows of them: its block is
  16 x 13. Maps estimated from a 16-wide region would see unacquired (zero) columns as data.
  """
  mask = np.asarray(mask, bool)
  best = (0, 0)
  for rows in range(min(calib, mask.shape[0]), 0, -1):
    for cols in range(min(calib, mask.shape[1]), 0, -1):
      if rows * cols <= best[0] * best[1]:
        break
      if mask[center_slices(mask.shape, (rows, cols))].all():
        best = (rows, cols)
        break
  if best == (0, 0):
    raise ValueError("mask: expected a fully sampled k-space centre, found the centre unsampled")
  return best


def prepare_slice(kspace_grid, mask, cfg: PrepConfig) -> dict:
  """One slice's network input and target.

  Args:
    kspace_grid: (C, h, w) complex fully sampled k-space on the grid (``fastmri.to_grid``).
    mask: (h, w) bool sampling mask.
    cfg: the preparation config (``maps`` and ``calib`` are used here).

  Returns:
    dict(x=(h, w, 2) float32, y=(h, w, 2) float32, maps=(C, h, w) complex64,
    kspace=(C, h, w) complex64 the sampled k-space ``mask * kspace_grid / scale``, scale=float).
    Maps come from the undersampled data only, and ``scale = max |x|`` uses only the input, so
    both are available at inference.

  Also returns ``coverage``, the fraction of the grid where the maps are non-zero
  (``PrepConfig.min_map_coverage`` is applied to it on loading).

  Raises:
    EmptySlice: all-zero k-space, or maps that are zero everywhere (ESPIRiT on a noise-only slice).
  """
  kspace_grid = np.asarray(kspace_grid, np.complex64)
  mask = np.asarray(mask, bool)
  if not kspace_grid.any():
    raise EmptySlice("all-zero k-space")
  out = network_input(kspace_grid, mask, cfg)
  y = sense.zero_filled(kspace_grid, out["maps"], np.ones_like(mask))
  return dict(out, y=sense.to_channels(y / out["scale"]),
              kspace=np.asarray(kspace_grid * mask / out["scale"], np.complex64))


def network_input(kspace, mask, cfg: PrepConfig) -> dict:
  """What a network sees of one slice, from its sampled k-space only (so also at inference).

  Args:
    kspace: (C, h, w) complex k-space; only the samples where ``mask`` is set are used.
    mask: (h, w) bool sampling mask.
    cfg: the preparation config (``maps`` and ``calib`` are used here).

  Returns:
    dict(x=(h, w, 2) float32 the SENSE zero-filled image / scale, maps=(C, h, w) complex64 from
    the calibration region, scale=max |zero-filled image|, coverage=the fraction of the grid
    where the maps are non-zero).

  Raises:
    EmptySlice: all-zero k-space, or maps that are zero everywhere (a noise-only slice).
  """
  kspace, mask = np.asarray(kspace, np.complex64), np.asarray(mask, bool)
  if not (kspace * mask).any():
    raise EmptySlice("all-zero k-space")
  calib = calib_size(mask, cfg.calib)
  maps = coils.estimate(kspace * mask, cfg.maps, calib=calib)
  coverage = float(np.mean(np.any(maps != 0, axis=0)))
  if coverage == 0:
    raise EmptySlice(f"{cfg.maps} coil maps are zero on the whole grid ({_NO_MAPS_HINT})")
  x = sense.zero_filled(kspace, maps, mask)
  scale = float(np.abs(x).max())
  if not np.isfinite(scale) or scale <= 0:
    raise EmptySlice(f"zero-filled image: expected a finite positive maximum, found {scale} "
                     f"({_NO_MAPS_HINT})")
  return dict(x=sense.to_channels(x / scale), maps=np.asarray(maps, np.complex64), scale=scale,
              coverage=coverage)


_NO_MAPS_HINT = ("a noise-only slice? If slices with signal are skipped too: a larger --calib or "
                 "--center_fraction, or --maps=lowres")
