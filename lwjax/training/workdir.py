"""Everything a run writes under its workdir, and the checks that a workdir belongs to this run.

``config.json``, ``data.json``, ``summary.json``, ``metrics.jsonl`` (``MetricsLog``; also to
``tensorboard/``), ``checkpoints/<phase>/``, ``params/<method>/depth_<d>/`` (finished networks),
``stages/<method>/stage_<i>.json`` (stage reports, written last: a stage with one is finished).
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import files
from lwjax.config import Config
from lwjax.training import checkpoints
from lwjax.training import runtime


Params = Any


class MetricsLog:
  """Appends JSON lines to ``WORKDIR/metrics.jsonl`` (process 0 only), each stamped with its
  ``time`` (Unix seconds); ``launch/evaluate.py`` draws the training curves from it. With a
  ``board`` (``tensorboard.Board``) every record also goes to TensorBoard."""

  def __init__(self, workdir, board=None):
    self.path = Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.board = board

  def write(self, record: dict) -> None:
    if not runtime.is_primary():
      return
    record = {**{k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
                 for k, v in record.items()}, "time": round(time.time(), 3)}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self.board is not None:
      self.board.record(record)

  def records(self) -> list[dict]:
    """Every record written so far (none where this process cannot see the file)."""
    return files.read_json_lines(self.path) if self.path.is_file() else []

  def close(self) -> None:
    if self.board is not None:
      self.board.close()


def write_json(path: Path, value, sort_keys: bool = True) -> None:
  """``files.write_json`` on process 0 of a multi-host run (every process holds the same value)."""
  if runtime.is_primary():
    files.write_json(path, value, sort_keys)


def params_dir(workdir, method: str, depth: int) -> Path:
  return Path(workdir).absolute() / "params" / method / f"depth_{depth}"


def stage_report_path(workdir, method: str, index: int) -> Path:
  return Path(workdir).absolute() / "stages" / method / f"stage_{index}.json"


def finished_stage(workdir, method: str, index: int,
                   depth: int) -> Optional[tuple[Params, dict]]:
  """``(params, report)`` of stage ``index`` (1-based) of ``method`` if it is finished (its
  report exists), the network of ``depth`` it ended with; None otherwise. A damaged report or
  network is set aside, with a warning, and the stage trained again (from its checkpoints)."""
  report_path = stage_report_path(workdir, method, index)
  if not report_path.exists():
    return None
  try:
    report = files.read_json(report_path)
  except ValueError as e:
    logging.warning("%s: moved to %s", e,
                    checkpoints.set_aside(report_path, Path(workdir).absolute()))
    return None
  params = checkpoints.load_finished(params_dir(workdir, method, depth), workdir)
  if params is None:
    logging.warning("%s: stage %d has a report but no intact network: trained again", method,
                    index)
    checkpoints.set_aside(report_path, Path(workdir).absolute())
    return None
  return params, report


def finish_stage(cfg: Config, log: MetricsLog, method: str, index: int, depth: int,
                 params: Params, report: dict) -> dict:
  """Saves a finished stage: the network of ``depth`` it ends with, a ``stage_done`` log line and,
  last, its report (floats), whose presence marks the stage finished. Returns the report."""
  checkpoints.save_params(params_dir(cfg.workdir, method, depth), params)
  report = {k: float(v) for k, v in report.items()}
  log.write({"phase": f"{method}_s{index}", "event": "stage_done", **report})
  write_json(stage_report_path(cfg.workdir, method, index), report)
  return report


def record_eval(summary: dict, summary_path: Path, log: MetricsLog, method: str, depth: int,
                means: dict, report: Optional[dict] = None, *, stage: int, phase: str) -> dict:
  """Put one network's validation means (and its stage report) into summary.json and the log
  (unless ``summary``, read back from a rerun's summary.json, holds them already)."""
  if summary.get(method, {}).get(str(depth)) != means:
    log.write({"phase": phase, "event": "eval", **means})
  summary.setdefault(method, {})[str(depth)] = means
  if report:
    summary["stages"].setdefault(method, {})[str(stage)] = report
  write_json(summary_path, results_first(summary), sort_keys=False)
  return means


def results_first(summary: dict) -> dict:
  """summary.json's keys in reading order: the baselines and every method's metrics by depth,
  then the stage reports, then the configuration."""
  tail = ("stages", "config")
  return {**{k: v for k, v in summary.items() if k not in tail},
          **{k: summary[k] for k in tail if k in summary}}


# Fields that may change when a run is resumed; any other change would mix two experiments.
_RESUMABLE_FIELDS = {"log_every", "eval_batch_size", "workdir", "data_dir", "cache_dir",
                     "cache_features", "data_on_device", "compilation_cache", "conv_fusion",
                     "host_data", "distributed", "prep_workers"}


def writable_folder(path: Path, flag: str) -> Optional[Path]:
  """Creates the folder ``path`` if it is missing and checks that a file can be written in it;
  raises ValueError naming ``--flag`` and the path otherwise (as root, permission bits do not
  tell: a file is written and removed). Returns the topmost folder it created (None: none)."""
  missing = [p for p in (path, *path.parents) if not p.exists()]
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".lwjax_write_test_", dir=path)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    if missing and missing[-1].is_dir():
      shutil.rmtree(missing[-1], ignore_errors=True)
    raise ValueError(f"--{flag}={path}: cannot write there ({e.strerror or e}): expected a folder "
                     "this user can create and write files in") from None
  return missing[-1] if missing else None


def check_resume(cfg: Config, workdir: Path) -> None:
  """Refuses settings that differ from those of the run in ``workdir`` (its config.json)."""
  path = workdir / "config.json"
  if path.exists():
    old = dataclasses.asdict(config_lib.load(path))
    new = dataclasses.asdict(cfg)
    changed = sorted(k for k in new if k not in _RESUMABLE_FIELDS and old.get(k) != new[k])
    if changed:
      raise ValueError(
          f"{path}: this workdir holds a run with other settings ("
          + ", ".join(f"--{k}: {old.get(k)!r} there, {new[k]!r} now" for k in changed)
          + "); use another --workdir or the same flags")


def check_same_data(workdir: Path, splits: dict[str, data_lib.Split]) -> None:
  """Refuses to go on with a run on other data than it started on; the first run writes
  ``WORKDIR/data.json``. ``--data_dir`` may change (the data moved), the data may not."""
  path = workdir / "data.json"
  record = {name: data_lib.data_record(split) for name, split in splits.items()}
  if not path.exists():
    write_json(path, record)
    return
  old = files.read_json(path)
  for name, new in record.items():
    difference = data_lib.data_difference(old.get(name, {"files": [], "scale": []}), new)
    if difference:
      raise ValueError(f"{path}: this workdir was trained on other {name} data: {difference}; "
                       "use another --workdir, or the data it was trained on")


def data_folder(cfg: Config) -> Path:
  """The run's data: ``cfg.data_dir``, or without it the synthetic dataset in WORKDIR/data."""
  return Path(cfg.data_dir) if cfg.data_dir else Path(cfg.workdir).absolute() / "data"

