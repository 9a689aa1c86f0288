"""The interface of a model family: what the run, evaluation and the memory planner ask of one.

A family (the CNN, the unrolled network) is one ``Family`` value; ``models.family(cfg)`` picks it.
"Depth" is the family's own count: conv layers for the CNN, iterations for the unrolled network.
"""
import dataclasses
from typing import Any, Callable

import numpy as np

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
