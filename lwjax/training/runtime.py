"""The runtime: XLA and JAX set-up, processes, the device mesh and how arrays are sharded on it.

Every step is data-parallel over a 1-D mesh with a "data" axis: state and frozen inputs are
replicated, batches split over the axis; ``map_batches`` runs any function over a dataset so.
"""
import collections
import functools
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwjax import data as data_lib


def enable_compilation_cache(path: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in ``path`` (``~`` expanded), unless
  ``JAX_COMPILATION_CACHE_DIR`` already names one; returns the directory in use (None: off)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not path:
    return None
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# XLA's GPU pass that fuses a convolution with its bias add and ReLU into one cuDNN call: it made
# the 7x7x256 layers slower on an H200 (BUILD_NOTES, "XLA's convolution fusion").
CONV_FUSION_PASS = "cudnn-fused-convolution-rewriter"


def configure_xla(conv_fusion: bool) -> str:
  """Sets this process's ``XLA_FLAGS`` before JAX starts its backend; returns them.

  ``conv_fusion=False`` disables ``CONV_FUSION_PASS``. An ``XLA_FLAGS`` that already names
  passes to disable is left as it is (the user's choice wins), and so is everything once the
  backend has started (XLA reads the variable once): both are logged.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if conv_fusion:
    return current
  if "--xla_disable_hlo_passes" in current:
    if CONV_FUSION_PASS not in current:
      logging.info("XLA_FLAGS already disables passes; %s is left on", CONV_FUSION_PASS)
    return current
  from jax._src import xla_bridge  # No public way to ask whether the backend has started.
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    logging.warning("the JAX backend has already started: %s stays as it was", CONV_FUSION_PASS)
    return current
  os.environ["XLA_FLAGS"] = f"{current} --xla_disable_hlo_passes={CONV_FUSION_PASS}".strip()
  return os.environ["XLA_FLAGS"]


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def primary_first(fn: Callable[[], Any], what: str) -> Any:
  """``fn()`` on process 0, then on the others, which find what it wrote (data, caches).

  One process: just ``fn()``. Every host of a multi-host run calls this at the same point.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if is_primary() else None
  multihost_utils.sync_global_devices(f"lwjax: {what} ready on process 0")
  return out if is_primary() else fn()


def initialize_distributed(spec: str) -> None:
  """``--distributed``: "" (one host), "auto" (TPU pods, SLURM, Open MPI, Kubernetes: detected),
  or "ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID". Must run before anything touches a device."""
  if not spec:
    return
  # Cross-process collectives of the CPU backend (tests, CPU clusters); GPUs/TPUs have their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if spec == "auto":
    jax.distributed.initialize()
    return
  parts = spec.split(",")
  if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
    raise ValueError(f"--distributed={spec!r}: expected 'auto' or "
                     "'ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID' (e.g. 10.0.0.2:1234,4,0)")
  jax.distributed.initialize(coordinator_address=parts[0], num_processes=int(parts[1]),
                             process_id=int(parts[2]))


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh with a "data" axis over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()[: num_devices or None]
  return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly batch-sharded) global array as NumPy, on every process."""
  if not x.is_fully_addressable:  # Multi-host: gather the other hosts' rows.
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host arrays with a leading batch axis -> global device arrays split over the mesh."""
  sharding = batch_sharded(mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def device_batches(batches: Iterator[dict], mesh: Mesh, prefetch: int = 2) -> Iterator[dict]:
  """Host batches -> sharded device batches, transferred ``prefetch`` batches ahead.

  The transfers are asynchronous, so the next batches travel while the device runs a step.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(put_batch(batch, mesh))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def take_batch(mesh: Mesh):
  """Jitted ``(arrays, idx) -> {k: v[idx]}`` for arrays held on the devices (replicated); the
  batch comes out split over the mesh, as ``put_batch`` would give it."""
  return jax.jit(lambda arrays, idx: {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()},
                 out_shardings=batch_sharded(mesh))


@functools.lru_cache(maxsize=32)
def sharded(fn: Callable, mesh: Mesh) -> Callable:
  """``fn(args, batch)`` jitted for ``mesh`` (args replicated, the batch split), once per pair."""
  return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=batch_sharded(mesh))


def map_batches(fn: Callable, args, arrays: dict, *, mesh: Mesh, batch_size: int) -> np.ndarray:
  """``fn(args, batch)`` over every example of ``arrays`` (host arrays with a leading example
  axis), in order: the outputs' rows on the host. Batches of ``batch_size`` (rounded up to the
  device count) split over ``mesh``; the last is padded and the padding dropped."""
  batch_size = _round_up(batch_size, mesh.devices.size)
  jitted = sharded(fn, mesh)
  args = jax.device_put(args, replicated(mesh))
  out = []
  for batch in data_lib.eval_batches(arrays, batch_size):
    valid = batch.pop("valid")
    out.append(to_host(jitted(args, put_batch(batch, mesh)))[valid])
  return np.concatenate(out)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def free_device_bytes(device) -> Optional[int]:
  """Bytes the allocator of ``device`` can still hand out, or None where it does not say (CPU)."""
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check_device_room(need: int, mesh: Mesh, what: str, instead: str) -> None:
  """Refuses to hold ``need`` bytes on every device unless 20% of the free memory stays for the
  step; the error says ``what`` needs them and what to do ``instead``."""
  free = [free_device_bytes(d) for d in mesh.local_devices]  # Others are asked by their host.
  known = [f for f in free if f is not None]
  if known and need > 0.8 * min(known):
    raise ValueError(f"{what} need {need / 2**30:.2f} GiB on every device, "
                     f"{min(known) / 2**30:.2f} GiB are free; {instead}")

