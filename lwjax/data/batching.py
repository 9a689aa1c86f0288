"""Batches of host arrays: shuffled training epochs (``batch_order``, ``gather``) and evaluation."""
from typing import Iterator, Optional

import numpy as np


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
