r"""Benchmark (not a test): lwjax's training steps against the device's peak and a PyTorch reference.

For the paper's configuration (320x320, 7x7, 256 channels, 5 layers) and a list of batch sizes this
times one training step of the end-to-end network, of each layer-wise stage (non-convex and
convex, on their frozen prefix or on cached prefix features) and evaluation of the full network.
Every lwjax step is built by the project's own code (``loop.make_step``, ``cnn.e2e_loss``,
``cnn.stage_loss``, ``cnn.make_stage``, ``cnn.make_forward``) from a ``config.Config`` made
from the flags, on random inputs already on the device, with the state donated and re-fed as
the trainer does. For each it reports

* milliseconds per step (median of ``--repeats`` timed runs after ``--warmup`` steps; each run
  times enough steps to last ``--min_time_s``, then synchronises with ``jax.block_until_ready``),
  images per second;
* the step's FLOPs from the compiled step's ``cost_analysis()`` and the FLOPs of its convolutions
  counted by hand (``conv TF``: a check on the first), achieved TFLOP/s and the fraction of the
  device's peak, measured once per dtype with a large square matrix product (``--peak_size``);
* the device memory the compiled step needs (``memory_analysis()``); a step that needs more than
  the device has is reported as not fitting and is not run (nor at larger batch sizes);
* with ``--torch``: the same step in plain PyTorch (``bench/torch_ref.py``) on the same device in
  the same process, and ``ratio`` = lwjax images/s / PyTorch images/s (> 1: lwjax is faster).

Steps (``--steps``, comma-separated): ``e2e``, ``eval``, ``layerwise_sN`` and
``layerwise_convex_sN`` (stage N = 1 .. depth - 1 trains hidden layer N on the N - 1 frozen
layers; N may be ``last`` or ``*`` for all), ``layerwise_cached`` and ``layerwise_convex_cached``
(a stage >= 2 on prefix features given as input, what ``--cache_features`` makes of every later
stage; the table adds the host-to-device copy time of those features per step, ``h2d ms``).

``--ndim=3`` times the 3D networks (patches of ``--volume_depth`` slices, ``--kernel_depth``;
"img/s" then counts patches) against the peak, with ``--torch=false``: the PyTorch reference is
2D only.

``--compute_dtype`` may list several dtypes (``float32,bfloat16``); each gets its own peak. On GPUs,
JAX's default precision may run float32 convolutions and matmuls as TF32 on the tensor cores: the
run measures whether it does (against HIGHEST precision) and sets PyTorch's ``allow_tf32`` to the
same, so both compute at one precision (``--matmul_precision=highest`` makes both full float32).

Results are printed as they come and the JSON (``--json_out``) is rewritten after each
measurement, so a run stopped by a timeout keeps what it measured. A failing measurement (an
out-of-memory error at a large batch, say) is reported in its row and the run goes on.
``--time_budget_s``: no new batch size is started once the elapsed time is past it (or would be,
judged from the previous batch size), and no new measurement at all after 1.25 times it.

CPU, reduced size (about 5 minutes on 2 cores):
  python bench/bench_steps.py --image_size=64 --features=32 --depth=3 --batch_sizes=1,2,4 \
      --steps='e2e,layerwise_s*,layerwise_convex_s*,layerwise_cached,layerwise_convex_cached,eval' \
      --repeats=7 --time_budget_s=3000 --json_out=/tmp/bench_cpu.json
Paper size on one GPU: see bench/README.md.
"""
import os

# JAX must not take 75% of the GPU up front: the PyTorch reference shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# PyTorch's OpenMP threads share the CPU with XLA's thread pool (and, on a shared machine, with
# other processes); spinning OpenMP workers then run 10x slower. Passive waiting costs nothing
# measurable when the cores are free. Must be set before PyTorch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

# The repository's lwjax (this working tree), installed or not.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from lwjax import config as config_lib  # noqa: E402
from lwjax import files  # noqa: E402

T_START = time.perf_counter()

config_lib.define_flags()  # --image_size, --features, --kernel_size, --depth, --compute_dtype, ...
flags.DEFINE_string("batch_sizes", "1,4,16",
                    "comma-separated global batch sizes, or 'auto': 1, 2, 4, ... while the step "
                    "fits the device memory and <= --max_batch")
