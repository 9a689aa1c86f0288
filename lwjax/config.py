"""The run configuration: one frozen dataclass, and the absl flags generated from it.

Every launch script defines the same flags from ``Config`` (``define_flags``), so a flagfile written
for ``launch/train.py`` also drives ``launch/evaluate.py`` and ``launch/memory.py``. A run stores its
configuration as ``WORKDIR/config.json`` (``save``/``load``).
"""
import dataclasses
import json
from pathlib import Path
from typing import Optional

# Plain tuples, so that importing this module (every launch script's --help) does not load JAX;
# tests check them against ``train.STAGES``, ``masks.KINDS`` and ``coils.METHODS``.
# The layer-wise stage kinds (``train.STAGES`` builds each) and the end-to-end baseline.
LAYERWISE = ("layerwise_convex", "layerwise")
METHODS = LAYERWISE + ("e2e",)
MASKS = ("poisson", "cartesian", "equispaced")
MAPS = ("espirit", "lowres")
SOLVERS = ("adam", "fista")
DTYPES = ("float32", "bfloat16")
FEATURE_CACHES = ("none", "host", "disk", "device")
HOST_DATA = ("memory", "disk")


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of a run. Field comments become the flags' help text."""
  # Data.
  data_dir: str = ""  # fastMRI root with train/ and val/ (or multicoil_train/, multicoil_val/) HDF5 files; empty: synthetic data generated in WORKDIR/data
  image_size: int = 320  # side of the square image grid every slice is cropped to
  mask: str = "poisson"  # undersampling mask: poisson (2D variable-density Poisson disc), cartesian (1D random lines), equispaced (1D equispaced lines)
  accel: float = 4.0  # acceleration factor of the mask
  calib: int = 16  # fully sampled centre of Poisson masks; coil maps use the sampled block within calib x calib
  center_fraction: float = 0.04  # fully sampled centre fraction of 1D Cartesian masks
  mask_seed: int = 0  # seed of the (fixed) sampling mask
  maps: str = "espirit"  # coil-map estimation from the calibration region: espirit or lowres
  min_map_coverage: float = 0.01  # skip (and log) a slice whose coil maps are non-zero on less than this fraction of the grid (ESPIRiT's maps are empty on most noise-only edge slices of 15-coil data; with few coils or lowres maps noise is covered and kept); all-zero slices are skipped too; applied on loading, changing it prepares nothing again
  cache_dir: str = ""  # folder of the prepared-slice cache; empty: WORKDIR/cache. Entries are keyed by file (path, size, mtime, norm/max attrs), slice, mask bits and preparation settings, so runs on the same data can share one folder and skip ESPIRiT
  host_data: str = "memory"  # where the prepared slices live on the host: memory, or disk (a memory-mapped scratch file in the slice cache's folder, deleted as soon as it is mapped: host memory then does not grow with the dataset; batches are read from the page cache or the disk; 2D networks: a 3D run's volume patches are built in memory)
  prep_workers: int = 0  # processes preparing slices that are not cached yet (ESPIRiT is the slow part); 0: one per CPU core
  max_train_volumes: int = 0  # use at most this many training files (subjects); 0: all
  max_val_volumes: int = 0  # use at most this many validation files (subjects); 0: all
  synth_train_subjects: int = 30  # synthetic data: training subjects (files)
  synth_val_subjects: int = 6  # synthetic data: validation subjects (files)
  synth_slices: int = 8  # synthetic data: slices per subject
  synth_coils: int = 15  # synthetic data: receive coils
  synth_noise: float = 0.01  # synthetic data: k-space noise std relative to the image maximum
  synth_seed: int = 0  # synthetic data: seed
  # Network.
  depth: int = 5  # conv layers including the 1x1 head (the paper: 5)
  features: int = 256  # channels of every hidden layer (the paper: 256)
  kernel_size: int = 7  # kernel side of every hidden layer (the paper: 7)
  # Training.
  method: str = "layerwise_convex,e2e"  # comma-separated methods to train: layerwise_convex, layerwise (non-convex ablation), e2e
  e2e_depths: str = ""  # comma-separated depths at which to train end-to-end networks; empty: only --depth
  batch_size: int = 4  # global batch size, split over all local devices
  epochs: int = 40  # epochs per network (e2e) or per stage (layer-wise)
  lr: float = 1e-4  # Adam learning rate
  lr_decay_every: int = 10  # multiply the learning rate by --lr_decay every this many epochs
  lr_decay: float = 0.5  # learning-rate decay factor
  weight_decay: float = 0.0  # decoupled weight decay of the non-convex methods (e2e, layerwise)
  seed: int = 0  # seed of initialisation and shuffling
  # Convex stage.
  convex_solver: str = "adam"  # solver of the convex stages: adam (the paper) or fista (rho = 0 only)
  beta: float = 0.01  # group-lasso weight of the convex stage: a fraction of each stage's beta_max (the weight that zeroes every group) with --beta_relative, else absolute (for a 0.5*mean squared-error data term)
  beta_relative: bool = True  # read --beta as a fraction of each stage's beta_max (found in one pass over the data before the stage trains)
  rho: float = 0.0  # ReLU-constraint penalty of the convex stage (0: the gated-ReLU relaxation, mapped to ReLU with a refit head)
  refit_head: bool = True  # refit each convex stage's 1x1 head on its ReLU features by least squares
  fista_iters: int = 200  # FISTA iterations (one pass over the data each) per convex stage
  gate_seed: int = 0  # seed of the convex stages' fixed gate filters
  # Runtime.
  workdir: str = "workdir"  # everything a run writes: checkpoints, metrics, summary.json
  eval_batch_size: int = 8  # batch size of evaluation
  compute_dtype: str = "float32"  # float32, or bfloat16 compute with float32 parameters and loss
  data_on_device: bool = False  # hold the training arrays (inputs, targets; k-space and maps for the unrolled model) in accelerator memory, every device a full copy, and gather each batch there: no host work or host-to-device copy per step
  cache_features: str = "none"  # keep a finished stage's output features: none, host (memory), disk (memory-mapped file) or device (accelerator memory, every device a full copy)
  distributed: str = ""  # multi-host runs (every host runs the same command): auto (jax.distributed.initialize() detects TPU pods, SLURM, Open MPI, Kubernetes) or ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID; empty: one host
  compilation_cache: str = "~/.cache/lwjax/jax"  # JAX's persistent cache of compiled steps, XLA's convolution autotuning included (on a GPU ~30 s per new 7x7x256 step: a rerun or resumed run skips it); empty: off; JAX_COMPILATION_CACHE_DIR, when set, wins
  conv_fusion: bool = False  # GPU: let XLA fuse each convolution with its bias and ReLU into one cuDNN call; off by default: on an H200 the plain convolution plus XLA's own bias+ReLU fusion cut the bfloat16 steps' time by 11-22% (evaluation 43.0 -> 33.7 ms; BUILD_NOTES)
  log_every: int = 50  # console log every this many steps (and at every epoch end)
  # Unrolled model and 3D.
  model: str = "cnn"  # cnn (the deep net) or unrolled (MoDL-style: --unroll_iters x [CNN_k, then CG-SENSE data consistency]; --method=e2e trains all iterations jointly, layerwise one iteration per stage)
  unroll_iters: int = 2  # unrolled model: iterations K, each with its own CNN and lambda
  dc_lambda: float = 0.05  # unrolled model: weight lambda of the data-consistency step argmin |Ax - y|^2 + lambda |x - z|^2 (the start value when learned)
  learn_lambda: bool = True  # unrolled model: learn each iteration's lambda (log-parametrised); false: keep --dc_lambda
  lambda_lr: float = 0.0  # unrolled model: Adam learning rate of log lambda, on the --lr schedule (0: --lr; Adam moves log lambda by about this much per step)
  cg_iters: int = 10  # unrolled model: conjugate-gradient steps per data-consistency step
  ndim: int = 2  # spatial dimensions of the network: 2 (slices) or 3 (volume patches of --volume_depth consecutive slices of one file, kernels --kernel_depth x --kernel_size x --kernel_size)
  volume_depth: int = 8  # 3D: slices per volume patch (slices that fill no patch, at a file's end or before a skipped slice, are dropped)
  kernel_depth: int = 0  # 3D: kernel extent across slices (0: --kernel_size; e.g. 3 with --kernel_size=7 for 3x7x7 kernels on thick slices)

  @property
  def methods(self) -> tuple[str, ...]:
    return tuple(m.strip() for m in self.method.split(",") if m.strip())

  @property
  def kernel(self) -> tuple[int, ...]:
    """The hidden layers' kernel extent per spatial dimension: (k, k) or (kernel_depth, k, k)."""
    k = (self.kernel_size,) * 2
    return ((self.kernel_depth or self.kernel_size),) + k if self.ndim == 3 else k

  @property
  def spatial(self) -> tuple[int, ...]:
    """The spatial shape of one training example: a slice (H, W), or a volume patch (D, H, W)."""
    size = (self.image_size,) * 2
    return size if self.ndim == 2 else (self.volume_depth,) + size

  @property
  def depths_e2e(self) -> tuple[int, ...]:
    if not self.e2e_depths.strip():
      return (self.depth,)
    return tuple(int(d) for d in self.e2e_depths.split(","))


