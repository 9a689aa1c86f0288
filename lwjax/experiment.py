"""One run: settings and workdir checks, the data, then the model family's methods and
summary.json. ``launch/train.py`` calls ``run``."""
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import jax
from absl import logging
from jax.sharding import Mesh

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import models
from lwjax import tensorboard
from lwjax.config import Config
from lwjax.mri import masks
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib


def _load_data(cfg: Config, log, splits: tuple[str, ...]) -> tuple[data_lib.Split, ...]:
  workdir = Path(cfg.workdir).absolute()
  prep = data_lib.prep_config(cfg)
  mask = data_lib.checked_mask(prep)  # Bad mask or map settings fail before any data is read.
  warning = data_lib.calibration_warning(prep, mask)
  if warning:
    logging.warning("%s", warning)
  data_dir = cfg.data_dir
  if not data_dir:
    log(f"synthetic data: {cfg.synth_train_subjects} + {cfg.synth_val_subjects} files of "
        f"{cfg.synth_slices} slices, {cfg.synth_coils} coils, {cfg.image_size}x{cfg.image_size} "
        f"in {workdir_lib.data_folder(cfg)} (generated once, then reused)")
    data_dir = data_lib.synthetic_dataset(cfg, workdir_lib.data_folder(cfg))
  limits = {"train": cfg.max_train_volumes, "val": cfg.max_val_volumes}
  for split in splits[1:]:  # A missing or bad file fails now, not after preparing the others.
    data_lib.volume_infos(data_dir, split, limits[split] or None)
  dc = models.family(cfg).data_consistency  # DC needs the coil maps and the sampled k-space.
  cache_dir = Path(cfg.cache_dir).expanduser().absolute() if cfg.cache_dir else workdir / "cache"
  return tuple(data_lib.load_split(data_dir, split, prep, cache_dir=cache_dir,
                                   max_volumes=limits[split] or None, with_maps=dc,
                                   with_kspace=dc, workers=cfg.prep_workers,
                                   storage=cfg.host_data, log=log)
               for split in splits)


def load_data(cfg: Config, log=logging.info,
              splits: tuple[str, ...] = ("train", "val")) -> tuple[data_lib.Split, ...]:
  """The run's splits, in the order asked (synthetic data in WORKDIR/data without data_dir).

  Every host of a multi-host run holds all of them; process 0 generates and prepares first, the
  others then read its files and slice cache."""
  return runtime.primary_first(lambda: _load_data(cfg, log, splits), "data")


def _check_examples(cfg: Config, train: data_lib.Split, val: data_lib.Split,
                    num_devices: int) -> dict[str, int]:
  """The settings that depend on the data (--batch_size, --volume_depth) and disjoint splits,
  checked before the run writes its config.json: a refused command, corrected, must not find the
  workdir taken. Returns how many slices of each split the examples hold (3D: the patches')."""
  if cfg.ndim == 3:  # volume_patches raises when no patch fits.
    held = {name: data_lib.volume_patches(s, cfg.volume_depth).size
            for name, s in (("train", train), ("val", val))}
  else:
    held = {"train": len(train.x), "val": len(val.x)}
  examples = held["train"] // (cfg.volume_depth if cfg.ndim == 3 else 1)
  data_lib.check_batch_size(examples, cfg.batch_size, num_devices)
  data_lib.check_disjoint({"train": train, "val": val})
  return held


def run(cfg: Config, *, mesh: Optional[Mesh] = None) -> dict:
  """Train every method of ``cfg`` and evaluate each at every depth; returns summary.json's dict."""
  mesh = mesh or runtime.make_mesh()
  config_lib.validate(cfg, mesh.devices.size)
  if cfg.data_dir:  # config.json must name the data from wherever it is read (launch/evaluate.py).
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))
  workdir = Path(cfg.workdir).absolute()
  created = workdir_lib.writable_folder(workdir, "workdir")
  try:
    if cfg.cache_dir:
      workdir_lib.writable_folder(Path(cfg.cache_dir).expanduser().absolute(), "cache_dir")
    workdir_lib.check_resume(cfg, workdir)
    logging.info("devices: %d x %s; workdir %s", mesh.devices.size, jax.devices()[0].platform,
                 workdir)
    train, val = load_data(cfg)
    held = _check_examples(cfg, train, val, mesh.devices.size)
    workdir_lib.check_same_data(workdir, {"train": train, "val": val})
  except Exception:
    if created is not None and runtime.is_primary():  # A refused run leaves no new workdir behind.
      shutil.rmtree(created, ignore_errors=True)
    raise
  config_path = workdir / "config.json"  # Only now: a command refused above leaves no run.
  if runtime.is_primary():  # An unchanged config.json is left as it is.
    config_lib.save(cfg, config_path)
  logging.info("data: %d training slices from %d files, %d validation slices from %d files, "
               "grid %s, mask %s x%.2f", len(train.x), len(set(train.volume_index.tolist())),
               len(val.x), len(set(val.volume_index.tolist())), train.x.shape[1:3], cfg.mask,
               masks.acceleration(train.mask))
  if cfg.ndim == 3:
    logging.info("3D: patches of %d slices hold %d of %d training and %d of %d validation slices "
                 "(slices that fill no patch, at a file's end or before a skipped slice, are "
                 "dropped)", cfg.volume_depth, held["train"], len(train.x), held["val"],
                 len(val.x))
  board = tensorboard.Board(workdir / "tensorboard", enabled=runtime.is_primary())
  log = workdir_lib.MetricsLog(workdir, board=board)
  summary_path = workdir / "summary.json"
  try:
    return models.family(cfg).run(cfg, train, val, mesh=mesh, log=log, summary_path=summary_path)
  finally:
    log.close()