flags.DEFINE_integer("max_batch", 256, "largest batch size tried by --batch_sizes=auto")
flags.DEFINE_string("steps", "e2e,layerwise_s*,layerwise_convex_s*,eval",
                    "comma-separated steps: e2e, eval, layerwise_sN, layerwise_convex_sN (N: 1.."
                    "depth-1, 'last' or '*'), layerwise_cached, layerwise_convex_cached")
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (the median is reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation (at least 1)")
flags.DEFINE_float("min_time_s", 0.02,
                   "each timed run repeats the step until it lasts about this long (short steps)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference (bench/torch_ref.py)")
flags.DEFINE_bool("torch_cudnn_benchmark", True,
                  "PyTorch: let cuDNN time its algorithms per shape (cudnn.benchmark); false: "
                  "its heuristic choice (cuDNN's bf16 7x7 search at 320x320 took minutes on an "
                  "H200)")
flags.DEFINE_integer("torch_cudnn_benchmark_limit", -1,
                     "PyTorch benchmark mode: the most cuDNN algorithms it times per shape "
                     "(torch.backends.cudnn.benchmark_limit; 0: all); -1: PyTorch's default")
flags.DEFINE_bool("check", True, "first compare lwjax and PyTorch losses and gradients on a small "
                  "input (same parameters, highest precision)")
flags.DEFINE_string("json_out", "", "write all results here as JSON (rewritten after each row)")
flags.DEFINE_float("time_budget_s", 300.0, "stop adding batch sizes after this many seconds")
flags.DEFINE_integer("peak_size", 0, "largest side of the square matmul that measures the peak "
                     "(smaller where one product would take over 0.2 s); 0: 8192 on "
                     "accelerators, 2048 on CPU")
flags.DEFINE_string("matmul_precision", "", "jax_default_matmul_precision for every lwjax step "
                    "('' keeps JAX's default); PyTorch's TF32 follows what JAX then does")
flags.DEFINE_integer("num_devices", 0, "devices in the mesh (0: all local devices)")
flags.DEFINE_enum("interleave", "auto", ["auto", "true", "false"],
                  "alternate the timed runs of lwjax and PyTorch (both steps held at once) so a "
                  "busy moment on a shared machine hits both alike; auto: on CPU only (on a GPU "
                  "it would halve the memory each may use)")
flags.DEFINE_float("memory_limit_gb", 0.0, "device memory a step may need (0: what JAX reports "
                   "for the device, or the host's memory on CPU); 12 emulates the paper's GPU")

FLAGS = flags.FLAGS
GB = 1e9


def log(msg=""):
  print(msg, flush=True)


def elapsed() -> float:
  return time.perf_counter() - T_START


def progress(msg: str) -> None:
  """A timestamped line on stderr: where a run cut short by a timeout spent its time."""
  print(f"  [{elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def short_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip()
  lower = text.lower()
  if "resource_exhausted" in lower or "out of memory" in lower:
    return "OOM: " + text.splitlines()[0][:200]
  return text.splitlines()[0][:300]


# ----------------------------------------------------------------------------------------------
# Timing.

def time_interleaved(fns: list, *, warmup: int, repeats: int, min_time_s: float,
                     after_warmup=None) -> list:
  """Median seconds per call of each ``(run, block)`` in ``fns`` (``block(out)`` waits for the
  device). All are warmed up first (then ``after_warmup()``, e.g. a reset of peak-memory
  counters); then the timed runs alternate between them, so that a busy moment on a shared
  machine hits each alike. Each timed run repeats the call until it lasts about ``min_time_s``
  and then waits once."""
  inners = []
  for run, block in fns:
    for _ in range(max(warmup, 1)):
      block(run())
    t0 = time.perf_counter()
    block(run())
    first = time.perf_counter() - t0
    inners.append(int(min(100, max(1, math.ceil(min_time_s / max(first, 1e-9))))))
  if after_warmup is not None:
    after_warmup()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for (run, block), inner, ts in zip(fns, inners, times):
      t0 = time.perf_counter()
      out = None
      for _ in range(inner):
        out = run()
      block(out)
      ts.append((time.perf_counter() - t0) / inner)
  out = []
  for inner, ts in zip(inners, times):
    med = statistics.median(ts)
    out.append({"s": med, "times_s": ts, "inner": inner,
                "spread": (max(ts) - min(ts)) / med if med > 0 else 0.0})
  return out


def time_steps(run, block, **timing) -> dict:
  return time_interleaved([(run, block)], **timing)[0]


# ----------------------------------------------------------------------------------------------
# Steps: names, FLOPs counted by hand.

def parse_steps(spec: str, depth: int) -> list:
  out = []
  for token in (t.strip() for t in spec.split(",")):
    if not token:
      continue
    if token in ("e2e", "eval", "layerwise_cached", "layerwise_convex_cached"):
      out.append(token)
      continue
    method, sep, n = token.rpartition("_s")
    if not sep or method not in ("layerwise", "layerwise_convex"):
      raise app.UsageError(f"--steps: unknown step {token!r}")
    if n in ("*", "all"):
      out += [f"{method}_s{i}" for i in range(1, depth)]
    elif n == "last":
      out.append(f"{method}_s{depth - 1}")
    elif n.isdigit() and 1 <= int(n) <= depth - 1:
      out.append(f"{method}_s{int(n)}")
    else:
      raise app.UsageError(f"--steps: {token!r}: stages are 1..{depth - 1} for --depth={depth}")
  return list(dict.fromkeys(out))


def conv_flops(cfg, batch: int, step: str) -> float:
  """Multiply-add FLOPs (x2) of the step's convolutions: forward, input and filter gradients
  (2D slices, or 3D patches of ``--volume_depth`` slices with ``cfg.kernel`` kernels)."""
  pixels = batch * math.prod(cfg.spatial)
  k2, f = math.prod(cfg.kernel), cfg.features

  def conv(c_in, c_out, kk=k2):
    return 2.0 * pixels * kk * c_in * c_out

  hidden = [conv(2 if i == 0 else f, f) for i in range(cfg.depth - 1)]
  head = conv(f, 2, 1)
  if step == "eval":
    return sum(hidden) + head
  if step == "e2e":  # Forward, filter gradients everywhere, input gradients but for layer 0.
    return 3 * (sum(hidden) + head) - hidden[0]
  index = stage_index(step, cfg.depth)
  c_in = 2 if index == 0 else f
  prefix = 0.0 if "cached" in step else sum(hidden[:index])
  if "convex" in step:  # Gate conv (P channels), V/Z conv forward + filter gradient.
    return prefix + conv(c_in, f // 4) + 2 * conv(c_in, f)
  return prefix + 2 * conv(c_in, f) + 3 * head


def cost_of(compiled) -> dict:
  """FLOPs and bytes from ``compiled.cost_analysis()`` (a dict, or a list of dicts, or nothing)."""
  try:
    ca = compiled.cost_analysis()
  except Exception as e:  # Some backends do not implement it.
    return {"cost_error": short_error(e)}
  if isinstance(ca, dict):
    ca = [ca]
  flops = [d.get("flops") for d in ca or () if isinstance(d, dict) and d.get("flops") is not None]
  nbytes = [d.get("bytes accessed") for d in ca or ()
            if isinstance(d, dict) and d.get("bytes accessed") is not None]
  return {"flops": float(sum(flops)) if flops and sum(flops) > 0 else None,
          "bytes_accessed": float(sum(nbytes)) if nbytes else None}


def memory_of(compiled) -> dict:
  """The row's memory columns from ``memory.compiled_memory`` (empty where a backend has none)."""
  from lwjax import memory
  try:
    m = memory.compiled_memory(compiled)
  except Exception as e:
    return {"memory_error": short_error(e)}
  if not m:
    return {}
  return {"memory_bytes": m["total"], "temp_bytes": m["temp"], "argument_bytes": m["argument"]}


# ----------------------------------------------------------------------------------------------
# The device, its peak and its precision.

class Env:
  """JAX (and optionally PyTorch) on the benchmark device."""

  def __init__(self):
    import jax
    import numpy as np
    self.jax, self.np = jax, np
    if FLAGS.matmul_precision:
      jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
    from lwjax.training import runtime
    from lwjax.training import loop
    from lwjax.models import cnn
    self.runtime, self.loop, self.cnn = runtime, loop, cnn
    runtime.configure_xla(FLAGS.conv_fusion)  # As launch/train.py does.
    self.mesh = runtime.make_mesh(FLAGS.num_devices or None)
    self.ndev = self.mesh.devices.size
    dev = jax.devices()[0]
    self.platform = dev.platform
    self.device_kind = dev.device_kind
    self.interleave = (FLAGS.interleave == "true" or
                       (FLAGS.interleave == "auto" and self.platform == "cpu"))
    stats = None
    try:
      stats = dev.memory_stats()
    except Exception:  # Not every backend has memory statistics.
      pass
    self.memory_limit = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    if FLAGS.memory_limit_gb > 0:
      self.memory_limit = int(FLAGS.memory_limit_gb * GB)
    if self.memory_limit is None:
      try:
        self.memory_limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      except (ValueError, OSError):
        pass
    self.torch = None
    self.torch_error = None
    # JAX convolves and multiplies first (so that it loads its own cuDNN before PyTorch is
    # imported), and the result says whether its float32 runs as TF32: PyTorch is set to match.
    self.jax_tf32 = self.jax_f32_is_tf32()
    if FLAGS.torch:
      try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch
        import torch_ref
        self.torch, self.ref = torch, torch_ref
        self.tdev = "cuda" if self.platform == "gpu" and torch.cuda.is_available() else "cpu"
        if self.platform not in ("gpu", "cpu"):
          raise RuntimeError(f"no PyTorch reference on a {self.platform} device")
        if self.platform == "gpu" and self.tdev == "cpu":
          raise RuntimeError("PyTorch cannot see the GPU")
        self.torch_settings = torch_ref.setup(
            self.tdev, cudnn_benchmark=FLAGS.torch_cudnn_benchmark,
            benchmark_limit=FLAGS.torch_cudnn_benchmark_limit,
            tf32_conv=self.jax_tf32["conv"], tf32_matmul=self.jax_tf32["matmul"])
      except Exception as e:  # The benchmark still runs without the reference.
        self.torch, self.torch_error = None, short_error(e)

  def jax_f32_is_tf32(self) -> dict:
    """Whether JAX's float32 conv and matmul at the precision in effect differ from HIGHEST
    like TF32 does (10 mantissa bits: ~1e-3 relative; full float32: ~1e-7 or exactly 0)."""
    jax, jnp, np = self.jax, self.jax.numpy, self.np
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)

    def conv(precision):
      return np.asarray(jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=precision), np.float64)

    def matmul(precision):
      return np.asarray(jnp.matmul(a, a, precision=precision), np.float64)

    out = {}
    for name, f in (("conv", conv), ("matmul", matmul)):
      hi = f(jax.lax.Precision.HIGHEST)
      out[name] = bool(np.linalg.norm(f(None) - hi) / np.linalg.norm(hi) > 3e-5)
    return out

  def meta(self) -> dict:
    import flax
    import jaxlib
    import optax
    out = {"platform": self.platform, "device_kind": self.device_kind, "devices": self.ndev,
           "device_memory_limit_bytes": self.memory_limit, "host": platform.node(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "jax": self.jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
           "optax": optax.__version__,
           "jax_default_matmul_precision": self.jax.config.jax_default_matmul_precision,
           "jax_float32_runs_as_tf32": self.jax_tf32,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "interleaved_timing": self.interleave and self.torch is not None,
           "argv": sys.argv}
    if self.torch is not None:
      out["torch"] = self.torch_settings
      if self.tdev == "cuda":
        out["torch_device"] = self.torch.cuda.get_device_name()
    else:
      out["torch"] = {"error": self.torch_error or "disabled (--torch=false)"}
    return out

  # --- peak and precision probes ---

  def _peak(self, make, block, n_max: int) -> tuple:
    """(FLOP/s, n) of an n x n x n product ``make(n)() ``, n <= n_max chosen so that one product
    lasts >= 0.2 s where the device is slow (bfloat16 on a CPU without it runs at ~1 GFLOP/s)."""
    n = min(n_max, 256)
    while True:
      run = make(n)
      t0 = time.perf_counter()
      block(run())  # Compiles / initialises; then one timed product sizes the measurement.
      t0 = time.perf_counter()
      block(run())
      one = time.perf_counter() - t0
      grow = int((0.2 / max(one, 1e-9)) ** (1 / 3) * n) // 256 * 256
      if n >= n_max or grow <= n:
        break
      n = min(n_max, grow)
    reps = 5 if one < 1.0 else 3
    t = time_steps(run, block, warmup=1, repeats=reps, min_time_s=FLAGS.min_time_s)
    return 2.0 * n ** 3 / t["s"], n

  def jax_matmul_peak(self, dtype: str, n_max: int) -> tuple:
    jax, jnp = self.jax, self.jax.numpy
    f = jax.jit(lambda a, b: a @ b)

    def make(n):
      ka, kb = jax.random.split(jax.random.key(1))
      a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
      b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
      return lambda: f(a, b)
    return self._peak(make, jax.block_until_ready, n_max)

  def torch_matmul_peak(self, dtype: str, n_max: int) -> tuple:
    torch = self.torch

    def make(n):
      g = torch.Generator(device=self.tdev).manual_seed(1)
      a = torch.randn((n, n), device=self.tdev, generator=g).to(self.ref.torch_dtype(dtype))
      b = torch.randn((n, n), device=self.tdev, generator=g).to(self.ref.torch_dtype(dtype))
      return lambda: a @ b
    return self._peak(make, self.torch_block, n_max)

  def torch_block(self, out=None):
    if self.tdev == "cuda":
      self.torch.cuda.synchronize()

  def precision_probe(self) -> dict:
    """Relative error of float32 matmuls and convs at the precision in effect, per framework."""
    np, jax, jnp = self.np, self.jax, self.jax.numpy
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(512, 512)), rng.normal(size=(512, 512))
    ref = a @ b
    rel = lambda out, ref: float(np.linalg.norm(out - ref) / np.linalg.norm(ref))  # noqa: E731
    out = {"jax_f32_matmul_rel_err": rel(np.asarray(
        jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32), np.float64), ref)}
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)), jnp.float32)
    conv = lambda precision: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    hi = np.asarray(conv(jax.lax.Precision.HIGHEST), np.float64)
    out["jax_f32_conv_rel_diff_vs_highest"] = rel(np.asarray(conv(None), np.float64), hi)
    if self.torch is not None:
      torch = self.torch
      ta = torch.tensor(a, dtype=torch.float32, device=self.tdev)
      tb = torch.tensor(b, dtype=torch.float32, device=self.tdev)
      out["torch_f32_matmul_rel_err"] = rel((ta @ tb).double().cpu().numpy(), ref)
      tx = self.ref.from_nhwc(np.asarray(x), self.tdev)
      tw = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).to(self.tdev)
      tconv = torch.nn.functional.conv2d(tx, tw, padding="same")
      out["torch_f32_conv_rel_diff_vs_highest"] = rel(
          self.ref.to_nhwc(tconv).astype(np.float64), hi)
    # TF32 keeps 10 mantissa bits: errors near 1e-4..1e-3; full float32 lands near 1e-7..1e-6.
    for k in list(out):
      out[k.replace("_rel_err", "_mode").replace("_rel_diff_vs_highest", "_mode")] = (
          "tf32-like" if out[k] > 3e-5 else "float32")
    return out


