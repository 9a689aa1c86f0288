"""Orbax checkpoints of a phase and saved networks: written atomically, read back intact or set
aside (``WORKDIR/damaged/``) with one warning, never trained from when damaged."""
import os
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lwjax.training import runtime


Params = Any


def set_aside(path: Path, workdir: Path) -> Path:
  """Moves the damaged ``path`` (inside ``workdir``) to ``WORKDIR/damaged/`` (same relative
  path, ``.1``, ``.2``, ... if taken): kept for a look, out of the run's way. Returns where."""
  to = workdir / "damaged" / path.relative_to(workdir)
  for n in range(1, 1000):
    if not to.exists():
      break
    to = to.with_name(f"{path.name}.{n}")
  to.parent.mkdir(parents=True, exist_ok=True)
  os.replace(path, to)
  return to


def _drop_closed_loop_reports() -> None:
  """An unreadable checkpoint fails orbax's restore while tensorstore reads are in flight; each
  read then reports "Event loop is closed" as an unraisable exception, a traceback apiece (also
  after the restore returned). The damage is reported once (``restore_intact``): those reports
  are dropped from now on, nothing else is."""
  hook = sys.unraisablehook
  if getattr(hook, "drops_closed_loop", False):
    return

  def filtered(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)
  filtered.drops_closed_loop = True
  sys.unraisablehook = filtered


def _first_line(error: Exception) -> str:
  """The first line of ``error``'s message (orbax's run to hundreds of lines), at most 300
  characters; its type when it has none."""
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def _finite(tree) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def _reload(manager: ocp.CheckpointManager) -> None:
  """The manager forgets the steps set aside (after every process has seen them moved)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lwjax: damaged checkpoints set aside")
  manager.reload()


def restore_intact(manager: ocp.CheckpointManager, state: dict, phase: str,
                   workdir: Path) -> tuple[int, dict]:
  """``(epoch, state)`` of the newest checkpoint of ``manager`` that restores into ``state``'s
  structure with finite values; ``(0, state)`` when there is none.

  Newer steps that do not (a truncated or overwritten array file, a missing manifest or
  _METADATA, an emptied step folder) are each named in one log line and set aside
  (``set_aside``); with none intact left the phase restarts from its first epoch, with a warning.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = Path(manager.directory) / str(step)
    try:
      # Checked first: orbax, asked to restore a step without it, is left unable to restore the
      # next one.
      if not (step_dir / "default" / "_METADATA").is_file():
        raise ValueError("its default/_METADATA is missing")
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
      if not _finite(restored):
        raise ValueError("it holds NaN or Inf")
    except Exception as e:  # Any failure to read it back: orbax's wording varies with the damage.
      _drop_closed_loop_reports()
      why = _first_line(e)
      damaged.append(step)
      if runtime.is_primary() and step_dir.exists():
        to = set_aside(step_dir, workdir)
        logging.warning("%s: the checkpoint of epoch %d in %s is damaged (%s); moved to %s",
                        phase, step, step_dir, why, to)
      _reload(manager)  # A failed restore can leave the manager unable to read the next step.
      continue
    logging.info("%s: resumed from the checkpoint of epoch %d in %s", phase, step,
                 manager.directory)
    return step, restored
  if damaged:
    logging.warning("%s: no intact checkpoint left in %s: the phase restarts from its first "
                    "epoch", phase, manager.directory)
  return 0, state


def save_params(path: Path, params: Params) -> None:
  """Save a finished network (orbax writes to a temporary directory and renames at the end)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


class DamagedNetwork(ValueError):
  """A finished network's folder (``params_dir``) that cannot be read back."""


def load_params(path: Path) -> Params:
  if not path.exists():
    raise FileNotFoundError(f"{path}: no saved network there (was the run finished?)")
  try:
    return ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax's wording varies with the damage.
    _drop_closed_loop_reports()
    raise DamagedNetwork(f"{path}: the saved network is damaged ({_first_line(e)}); "
                         "launch/train.py with the run's flags sets it aside and trains it "
                         "again") from None


def load_finished(path: Path, workdir) -> Optional[Params]:
  """The finished network in ``path``, or None when there is none or it is damaged (then set
  aside, with a warning, to be trained again)."""
  if not path.exists():
    return None
  try:
    return load_params(path)
  except DamagedNetwork as e:
    logging.warning("%s: moved to %s", e, set_aside(path, Path(workdir).absolute()))
    return None

