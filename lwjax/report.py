"""report.md of an evaluated run: its tables (per slice, per volume, the gap to e2e), the stage
certificates explained, and the figures it shows (``evaluate.run`` writes it)."""
from pathlib import Path

import numpy as np

from lwjax import data as data_lib
from lwjax import figures
from lwjax import metrics as metrics_lib
from lwjax import models
from lwjax.config import Config

# What each figure of a stage report (stages/<method>/stage_<i>.json) means, and which values are
# good: report.md explains the keys its tables show. Images are scaled to max |zero-filled| = 1.
STAGE_KEYS = {
    "rel_gap": "relative duality gap (P - D) / P, the certificate: the stage's objective is at "
               "most this fraction above its optimum; good: at most target_gap (near 1: far from "
               "solved).",
    "target_gap": "the rel_gap at which the stage stops early (--target_gap; 0: never); a "
                  "rel_gap above it means the stage ran out of passes uncertified.",
    "passes": "passes over the training set the stage took (its epochs); fewer than the limit "
              "(--fista_iters or --epochs) means it reached target_gap early.",
    "kkt_violation": "how far the solution is from the group lasso's optimality (KKT) "
                     "conditions, RMS over the filter groups relative to beta; 0 at the "
                     "optimum, good: well below 1.",
    "constraint_violation": "how far the gated solution's branches lie outside their ReLU "
                            "cones, relative to their magnitude; 0: the convex model is exactly "
                            "a ReLU layer, good: near 0 (rho > 0 penalises it).",
    "relu_mismatch": "relative RMS difference between the convex model's output and that of "
                     "the ReLU layer it is mapped to; good: small (0: identical).",
    "mse_relu": "training MSE of the mapped ReLU layer with the convex model's head; good: "
                "close to mse.",
    "mse_refit": "training MSE of the mapped ReLU layer after the least-squares head refit (the "
                 "layer the network keeps); good: at most mse_relu.",
    "mse": "training mean squared error of the convex (gated) model; lower is better.",
    "objective": "the convex program's objective P (0.5 mse + beta * sum of group norms "
                 "[+ rho * cone violation]); lower is better, comparable within a stage only.",
    "active_groups": "filter groups (hidden units) left non-zero by the group lasso; fewer: a "
                     "sparser layer, 0: beta too large (the layer is empty).",
    "beta": "the group-lasso weight the stage used (--beta times beta_max with --beta_relative).",
    "beta_max": "the smallest beta that zeroes every group (found before the stage); beta "
                "must stay below it, or the layer is empty.",
    "lipschitz": "the data term's Lipschitz constant (pfista: in its metric), which sets the "
                 "solver's step size.",
    "metric_rows": "pfista: patches sampled to estimate its patch-covariance metric.",
    "metric_clipped": "pfista: eigenvalues of the patch covariance raised to its floor "
                      "(directions the features barely span); 0: none.",
}



def _cells(values: dict) -> list[str]:
  """"mean ± std" of each metric's values, in ``metrics.NAMES`` order and format."""
  return [f"{np.mean(values[k]):{fmt}} ± {np.std(values[k]):{fmt}}"
          for k, (_, _, fmt) in metrics_lib.NAMES.items()]



def _row(cells) -> str:
  return "| " + " | ".join(map(str, cells)) + " |"



def _accelerations(accel: dict) -> str:
  """eval.json's "acceleration" in words."""
  text = f"{accel['grid']:.2f} on the grid"
  if accel["acquired"]:
    text += (f", {data_lib.format_span(accel['acquired'])} over the k-space columns the files "
             "acquired, per their encodingLimits")
  return text