# ----------------------------------------------------------------------------------------------
# One lwjax measurement.

def make_config(dtype: str, batch: int):
  cfg = config_lib.from_flags()
  return dataclasses.replace(cfg, compute_dtype=dtype, batch_size=batch,
                             convex_solver="adam", method="layerwise_convex,layerwise,e2e")


def stage_index(step: str, depth: int) -> int:
  return depth - 2 if "cached" in step else int(step.rpartition("_s")[2]) - 1


def small_shape(cfg, channels: int) -> tuple:
  """A one-example input shape to initialise with (conv shapes do not depend on the size)."""
  return (1,) + (8,) * cfg.ndim + (channels,)


def random_params(env, cfg, seed=0):
  """Full ``DeepNet`` parameters of the run's network (2D or 3D)."""
  from lwjax import nets
  return nets.init(env.jax.random.key(seed), small_shape(cfg, 2), depth=cfg.depth,
                   features=cfg.features, kernel_size=cfg.kernel, ndim=cfg.ndim)


def stage_variables(env, cfg, stage, step, h_channels, seed=1):
  """A stage's variables; the convex stage starts at zero, so draw them at random instead
  (zeros can run faster than real values)."""
  jax, jnp = env.jax, env.jax.numpy
  variables = stage.init(jax.random.key(seed), small_shape(cfg, h_channels))
  if "convex" in step:
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.01 * jax.random.normal(k, l.shape, jnp.float32) for k, l in zip(keys, leaves)]
    variables = jax.tree.unflatten(tree, leaves)
  return variables


