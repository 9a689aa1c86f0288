"""Per-slice preparation, its disk cache, the train/val splits and the batch iterators.

A prepared slice is the network's input and target on the ``image_size`` grid: ``x`` the SENSE
zero-filled image, ``y`` the SENSE combination of the fully sampled coil images with the same maps,
both (h, w, 2) float32 (real, imaginary) divided by ``scale = max |x|``. Splits are directories of
files (subjects), so no subject is in two splits.

Data consistency (the unrolled network) also needs the coil maps and the undersampled k-space
``mask * kspace / scale`` (``load_split(with_maps=True, with_kspace=True)``): divided by the same
``scale`` as ``x``, so ``sense.zero_filled(kspace, maps, mask) == x`` as a complex image.
``to_volumes`` stacks consecutive slices of one file into volume patches for 3D networks.
"""
import collections
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional
import zipfile

import numpy as np

from lwjax import files
from lwjax import fastmri, synthetic
from lwjax.mri import coils, masks, sense
from lwjax.mri.fft import center_slices

CACHE_VERSION = 4  # bump when preparation changes what a cached slice holds (4: ESPIRiT settled)
# Per-slice scales of one file compare within this relative tolerance: a cache rebuilt elsewhere
# (another machine, BLAS, worker count) may differ in the last float32 bits.
SCALE_RTOL = 1e-3
SYNTHETIC_VERSION = 1  # bump when the synthetic generator changes its output


@dataclasses.dataclass(frozen=True)
class PrepConfig:
  """How raw k-space becomes (x, y): the grid, the sampling mask and the coil maps.

  ``calib`` is the side of the fully sampled k-space centre of the Poisson masks and of the coil
  maps' calibration region (maps use less where the mask samples less: :func:`calib_size`).
  ``center_fraction`` is the fraction of fully sampled centre columns of the 1D Cartesian masks.
  ``min_map_coverage``: a slice whose coil maps are non-zero on less than this fraction of the
  grid is skipped: ESPIRiT finds no coil sensitivity on a noise-only edge slice, so there is
  nothing to reconstruct there. It is applied when slices are loaded (``load_split``), to the
  coverage their cache entries record, so changing it prepares nothing again.
  """
  image_size: int = 320
  mask: str = "poisson"  # "poisson" | "cartesian" | "equispaced"
  accel: float = 4.0
  calib: int = 16
  center_fraction: float = 0.04
  mask_seed: int = 0
  maps: str = "espirit"  # "espirit" | "lowres"
  min_map_coverage: float = 0.01


class EmptySlice(ValueError):
  """A slice with nothing to reconstruct (all-zero k-space, or coil maps that cover too little of
  the grid): skipped with a log line, never trained or evaluated on."""


@dataclasses.dataclass
class Split:
  """The prepared slices of a split, N of them, in file then slice order."""
  x: np.ndarray  # (N, h, w, 2) float32 zero-filled input / scale
  y: np.ndarray  # (N, h, w, 2) float32 target / scale
  mask: np.ndarray  # (h, w) bool, shared by all slices
  ids: list[tuple[str, int]]  # (file name, slice index)
  scale: np.ndarray  # (N,) float32, max |zero-filled image| before scaling
  volume_index: np.ndarray  # (N,) int, index of the file (subject) in the split
  maps: Optional[np.ndarray] = None  # (N, C, h, w) complex64 when asked for (C: the most coils)
  kspace: Optional[np.ndarray] = None  # (N, C, h, w) complex64 mask * kspace / scale, if asked
  paths: list[Path] = dataclasses.field(default_factory=list)  # the file of each volume_index
  # (file name, slice index, why) of the slices left out (EmptySlice), in file then slice order.
  skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
  # Per file (``paths``): the grid columns [lo, hi) its header says were acquired, or None.
  acquired: list[Optional[tuple[int, int]]] = dataclasses.field(default_factory=list)


def grid_columns(acquired: tuple[int, int], width: int, size: int) -> tuple[int, int]:
  """The columns [lo, hi) of ``size``-wide grid k-space that lie inside the acquired columns
  ``acquired`` of ``width``-wide k-space (``fastmri.Header.acquired``). ``fastmri.to_grid``
  crops or pads in image space, which keeps k-space's extent and scales its column spacing by
  width / size: column k lands at ``size // 2 + (k - width // 2) * size / width``."""
  at = lambda k: size // 2 + (k - width // 2) * size / width
  return max(0, math.ceil(at(acquired[0]))), min(size, math.floor(at(acquired[1] - 1)) + 1)


