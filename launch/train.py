r"""Train MRI reconstruction networks layer by layer (convex or not) and end to end.

  python launch/train.py --flagfile=poisson.flags
  python launch/train.py --flagfile=demo.flags --workdir=runs/demo

Every flag is a field of ``lwjax.config.Config`` (``--helpfull`` lists them). Outputs go to
``--workdir``: summary.json, metrics.jsonl, config.json, checkpoints/, params/, stages/.
Run it again with the same flags to resume a killed run.
"""
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lwjax import train  # Imported after flag parsing so --help stays fast.
  train.quiet_library_logs()
  cfg = config.from_flags()
  train.configure_xla(cfg.conv_fusion)
  cache = train.enable_compilation_cache(cfg.compilation_cache)
  logging.info("compilation cache: %s", cache or "off")
  try:
    train.initialize_distributed(cfg.distributed)
    train.run(cfg)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  config.define_flags()
  flags.FLAGS.alsologtostderr = True
  app.run(main)