def device_random(env, shapes: dict, dtypes: dict, seed: int):
  """Random normal arrays made on the device, split over the mesh's "data" axis."""
  jax = env.jax
  out = {}
  sharding = env.runtime.batch_sharded(env.mesh)
  for i, (name, shape) in enumerate(shapes.items()):
    make = jax.jit(lambda k, shape=shape, dt=dtypes.get(name, "float32"):
                   jax.random.normal(k, shape, dt), out_shardings=sharding)
    out[name] = make(jax.random.key(seed + i))
  return out


class JaxMeasurement:
  """Builds, compiles and times one lwjax step."""

  def __init__(self, env, cfg, step: str, batch: int):
    jax, jnp = env.jax, env.jax.numpy
    runtime, loop, cnn = env.runtime, env.loop, env.cnn
    self.env, self.jax = env, jax
    shape = (batch,) + cfg.spatial  # Slices, or 3D patches.
    net = cnn.network_template(cfg)
    params = random_params(env, cfg)
    xy = {"x": shape + (2,), "y": shape + (2,)}
    rep = runtime.replicated(env.mesh)
    self.kind = "train"
    self.h2d = None
    if step == "eval":
      self.kind = "eval"
      fn = cnn.make_forward(net, env.mesh)
      self.params = jax.device_put(params, rep)
      self.x = device_random(env, {"x": xy["x"]}, {}, seed=10)  # The batch {"x": ...}.
      self.compiled = fn.lower(self.params, self.x).compile()
      return
    if step == "e2e":
      loss_fn, tx = cnn.e2e_loss(net), loop.adam(cfg, 1, cfg.weight_decay)
      variables, frozen = params, {}
      batch_arrays = device_random(env, xy, {}, seed=10)
    else:
      method = "layerwise_convex" if "convex" in step else "layerwise"
      index = stage_index(step, cfg.depth)
      stage = cnn.make_stage(method, cfg, num_examples=cfg.batch_size)
      c_in = 2 if index == 0 else cfg.features
      variables = stage_variables(env, cfg, stage, step, c_in)
      tx = stage.tx
      if "cached" in step:
        # The prefix features arrive as an input (what --cache_features stores), in the dtype
        # the prefix computes them in.
        loss_fn = lambda v, frozen, b: stage.loss(v, b["h"], b["x"], b["y"])  # noqa: E731
        frozen = {}
        h_shape = shape + (c_in,)
        batch_arrays = device_random(env, {**xy, "h": h_shape}, {"h": cfg.compute_dtype}, 10)
        self.h_host = env.np.full(h_shape, 0.5, jnp.dtype(cfg.compute_dtype))
      else:
        loss_fn = cnn.stage_loss(net, stage, index)
        frozen = {k: v for k, v in params.items()
                  if k.startswith("convs_") and int(k.split("_")[1]) < index}
        batch_arrays = device_random(env, xy, {}, seed=10)
    step_fn = loop.make_step(loss_fn, tx, env.mesh)
    self.state = jax.device_put(
        {"params": variables, "opt": tx.init(variables), "step": jnp.zeros((), jnp.int32)}, rep)
    self.frozen = jax.device_put(frozen, rep)
    self.batch = batch_arrays
    self.compiled = step_fn.lower(self.state, self.frozen, self.batch).compile()

  def run(self):
    if self.kind == "eval":
      return self.compiled(self.params, self.x)
    self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
    return self.state, metrics

  def time_h2d(self, repeats: int) -> float:
    """Seconds to copy one batch of cached features from host memory to the device(s)."""
    sharding = self.env.runtime.batch_sharded(self.env.mesh)
    t = time_steps(lambda: self.jax.device_put(self.h_host, sharding),
                   self.jax.block_until_ready, warmup=1, repeats=repeats, min_time_s=0)
    return t["s"]

  def finite(self) -> bool:
    """Whether the last loss is finite (a NaN would make the timings suspect)."""
    if self.kind == "eval":
      return True
    _, metrics = self.compiled(self.state, self.frozen, self.batch)
    return bool(self.env.np.isfinite(float(metrics["loss"])))