def acquired_acceleration(split: Split) -> Optional[tuple[float, float]]:
  """(min, max) over the split's files of the mask's acceleration over the grid columns each
  file acquired (``Split.acquired``), or None where no file's header says. fastMRI zero-pads
  k-space outside them (about 10% of the columns of its knee data), so a mask's samples there
  measure nothing; depending on how densely the mask samples the padded edges, this is above
  or below the grid's ``masks.acceleration``."""
  accels = [masks.acceleration(split.mask[:, lo:hi]) for lo, hi in filter(None, split.acquired)]
  return (min(accels), max(accels)) if accels else None


def format_span(span: tuple[float, float]) -> str:
  """A (min, max) of accelerations as text: "3.49", or "3.49-3.95" where they differ."""
  lo, hi = span
  return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}"


def samples_outside_acquired(split: Split) -> float:
  """The largest share over the split's files of the mask's samples that fall outside the
  columns the file acquired (0 where no header says)."""
  total = split.mask.sum()
  return max((1 - split.mask[:, lo:hi].sum() / total for lo, hi in filter(None, split.acquired)),
             default=0.0)


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
    return masks.make_mask(cfg.mask, (cfg.image_size, cfg.image_size), cfg.accel,
                           seed=cfg.mask_seed, calib=cfg.calib,
                           center_fraction=cfg.center_fraction)
  except ValueError as e:  # ``masks`` names its arguments; a user knows the flags.
    raise ValueError(f"--mask={cfg.mask} --accel={cfg.accel} --calib={cfg.calib} "
                     f"--center_fraction={cfg.center_fraction} --image_size={cfg.image_size}: "
                     f"{e}") from e


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


def _too_small(coverage: float, cfg: PrepConfig) -> Optional[str]:
  """Why a slice whose maps cover ``coverage`` of the grid is skipped, or None to keep it."""
  if coverage >= cfg.min_map_coverage:
    return None
  return (f"{cfg.maps} coil maps cover {coverage:.2%} of the grid, less than "
          f"--min_map_coverage={cfg.min_map_coverage:g} ({cfg.min_map_coverage:.2%})")


# File attrs that change with the k-space (fastMRI stores its norm and the target's maximum): a
# file rewritten with other data under the same size and mtime (``cp -p``) still gets a new key.
_CONTENT_ATTRS = ("norm", "max")


# Fields that act on a slice only through the mask: the key holds the mask's bits instead, so
# a changed mask algorithm (or a new mask kind or option) can never reuse a stale entry.
_MASK_FIELDS = ("mask", "accel", "center_fraction", "mask_seed")


