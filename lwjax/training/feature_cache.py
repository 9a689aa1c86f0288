"""The frozen prefix as a feature extractor: its features batch by batch, and their cache
(``--cache_features``: host memory, disk or the devices) so a stage need not rerun the prefix."""
import functools
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lwjax import files
from lwjax import nets
from lwjax.config import Config
from lwjax.training import runtime


Params = Any


FEATURES = "h"  # The key of a layer-wise stage's cached prefix features in its training arrays.


@functools.lru_cache(maxsize=32)
def _prefix_fn(net: nets.DeepNet, n: int) -> Callable:
  """The jitted ``(layers, x) -> h_n``, one per (net, n): a convex stage runs the prefix over the
  data several times (beta_max, each FISTA power iteration, certificate, head refit), and a new
  jitted function per pass would recompile (and on a GPU re-autotune) it every time."""
  return jax.jit(lambda f, x: nets.prefix_features(net, f, x, n))


def prefix_batches(net: nets.DeepNet, layers: Params, inputs, n: int,
              batch_size: int) -> Iterator[jax.Array]:
  """``h_n`` of the layers ``convs_0 .. convs_{n-1}`` on ``inputs``, batch by batch (on device):
  (batch, *spatial, features) each."""
  prefix = _prefix_fn(net, n)
  for start in range(0, len(inputs), batch_size):
    yield prefix(layers, jnp.asarray(inputs[start:start + batch_size]))


def cached_features(cfg: Config, method: str, index: int, batches: Iterator[jax.Array],
                    shape: tuple, *, mesh: Mesh):
  """All training examples' ``h_index`` (N, *spatial, features), held as ``--cache_features`` says.

  "host" keeps them in memory; "disk" in ``WORKDIR/features/<method>/h_<index>.npy``, written to a
  temporary file and renamed when complete (a killed run leaves no file that looks finished) and
  read back memory-mapped, so only the batches in use occupy host memory; "device" in accelerator
  memory (a full copy on every device of ``mesh``), where the trainer gathers each batch without
  a copy from the host.
  """
  if cfg.cache_features == "host":
    return np.concatenate([np.asarray(b) for b in batches])
  if cfg.cache_features == "device":
    # Filled in place batch by batch (the buffer is donated), so the peak is one cache + a batch.
    put = jax.jit(lambda buf, b, i: jax.lax.dynamic_update_slice_in_dim(buf, b, i, 0),
                  donate_argnums=0)
    buf, start = None, 0
    for batch in batches:
      if buf is None:
        runtime.check_device_room(math.prod(shape) * batch.dtype.itemsize, mesh,
                           f"--cache_features=device: the features h_{index}",
                           "use --cache_features=host or disk (or fewer training slices)")
        buf = jax.device_put(jnp.zeros(shape, batch.dtype), runtime.replicated(mesh))
      buf = put(buf, batch, start)
      start += len(batch)
    return buf
  return runtime.primary_first(lambda: _disk_features(cfg, method, index, batches, shape),
                       f"features h_{index}")


def _disk_features(cfg: Config, method: str, index: int, batches: Iterator[jax.Array],
                   shape: tuple) -> np.ndarray:
  path = Path(cfg.workdir).absolute() / "features" / method / f"h_{index}.npy"
  if path.exists():
    cached = np.load(path, mmap_mode="r")
    if cached.shape == shape:
      return cached
  path.parent.mkdir(parents=True, exist_ok=True)
  with files.atomic_write(path) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    start = 0
    for batch in batches:
      out[start:start + len(batch)] = np.asarray(batch)
      start += len(batch)
    out.flush()
    del out
  return np.load(path, mmap_mode="r")


def stage_batches(net: nets.DeepNet, frozen: Params, arrays: dict, index: int,
                   batch_size: int) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
  """(h, skip, y) over the training set in order, for a stage's prepare and finalize passes
  (``stage.FeatureBatches``): h is ``arrays``' cached features if it holds them, else the output
  of the ``index`` frozen layers; skip is the input x."""
  n = len(arrays["x"])
  if FEATURES in arrays:
    hs = (arrays[FEATURES][i:i + batch_size] for i in range(0, n, batch_size))
  else:
    hs = prefix_batches(net, frozen, arrays["x"], index, batch_size)
  for start, h in zip(range(0, n, batch_size), hs):
    yield (jnp.asarray(h), jnp.asarray(arrays["x"][start:start + batch_size]),
           jnp.asarray(arrays["y"][start:start + batch_size]))