# ----------------------------------------------------------------------------------------------
# One PyTorch measurement.

class TorchMeasurement:

  def __init__(self, env, cfg, step: str, batch: int):
    torch, ref, dev = env.torch, env.ref, env.tdev
    self.env = env
    torch.manual_seed(0)
    s, f, k, dt = cfg.image_size, cfg.features, cfg.kernel_size, cfg.compute_dtype
    g = torch.Generator(device=dev).manual_seed(10)

    def rand(c, dtype=torch.float32):
      return torch.randn((batch, s, s, c), device=dev, generator=g, dtype=dtype).permute(0, 3, 1, 2)

    self.x, self.y = rand(2), rand(2)
    if step == "eval":
      net = ref.channels_last(ref.DeepNet(cfg.depth, f, k), dev)
      stepper = ref.Forward(net, device=dev, compute_dtype=dt)
      self.run = lambda: stepper.step(self.x)
      return
    if step == "e2e":
      net = ref.channels_last(ref.DeepNet(cfg.depth, f, k), dev)
      stepper = ref.E2EStep(net, lr=cfg.lr, device=dev, compute_dtype=dt)
      self.run = lambda: stepper.step(self.x, self.y)
      return
    index = stage_index(step, cfg.depth)
    c_in = 2 if index == 0 else f
    if "convex" in step:
      stage = ref.ConvexStage(c_in, f, k, beta=cfg.beta, rho=cfg.rho)
    else:
      stage = ref.TwoLayer(c_in, f, k)
    stage = ref.channels_last(stage, dev)
    if "cached" in step:
      self.h = rand(c_in, ref.torch_dtype(dt))
      stepper = ref.StageStep(None, stage, index, lr=cfg.lr, device=dev, compute_dtype=dt)
      self.run = lambda: stepper.step(self.h, self.x, self.y)
    else:
      prefix = ref.channels_last(ref.DeepNet(max(index, 1) + 1, f, k), dev)
      stepper = ref.StageStep(prefix, stage, index, lr=cfg.lr, device=dev, compute_dtype=dt)
      self.run = lambda: stepper.step(self.x, self.y)


def torch_cleanup(env):
  gc.collect()
  if env.torch is not None and env.tdev == "cuda":
    env.torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The agreement check: same parameters, same inputs, highest precision.