def cache_identity(path, index, cfg: PrepConfig, attrs: Optional[dict] = None,
                   mask: Optional[np.ndarray] = None) -> str:
  """What a prepared slice is, as JSON: file identity (absolute path, size, mtime and the
  ``norm``/``max`` of its ``attrs``, as ``fastmri.open_volume`` reads them), slice, the sampling
  ``mask`` (default ``mask_for(cfg)``) by its bits, the rest of the config, format. Its entry
  is named by its hash (``cache_key``) and holds it, checked on reading."""
  st = os.stat(path)
  content = {k: repr(attrs[k]) for k in _CONTENT_ATTRS if k in (attrs or {})}
  mask = np.asarray(mask_for(cfg) if mask is None else mask, bool)
  prep = dataclasses.asdict(cfg)
  for field in _MASK_FIELDS + ("min_map_coverage",):  # The last is applied on loading.
    del prep[field]
  bits = hashlib.sha256(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()
  return json.dumps({"version": CACHE_VERSION, "path": str(Path(path).resolve()),
                     "size": st.st_size, "mtime_ns": st.st_mtime_ns, "attrs": content,
                     "slice": index, "cfg": prep, "mask": bits}, sort_keys=True)


def cache_key(path, index, cfg: PrepConfig, attrs: Optional[dict] = None,
              mask: Optional[np.ndarray] = None) -> str:
  """The name of a prepared slice's cache entry: the hash of its ``cache_identity``."""
  return _key(cache_identity(path, index, cfg, attrs, mask))


def _key(identity: str) -> str:
  return hashlib.sha256(identity.encode()).hexdigest()[:32]


def identity_difference(was: str, want: str) -> str:
  """How the ``cache_identity`` an entry holds differs from the one asked for, in words."""
  was, want = json.loads(was), json.loads(want)
  return ", ".join(f"{k} {was.get(k)!r} instead of {want[k]!r}" for k in sorted(want)
                   if was.get(k) != want[k]) or "the same"


def _read_entry(file, size, num_coils=None, kspace=False, identity=None) -> Optional[dict]:
  """The cached slice in ``file``, or None when it is missing, unreadable or malformed.

  ``num_coils`` set: the entry must hold maps of that many coils, and with ``kspace`` also the
  sampled k-space (an entry written without them is valid for reads that do not need them).
  A skipped slice's entry is ``{"skip": reason}``. ``identity`` set: an entry that records
  another ``cache_identity`` is ``{"mismatch": how it differs}`` (one that records none is
  invalid).
  """
  want = {"x": ((size, size, 2), np.float32), "y": ((size, size, 2), np.float32),
          "scale": ((), np.float32), "coverage": ((), np.float32)}
  if num_coils is not None:
    want["maps"] = ((num_coils, size, size), np.complex64)
    if kspace:
      want["kspace"] = ((num_coils, size, size), np.complex64)
  try:
    with np.load(file, allow_pickle=False) as z:
      if identity is not None:
        if _IDENTITY not in z.files:  # Written before entries held one: prepared again.
          return None
        if str(z[_IDENTITY]) != identity:
          return {_MISMATCH: identity_difference(str(z[_IDENTITY]), identity)}
      if _SKIP in z.files:
        return {_SKIP: str(z[_SKIP])}
      entry = {k: z[k] for k in want}
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    return None
  for k, (shape, dtype) in want.items():
    if entry[k].shape != shape or entry[k].dtype != dtype or not np.isfinite(entry[k]).all():
      return None
  if entry["scale"] <= 0:
    return None
  return entry


def _entry(example, with_maps, with_kspace=False) -> dict:
  """What the cache keeps of a prepared slice (maps, and maps with the sampled k-space, only
  when asked for: 8 bytes/pixel/coil each)."""
  entry = dict(x=example["x"], y=example["y"], scale=np.float32(example["scale"]),
               coverage=np.float32(example["coverage"]))
  if with_maps or with_kspace:
    entry["maps"] = example["maps"]
  if with_kspace:
    entry["kspace"] = example["kspace"]
  return entry


def _cache_file(info, index, mask, cfg, cache_dir) -> tuple[Path, str]:
  """The cache entry of a slice and the ``cache_identity`` it must hold."""
  identity = cache_identity(info.path, index, cfg, info.attrs, mask)
  return Path(cache_dir) / f"{_key(identity)}.npz", identity


def _cached_slice(info, index, mask, cfg, cache_dir, with_maps, with_kspace) -> Optional[dict]:
  file, identity = _cache_file(info, index, mask, cfg, cache_dir)
  return _read_entry(file, cfg.image_size, info.num_coils if with_maps or with_kspace else None,
                     with_kspace, identity)


_SKIP = "skip"  # The key of a skipped slice's cache entry (its reason), so it is decided once.
_IDENTITY = "identity"  # The key of an entry's ``cache_identity``.
_MISMATCH = "mismatch"  # ``_read_entry``'s answer for an entry of another slice or settings.


def overflows(kspace: np.ndarray) -> bool:
  """Whether k-space (C, H, W) is too large for float32 FFTs: an orthonormal 2D FFT's output can
  reach sqrt(H * W) times the largest input magnitude."""
  limit = float(np.finfo(np.float32).max) / math.sqrt(kspace.shape[-1] * kspace.shape[-2])
  return float(np.abs(kspace).max()) > limit


def _prepare_and_cache(info, index, mask, cfg, cache_dir, with_maps, with_kspace) -> dict:
  """Prepares one slice from its file and writes its cache entry (atomically); returns it
  (``{"skip": reason}`` for an :class:`EmptySlice`)."""
  file, identity = _cache_file(info, index, mask, cfg, cache_dir)
  kspace = fastmri.read_slice(info.path, index)
  where = f"{info.path}: key '{fastmri.KSPACE}', slice {index}"
  if overflows(kspace):
    raise fastmri.DataError(
        f"{where}: its largest magnitude, {np.abs(kspace).max():.3g}, is so close to float32's "
        f"maximum ({np.finfo(np.float32).max:.3g}) that the FFTs' sums overflow to inf (then "
        "LAPACK's 'Eigenvalues did not converge', or NaN images); expected k-space scaled well "
        "below it (fastMRI's is ~1e-3): rescale the file's k-space")
  grid = fastmri.to_grid(kspace, cfg.image_size)
  try:
    entry = _entry(prepare_slice(grid, mask, cfg), with_maps, with_kspace)
  except EmptySlice as e:
    entry = {_SKIP: np.array(str(e))}
  except ValueError as e:
    raise fastmri.DataError(f"{where}: {e}") from e
  with files.atomic_write(file) as tmp, open(tmp, "wb") as f:
    np.savez(f, **entry, **{_IDENTITY: np.array(identity)})
  return entry


def _die_with_parent(parent: int) -> None:
  """Worker initializer: the worker ends when ``parent`` does, also when it is killed with
  SIGKILL (its pool's shutdown never runs then). Linux: the kernel sends SIGKILL
  (PR_SET_PDEATHSIG); elsewhere a thread watches the parent. The workers gone, multiprocessing's
  resource tracker sees its pipe close and ends too."""
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
  else:
    def watch():
      while os.getppid() == parent:
        time.sleep(1.0)
      os._exit(1)
    threading.Thread(target=watch, daemon=True).start()
  if os.getppid() != parent:  # It died before the signal was armed.
    os._exit(1)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """Processes for slice preparation: spawned (the parent may run JAX's threads, which a fork
  would copy half-way), each with single-threaded BLAS/FFT so that ``workers`` use as many cores.
  Preparation is NumPy only; JAX is pinned to the CPU there all the same, so that no worker can
  ever take accelerator memory. No worker outlives the process that made the pool
  (``_die_with_parent``)."""
  worker_env = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
  worker_env["JAX_PLATFORMS"] = "cpu"
  saved = {k: os.environ.get(k) for k in worker_env}
  os.environ.update(worker_env)  # Inherited by the workers, spawned below.
  try:
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
        initargs=(os.getpid(),))
    for _ in pool.map(int, range(workers)):  # Start them all now, under this environment.
      pass
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return pool


