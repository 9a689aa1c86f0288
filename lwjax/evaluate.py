"""Evaluation of a finished run: per-slice metrics of every network, a report and the figures.

``run(workdir)`` reads ``WORKDIR/config.json`` and the saved networks (``workdir.params_dir``),
predicts the validation split with each and writes:

  WORKDIR/eval.json   {"data_dir": the data evaluated ("": the run's synthetic data),
                       "own_data": whether it is the run's validation data (data.json),
                       "acceleration": {"grid": the mask's, "acquired": [min, max] over
                                        the files of its acceleration over the k-space columns
                                        each acquired (header encodingLimits), or null},
                       "per_slice": {"zero_filled": {"psnr": [...], "ssim": [...], "nmse": [...]},
                                     method: {"<depth>": {"psnr": [...], ...}}},
                       "mean": the same with means (summary.json's layout),
                       "slices": [[file, slice], ...] (the order of every per-slice list),
                       "skipped": [[file, slice, why], ...] (empty slices, not evaluated),
                       "examples": [slice indices drawn in examples.png],
                       "per_volume", "volume_mean": the same per file and averaged over files,
                       in fastMRI's volume-wise convention (``metrics.volume_metrics``),
                       "volumes": [file, ...] (the order of every per-volume list),
                       "diverged": {method: {"<depth>": why}} (networks whose metrics are
                       not results: ``loop.network_divergence``; report.md marks them)}
  WORKDIR/report.md   a table per method and depth, the layer-wise vs e2e gap, stage reports
  WORKDIR/figures/    metrics_vs_depth.png (paper figure 2), examples.png (figure 3),
                      training_curves.png
Other data than the run's (``--data_dir``) is evaluated into ``WORKDIR/eval_<its name>/`` instead
(``output_dir``), so that the run's own evaluation is never overwritten.

Metrics are the trainer's (``metrics.per_slice``): slice-based PSNR, SSIM and NMSE on magnitude
images, data range = each target slice's maximum (the paper's); and fastMRI's volume-wise ones, for
comparison with fastMRI results (on SENSE-combined targets here, not fastMRI's RSS images).
Every kind of run is evaluated as its trainer evaluates it: 2D slices, 3D volume patches
(metrics per slice of each patch) or the unrolled model (with k-space and maps; plus the
"cg_sense" baseline); for the unrolled model "depth" is the number of iterations.
"""
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from lwjax import config as config_lib
from lwjax import data as data_lib
from lwjax import experiment
from lwjax import files
from lwjax import metrics as metrics_lib
from lwjax import models
from lwjax import report
from lwjax.config import Config
from lwjax.mri import masks
from lwjax.training import checkpoints
from lwjax.training import loop
from lwjax.training import runtime
from lwjax.training import workdir as workdir_lib

# Settings a run may be evaluated with other than its own: where the data is, how many of its
# files (0: all), how much at once.
OVERRIDABLE = ("data_dir", "max_val_volumes", "eval_batch_size", "cache_dir")
# Representative slices of examples.png: the median and the 10th percentile of the reference
# network's PSNR, a typical and a hard slice (the very worst is often an all-noise edge slice).
EXAMPLE_QUANTILES = (0.5, 0.1)
METRICS = tuple(metrics_lib.NAMES)


def load_config(workdir, **overrides) -> Config:
  """The configuration of the run in ``workdir``, with ``overrides`` (``OVERRIDABLE`` fields).

  ``workdir`` is where the run is now, which may differ from where it was trained; a missing
  directory or config.json raises FileNotFoundError naming the path.
  """
  workdir = Path(workdir).absolute()
  path = workdir / "config.json"
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir}: no such run directory (--workdir)")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; is {workdir} the --workdir of a training run?")
  bad = sorted(set(overrides) - set(OVERRIDABLE))
  if bad:
    raise ValueError(f"only {OVERRIDABLE} may differ from the run's {path}, got {bad}")
  return config_lib.load(path, workdir=str(workdir), **overrides)


