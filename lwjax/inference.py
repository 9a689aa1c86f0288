"""Using a trained network: load one of a run's networks and reconstruct images or whole files.

  from lwjax import inference
  recon = inference.load("runs/demo", method="layerwise_convex", depth=4)
  image = recon(zero_filled)                      # (..., H, W) complex -> (..., H, W) complex
  image = recon.from_kspace(kspace, mask, maps)   # (C, H, W) k-space, (H, W) mask, (C, H, W) maps

The network is fully convolutional: any image size works, and each image is scaled by the
maximum of its magnitude on the way in (as in training) and back on the way out.
``reconstruct_file`` writes a file's reconstructions in fastMRI's submission layout.
"""
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import jax
import numpy as np
from absl import logging

from lwjax import data as data_lib
from lwjax import evaluate
from lwjax import files
from lwjax import models
from lwjax import nets
from lwjax.config import Config
from lwjax.data import fastmri
from lwjax.models import cnn
from lwjax.mri import masks
from lwjax.mri import sense
from lwjax.training import workdir as workdir_lib

RECONSTRUCTION = "reconstruction"  # fastMRI's submission key: (slices, h, w) float32 magnitudes


def choose_network(cfg: Config, method: Optional[str] = None,
                   depth: Optional[int] = None) -> tuple[str, int]:
  """``(method, depth)`` of a trained network of the run of ``cfg``: by default its first method
  at the deepest depth trained so far. Raises ValueError naming the flag when there is none."""
  deepest = dict(evaluate.final_networks(cfg))
  method = method or cfg.methods[0]
  if method not in deepest:
    one = " (one of them)" if "," in method else ""
    raise ValueError(f"--method={method!r}: expected one method the run trained{one}: "
                     f"{', '.join(deepest)}")
  depths = [d for m, d in evaluate.trained_networks(cfg) if m == method]
  saved = [d for d in depths if workdir_lib.params_dir(cfg.workdir, method, d).exists()]
  if not saved:
    raise ValueError(f"--method={method}: no {method} network of {cfg.workdir} is trained yet")
  depth = depth or max(saved)  # An unfinished run: its deepest network so far.
  if depth not in saved:
    raise ValueError(f"--depth={depth}: the run has {method} networks of depth {depths}, of which "
                     f"{saved} are trained")
  return method, depth


@functools.lru_cache(maxsize=8)
def _forward(net: nets.DeepNet) -> Callable:
  return jax.jit(lambda params, x: nets.forward(net, params, x))


@dataclasses.dataclass(frozen=True)
class Reconstructor:
  """One trained 2D network of a run, as a function of zero-filled images."""
  cfg: Config
  method: str
  depth: int
  params: Any
  batch_size: int = 8

  def channels(self, x: np.ndarray) -> np.ndarray:
    """The network on (N, H, W, 2) float images already scaled as in training (max |x| = 1)."""
    net = cnn.network_template(self.cfg).clone(depth=self.depth)
    out = [np.asarray(_forward(net)(self.params, x[i:i + self.batch_size]))
           for i in range(0, len(x), self.batch_size)]
    return np.concatenate(out) if out else np.zeros_like(x)

  def __call__(self, zero_filled) -> np.ndarray:
    """(..., H, W) complex zero-filled images (or (..., H, W, 2) real, imaginary) -> the
    reconstructions in the same form and scale."""
    z = np.asarray(zero_filled)
    as_channels = not np.iscomplexobj(z)
    z = sense.to_complex(z) if as_channels else z
    flat = z.reshape((-1,) + z.shape[-2:])
    scale = np.abs(flat).max(axis=(1, 2)).reshape(-1, 1, 1)
    scale = np.where(scale > 0, scale, 1.0)
    x = np.asarray(sense.to_channels(flat / scale), np.float32)
    out = sense.to_complex(self.channels(x)) * scale
    out = out.reshape(z.shape).astype(np.complex64)
    return np.asarray(sense.to_channels(out)) if as_channels else out

  def from_kspace(self, kspace, mask, maps) -> np.ndarray:
    """The reconstruction (H, W) complex of one slice's k-space (C, H, W), sampled where
    ``mask`` (H, W) is set, with coil maps (C, H, W) (``coils.estimate``)."""
    return self(sense.zero_filled(np.asarray(kspace), np.asarray(maps), np.asarray(mask, bool)))


def load(workdir, method: Optional[str] = None, depth: Optional[int] = None, *,
         batch_size: Optional[int] = None) -> Reconstructor:
  """A run's trained network (default: its first method at its deepest trained depth) as a
  ``Reconstructor``. 2D CNN runs only; raises ValueError or FileNotFoundError naming what is
  missing."""
  cfg = evaluate.load_config(workdir)
  if not models.family(cfg).image_to_image or cfg.ndim != 2:
    raise ValueError(f"{workdir}: reconstruction covers 2D CNN runs; this run has "
                     f"--model={cfg.model} --ndim={cfg.ndim}")
  method, depth = choose_network(cfg, method, depth)
  return Reconstructor(cfg, method, depth, evaluate.load_network(cfg, method, depth),
                       batch_size=batch_size or cfg.eval_batch_size)