def _host_array(shape, dtype, storage: str, scratch_dir) -> np.ndarray:
  """A zero array of ``shape``: in memory, or (``storage="disk"``) memory-mapped from a scratch
  file in ``scratch_dir`` that is deleted at once (the mapping keeps it until the array goes),
  so that no file is left behind whatever happens to the run."""
  if storage == "memory":
    return np.zeros(shape, dtype)
  if storage != "disk":
    raise ValueError(f"storage: expected 'memory' or 'disk', found {storage!r}")
  fd, path = tempfile.mkstemp(prefix="split_", suffix=".npy", dir=scratch_dir)
  os.close(fd)
  try:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # Reserve the blocks now: a sparse file that meets a
      with open(path, "r+b") as f:  # full disk later kills the process with SIGBUS.
        try:
          os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
          raise OSError(f"--host_data=disk: {scratch_dir}: expected room for "
                        f"{os.path.getsize(path) / 2**30:.2f} GiB of prepared slices: {e}") from e
    return out
  finally:
    os.unlink(path)


def volume_infos(data_dir, split, max_volumes=None, *, log=None) -> list[fastmri.VolumeInfo]:
  """The validated files of ``split`` (``fastmri.open_volume``, which reads no k-space), the
  first ``max_volumes`` of them in name order (None: all; a cut is logged)."""
  if max_volumes is not None and max_volumes < 1:
    raise ValueError(f"max_volumes: expected None or >= 1, found {max_volumes}")
  files = fastmri.list_volumes(data_dir, split)
  if log and max_volumes is not None and max_volumes < len(files):
    log(f"{split}: using the first {max_volumes} of {len(files)} files in "
        f"{files[0].parent} (--max_{split}_volumes={max_volumes}; 0: all)")
  return [fastmri.open_volume(f) for f in files[:max_volumes]]