def overrides_from_flags(flag_values, *, used=()) -> dict:
  """The ``OVERRIDABLE`` settings given on the command line, for ``load_config``.

  A run is evaluated with its own config.json: other ``Config`` flags given explicitly (a
  flagfile's, say), apart from ``--workdir``, ``--conv_fusion`` (a setting of this process, see
  ``runtime.configure_xla``) and the names in ``used``, are ignored with a warning.
  """
  given = [f.name for f in dataclasses.fields(Config) if flag_values[f.name].present]
  ignored = sorted(set(given) - set(OVERRIDABLE) - {"workdir", "conv_fusion", *used})
  if ignored:
    logging.warning("ignoring %s: a run is evaluated with its own config.json",
                    ", ".join(f"--{name}" for name in ignored))
  return {name: flag_values[name].value for name in OVERRIDABLE if name in given}


def trained_networks(cfg: Config) -> list[tuple[str, int]]:
  """``(method, depth)`` of every network a finished run of ``cfg`` has saved, in method order
  (``Family.trained_networks``; for the unrolled model "depth" counts iterations)."""
  return models.family(cfg).trained_networks(cfg)


def final_networks(cfg: Config) -> list[tuple[str, int]]:
  """The deepest network of each method."""
  deepest = {}
  for method, depth in trained_networks(cfg):
    deepest[method] = max(depth, deepest.get(method, depth))
  return list(deepest.items())


def load_network(cfg: Config, method: str, depth: int):
  return checkpoints.load_params(workdir_lib.params_dir(cfg.workdir, method, depth))


def as_slices(images: np.ndarray) -> np.ndarray:
  """(N, h, w, 2) slices, or (M, depth, h, w, 2) patches flattened to (M * depth, h, w, 2)."""
  return images.reshape((-1,) + images.shape[-3:])


def predictor(cfg: Config, arrays: dict, mask: np.ndarray,
              *, mesh) -> Callable[[str, int], np.ndarray]:
  """``(method, depth) -> (N, h, w, 2)`` the saved network's output on ``arrays``, as slices."""
  run = models.family(cfg).predictor(cfg, arrays, mask, mesh)
  return lambda method, depth: as_slices(run(load_network(cfg, method, depth)))


def validation_split(cfg: Config, log: Callable[[str], None] = lambda s: None) -> data_lib.Split:
  """The run's validation slices (from the run's cache where it has them)."""
  # The validation split does not depend on the training files: reading one instead of all of
  # them from the cache spares the memory and time of the whole training set.
  return experiment.load_data(cfg, log=log, splits=("val",))[0]


def per_slice_metrics(cfg: Config, val: data_lib.Split,
                      *, mesh) -> tuple[dict, dict, dict, np.ndarray]:
  """Metrics of the baselines and of every saved network, per evaluated slice and per file.

  Returns ``(metrics, volume, outputs, slices)``: metrics ``{"zero_filled": m, ["cg_sense": m,]
  method: {"<depth>": m}}`` with m ``{name: (N,) array}``; ``volume`` the same tree of fastMRI's
  volume-wise metrics, ``{name: (V,) array}`` per file (``metrics.per_file``); ``outputs`` the
  magnitude images of the zero-filled input, each method's deepest network and the target
  (``example_columns``); ``slices`` (N,) the evaluated slices' indices into ``val``.
  """
  # As the trainer evaluates them: slices or 3D patches, with k-space and maps when unrolled.
  fam = models.family(cfg)
  arrays, slices = data_lib.example_arrays(cfg, val, fam.example_keys + ("scale",))
  x, y = as_slices(arrays["x"]), as_slices(arrays["y"])
  volumes = val.volume_index[slices]
  # Each example was divided by its own scale (a slice's, or a 3D patch's): a volume's metrics
  # need the slices' true relative intensities back.
  per_example = len(x) // len(arrays["x"])  # Slices per example: 1, or --volume_depth.
  scale = np.repeat(arrays.pop("scale"), per_example)[:, None, None, None]
  y_true = y * scale
  out, volume = {}, {}

  def measure(pred, *path):
    """Records the metrics of ``pred`` (N, H, W, 2) under ``path`` in both trees."""
    for tree, value in ((out, metrics_lib.per_slice(pred=pred, target=y)),
                        (volume, metrics_lib.per_file(pred=pred * scale, target=y_true,
                                                      volumes=volumes))):
      for key in path[:-1]:
        tree = tree.setdefault(key, {})
      tree[path[-1]] = value

  measure(x, "zero_filled")
  outputs = {"zero-filled": metrics_lib.magnitude(x)}
  for name, pred in fam.baselines(cfg, arrays, val.mask, mesh).items():
    measure(as_slices(pred), name)
  predict = predictor(cfg, arrays, val.mask, mesh=mesh)
  final = dict(final_networks(cfg))
  for method, depth in trained_networks(cfg):
    pred = predict(method, depth)
    measure(pred, method, str(depth))
    if final[method] == depth:
      outputs[f"{method} ({depth} {fam.depth_unit})"] = (
          metrics_lib.magnitude(pred))
  outputs["target"] = metrics_lib.magnitude(y)
  return out, volume, outputs, slices


