"""What every launcher shares before any work: grouped ``--help``, early flag checks, quiet logs.

Imports neither JAX nor any module that does, so ``--help`` and a refused flag answer at once.

``--help`` lists the flags a launcher uses, grouped by ``TOPICS``, one line each, and exits 0;
``--helpfull`` lists every flag (absl's too) with its full help.
"""
import inspect
import logging as std_logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from absl import app
from absl import flags
from absl import logging

from lwjax import config

TOPICS = ("data", "network", "methods", "training", "convex solver", "runtime", "output")
# Config's section comments -> topic; the fields below go to another topic than their section's.
_SECTIONS = {"Data": "data", "Network": "network", "Training": "training",
             "Convex stage": "convex solver", "Runtime": "runtime",
             "Unrolled model and 3D": "network"}
_MOVED = {"method": "methods", "e2e_depths": "methods", "model": "methods",
          "lambda_lr": "training", "workdir": "output", "log_every": "output"}
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
FULL_HELP_ARGS = ("--helpfull", "-helpfull")
# lwjax's own code, whose INFO lines a run shows (the checkout may hold the virtualenv too).
_OURS = tuple(Path(__file__).resolve().parents[1] / d for d in ("lwjax", "launch", "bench"))


def config_topics() -> dict[str, str]:
  """``{field: topic}`` of every ``Config`` field, from its section comment in config.py."""
  topics, section = {}, None
  for line in inspect.getsource(config.Config).splitlines():
    heading = re.match(r"\s+# (.+)\.$", line)
    field = re.match(r"\s+(\w+): \w+ = ", line)
    if heading:
      section = heading.group(1)
    elif field:
      topics[field.group(1)] = _MOVED.get(field.group(1), _SECTIONS.get(section, "runtime"))
  return topics


def _spec(flag) -> str:
  if isinstance(flag, flags.BooleanFlag):
    return f"--[no]{flag.name} ({'true' if flag.default else 'false'})"
  value = "''" if flag.default in ("", None) else flag.default
  return f"--{flag.name}={value}"


def help_text(doc: str, shown: Mapping[str, str], fv=flags.FLAGS) -> str:
  """The launcher's ``--help``: the first two paragraphs of its ``doc`` (what it does, example
  commands), then the flags in ``shown`` (``{name: topic}``) grouped by topic in ``TOPICS``
  order, one line each."""
  lines = ["\n\n".join(doc.strip().split("\n\n")[:2]), ""]
  unknown = set(shown.values()) - set(TOPICS)
  if unknown:
    raise ValueError(f"topics {sorted(unknown)}: expected some of {TOPICS}")
  for topic in TOPICS:
    names = [n for n in shown if shown[n] == topic]
    if names:
      lines.append(f"{topic}:")
      lines += [f"  {_spec(fv[n]):<34} {' '.join(fv[n].help.split())}" for n in names]
      lines.append("")
  lines.append("--helpfull: every flag, with absl's own; --flagfile=F reads flags from F.")
  return "\n".join(lines)


def run(main: Callable, doc: str, shown: Mapping[str, str]) -> None:
  """``app.run(main)`` with ``--help`` = ``help_text(doc, shown)`` (exit 0) and ``--helpfull``
  exiting 0 too; INFO lines only from lwjax and the launchers (``quiet_library_logs``)."""
  def parse(argv):
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
      _print(help_text(doc, shown))
      sys.exit(0)
    if any(a in FULL_HELP_ARGS for a in args):
      app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
    return app.parse_flags_with_usage(argv)

  flags.FLAGS.alsologtostderr = True
  quiet_library_logs()
  app.run(main, flags_parser=parse)


def _print(text: str) -> None:
  """``print`` that lets ``--help | head`` end quietly (as absl's own usage does)."""
  try:
    print(text, flush=True)
  except BrokenPipeError:  # The reader is gone: Python's documented way to exit cleanly.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def config_flags(names: Optional[Iterable[str]] = None) -> dict[str, str]:
  """``{name: topic}`` of the ``Config`` flags ``names`` (all of them when None)."""
  topics = config_topics()
  return {n: topics[n] for n in (topics if names is None else names)}


def trained_network_flags(workdir_help: str) -> None:
  """Help of ``--workdir``, ``--method`` and ``--depth`` for a launcher that loads one network
  of a finished training run (after ``config.define_flags``)."""
  flags.FLAGS["workdir"].help = workdir_help
  flags.FLAGS["method"].help = "the network's method, one the run trained (default: its first)"
  flags.FLAGS["depth"].help = "the network's depth (default: the method's deepest trained one)"


def _ours(record) -> bool:
  path = Path(record.pathname).resolve()
  return any(path.is_relative_to(d) for d in _OURS)


def quiet_library_logs() -> None:
  """Keeps absl's INFO lines to lwjax's and the launchers' own: JAX's backend probe ("Unable to
  initialize backend 'tpu'") and orbax's per-checkpoint lines are INFO; warnings stay."""
  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or _ours(record)

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _Filter) for f in handler.filters):
    handler.addFilter(_Filter())


def checked_config() -> config.Config:
  """The flags as a ``Config``, checked by ``config.validate`` before JAX is imported (the
  device count, which needs JAX, is checked again when the run starts). Raises ValueError."""
  cfg = config.from_flags()
  config.validate(cfg, num_devices=1)
  return cfg


def fail(error: Exception) -> int:
  """Logs ``error`` and prints it as ``error: ...`` on stderr; returns the exit status 1."""
  logging.error("%s", error)
  print(f"error: {error}", file=sys.stderr)
  return 1