def load_split(data_dir, split, cfg: PrepConfig, *, cache_dir, max_volumes=None,
               with_maps=False, with_kspace=False, workers: int = 1, storage: str = "memory",
               log: Optional[Callable[[str], None]] = None) -> Split:
  """Every slice of the first ``max_volumes`` files of a split, prepared or read from the cache.

  Each slice is cached as one ``.npz`` keyed by :func:`cache_key`; entries are written atomically
  and validated on reading (shapes, finite values, the ``cache_identity`` they hold), and an
  invalid one is prepared and written again (one that holds another identity is logged). ``with_maps`` and
  ``with_kspace`` add the coil maps and the sampled, scaled k-space (what data consistency needs)
  to the split; an entry cached without them is prepared again once. Files with fewer coils than
  the split's most are padded with zero coils (map and k-space 0), which adds exactly nothing to
  any SENSE sum over coils (fastMRI brain files have 4 to 20). Slices not in the cache are
  prepared by ``workers`` processes (0: one per CPU core; ESPIRiT is the slow part).
  ``storage``: the split's arrays in host memory, or on ``"disk"`` (memory-mapped scratch files
  in ``cache_dir``, see ``_host_array``) for datasets larger than the host's memory.
  Slices with nothing to reconstruct (:class:`EmptySlice`: all-zero k-space, or noise-only edge
  slices on which ESPIRiT finds no coil) are left out, logged and listed in ``Split.skipped``;
  a split left with none raises DataError. Any other bad slice raises DataError naming it.
  """
  mask = checked_mask(cfg)
  infos = volume_infos(data_dir, split, max_volumes, log=log)
  coil_counts = sorted({info.num_coils for info in infos})
  if log and (with_maps or with_kspace) and len(coil_counts) > 1:
    log(f"{split}: files with {coil_counts} coils; maps and k-space are padded with zero coils "
        f"to {coil_counts[-1]}")
  small = [info.path.name for info in infos if min(info.kspace_shape[2:]) < cfg.image_size]
  if log and small:
    log(f"{split}: {len(small)} file(s) have k-space smaller than --image_size={cfg.image_size} "
        f"in H or W and are zero-padded in image space (e.g. {small[0]})")
  cropped = [info for info in infos if info.recon and max(info.recon) > cfg.image_size]
  if log and cropped:
    log(f"{split}: {len(cropped)} file(s) have a larger reconstruction grid than --image_size="
        f"{cfg.image_size} (e.g. {cropped[0].path.name}: {cropped[0].recon[0]}x"
        f"{cropped[0].recon[1]} in its header): their images are cropped to the central "
        f"{cfg.image_size}x{cfg.image_size} pixels (a smaller field of view), not resampled")
  Path(cache_dir).mkdir(parents=True, exist_ok=True)
  slices = [(v, info, index) for v, info in enumerate(infos) for index in range(info.num_slices)]
  arrays = _split_arrays(len(slices), cfg.image_size, coil_counts[-1], with_maps=with_maps,
                         with_kspace=with_kspace, storage=storage, scratch_dir=cache_dir)
  skipped = _fill_split(arrays, slices, mask, cfg, split=split, cache_dir=cache_dir,
                        with_maps=with_maps, with_kspace=with_kspace, workers=workers, log=log)
  kept = [i for i in range(len(slices)) if i not in skipped]
  name = lambda i: f"{slices[i][1].path.name} slice {slices[i][2]}"
  if not kept:
    first = min(skipped)
    raise fastmri.DataError(
        f"{split}: every slice of {len(infos)} file(s) was skipped as empty (e.g. "
        f"{slices[first][1].path}, key '{fastmri.KSPACE}', slice {slices[first][2]}: "
        f"{skipped[first]}); expected slices with signal")
  if skipped and log:
    first = min(skipped)
    log(f"{split}: skipped {len(skipped)} of {len(slices)} slices with nothing to reconstruct "
        f"(e.g. {name(first)}: {skipped[first]}; all are listed in the run's data.json)")
    left = {slices[i][0] for i in kept}
    emptied = [info.path.name for v, info in enumerate(infos) if v not in left]
    if emptied:
      log(f"{split}: {len(emptied)} file(s) have no slice left and are not used (e.g. "
          f"{emptied[0]})")
  out = Split(mask=mask, ids=[(slices[i][1].path.name, slices[i][2]) for i in kept],
              volume_index=np.asarray([slices[i][0] for i in kept], int),
              paths=[info.path for info in infos],
              skipped=[(slices[i][1].path.name, slices[i][2], why)
                       for i, why in sorted(skipped.items())],
              acquired=[info.acquired and grid_columns(info.acquired, info.kspace_shape[3],
                                                       cfg.image_size) for info in infos],
              **_compact(arrays, kept))
  outside = samples_outside_acquired(out)
  if log and outside > 0.01:
    accel = acquired_acceleration(out)
    log(f"{split}: up to {outside:.1%} of the mask's samples fall on k-space columns the files "
        "did not acquire (their headers' encodingLimits; zero-padded): its acceleration is "
        f"{masks.acceleration(mask):.2f} over the grid, {format_span(accel)} over the "
        "acquired columns")
  return out


def _split_arrays(total, size, num_coils, *, with_maps, with_kspace, storage,
                  scratch_dir) -> dict[str, np.ndarray]:
  """A split's zero arrays of ``total`` slices (``x``, ``y``, ``scale``; ``maps``, ``kspace``
  when asked), filled slice by slice as entries are read or prepared: the host holds the split
  once (1.6 MB per 320x320 slice, plus 2 x 8 bytes per pixel and coil with maps and k-space),
  never a list of entries besides it."""
  shapes = {"x": ((total, size, size, 2), np.float32), "y": ((total, size, size, 2), np.float32),
            "scale": ((total,), np.float32)}
  for key, wanted in (("maps", with_maps), ("kspace", with_kspace)):
    if wanted:
      shapes[key] = ((total, num_coils, size, size), np.complex64)
  return {k: _host_array(shape, dtype, storage if k != "scale" else "memory", scratch_dir)
          for k, (shape, dtype) in shapes.items()}


