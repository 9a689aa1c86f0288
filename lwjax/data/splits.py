"""A split's prepared slices (``Split``, ``load_split``), their identity and disjointness.

Splits are directories of files (subjects), so no subject is in two splits. Data consistency (the
unrolled network) also needs the coil maps and the undersampled k-space ``mask * kspace / scale``
(``load_split(with_maps=True, with_kspace=True)``): divided by the same ``scale`` as ``x``, so
``sense.zero_filled(kspace, maps, mask) == x`` as a complex image.
"""
import collections
import dataclasses
import math
import os
from pathlib import Path
import tempfile
from typing import Callable, Optional

import numpy as np

from lwjax.data import fastmri
from lwjax.data.cache import fill_split
from lwjax.data.prepare import PrepConfig, checked_mask
from lwjax.mri import masks

# Per-slice scales of one file compare within this relative tolerance: a cache rebuilt elsewhere
# (another machine, BLAS, worker count) may differ in the last float32 bits.
SCALE_RTOL = 1e-3


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
  invalid one is prepared and written again (one that holds another identity is logged).
  ``with_maps`` and ``with_kspace`` add the coil maps and the sampled, scaled k-space (what data
  consistency needs) to the split; an entry cached without them is prepared again once. Files
  with fewer coils than the split's most are padded with zero coils (map and k-space 0), which
  adds exactly nothing to any SENSE sum over coils (fastMRI brain files have 4 to 20). Slices not in the cache are
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
  skipped = fill_split(arrays, slices, mask, cfg, split=split, cache_dir=cache_dir,
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
