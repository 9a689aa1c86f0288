"""The run configuration: one frozen dataclass, and the absl flags generated from it.

Every launch script defines the same flags from ``Config`` (``define_flags``), so a flagfile written
for ``launch/train.py`` also drives ``launch/evaluate.py`` and ``launch/memory.py``. A run stores its
configuration as ``WORKDIR/config.json`` (``save``/``load``).
"""
import dataclasses
import math
from pathlib import Path
from typing import Optional

from lwjax import files

# Plain tuples, so that importing this module (every launch script's --help) does not load JAX;
# tests check them against ``cnn.STAGES``, ``masks.KINDS`` and ``coils.METHODS``.
# The layer-wise stage kinds (``models.cnn.STAGES`` builds each) and the end-to-end baseline.
LAYERWISE = ("layerwise_convex", "layerwise")
METHODS = LAYERWISE + ("e2e",)
MASKS = ("poisson", "cartesian", "equispaced")
MAPS = ("espirit", "lowres")
SOLVERS = ("pfista", "fista", "adam")
GATE_FILTERS = ("white", "gaussian")
PRECISIONS = ("default", "high", "highest")  # jax.default_matmul_precision's names
DTYPES = ("float32", "bfloat16")
FEATURE_CACHES = ("none", "host", "disk", "device")
HOST_DATA = ("memory", "disk")


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of a run. Field comments become the flags' help text."""
  # Data.
  data_dir: str = ""  # fastMRI root holding train/ and val/ (or multicoil_*); empty: synthetic data in WORKDIR/data
  image_size: int = 320  # side of the square image grid every slice is cropped to
  mask: str = "poisson"  # undersampling mask: poisson (2D Poisson disc), cartesian (random 1D lines) or equispaced
  accel: float = 4.0  # acceleration factor of the mask
  calib: int = 16  # side of the fully sampled centre of Poisson masks, and of the coil maps' calibration region
  center_fraction: float = 0.04  # fully sampled centre fraction of 1D Cartesian masks
  mask_seed: int = 0  # seed of the (fixed) sampling mask
  maps: str = "espirit"  # coil-map estimation from the calibration region: espirit or lowres
  min_map_coverage: float = 0.01  # skip (and log) a slice whose coil maps cover less than this fraction of the grid
  cache_dir: str = ""  # folder of the prepared-slice cache, shareable by runs on the same data; empty: WORKDIR/cache
  host_data: str = "memory"  # where the prepared slices live on the host: memory, or disk (a memory-mapped scratch file)
  prep_workers: int = 0  # processes preparing the slices not cached yet; 0: one per CPU core
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
  e2e_depths: str = ""  # comma-separated depths of the end-to-end networks; empty: only --depth
  batch_size: int = 4  # global batch size, split over all local devices
  epochs: int = 40  # epochs per network (e2e) or per stage (layer-wise)
  lr: float = 1e-4  # Adam learning rate
  lr_decay_every: int = 10  # multiply the learning rate by --lr_decay every this many epochs
  lr_decay: float = 0.5  # learning-rate decay factor
  weight_decay: float = 0.0  # decoupled weight decay of the non-convex methods (e2e, layerwise)
  seed: int = 0  # seed of initialisation and shuffling
  # Convex stage.
  convex_solver: str = "pfista"  # convex-stage solver: pfista (FISTA in the patch-covariance metric), fista or adam (the paper's)
  beta: float = 0.01  # group-lasso weight: a fraction of each stage's beta_max with --beta_relative, else absolute
  beta_relative: bool = True  # read --beta as a fraction of each stage's beta_max (one pass before the stage)
  rho: float = 0.0  # ReLU-cone penalty (0: the gated-ReLU relaxation, mapped to ReLU by a head refit; > 0: adam only)
  refit_head: bool = True  # refit each convex stage's 1x1 head on its ReLU features by least squares
  fista_iters: int = 500  # most passes over the data of a FISTA convex stage (one iteration each)
  target_gap: float = 1e-4  # end a convex stage (rho = 0) once its relative duality gap is at most this; 0: never early
  certify_every: int = 10  # passes between a convex stage's certificates (its checkpoints, pfista's recentring)
  metric_samples: int = 64  # pfista: patches per patch dimension for the covariance metric; 0: every patch
  metric_coupling: float = 1.0  # pfista: c of the metric's gate coupling I + c 1 1^T (1: common mode out; 0: separable)
  convex_init: str = "zeros"  # start of the convex stages: zeros or random (a convex stage reaches one optimum)
  convex_precision: str = "default"  # matmul precision of the convex stages' training step: default (TF32 on GPUs), high or highest
  gate_seed: int = 0  # seed of the convex stages' fixed gate filters
  gate_filters: str = "white"  # convex stages' gate filters: white (whitened by the stage input's patch covariance) or gaussian
  # Runtime.
  workdir: str = "workdir"  # everything a run writes: checkpoints, metrics, summary.json
  eval_batch_size: int = 8  # batch size of evaluation
  compute_dtype: str = "float32"  # float32, or bfloat16 compute with float32 parameters and loss
  data_on_device: bool = False  # hold the training arrays in accelerator memory (a copy per device): no host copy per step
  cache_features: str = "none"  # keep a finished stage's output features: none, host (memory), disk or device
  distributed: str = ""  # multi-host runs: auto, or ADDRESS:PORT,NUM_PROCESSES,PROCESS_ID; empty: one host
  compilation_cache: str = "~/.cache/lwjax/jax"  # folder of JAX's persistent compilation cache; empty: off (JAX_COMPILATION_CACHE_DIR wins)
  conv_fusion: bool = False  # GPU: let XLA fuse each convolution with its bias and ReLU into one cuDNN call
  log_every: int = 50  # console log every this many steps (and at every epoch end)
  # Unrolled model and 3D.
  model: str = "cnn"  # cnn (the deep net) or unrolled (MoDL-style: per iteration a CNN, then CG-SENSE data consistency)
  unroll_iters: int = 2  # unrolled model: iterations K, each with its own CNN and lambda
  dc_lambda: float = 0.05  # unrolled model: weight of the data-consistency step (its start value when learned)
  learn_lambda: bool = True  # unrolled model: learn each iteration's lambda (log-parametrised); false: keep --dc_lambda
  lambda_lr: float = 0.0  # unrolled model: Adam learning rate of log lambda, on the --lr schedule; 0: --lr
  cg_iters: int = 10  # unrolled model: conjugate-gradient steps per data-consistency step
  ndim: int = 2  # spatial dimensions of the network: 2 (slices) or 3 (volume patches of --volume_depth slices)
  volume_depth: int = 8  # 3D: consecutive slices of one file per volume patch
  kernel_depth: int = 0  # 3D: kernel extent across slices; 0: --kernel_size

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
  for f in dataclasses.fields(cfg):  # inf passes every "> 0" below; nan fails them unnamed.
    if f.type is float:
      need(math.isfinite(getattr(cfg, f.name)), f.name, "expected a finite number")
  need(cfg.image_size >= 1, "image_size", "must be >= 1 (pixels per side)")
  need(cfg.calib >= 1, "calib", "must be >= 1")
  need(0 < cfg.center_fraction <= 1, "center_fraction", "expected a fraction in (0, 1]")
  for flag in ("mask_seed", "seed", "gate_seed", "synth_seed"):
    need(getattr(cfg, flag) >= 0, flag, "must be >= 0 (a seed)")
  for flag in ("synth_train_subjects", "synth_val_subjects", "synth_slices", "synth_coils"):
    need(getattr(cfg, flag) >= 1, flag, "must be >= 1")
  need(cfg.synth_noise >= 0, "synth_noise", "must be >= 0 (a standard deviation)")
  for flag in ("max_train_volumes", "max_val_volumes"):
    need(getattr(cfg, flag) >= 0, flag, "must be >= 0 (0: all files)")
  need(cfg.log_every >= 0, "log_every", "must be >= 0 (0: only at epoch ends)")
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
  need(cfg.convex_solver == "adam" or cfg.rho == 0, "rho",
       f"{cfg.convex_solver} solves the gated relaxation only: use --rho=0, or "
       "--convex_solver=adam")
  need(0 <= cfg.target_gap < 1, "target_gap", "expected a relative duality gap in [0, 1)")
  need(cfg.certify_every >= 1, "certify_every", "must be >= 1 (passes)")
  need(cfg.metric_samples >= 0, "metric_samples", "must be >= 0 (0: every patch)")
  need(cfg.metric_coupling >= 0, "metric_coupling", "must be >= 0")
  need(cfg.gate_filters in GATE_FILTERS, "gate_filters",
       f"expected one of {', '.join(GATE_FILTERS)}")
  need(cfg.convex_init in ("zeros", "random"), "convex_init", "expected zeros or random")
  need(cfg.convex_precision in PRECISIONS, "convex_precision",
       f"expected one of {', '.join(PRECISIONS)}")
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
  files.write_json(path, dataclasses.asdict(cfg))


def load(path, **overrides) -> Config:
  """Read a ``config.json`` written by ``save``; unknown keys are an error naming the file."""
  values = files.read_json(path)
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{path}: unknown configuration keys {unknown}")
  values.update(overrides)
  return Config(**values)