def _fill_split(arrays, slices, mask, cfg, *, split, cache_dir, with_maps, with_kspace, workers,
                log) -> dict[int, str]:
  """Fills row i of ``arrays`` with slice ``slices[i] = (volume, info, index)``, from the cache or
  prepared by ``workers`` processes; returns the skipped rows' reasons (``EmptySlice``)."""
  total, skipped = len(slices), {}

  def store(i: int, entry: dict) -> None:
    why = str(entry[_SKIP]) if _SKIP in entry else _too_small(float(entry["coverage"]), cfg)
    if why:
      skipped[i] = why
      return
    for key, out in arrays.items():
      if key in ("maps", "kspace"):
        out[i, :len(entry[key])] = entry[key]  # A file with fewer coils: the rest stay zero.
      else:
        out[i] = entry[key]

  missing, mismatched = [], []
  for i, (_, info, index) in enumerate(slices):
    entry = _cached_slice(info, index, mask, cfg, cache_dir, with_maps, with_kspace)
    if entry is not None and _MISMATCH in entry:
      mismatched.append(f"{info.path.name} slice {index}: {entry[_MISMATCH]}")
      entry = None
    if entry is None:
      missing.append(i)
    else:
      store(i, entry)
  hits = total - len(missing)
  if log and mismatched:
    log(f"{split}: {len(mismatched)} cache entries in {cache_dir} hold another slice or other "
        f"settings than their names say (e.g. {mismatched[0]}): prepared again")
  args = lambda i: (slices[i][1], slices[i][2], mask, cfg, cache_dir, with_maps, with_kspace)
  workers = min(workers or os.cpu_count() or 1, len(missing))

  def prepared() -> Iterator[tuple[int, dict]]:
    """(index, entry) of every missing slice, as each is ready."""
    if workers <= 1:
      yield from ((i, _prepare_and_cache(*args(i))) for i in missing)
      return
    pool = _worker_pool(workers)
    try:
      futures = {pool.submit(_prepare_and_cache, *args(i)): i for i in missing}
      for future in concurrent.futures.as_completed(futures):
        yield futures[future], future.result()  # A worker's DataError is raised here.
    finally:  # On an error, the slices not started yet are dropped, not prepared first.
      pool.shutdown(wait=True, cancel_futures=True)

  every = max(1, total // 10)
  pool_note = f", {workers} workers" if workers > 1 else ""
  for done, (i, entry) in enumerate(prepared(), start=hits + 1):
    store(i, entry)
    if log and (done % every == 0 or done == total):
      log(f"{split}: prepared {done}/{total} slices ({hits} from cache{pool_note})")
  if log and not missing:
    log(f"{split}: prepared {total}/{total} slices ({hits} from cache)")
  return skipped


def _compact(arrays: dict[str, np.ndarray], kept: list[int]) -> dict[str, np.ndarray]:
  """The rows ``kept`` (increasing) of each array, moved down in place: no second copy of the
  split (in memory or memory-mapped); the arrays themselves when nothing was dropped."""
  if len(kept) == len(next(iter(arrays.values()))):
    return arrays
  for new, old in enumerate(kept):
    if new != old:
      for out in arrays.values():
        out[new] = out[old]
  return {k: v[:len(kept)] for k, v in arrays.items()}


def data_record(split: Split) -> dict:
  """What identifies a split's data: its files with their slice counts, and each slice's scale
  (max |zero-filled image|: it changes with the content); and the skipped slices, for the user."""
  files = collections.Counter(name for name, _ in split.ids)
  return {"files": [[name, count] for name, count in files.items()],
          "scale": [float(v) for v in split.scale],
          "skipped": [list(s) for s in split.skipped]}


def data_difference(was: dict, new: dict) -> Optional[str]:
  """How a split's ``data_record`` ``new`` differs from ``was``, or None for the same data."""
  if new["files"] != was["files"]:
    diff = next(((a, b) for a, b in zip(was["files"], new["files"]) if a != b), None)
    return (f"{diff[0][0]} ({diff[0][1]} slices) there, {diff[1][0]} ({diff[1][1]}) now"
            if diff else f"{len(was['files'])} files there, {len(new['files'])} now")
  close = np.isclose(new["scale"], was["scale"], rtol=SCALE_RTOL, atol=0)
  if not close.all():
    i = int(np.argmax(~close))
    return (f"the files have the same names but other content (slice {i} of the split: scale "
            f"{was['scale'][i]:.6g} there, {new['scale'][i]:.6g} now)")
  return None


def check_disjoint(splits: dict[str, Split]) -> None:
  """Raises DataError when a file (subject) is in two splits: the same resolved path (a
  symlink), or the same content under another name (a copy): the same slices with the same
  scales (within ``SCALE_RTOL``), which other k-space does not give."""
  def refuse(path, name, how, other_path, other):
    raise fastmri.DataError(
        f"{path} ({name}) {how} {other_path} ({other}): a subject in two splits would be "
        "evaluated on data it was trained on; expected disjoint train and val files")

  by_path = {}  # resolved path -> (split, path) of the first file there
  by_slices = collections.defaultdict(list)  # slice indices -> [(split, path, scales)]
  for name, split in splits.items():
    for v, path in enumerate(split.paths):
      rows = np.flatnonzero(split.volume_index == v)
      if not len(rows):  # Every slice skipped: nothing of it is used.
        continue
      other, other_path = by_path.setdefault(path.resolve(), (name, path))
      if other != name:
        refuse(path, name, "is the same file as", other_path, other)
      slices, scales = tuple(split.ids[r][1] for r in rows), split.scale[rows]
      for other, other_path, other_scales in by_slices[slices]:
        if other != name and np.allclose(scales, other_scales, rtol=SCALE_RTOL, atol=0):
          refuse(path, name, "holds the same k-space as", other_path, other)
      by_slices[slices].append((name, path, scales))


def volume_patches(split: Split, depth: int) -> np.ndarray:
  """(M, depth) int: each volume patch's slices (indices into ``split``), see ``to_volumes``.
  Raises ValueError naming ``--volume_depth`` when no file has ``depth`` slices."""
  if depth < 1:
    raise ValueError(f"--volume_depth={depth}: expected >= 1")
  groups, longest = [], 0
  for v in np.unique(split.volume_index):
    rows = np.flatnonzero(split.volume_index == v)
    index = np.array([split.ids[r][1] for r in rows])
    order = np.argsort(index, kind="stable")
    rows, index = rows[order], index[order]
    # Runs of consecutive slices: a skipped slice (Split.skipped) breaks a run.
    for run in np.split(rows, np.flatnonzero(np.diff(index) != 1) + 1):
      longest = max(longest, len(run))
      groups += [run[i:i + depth] for i in range(0, len(run) - depth + 1, depth)]
  if not groups:
    raise ValueError(f"--volume_depth={depth}: expected at most the longest run of consecutive "
                     f"slices of a file ({longest}; skipped slices break runs), or no volume "
                     "patch fits")
  return np.stack(groups)


def to_volumes(split: Split, depth: int) -> dict[str, np.ndarray]:
  """Volume patches for 3D networks: ``depth`` consecutive slices of one file, slices as axis 1.

  Each run of consecutive slices of a file (a skipped slice ends a run) is cut into
  non-overlapping patches of ``depth``; the run's last ``len(run) % depth`` slices are dropped
  and no patch mixes two files or spans a skipped slice. The slices of a patch are brought to
  one scale, the patch's: each was divided by its own ``max |x|`` (``Split.scale``), so they are
  multiplied by ``scale_slice / scale_patch`` with ``scale_patch`` the largest of them (then
  ``max |x| = 1`` over the patch and the slices keep their relative intensities). The
  slice-wise metrics do not change under this per-slice rescaling.

  Returns:
    dict(x=(M, depth, h, w, 2) float32, y=(M, depth, h, w, 2) float32, scale=(M,) float32 the
    patches' scales, volume_index=(M,) int the patches' files, slices=(M, depth) int the patches'
    slices as indices into ``split``), and ``maps`` and ``kspace`` (M, depth, C, h, w) complex64
    when the split has them (``kspace`` rescaled like ``x``).
  """
  slices = volume_patches(split, depth)  # (M, depth)
  patch_scale = split.scale[slices].max(axis=1)
  factor = (split.scale[slices] / patch_scale[:, None]).astype(np.float32)  # (M, depth)
  out = {"x": split.x[slices] * factor[..., None, None, None],
         "y": split.y[slices] * factor[..., None, None, None],
         "scale": patch_scale.astype(np.float32),
         "volume_index": split.volume_index[slices[:, 0]], "slices": slices}
  if split.maps is not None:
    out["maps"] = split.maps[slices]
  if split.kspace is not None:
    out["kspace"] = split.kspace[slices] * factor[..., None, None, None]
  return out


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
    done = json.loads(manifest.read_text()) == args
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
      volume = synthetic.make_volume(np.random.default_rng([seed, code, i]), size=size,
                                     coils=coils, slices=slices, noise_std=noise_std)
      fastmri.write_volume(file, volume["kspace"], volume["rss"],
                           patient_id=f"synth-{split}-{i:03d}")
  with files.atomic_write(manifest) as tmp:
    tmp.write_text(json.dumps(args, indent=2))
  return out_dir


def steps_per_epoch(n, batch_size, full_pass: bool = False) -> int:
  """Batches in an epoch of ``n`` examples: full ones (the remainder is dropped), or with
  ``full_pass`` enough to hold every example (the last one padded, see ``batch_order``)."""
  return -(-n // batch_size) if full_pass else n // batch_size


def num_examples(arrays) -> int:
  """The leading size shared by every array of ``arrays`` (ValueError if they disagree)."""
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays: expected one leading size for all entries, found {sizes}")
  return next(iter(sizes.values()))


def check_batch_size(n: int, batch_size: int, num_devices: int = 1) -> None:
  """Raises ValueError unless ``batch_size`` is in 1..n and divisible by ``num_devices``."""
  if batch_size % num_devices:
    raise ValueError(f"batch_size {batch_size} is not divisible by num_devices {num_devices}")
  if not 0 < batch_size <= n:
    raise ValueError(f"--batch_size={batch_size}: expected 1..{n}, the number of training "
                     "examples (slices, or volume patches of a 3D network)")


def batch_order(n: int, batch_size: int, *, seed, epoch, num_devices=1,
                full_pass: bool = False) -> list[np.ndarray]:
  """One epoch's shuffled batches of example indices, each example at most once.

  The order depends only on (seed, epoch). Every batch has ``batch_size`` entries (static
  shapes): the last ``n % batch_size`` examples of the shuffled order are dropped, or with
  ``full_pass`` (a full-batch solver needs every example each epoch) kept, and the last batch is
  filled up with index -1, a padding row that ``gather`` gives weight 0.
  """
  check_batch_size(n, batch_size, num_devices)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  steps = steps_per_epoch(n, batch_size, full_pass)
  order = np.concatenate([order, np.full(max(steps * batch_size - n, 0), -1)])
  return np.split(order[:steps * batch_size], steps)


def gather(arrays: dict, idx: np.ndarray, *, full_pass_of: Optional[int] = None) -> dict:
  """The batch ``{k: v[idx]}`` of host ``arrays``.

  ``full_pass_of=n``: ``idx`` is a batch of a ``full_pass`` epoch over n examples; padding rows
  (-1) repeat example 0, and the batch gets ``weight`` (B,) float32: ``steps * B / n`` for the
  examples and 0 for the padding, so that the mean over the epoch's ``steps`` batches of each
  batch's weighted mean loss (``stage.half_mse``) is the mean loss over the n examples.
  """
  batch = {k: v[np.maximum(idx, 0)] for k, v in arrays.items()}
  if full_pass_of is not None:
    steps = steps_per_epoch(full_pass_of, len(idx), full_pass=True)
    batch["weight"] = np.where(idx >= 0, steps * len(idx) / full_pass_of, 0).astype(np.float32)
  return batch


def _pad(a, n):
  """Zero-pads the leading axis of ``a`` to length ``n`` (``a`` itself when it has n rows)."""
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def eval_batches(arrays: dict[str, np.ndarray], batch_size) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in batches of ``batch_size``.

  The last batch is zero-padded to ``batch_size`` (static shapes for jit and sharding); ``valid``
  (batch_size,) bool marks the real examples.
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  n = num_examples(arrays)
  if batch_size < 1:
    raise ValueError(f"batch_size {batch_size}: expected >= 1")
  if "valid" in arrays:
    raise ValueError("arrays: expected no 'valid' entry (eval_batches adds it)")

  def batch(start):
    m = min(batch_size, n - start)
    return {**{k: _pad(v[start:start + m], batch_size) for k, v in arrays.items()},
            "valid": np.arange(batch_size) < m}

  return map(batch, range(0, n, batch_size))


def example_arrays(cfg, split: Split,
                   keys: tuple[str, ...] = ("x", "y")) -> tuple[dict, np.ndarray]:
  """The examples the networks of ``cfg`` train and are evaluated on, and their slices.

  Slices, or for 3D networks volume patches of ``--volume_depth`` consecutive slices of one file
  (``data.to_volumes``: slices that fill no patch are dropped). Returns
  ``({key: array}, slices)``, ``slices`` the examples' slices as indices into ``split``, in the
  order of the examples flattened to slices."""
  if cfg.ndim == 3:
    volumes = to_volumes(split, cfg.volume_depth)
    return {k: volumes[k] for k in keys}, volumes["slices"].reshape(-1)
  return {k: getattr(split, k) for k in keys}, np.arange(len(split.x))