def validate(cfg: Config, num_devices: int) -> None:
  """Raise ValueError, naming the flag, for any setting that cannot run (before any work)."""
  def need(ok, flag, msg):
    if not ok:
      raise ValueError(f"--{flag}={getattr(cfg, flag)!r}: {msg}")
  need(cfg.methods and all(m in METHODS for m in cfg.methods), "method",
       f"expected a comma-separated subset of {', '.join(METHODS)}")
  need(cfg.depth >= 2, "depth", "must be >= 2 (one hidden layer and the 1x1 head)")
  try:
    depths = cfg.depths_e2e
  except ValueError:
    depths = ()
  need(depths and all(d >= 2 for d in depths), "e2e_depths",
       "expected comma-separated integers >= 2")
  need(cfg.model == "unrolled" or "e2e" not in cfg.methods or all(d <= cfg.depth for d in depths),
       "e2e_depths",
       f"deeper than --depth={cfg.depth}; the comparison ends at --depth (e.g. --e2e_depths="
       f"{','.join(str(d) for d in depths if d <= cfg.depth) or cfg.depth})")
  need(cfg.features >= 1, "features", "must be >= 1")
  # A SAME conv with an even kernel is not centred (XLA pads one pixel more after than before):
  # the output would shift by half a pixel per layer, and the receptive fields would be lopsided.
  need(cfg.kernel_size >= 1 and cfg.kernel_size % 2 == 1, "kernel_size",
       "expected an odd size >= 1 (a centred SAME conv)")
  need(cfg.batch_size >= 1 and cfg.batch_size % num_devices == 0, "batch_size",
       f"must be a positive multiple of the device count ({num_devices} devices)")
  need(cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
  need(cfg.epochs >= 1, "epochs", "must be >= 1")
  need(cfg.lr > 0, "lr", "must be > 0")
  need(0 < cfg.lr_decay <= 1, "lr_decay", "expected a factor in (0, 1]")
  need(cfg.lr_decay_every >= 1, "lr_decay_every", "must be >= 1 (epochs)")
  need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(cfg.fista_iters >= 1, "fista_iters", "must be >= 1")
  need(cfg.mask in MASKS, "mask", f"expected one of {', '.join(MASKS)}")
  need(cfg.accel > 1, "accel", "acceleration must be > 1")
  need(cfg.maps in MAPS, "maps", f"expected one of {', '.join(MAPS)}")
  need(cfg.convex_solver in SOLVERS, "convex_solver", f"expected one of {', '.join(SOLVERS)}")
  need(cfg.convex_solver != "fista" or cfg.rho == 0, "rho",
       "FISTA solves the gated relaxation only: use --rho=0 with --convex_solver=fista")
  need(cfg.beta >= 0 and cfg.rho >= 0, "beta", "beta and rho must be >= 0")
  need(cfg.beta > 0 or "layerwise_convex" not in cfg.methods, "beta",
       "the convex stage needs beta > 0 (its group lasso)")
  need(not (cfg.beta_relative and cfg.beta >= 1) or "layerwise_convex" not in cfg.methods,
       "beta", "with --beta_relative, --beta is a fraction of beta_max (the beta that zeroes "
       "every group): expected < 1, else the stage's layer is empty")
  need("layerwise_convex" not in cfg.methods or cfg.features % 4 == 0, "features",
       "the convex stage needs features divisible by 4 (2 * P arrangements * 2 output channels)")
  need(cfg.compute_dtype in DTYPES, "compute_dtype", f"expected one of {', '.join(DTYPES)}")
  need(cfg.cache_features in FEATURE_CACHES, "cache_features",
       f"expected one of {', '.join(FEATURE_CACHES)}")
  need(cfg.model in ("cnn", "unrolled"), "model", "expected cnn or unrolled")
  if cfg.model == "unrolled":
    need(set(cfg.methods) <= {"e2e", "layerwise"}, "method",
         "the unrolled model trains e2e (all iterations jointly) and layerwise (one iteration per "
         "stage); layerwise_convex is not defined for it")
    need(not cfg.e2e_depths.strip() or cfg.depths_e2e == (cfg.depth,), "e2e_depths",
         "the unrolled model's CNNs all have --depth layers; leave --e2e_depths empty")
  need(cfg.unroll_iters >= 1, "unroll_iters", "must be >= 1")
  need(cfg.dc_lambda > 0, "dc_lambda", "must be > 0 (it is log-parametrised)")
  need(cfg.lambda_lr >= 0, "lambda_lr", "must be >= 0 (0: --lr)")
  need(cfg.cg_iters >= 1, "cg_iters", "must be >= 1")
  need(cfg.ndim in (2, 3), "ndim", "expected 2 or 3")
  need(cfg.volume_depth >= 1, "volume_depth", "must be >= 1")
  need(0 <= cfg.min_map_coverage < 1, "min_map_coverage", "must be in [0, 1)")
  need(cfg.prep_workers >= 0, "prep_workers", "must be >= 0 (0: one per CPU core)")
  need(cfg.host_data in HOST_DATA, "host_data", f"expected one of {HOST_DATA}")
  need(cfg.kernel_depth == 0 or (cfg.kernel_depth > 0 and cfg.kernel_depth % 2 == 1),
       "kernel_depth", "expected 0 (--kernel_size) or an odd size (a centred SAME conv)")
  need(cfg.kernel_depth == 0 or cfg.ndim == 3, "kernel_depth", "applies to 3D networks only "
       "(--ndim=3)")
  need(bool(cfg.workdir), "workdir", "must not be empty")
  if cfg.data_dir:
    need(Path(cfg.data_dir).is_dir(), "data_dir", "is not a directory")


def define_flags() -> None:
  """Define one absl flag per ``Config`` field (type, default and help from the dataclass)."""
  from absl import flags  # Imported here so the library itself does not need absl's flag state.
  import inspect
  import re

  help_text = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
  for f in dataclasses.fields(Config):
    helps = help_text.get(f.name, f.name)
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[f.type]
    define(f.name, f.default, helps)


def from_flags(base: Optional[Config] = None) -> Config:
  """The parsed flags as a Config; with ``base``, its values where no flag was given (on the
  command line or in a flagfile)."""
  from absl import flags
  values = flags.FLAGS
  if base is not None:
    return dataclasses.replace(base, **{f.name: getattr(values, f.name)
                                        for f in dataclasses.fields(Config)
                                        if values[f.name].present})
  return Config(**{f.name: getattr(values, f.name) for f in dataclasses.fields(Config)})


def save(cfg: Config, path) -> None:
  """Write ``cfg`` as JSON atomically (temp file + rename)."""
  from lwjax import fastmri  # its atomic_write; not needed to define or parse the flags
  with fastmri.atomic_write(path) as tmp:
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=True))


def load(path, **overrides) -> Config:
  """Read a ``config.json`` written by ``save``; unknown keys are an error naming the file."""
  values = json.loads(Path(path).read_text())
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{path}: unknown configuration keys {unknown}")
  values.update(overrides)
  return Config(**values)
