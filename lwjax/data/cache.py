"""The prepared-slice cache on disk, and the worker processes that fill it.

Each slice is one ``.npz`` named by the hash of its ``cache_identity`` (file identity, slice,
mask bits, the rest of ``PrepConfig``) and holding that identity, checked on reading.
"""
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
import signal
import sys
import threading
import time
from typing import Iterator, Optional
import zipfile

import numpy as np

from lwjax import files
from lwjax.data import fastmri
from lwjax.data.prepare import EmptySlice, PrepConfig, mask_for, prepare_slice

CACHE_VERSION = 4  # bump when preparation changes what a cached slice holds (4: ESPIRiT settled)


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


def _prepare_and_cache(info, index, mask, cfg, cache_dir, with_maps, with_kspace) -> dict:
  """Prepares one slice from its file and writes its cache entry (atomically); returns it
  (``{"skip": reason}`` for an :class:`EmptySlice`)."""
  file, identity = _cache_file(info, index, mask, cfg, cache_dir)
  kspace = fastmri.read_slice(info.path, index)
  where = f"{info.path}: key '{fastmri.KSPACE}', slice {index}"
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


def _too_small(coverage: float, cfg: PrepConfig) -> Optional[str]:
  """Why a slice whose maps cover ``coverage`` of the grid is skipped, or None to keep it."""
  if coverage >= cfg.min_map_coverage:
    return None
  return (f"{cfg.maps} coil maps cover {coverage:.2%} of the grid, less than "
          f"--min_map_coverage={cfg.min_map_coverage:g} ({cfg.min_map_coverage:.2%})")


def fill_split(arrays, slices, mask, cfg, *, split, cache_dir, with_maps, with_kspace, workers,
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