def _is_metrics(entry: dict) -> bool:
  """Whether ``entry`` is one ``{metric: value(s)}`` leaf (not a ``{depth: ...}`` table)."""
  return set(entry) == set(METRICS)


def _map_metrics(fn, tree):
  """Applies ``fn`` to every ``{metric: per-slice values}`` entry of a per_slice_metrics tree."""
  if _is_metrics(tree):
    return fn(tree)
  return {k: _map_metrics(fn, v) for k, v in tree.items()}


def mean_lines(means: dict) -> list[str]:
  """One printable line per network of eval.json's ``mean``: baselines (zero-filled, CG-SENSE:
  one entry of metrics) and each method at each depth."""
  lines = []
  for name, entry in means.items():
    for depth, m in ({"": entry} if _is_metrics(entry) else entry).items():
      lines.append(f"{name:>18} {depth:>2}: " + metrics_lib.format_means(m, sep="  "))
  return lines


def representative_slices(psnr: np.ndarray) -> list[int]:
  """Indices of the slices nearest ``EXAMPLE_QUANTILES`` of ``psnr`` (N,), without repeats."""
  order = np.argsort(psnr, kind="stable")
  picks = [int(order[int(q * (len(psnr) - 1) + 0.5)]) for q in EXAMPLE_QUANTILES]
  return list(dict.fromkeys(picks))


def example_columns(outputs: dict, examples: list[int]) -> dict:
  """The ``examples`` (indices of evaluated slices) of each of ``per_slice_metrics``' outputs."""
  return {name: list(np.asarray(images)[examples]) for name, images in outputs.items()}


def read_metrics_log(workdir) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: the run's training log is missing")
  return files.read_json_lines(path)


def stage_reports(cfg: Config) -> dict:
  """``{method: {stage: report}}`` of the finished layer-wise stages that report anything."""
  out, fam = {}, models.family(cfg)
  for method, depth in trained_networks(cfg):
    if method == fam.reference:
      continue
    stage = fam.stage_of(depth)
    path = workdir_lib.stage_report_path(cfg.workdir, method, stage)
    entry = files.read_json(path) if path.is_file() else {}  # not ``report``: the module
    if entry:
      out.setdefault(method, {})[stage] = entry
  return out


def diverged_networks(cfg: Config, mean: dict, records: list[dict]) -> dict:
  """``{method: {depth: why}}`` of the networks that diverged (``loop.network_divergence``)."""
  out = {}
  for method, depth in trained_networks(cfg):
    phase = models.family(cfg).phase_of(method, depth)
    why = loop.network_divergence(mean[method][str(depth)], mean["zero_filled"], records, phase)
    if why:
      out.setdefault(method, {})[str(depth)] = why
  return out












