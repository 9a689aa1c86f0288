r"""Train MRI reconstruction networks layer by layer (convex or not) and end to end.

  python launch/train.py --flagfile=poisson.flags
  python launch/train.py --flagfile=demo.flags --workdir=runs/demo

Every flag is a field of ``lwjax.config.Config`` (``--help`` lists them by topic). Outputs go to
``--workdir``: summary.json, metrics.jsonl, config.json, checkpoints/, params/, stages/.
Run it again with the same flags to resume a killed run.
"""
import sys
from pathlib import Path

from absl import app
from absl import logging

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = cli.checked_config()  # Before JAX is imported: a bad flag is refused at once.
  except ValueError as e:
    return cli.fail(e)
  from lwjax.training import runtime
  from lwjax.training import loop
  from lwjax import experiment
  runtime.configure_xla(cfg.conv_fusion)
  cache = runtime.enable_compilation_cache(cfg.compilation_cache)
  logging.info("compilation cache: %s", cache or "off")
  try:
    runtime.initialize_distributed(cfg.distributed)
    summary = experiment.run(cfg)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    return cli.fail(e)
  if runtime.is_primary():
    from lwjax import console
    print(console.finished_run(summary, cfg.workdir))
  diverged = loop.diverged_message(summary)
  return cli.fail(FloatingPointError(diverged)) if diverged else 0


if __name__ == "__main__":
  config.define_flags()
  cli.run(main, __doc__, cli.config_flags())