def markdown(cfg: Config, result: dict, figure_files: dict, stages: dict) -> str:
  """report.md: a table of every network, the gap to e2e at the same depth, stage reports."""
  per_slice, mean = result["per_slice"], result["mean"]
  files = len({f for f, _ in result["slices"]})
  data = result["data_dir"] or "its synthetic data"
  origin = "the run's validation data" if result["own_data"] else "not the run's validation data"
  skipped = (f" ({len(result['skipped'])} empty slice(s) skipped: {result['skipped'][0][0]} "
             f"slice {result['skipped'][0][1]}, ...)" if result["skipped"] else "")
  lines = [f"# Evaluation of {cfg.workdir}", "",
           f"Data: {data} ({origin}).", "",
           f"{len(result['slices'])} validation slices from {files} file(s){skipped}; mask "
           f"{cfg.mask} x{cfg.accel:g} ({_accelerations(result['acceleration'])}), "
           f"{cfg.image_size}x{cfg.image_size}, {cfg.features} channels, "
           f"{'x'.join(map(str, cfg.kernel))} kernels. Per-slice PSNR, SSIM and NMSE of "
           "magnitude images (data range: each target slice's maximum), mean ± std over slices; "
           "the gap is the method minus e2e at the same depth.", "",
           _row(["network", "depth"] + [metrics_lib.label(k) for k in metrics_lib.NAMES]
                + [metrics_lib.label(k, "gap") for k in metrics_lib.NAMES]),
           _row(["---"] + ["---:"] * (1 + 2 * len(metrics_lib.NAMES)))]
  blank = [""] * len(metrics_lib.NAMES)
  diverged = result.get("diverged", {})
  for name, label in figures.BASELINES.items():
    if name in per_slice:
      lines.append(_row([label, ""] + _cells(per_slice[name]) + blank))
  fam = models.family(cfg)
  networks = fam.trained_networks(cfg)
  e2e = mean.get(fam.reference, {})
  for method, depth in networks:
    gap = blank
    if method != fam.reference and str(depth) in e2e:
      means, ref = mean[method][str(depth)], e2e[str(depth)]
      gap = [f"{means[k] - ref[k]:+{metrics_lib.NAMES[k][2]}}" for k in metrics_lib.NAMES]
    label = f"{method} (DIVERGED)" if str(depth) in diverged.get(method, {}) else method
    lines.append(_row([label, depth] + _cells(per_slice[method][str(depth)]) + gap))
  lines += ["", "## fastMRI's volume-wise convention", "",
            f"Per file ({len(result['volumes'])}): data range the volume's maximum, PSNR and NMSE "
            "over the volume's evaluated slices (a 3D run drops the slices that fill no patch), "
            "SSIM the mean over them (fastMRI's evaluate.py); mean ± std over files.",
            "", _row(["network", "depth"] + [metrics_lib.label(k) for k in metrics_lib.NAMES]),
            _row(["---"] + ["---:"] * (1 + len(metrics_lib.NAMES)))]
  per_volume = result["per_volume"]
  rows = [(label, "", per_volume[name]) for name, label in figures.BASELINES.items()
          if name in per_volume]
  rows += [(m, d, per_volume[m][str(d)]) for m, d in networks]
  lines += [_row([label, depth] + _cells(v)) for label, depth, v in rows]
  for method, reports in stages.items():
    keys = sorted({k for r in reports.values() for k in r})
    lines += ["", f"## {method}: stage reports", "",
              "| stage | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
    lines += [f"| {s} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |"
              for s, r in sorted(reports.items())]
    lines += [""] + [f"- `{k}`: {STAGE_KEYS[k]}" for k in keys if k in STAGE_KEYS]
  if diverged:
    lines += ["", "## Diverged networks", "",
              "Their metrics are not results (thresholds: BUILD_NOTES.md); retrain them with a "
              "lower --lr.", ""]
    lines += [f"- {m} depth {d}: {why}" for m, by_depth in diverged.items()
              for d, why in by_depth.items()]
  lines += ["", "## Figures", ""]
  lines += [f"![{name}]({path})" for name, path in figure_files.items()]
  return "\n".join(lines) + "\n"



def draw_figures(cfg: Config, result: dict, columns: dict, records: list[dict],
                 figure_dir: Path) -> dict:
  """The run's figures; returns ``{title: path relative to report.md's folder}`` (the parent of
  ``figure_dir``)."""
  names = [f"{result['slices'][s][0]} slice {result['slices'][s][1]}" for s in result["examples"]]
  paths = {
      "metrics against depth": figures.metrics_vs_depth(
          result["mean"], figure_dir / "metrics_vs_depth.png",
          xlabel=models.family(cfg).depth_axis),
      "example slices": figures.example_grid(
          columns, figure_dir / "examples.png",
          title=f"{cfg.mask} x{cfg.accel:g}: the median and 10th percentile PSNR slices",
          row_labels=names),
      "training curves": figures.training_curves(records, figure_dir / "training_curves.png"),
  }
  return {name: str(Path(p).relative_to(figure_dir.parent)) for name, p in paths.items()}