def output_dir(cfg: Config, val: data_lib.Split, out_dir=None) -> tuple[Path, bool]:
  """Where an evaluation writes, and whether it is on the run's own validation data.

  The run's data (its data.json's validation record, wherever the files are now; a run without
  data.json: its config.json's data folder and file count): the workdir. Other data
  (``--data_dir`` elsewhere, or another ``--max_val_volumes`` of the run's files):
  ``WORKDIR/eval_<data folder name>[_first<n>]/`` (n: the ``--max_val_volumes`` that cut it), so
  that it never overwrites the run's own evaluation. ``out_dir`` wins when given.
  """
  workdir = Path(cfg.workdir)
  record = workdir / "data.json"
  if record.exists():
    was = files.read_json(record).get("val")
    own = was is not None and data_lib.data_difference(was, data_lib.data_record(val)) is None
  else:
    run_cfg = config_lib.load(workdir / "config.json")
    run_dir = run_cfg.data_dir
    same_dir = (not cfg.data_dir and not run_dir) or bool(
        cfg.data_dir and run_dir and Path(cfg.data_dir).resolve() == Path(run_dir).resolve())
    own = same_dir and cfg.max_val_volumes == run_cfg.max_val_volumes
  if out_dir:
    return Path(out_dir).absolute(), own
  if own:
    return workdir, own
  name = Path(cfg.data_dir).resolve().name if cfg.data_dir else "synthetic"
  # The first n files of a folder are other data than all of it (or than its first m); a
  # folder of n files or fewer is all of it (a run's --max_val_volumes=6 carries over).
  n = cfg.max_val_volumes
  cut = n and len(data_lib.fastmri.list_volumes(workdir_lib.data_folder(cfg), "val")) > n
  first = f"_first{n}" if cut else ""
  return workdir / f"eval_{name}{first}", own


def run(workdir, *, mesh=None, log: Callable[[str], None] = lambda s: None, out_dir=None,
        **overrides) -> dict:
  """Evaluates the run in ``workdir``; writes eval.json, report.md, figures/ into
  ``output_dir(...)`` (the workdir for the run's own data); returns eval.json's dict.

  ``overrides``: ``OVERRIDABLE`` settings other than the run's (None: the run's).
  """
  cfg = load_config(workdir, **{k: v for k, v in overrides.items() if v is not None})
  dirs = [workdir_lib.params_dir(cfg.workdir, m, d) for m, d in trained_networks(cfg)]
  missing = [str(p) for p in dirs if not p.exists()]
  if missing:
    raise FileNotFoundError(f"no saved network at {', '.join(missing)}: is the run finished? "
                            "(its summary.json holds the metrics of the networks finished so far)")
  records = read_metrics_log(cfg.workdir)
  mesh = mesh or runtime.make_mesh()
  val = validation_split(cfg, log=log)
  out, own = output_dir(cfg, val, out_dir)
  data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else ""
  if not own:
    log(f"{data_dir or 'the synthetic data'}: not (all of) the run's validation data; writing "
        f"to {out}")
    previous = out / "eval.json"
    if previous.exists():
      other = files.read_json(previous).get("data_dir")
      if other != data_dir:
        raise ValueError(f"{previous}: holds the evaluation of {other or 'other data'}, not of "
                         f"{data_dir}; choose another folder with --out_dir")
  per_slice, per_volume, outputs, slices = per_slice_metrics(cfg, val, mesh=mesh)
  method, depth = final_networks(cfg)[0]
  examples = representative_slices(per_slice[method][str(depth)]["psnr"])
  as_lists = lambda tree: _map_metrics(lambda m: {k: v.tolist() for k, v in m.items()}, tree)
  file_of = {int(val.volume_index[i]): val.ids[i][0] for i in slices}
  acquired = data_lib.acquired_acceleration(val)
  result = {"data_dir": data_dir,
            "own_data": own,
            "acceleration": {"grid": float(masks.acceleration(val.mask)),
                             "acquired": list(acquired) if acquired else None},
            "per_slice": as_lists(per_slice),
            "mean": _map_metrics(metrics_lib.means, per_slice),
            "slices": [[val.ids[i][0], int(val.ids[i][1])] for i in slices],
            "skipped": [list(s) for s in val.skipped],
            "examples": examples,
            "per_volume": as_lists(per_volume),
            "volume_mean": _map_metrics(metrics_lib.means, per_volume),
            "volumes": [file_of[v] for v in sorted(file_of)]}  # metrics.per_file's order
  result["diverged"] = diverged_networks(cfg, result["mean"], records)
  out.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_json(out / "eval.json", result)
  figure_files = report.draw_figures(cfg, result, example_columns(outputs, examples), records,
                              out / "figures")
  with files.atomic_write(out / "report.md") as tmp:
    tmp.write_text(report.markdown(cfg, result, figure_files, stage_reports(cfg)))
  log(f"wrote {out / 'report.md'} (tables, stage certificates explained), {out / 'eval.json'} "
      f"(per-slice metrics) and {len(figure_files)} figures in {out / 'figures'}")
  return result
