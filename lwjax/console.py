"""What a run says on the console: which network of how many, the whole run's ETA, the results
table at the end, and the next command to run (train -> evaluate -> interpret -> reconstruct)."""
import dataclasses
import time
from pathlib import Path
from typing import Callable

from absl import logging

from lwjax import metrics as metrics_lib
from lwjax.config import Config
from lwjax.figures import BASELINES  # The baselines of a summary: key -> label.
from lwjax.training.loop import format_duration


@dataclasses.dataclass
class Phase:
  """One network a run trains: an e2e network, or the layer-wise stage that ends at ``depth``."""
  method: str
  depth: int
  finished: bool  # trained by an earlier start of the run: loaded and evaluated, not retrained
  weight: float  # relative cost, for the ETA: the conv layers one training step runs

  @property
  def name(self) -> str:
    if self.method == "e2e":
      return f"e2e depth {self.depth}"
    return f"{self.method} stage {self.depth - 1} (depth {self.depth})"


def plan(cfg: Config, finished: Callable[[str, int], bool]) -> list[Phase]:
  """The networks of a CNN run in training order; ``finished(method, depth)`` says which exist."""
  phases = []
  for method in cfg.methods:
    depths = cfg.depths_e2e if method == "e2e" else range(2, cfg.depth + 1)
    for depth in depths:
      # A stage runs its frozen prefix in every step, unless the features are cached.
      cost = 2 if method != "e2e" and cfg.cache_features != "none" else depth
      phases.append(Phase(method, depth, finished(method, depth), cost))
  return phases


class Progress:
  """Logs "network i of n" as each network starts, with the ETA of the whole run.

  The ETA scales the time per ``Phase.weight`` the networks of each method took so far
  (evaluation included; a method not timed yet: all methods' together) by the weight left;
  networks finished by an earlier start are named once and not timed.
  """

  def __init__(self, phases: list[Phase], log=logging.info, clock=time.time):
    self.phases, self.log, self.clock = phases, log, clock
    self.spent, self.done_weight, self.started, self.ended = {}, {}, {}, set()
    skipped = [p.name for p in phases if p.finished]
    if skipped:
      log(f"rerun: {len(skipped)} of {len(phases)} networks are finished and are loaded and "
          f"evaluated again, not retrained: {', '.join(skipped)}")

  def _index(self, method: str, depth: int) -> int:
    return next(i for i, p in enumerate(self.phases) if (p.method, p.depth) == (method, depth))

  def eta(self) -> str:
    if not self.done_weight:
      return "run eta after the first network"
    overall = sum(self.spent.values()) / sum(self.done_weight.values())
    rate = lambda m: self.spent[m] / self.done_weight[m] if m in self.done_weight else overall
    left = sum(rate(p.method) * p.weight for p in self.phases
               if not p.finished and (p.method, p.depth) not in self.ended)
    return f"run eta {format_duration(left)}"

  def start(self, method: str, depth: int) -> None:
    i = self._index(method, depth)
    if self.phases[i].finished:
      return
    self.log(f"network {i + 1} of {len(self.phases)}: {self.phases[i].name}; {self.eta()}")
    self.started[(method, depth)] = self.clock()

  def end(self, method: str, depth: int) -> None:
    t0 = self.started.pop((method, depth), None)
    if t0 is not None:
      self.ended.add((method, depth))
      self.spent[method] = self.spent.get(method, 0.0) + self.clock() - t0
      self.done_weight[method] = (self.done_weight.get(method, 0.0)
                                  + self.phases[self._index(method, depth)].weight)


def deepest(summary: dict) -> list[tuple[str, str, dict]]:
  """``(name, depth, means)`` of the baselines and of each method at its deepest depth in a
  summary.json (or eval.json "mean") dict."""
  rows = [(label, "", summary[key]) for key, label in BASELINES.items() if key in summary]
  for name, entry in summary.items():
    depths = [d for d in entry if str(d).isdigit()] if isinstance(entry, dict) else []
    if depths and name not in BASELINES and name != "stages":
      depth = max(depths, key=int)
      rows.append((name, depth, entry[depth]))
  return rows


def results_table(summary: dict) -> str:
  """A small table: the baselines and each method at its deepest depth, PSNR/SSIM/NMSE."""
  names = list(metrics_lib.NAMES)
  head = f"  {'network':<20} {'depth':>5}" + "".join(
      f" {metrics_lib.label(k):>10}" for k in names)
  lines = [head]
  for name, depth, means in deepest(summary):
    lines.append(f"  {name:<20} {depth:>5}" + "".join(
        f" {means[k]:>10{metrics_lib.NAMES[k][2]}}" for k in names))
  return "\n".join(lines)


_NEXT = {
    "train": ("python launch/evaluate.py --workdir={w}",
              "per-slice and per-volume metrics, report.md and figures/ in {w}"),
    "evaluate": ("python launch/interpret.py --workdir={w}",
                 "filters, active units and an effective filter in {w}/figures/interpret/"),
    "interpret": ("python launch/reconstruct.py --workdir={w} --data_dir=D --out_dir=O",
                  "the reconstructions of every .h5 file in D, fastMRI's submission layout"),
}


def next_step(after: str, workdir) -> str:
  """The next command of train -> evaluate -> interpret -> reconstruct, and what it writes."""
  if after not in _NEXT:
    return ""
  command, writes = _NEXT[after]
  return f"next: {command.format(w=workdir)}\n  ({writes.format(w=workdir)})"


def finished_run(summary: dict, workdir) -> str:
  """The end of launch/train.py: where the results are, the table, the next command."""
  workdir = Path(workdir)
  board = workdir / "tensorboard"
  lines = [f"results: {workdir / 'summary.json'} (validation means per method and depth, stage "
           f"certificates under \"stages\"); per-epoch log: {workdir / 'metrics.jsonl'}"]
  if board.is_dir():
    lines.append(f"TensorBoard: tensorboard --logdir={board}")
  return "\n".join(lines + ["validation means, each method at its deepest network:",
                            results_table(summary), next_step("train", workdir)])