def h5_files(folder) -> list[Path]:
  """The ``.h5`` files of ``folder`` in name order (hidden ones, such as macOS's ``._*``, left
  out); DataError when there are none."""
  folder = Path(folder)
  if not folder.is_dir():
    raise fastmri.DataError(f"{folder}: no such folder (--data_dir)")
  files = sorted(f for f in folder.glob("*.h5") if not f.name.startswith("."))
  if not files:
    splits = [d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.h5"))]
    hint = f" (its sub-folders {splits} do: pass one of them)" if splits else ""
    raise fastmri.DataError(f"{folder}: expected fastMRI .h5 files in it, found none{hint}")
  return files


def mask_difference(own: np.ndarray, run: np.ndarray) -> Optional[str]:
  """How a file's own mask (H, W) differs from the run's (h, w) (None: the same)."""
  if own.shape == run.shape and np.array_equal(own, run):
    return None
  return (f"its own mask ({own.shape[0]}x{own.shape[1]}, {masks.acceleration(own):.2f}x) differs "
          f"from the one the network was trained with ({run.shape[0]}x{run.shape[1]}, "
          f"{masks.acceleration(run):.2f}x)")


def file_inputs(path, cfg: Config, run_mask: np.ndarray, *, log=logging.warning):
  """The network inputs of every slice of one file: ``(x, scales, kept)``.

  A fully sampled file is brought to the run's grid and undersampled with ``run_mask`` (as in
  training); an undersampled one (a ``mask`` key) keeps its own mask and its columns (its
  readout is cropped to the grid: exact for a mask of columns), with a warning through ``log``
  when that mask differs from the run's. x: (S', h, w, 2); scales: (S',); kept: the slices
  with something to reconstruct (the others, logged, are left zero)."""
  path = Path(path)
  info = fastmri.open_volume(path, undersampled=True)
  own = fastmri.read_mask(path)
  prep = data_lib.prep_config(cfg)
  if own is None:
    size, mask = (cfg.image_size, cfg.image_size), run_mask
  else:
    size = (cfg.image_size, own.shape[1])
    if own.shape != size and not (own == own[:1]).all():  # Only columns survive the crop.
      raise fastmri.DataError(f"{path}: key '{fastmri.MASK}': a 2D mask of {own.shape[0]} rows; "
                              f"expected a mask of columns, or {cfg.image_size} rows (the grid)")
    mask = own if own.shape == size else np.broadcast_to(own[:1], size).copy()
    difference = mask_difference(mask, run_mask)
    if difference:
      log(f"{path}: {difference}")
  xs, scales, kept = [], [], []
  for index in range(info.num_slices):
    grid = fastmri.to_grid(fastmri.read_slice(path, index, undersampled=True), size)
    try:
      out = data_lib.network_input(grid, mask, prep)
    except data_lib.EmptySlice as e:
      logging.info("%s slice %d: left zero (%s)", path.name, index, e)
      continue
    xs.append(out["x"])
    scales.append(out["scale"])
    kept.append(index)
  shape = (0,) + size + (2,)
  return (np.stack(xs) if xs else np.zeros(shape, np.float32), np.asarray(scales, np.float32),
          kept)


def reconstruct_file(recon: Reconstructor, path, out_dir, run_mask: np.ndarray, *,
                     log=logging.warning) -> Path:
  """Writes ``out_dir/<file name>`` with key ``reconstruction``: (slices, h, w) float32
  magnitudes at the header's reconstruction size (reconSpace; without a header, the grid), in
  the units of the SENSE-combined image. Returns its path."""
  path = Path(path)
  info = fastmri.open_volume(path, undersampled=True)
  x, scales, kept = file_inputs(path, recon.cfg, run_mask, log=log)
  magnitude = np.abs(sense.to_complex(recon.channels(x))) * scales[:, None, None]
  size = info.recon or x.shape[1:3]
  out = np.zeros((info.num_slices,) + tuple(size), np.float32)
  if kept:
    out[kept] = fastmri.center_fit(magnitude, size)
  target = Path(out_dir) / path.name
  target.parent.mkdir(parents=True, exist_ok=True)
  with files.atomic_write(target) as tmp, h5py.File(tmp, "w") as f:
    f.create_dataset(RECONSTRUCTION, data=out)
    f.attrs.update({"method": recon.method, "depth": recon.depth,
                    "workdir": str(recon.cfg.workdir)})
  return target