def agreement_check(env, cfg) -> dict:
  """lwjax vs PyTorch on a small image: forward output, and loss and gradient norm of the e2e
  step, a non-convex stage and a convex stage (relative differences; ~1e-6 means the same
  function). Run at full float32 in both frameworks."""
  jax, jnp, np, torch, ref = env.jax, env.jax.numpy, env.np, env.torch, env.ref
  cnn = env.cnn
  import optax
  from lwjax.stages import gated
  from lwjax import nets
  s = min(cfg.image_size, 32)
  cfg = dataclasses.replace(cfg, image_size=s, compute_dtype="float32")
  dev = env.tdev
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, s, s, 2)).astype(np.float32)
  y = rng.normal(size=(2, s, s, 2)).astype(np.float32)
  tx_, ty_ = ref.from_nhwc(x, dev), ref.from_nhwc(y, dev)
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
  out = {}
  tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with jax.default_matmul_precision("highest"):
      net = cnn.network_template(cfg)
      params = random_params(env, cfg)
      tnet = ref.load_deepnet(ref.channels_last(ref.DeepNet(cfg.depth, cfg.features,
                                                            cfg.kernel_size), dev), params)

      def jax_grad(loss_fn, variables, frozen):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(variables, frozen, batch)
        return float(loss), float(optax.tree_utils.tree_norm(g))

      pred = np.asarray(nets.forward(net, params, batch["x"]))
      with torch.no_grad():
        tpred = ref.to_nhwc(tnet(tx_))
      out["forward_rel_diff"] = float(np.linalg.norm(pred - tpred) / np.linalg.norm(pred))

      loss, gn = jax_grad(cnn.e2e_loss(net), params, {})
      tloss, tgn = ref.E2EStep(tnet, lr=cfg.lr, device=dev, compute_dtype="float32").grad(tx_, ty_)
      out["e2e_loss_rel_diff"], out["e2e_grad_norm_rel_diff"] = rel(tloss, loss), rel(tgn, gn)

      index = 1 if cfg.depth > 2 else 0
      c_in = 2 if index == 0 else cfg.features
      frozen = {k: v for k, v in params.items() if k.startswith("convs_") and
                int(k.split("_")[1]) < index}
      prefix = ref.load_deepnet(ref.channels_last(
          ref.DeepNet(max(index, 1) + 1, cfg.features, cfg.kernel_size), dev), params)
      for method in ("layerwise", "layerwise_convex"):
        stage = cnn.make_stage(method, cfg, num_examples=cfg.batch_size)
        variables = stage_variables(env, cfg, stage, method, c_in)
        if method == "layerwise":
          tstage = ref.load_twolayer(ref.TwoLayer(c_in, cfg.features, cfg.kernel_size), variables)
        else:
          # An unprepared stage gates with the seeded gated.gate_filters(cfg.gate_seed, ...)
          # (whitened ones need its data); another seed shows up here as a loss mismatch.
          u = gated.gate_filters(cfg.gate_seed, cfg.kernel_size, 2, c_in, cfg.features // 4)
          tstage = ref.load_convex(ref.ConvexStage(c_in, cfg.features, cfg.kernel_size,
                                                   beta=cfg.beta, rho=cfg.rho), variables, u)
        tstage = ref.channels_last(tstage, dev)
        loss, gn = jax_grad(cnn.stage_loss(net, stage, index), variables, frozen)
        tloss, tgn = ref.StageStep(prefix, tstage, index, lr=cfg.lr, device=dev,
                                   compute_dtype="float32").grad(tx_, ty_)
        out[f"{method}_s{index + 1}_loss_rel_diff"] = rel(tloss, loss)
        out[f"{method}_s{index + 1}_grad_norm_rel_diff"] = rel(tgn, gn)
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
  out["max_rel_diff"] = max(v for v in out.values())
  out["agree"] = out["max_rel_diff"] < 1e-4
  return out


# ----------------------------------------------------------------------------------------------
# Output.

COLUMNS = [("step", 24, "s"), ("dtype", 8, "s"), ("batch", 5, "d"), ("ms", 9, ".2f"),
           ("img/s", 9, ".2f"), ("TF/step", 9, ".4g"), ("conv TF", 9, ".4g"), ("TF/s", 9, ".3g"),
           ("%peak", 6, ".1f"), ("GB", 6, ".2f"), ("h2d ms", 7, ".2f"), ("torch ms", 9, ".2f"),
           ("torch GB", 8, ".2f"), ("ratio", 6, ".2f")]


def row_values(r: dict) -> dict:
  tf = lambda v: None if v is None else v / 1e12  # noqa: E731
  gb = lambda v: None if v is None else v / GB  # noqa: E731
  return {"step": r["step"], "dtype": r["dtype"], "batch": r["batch"], "ms": r.get("ms"),
          "img/s": r.get("img_per_s"), "TF/step": tf(r.get("flops")),
          "conv TF": tf(r.get("conv_flops")), "TF/s": r.get("tflops_per_s"),
          "%peak": None if r.get("peak_fraction") is None else 100 * r["peak_fraction"],
          "GB": gb(r.get("memory_bytes")), "h2d ms": r.get("h2d_ms"),
          "torch ms": r.get("torch_ms"), "torch GB": gb(r.get("torch_memory_bytes")),
          "ratio": r.get("ratio")}


def format_row(r: dict, sep=" ") -> str:
  v = row_values(r)
  cells = []
  for name, width, fmt in COLUMNS:
    x = v[name]
    cells.append(("-" if x is None else format(x, fmt)).rjust(width) if fmt != "s"
                 else str(x).ljust(width))
  line = sep.join(cells)
  notes = [r[k] for k in ("error", "torch_error", "note") if r.get(k)]
  return line + ("  " + " | ".join(notes) if notes else "")


def header(sep=" ") -> str:
  return sep.join(n.ljust(w) if f == "s" else n.rjust(w) for n, w, f in COLUMNS)


def markdown(results: list) -> str:
  names = [n for n, _, _ in COLUMNS] + ["notes"]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  for r in results:
    v = row_values(r)
    cells = ["-" if v[n] is None else (format(v[n], f) if f != "s" else str(v[n]))
             for n, _, f in COLUMNS]
    notes = "; ".join(r[k] for k in ("error", "torch_error", "note") if r.get(k))
    lines.append("| " + " | ".join(cells) + " | " + notes.replace("|", "/") + " |")
  return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
  if path:  # Values JSON cannot hold (dtypes, paths) as their str.
    files.write_json(path, json.loads(json.dumps(report, default=str)), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# The run.

def measure(env, cfg, step: str, batch: int, peak: dict) -> dict:
  """One row: the lwjax step (compiled, memory-checked, timed) and the PyTorch step.

  With ``--interleave`` both exist at once and their timed runs alternate; otherwise the lwjax
  step is timed and freed before the PyTorch one is built (half the device memory).
  """
  jax = env.jax
  r = {"step": step, "dtype": cfg.compute_dtype, "batch": batch,
       "conv_flops": conv_flops(cfg, batch, step)}
  if env.platform == "cpu":  # Other processes on the cores make CPU timings noisy: keep a trace.
    r["load_avg_1min"] = os.getloadavg()[0]
  timing = dict(warmup=FLAGS.warmup, repeats=FLAGS.repeats, min_time_s=FLAGS.min_time_s)
  if env.torch is not None and env.tdev == "cuda":
    # "torch GB" is the peak of the timed steps: cuDNN's algorithm search in the warm-up (its
    # workspace comes from PyTorch's allocator) is no part of a training step's memory.
    timing["after_warmup"] = env.torch.cuda.reset_peak_memory_stats
  interleave = env.interleave and env.torch is not None
  m = tm = None

  def jax_result(t):
    r.update(ms=1e3 * t["s"], img_per_s=batch / t["s"], times_ms=[1e3 * x for x in t["times_s"]],
             inner=t["inner"], spread=t["spread"])
    flops = r.get("flops") or None
    if flops is None or flops < 0.5 * r["conv_flops"]:
      # A backend whose cost analysis misses the convolutions (custom calls) would give a
      # meaningless fraction: fall back to the hand count and say so.
      r["note"] = (f"cost_analysis FLOPs {flops or 0:.3g} < half the conv count: "
                   "fraction from the hand count")
      flops = r["conv_flops"]
    r["tflops_per_s"] = flops / t["s"] / 1e12
    if peak.get(cfg.compute_dtype):
      r["peak_fraction"] = flops / t["s"] / peak[cfg.compute_dtype]
      r["conv_peak_fraction"] = r["conv_flops"] / t["s"] / peak[cfg.compute_dtype]

  def torch_result(t):
    r.update(torch_ms=1e3 * t["s"], torch_img_per_s=batch / t["s"],
             torch_times_ms=[1e3 * x for x in t["times_s"]], torch_spread=t["spread"])
    if env.tdev == "cuda":
      r["torch_memory_bytes"] = env.torch.cuda.max_memory_allocated()

  def torch_failed(e):
    r["torch_error"] = "torch " + short_error(e)
    r["torch_error_detail"] = traceback.format_exc()[-3000:]
    if env.tdev == "cuda":
      try:
        held = jax.devices()[0].memory_stats()["bytes_reserved"]
        r["torch_error"] += f" (JAX holds {held / GB:.1f} GB)"
      except Exception:  # Only a hint for the message.
        pass

  def build_torch():
    if env.tdev == "cuda":
      env.torch.cuda.reset_peak_memory_stats()
    return TorchMeasurement(env, cfg, step, batch)

  try:
    progress(f"{step} {cfg.compute_dtype} batch {batch}: compiling")
    t0 = time.perf_counter()
    m = JaxMeasurement(env, cfg, step, batch)
    r["compile_s"] = time.perf_counter() - t0
    progress(f"compiled in {r['compile_s']:.1f} s; timing")
    r.update(cost_of(m.compiled))
    r.update(memory_of(m.compiled))
    need, limit = r.get("memory_bytes"), env.memory_limit
    r["fits"] = not (need is not None and limit is not None and need > limit)
    if not r["fits"]:
      r["note"] = f"needs {need / GB:.3g} GB > {limit / GB:.3g} GB: not run"
    else:
      fns = [(m.run, jax.block_until_ready)]
      if interleave:
        try:
          tm = build_torch()
          fns.append((tm.run, env.torch_block))
        except Exception as e:
          torch_failed(e)
      ts = time_interleaved(fns, **timing)
      jax_result(ts[0])
      if len(ts) > 1:
        torch_result(ts[1])
      if "cached" in step:
        r["h2d_ms"] = 1e3 * m.time_h2d(min(FLAGS.repeats, 3))
      if not m.finite():
        r["note"] = "non-finite loss"
  except Exception as e:  # One failure must not end the run.
    if tm is not None and "torch_ms" not in r:
      torch_failed(e)  # Interleaved: the failure may be either's; the detail says which.
    r["error"] = "lwjax " + short_error(e)
    r["error_detail"] = traceback.format_exc()[-3000:]
  finally:
    del m
    gc.collect()

  if env.torch is None or not r.get("fits", True) or interleave:
    del tm
    torch_cleanup(env)
    return r
  if elapsed() >= 1.25 * FLAGS.time_budget_s:
    r["torch_error"] = "torch skipped: time budget spent"
    return r
  try:
    progress(f"lwjax {r.get('ms', float('nan')):.2f} ms ({r.get('memory_bytes', 0) / GB:.2f} GB); "
             "PyTorch step")
    tm = build_torch()
    torch_result(time_steps(tm.run, env.torch_block, **timing))
  except Exception as e:
    torch_failed(e)
  finally:
    del tm
    torch_cleanup(env)
  return r


def measure_peak(env, dtypes, n: int, into: dict) -> dict:
  """Per dtype, the faster square matmul of JAX and PyTorch in FLOP/s; details go to ``into``."""
  peak = {}
  for d in dtypes:
    entry = {}
    try:
      entry["jax"], entry["jax_size"] = env.jax_matmul_peak(d, n)
    except Exception as e:
      entry["jax_error"] = short_error(e)
    if env.torch is not None:
      try:
        entry["torch"], entry["torch_size"] = env.torch_matmul_peak(d, n)
      except Exception as e:
        entry["torch_error"] = short_error(e)
      torch_cleanup(env)
    best = max([entry.get("jax") or 0, entry.get("torch") or 0])
    peak[d] = entry["peak"] = best or None
    into[d] = entry
    log(f"peak {d}: square matmul: jax {(entry.get('jax') or 0) / 1e12:.3f} TFLOP/s "
        f"(n={entry.get('jax_size')}), torch {(entry.get('torch') or 0) / 1e12:.3f} TFLOP/s "
        f"(n={entry.get('torch_size')}) -> {best / 1e12:.3f} TFLOP/s")
  return peak


def batch_plan(spec: str, ndev: int):
  if spec.strip() == "auto":
    b = ndev
    while b <= FLAGS.max_batch:
      yield b
      b *= 2
    return
  for b in (int(t) for t in spec.split(",") if t.strip()):
    yield b


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  dtypes = [d.strip() for d in FLAGS.compute_dtype.split(",") if d.strip()]
  for d in dtypes:
    if d not in config_lib.DTYPES:
      raise app.UsageError(f"--compute_dtype: {d!r} is not one of {config_lib.DTYPES}")
  steps = parse_steps(FLAGS.steps, FLAGS.depth)
  if FLAGS.ndim == 3 and FLAGS.torch:
    raise app.UsageError("--ndim=3: the PyTorch reference (bench/torch_ref.py) is 2D only; "
                         "add --torch=false to time lwjax's 3D steps against the peak")
  env = Env()
  cfg0 = make_config(dtypes[0], env.ndev)
  config_lib.validate(cfg0, env.ndev)
  report = {"meta": env.meta(), "config": {k: getattr(FLAGS, k) for k in (
      "image_size", "ndim", "volume_depth", "kernel_depth", "features", "kernel_size", "depth",
      "batch_sizes", "compute_dtype", "steps",
      "repeats", "warmup", "min_time_s", "time_budget_s", "lr", "beta", "rho")},
      "peak_flops": {}, "results": []}
  log(f"device: {env.ndev} x {env.device_kind} ({env.platform}); jax {env.jax.__version__}; "
      f"memory limit {env.memory_limit / GB if env.memory_limit else float('nan'):.1f} GB; "
      f"torch: {report['meta']['torch'].get('torch', report['meta']['torch'].get('error'))}")
  log(f"config: {'x'.join(map(str, cfg0.spatial))} examples, {'x'.join(map(str, cfg0.kernel))} "
      f"kernels, {FLAGS.features} channels, depth {FLAGS.depth}; steps {', '.join(steps)}; "
      f"dtypes {', '.join(dtypes)}")

  # The peak: one large square matmul per dtype, in each framework; the better one is the peak.
  n = FLAGS.peak_size or (2048 if env.platform == "cpu" else 8192)
  peak = measure_peak(env, dtypes, n, report["peak_flops"])
  gc.collect()
  try:
    report["precision"] = env.precision_probe()
    log(f"precision in effect: {report['precision']}")
  except Exception as e:
    report["precision"] = {"error": short_error(e)}
  if FLAGS.check and env.torch is not None:
    try:
      report["check"] = agreement_check(env, cfg0)
    except Exception as e:
      report["check"] = {"error": short_error(e), "detail": traceback.format_exc()[-3000:]}
    log(f"agreement lwjax vs torch (float32, highest precision): "
        f"{ {k: v for k, v in report['check'].items() if k != 'detail'} }")
    torch_cleanup(env)
  write_json(FLAGS.json_out, report)

  log("")
  log(header())
  too_big = {}  # (step, dtype) -> the smallest batch size that did not fit.
  prev = None  # (batch, seconds it took, seconds of that spent compiling) of the last batch size.
  stop = ""
  for batch in batch_plan(FLAGS.batch_sizes, env.ndev):
    if batch % env.ndev:
      log(f"batch {batch}: skipped, not a multiple of the {env.ndev} devices")
      continue
    # All steps of one dtype before the next: a slow or failing dtype cannot hold up the rest.
    todo = [(s, d) for d in dtypes for s in steps if batch < too_big.get((s, d), batch + 1)]
    if not todo:
      stop = "every step is past the device memory"
      break
    if elapsed() > FLAGS.time_budget_s:
      stop = f"time budget {FLAGS.time_budget_s:.0f} s spent ({elapsed():.0f} s)"
      break
    if prev is not None:
      estimate = prev[2] + (prev[1] - prev[2]) * max(1.0, batch / prev[0])
      if elapsed() + estimate > 1.25 * FLAGS.time_budget_s:
        stop = (f"batch {batch} would take about {estimate:.0f} s more "
                f"({elapsed():.0f} s of {FLAGS.time_budget_s:.0f} s spent)")
        break
    t_batch, compile_s = time.perf_counter(), 0.0
    for step, d in todo:
      if elapsed() > 1.25 * FLAGS.time_budget_s:
        stop = f"time budget spent during batch {batch} ({elapsed():.0f} s)"
        break
      cfg = make_config(d, batch)
      r = measure(env, cfg, step, batch, peak)
      if r.get("ms") and r.get("torch_ms"):
        r["ratio"] = r["torch_ms"] / r["ms"]
      r["elapsed_s"] = elapsed()
      compile_s += r.get("compile_s", 0.0)
      if r.get("fits") is False or "OOM" in r.get("error", ""):
        too_big[(step, d)] = min(batch, too_big.get((step, d), batch))
      report["results"].append(r)
      log(format_row(r))
      write_json(FLAGS.json_out, report)
    prev = (batch, time.perf_counter() - t_batch, compile_s)
    if stop:
      break
    if FLAGS.batch_sizes.strip() == "auto" and batch * 2 > FLAGS.max_batch:
      stop = f"--max_batch={FLAGS.max_batch}"
  report["stopped"] = stop or "all batch sizes done"
  # The peak once more: on a shared machine the first one may have met a busy moment. The
  # fractions use the higher of the two. (Skipped on an accelerator past the budget: its peak is
  # steady, and a lease may be about to end.)
  if report["results"] and (env.platform == "cpu" or elapsed() < 1.25 * FLAGS.time_budget_s):
    end = {}
    peak_end = measure_peak(env, dtypes, n, end)
    report["peak_flops_end"] = end
    for d in dtypes:
      if peak_end.get(d) and (not peak.get(d) or peak_end[d] > peak[d]):
        peak[d] = peak_end[d]
        for r in report["results"]:
          if r["dtype"] == d and r.get("tflops_per_s"):
            r["peak_fraction"] = r["tflops_per_s"] * 1e12 / peak[d]
            r["conv_peak_fraction"] = r["conv_flops"] / (r["ms"] / 1e3) / peak[d]
    report["peak_used"] = peak
  report["elapsed_s"] = elapsed()
  write_json(FLAGS.json_out, report)
  log("")
  log(f"stopped: {report['stopped']}; {elapsed():.0f} s in all")
  for d in dtypes:
    if peak.get(d):
      log(f"peak {d}: {peak[d] / 1e12:.3f} TFLOP/s (the faster square matmul of JAX and "
          "PyTorch, the higher of the run's start and end)")
  log("ratio = lwjax img/s / torch img/s (> 1: lwjax faster); %peak from the compiled step's "
      "FLOPs (cost_analysis); conv TF = FLOPs of the convolutions counted by hand")
  order = {s: i for i, s in enumerate(steps)}
  log(markdown(sorted(report["results"], key=lambda r: (
      order.get(r["step"], 99), dtypes.index(r["dtype"]), r["batch"]))))
  if FLAGS.json_out:
    log(f"wrote {FLAGS.json_out}")
  return 0


if __name__ == "__main__":
  app.run(main)
