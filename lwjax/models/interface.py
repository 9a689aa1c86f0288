"""The interface of a model family: what the run, evaluation and the memory planner ask of one,
and what every family's ``run`` shares (``record_network``).

A family (the CNN, the unrolled network) is one ``Family`` value; ``models.family(cfg)`` picks it.
"Depth" is the family's own count: conv layers for the CNN, iterations for the unrolled network.
"""
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from lwjax import metrics as metrics_lib
from lwjax.figures import BASELINES
from lwjax.training import loop
from lwjax.training import workdir as workdir_lib

Params = Any
# (method, depth) of a trained network: method as in summary.json, params/ and stages/.
Network = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # --model
  # Its steps need each slice's coil maps and sampled k-space (data consistency).
  data_consistency: bool
  # It maps a zero-filled image to an image (no k-space): what launch/reconstruct.py and
  # launch/interpret.py can use.
  image_to_image: bool
  example_keys: tuple[str, ...]  # the arrays its networks train and are evaluated on
  reference: str  # the end-to-end method every other is compared with (report.md's gaps)
  depth_unit: str  # "layers" | "iterations"
  depth_axis: str  # a figure's x label for depth
  settings: tuple[str, ...]  # its own Config fields (memory reports name them)
  # cfg -> every (method, depth) a finished run has saved, in method order.
  trained_networks: Callable[[Any], list[Network]]
  stage_of: Callable[[int], int]  # depth -> the layer-wise stage that ends with it
  phase_of: Callable[[str, int], str]  # (method, depth) -> the training phase that ended with it
  # (cfg, arrays, mask, mesh) -> (params -> outputs (N, *spatial, 2) on the host).
  predictor: Callable[..., Callable[[Params], np.ndarray]]
  # (cfg, arrays, mask, mesh) -> {name: outputs} of its classical baselines (summary.json keys).
  baselines: Callable[..., dict[str, np.ndarray]]
  # (cfg, train, val, *, mesh, log, summary_path) -> summary.json's dict: trains every method.
  run: Callable[..., dict]
  # cfg -> the (method, depth) of every distinct training step the memory planner analyses.
  memory_networks: Callable[[Any], list[Network]]
  # (cfg, method, depth, batch_size, coils) -> (loss_fn, tx, state, frozen, batch), abstract.
  abstract_step: Callable[..., tuple]


def record_network(summary: dict, summary_path: Path, log: workdir_lib.MetricsLog, *,
                   method: str, depth: int, pred: np.ndarray, target: np.ndarray,
                   report: Optional[dict], stage: int, eval_phase: str, train_phase: str,
                   name: str) -> dict:
  """One finished network's validation means (pred, target: (N, *spatial, 2)) into summary.json
  and metrics.jsonl (``workdir.record_eval``), marked diverged when ``loop.network_divergence``
  says so, and one log line naming it ``name`` with the baselines' PSNR. Returns the means."""
  means = metrics_lib.means(metrics_lib.per_slice(pred=pred, target=target))
  why = loop.network_divergence(means, summary["zero_filled"], log.records(), train_phase)
  if why:
    summary.setdefault("diverged", {}).setdefault(method, {})[str(depth)] = why
    logging.error("%s DIVERGED: %s; its metrics are not a result", name, why)
  means = workdir_lib.record_eval(summary, summary_path, log, method, depth, means, report,
                                  stage=stage, phase=eval_phase)
  baselines = ", ".join(f"{label} {summary[key]['psnr']:.2f} dB"
                        for key, label in BASELINES.items() if key in summary)
  logging.info("%s: %s (%s)", name, metrics_lib.format_means(means), baselines)
  return means
