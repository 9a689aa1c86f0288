"""TensorBoard event files of a run, in ``WORKDIR/tensorboard/``, beside metrics.jsonl.

Written with tensorboardX (``pip install -e ".[tensorboard]"``); without it ``Board`` writes
nothing and the run is the same. ``Board.record`` takes the records of metrics.jsonl:

  train/<phase>/{loss, lr, steps_per_s, ...}  per epoch (step: the phase's epoch)
  stage/<method>/<key>                        a finished layer-wise stage's report (step: stage)
  val/<metric>/<method>                       validation means (step: depth; zero_filled too)
  examples/<name>                             one validation slice's magnitude (step: depth)
"""
import re
from pathlib import Path
from typing import Optional

import numpy as np

try:
  import tensorboardX
except ImportError:  # The optional extra: the run logs to metrics.jsonl only.
  tensorboardX = None

# A phase's name: "<method>_d<depth>" (a network), "_s<stage>" (a stage), "_k<iterations>".
_PHASE = re.compile(r"^(?P<method>.+)_[dsk](?P<index>\d+)$")
_EPOCH_SKIP = ("phase", "epoch", "step", "event", "time")


def available() -> bool:
  return tensorboardX is not None


class Board:
  """A tensorboardX writer for one run (None-safe: every method does nothing without it)."""

  def __init__(self, logdir, enabled: bool = True):
    self.logdir = Path(logdir)
    self._writer = (tensorboardX.SummaryWriter(str(self.logdir), flush_secs=10)
                    if enabled and available() else None)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is not None and np.isfinite(value):
      self._writer.add_scalar(tag, float(value), int(step))

  def record(self, record: dict) -> None:
    """One metrics.jsonl record as scalars (epochs, finished stages, evaluations)."""
    if self._writer is None or "phase" not in record:
      return
    phase, event = record["phase"], record.get("event")
    match = _PHASE.match(phase)
    numbers = {k: v for k, v in record.items()
               if k not in _EPOCH_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if event is None and "epoch" in record:
      for key, value in numbers.items():
        self.scalar(f"train/{phase}/{key}", value, record["epoch"])
    elif event == "stage_done" and match:
      for key, value in numbers.items():
        self.scalar(f"stage/{match['method']}/{key}", value, int(match["index"]))
      self.flush()
    elif event == "eval" and match:
      for key, value in numbers.items():
        self.scalar(f"val/{key}/{match['method']}", value, int(match["index"]))
      self.flush()

  def image(self, tag: str, magnitude: np.ndarray, step: int,
            vmax: Optional[float] = None) -> None:
    """A (H, W) magnitude image, on the grey scale [0, vmax] (default: its maximum)."""
    if self._writer is None:
      return
    magnitude = np.asarray(magnitude, np.float32)
    top = vmax or float(magnitude.max()) or 1.0
    self._writer.add_image(tag, np.clip(magnitude / top, 0, 1), int(step), dataformats="HW")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
