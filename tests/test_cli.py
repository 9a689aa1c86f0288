"""The first hour of a new user: --help by topic, early flag errors, progress, the end table."""
import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lwjax import cli
from lwjax import config as config_lib
from lwjax import console

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("train", "evaluate", "interpret", "memory", "make_data", "reconstruct")


def _run(launcher, *args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, str(ROOT / "launch" / f"{launcher}.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _groups(text):
  """{topic: [flag names]} of a --help text."""
  groups, topic = {}, None
  for line in text.splitlines():
    if line.rstrip(":") in cli.TOPICS and line.endswith(":"):
      topic = line[:-1]
      groups[topic] = []
    elif topic and line.startswith("  --"):
      groups[topic].append(re.match(r"  --(?:\[no\])?(\w+)", line).group(1))
    elif not line.strip():
      topic = None
  return groups


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_help_shows_the_launchers_flags_by_topic_and_exits_0(launcher):
  result = _run(launcher, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  groups = _groups(result.stdout)
  assert list(groups) == [t for t in cli.TOPICS if t in groups]  # In TOPICS order.
  names = [n for flags in groups.values() for n in flags]
  assert len(names) == len(set(names)) and names
  expected = {
      "train": {f.name for f in dataclasses.fields(config_lib.Config)},
      "evaluate": {"workdir", "data_dir", "max_val_volumes", "cache_dir", "eval_batch_size",
                   "out_dir"},
      "interpret": {"workdir", "method", "depth", "slice", "pixel", "out_dir"},
      "memory": {"budget_gb", "batch_size", "depth", "measure"},
      "make_data": {"out_dir", "image_size", "synth_coils", "synth_slices"},
      "reconstruct": {"workdir", "data_dir", "out_dir", "method", "depth"},
  }[launcher]
  assert expected <= set(names)
  if launcher in ("evaluate", "interpret", "reconstruct"):  # Not the 60 training flags.
    assert "lr" not in names and "synth_coils" not in names
  flag_lines = [line for line in result.stdout.splitlines() if line.startswith("  --")]
  assert len(flag_lines) == len(names)  # One line each.
  full = _run(launcher, "--helpfull")
  assert full.returncode == 0 and "--helpfull" in full.stdout and len(full.stdout) > len(
      result.stdout)


def test_evaluate_flags_are_what_it_reads():
  from lwjax import evaluate  # The launcher lists them without importing JAX: compare.
  tree = ast.parse((ROOT / "launch" / "evaluate.py").read_text())
  shown = next(ast.literal_eval(node.value) for node in tree.body
               if isinstance(node, ast.Assign) and node.targets[0].id == "SHOWN")
  assert set(evaluate.OVERRIDABLE) | {"workdir", "conv_fusion", "out_dir"} == set(shown)


def test_every_config_field_has_a_topic_and_a_one_line_help():
  topics = cli.config_topics()
  assert set(topics) == {f.name for f in dataclasses.fields(config_lib.Config)}
  assert set(topics.values()) <= set(cli.TOPICS)
  helps = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$",
                          inspect.getsource(config_lib.Config), re.M))  # As define_flags does.
  for name in topics:
    text = helps.get(name, name)
    assert text != name and "\n" not in text and len(text) <= 120, (name, text)


def test_a_bad_flag_is_refused_before_jax_is_imported(tmp_path):
  fake = tmp_path / "fake" / "jax"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('JAX was imported')\n")
  env = {"PYTHONPATH": str(tmp_path / "fake")}
  result = _run("train", "--method=bogus", f"--workdir={tmp_path / 'w'}", env_extra=env)
  assert result.returncode == 1
  assert "error: --method='bogus'" in result.stderr and "JAX was imported" not in result.stderr
  assert not (tmp_path / "w").exists()
  result = _run("memory", "--depth=1", env_extra=env)
  assert result.returncode == 1 and "--depth=1" in result.stderr, result.stderr[-2000:]


def test_progress_names_each_network_of_how_many_and_the_run_eta():
  cfg = config_lib.Config(method="layerwise,e2e", depth=3, e2e_depths="2,3")
  finished = {("layerwise", 2)}
  phases = console.plan(cfg, lambda m, d: (m, d) in finished)
  assert [(p.method, p.depth, p.finished) for p in phases] == [
      ("layerwise", 2, True), ("layerwise", 3, False), ("e2e", 2, False), ("e2e", 3, False)]
  lines, now = [], [0.0]
  progress = console.Progress(phases, log=lines.append, clock=lambda: now[0])
  assert "rerun: 1 of 4 networks are finished" in lines[0]
  assert "layerwise stage 1 (depth 2)" in lines[0]
  progress.start("layerwise", 2)  # Finished: nothing to say.
  progress.end("layerwise", 2)
  progress.start("layerwise", 3)
  assert lines[-1].startswith("network 2 of 4: layerwise stage 2 (depth 3)")
  now[0] = 30.0  # 30 s for 3 layers of work: 10 s per unit.
  progress.end("layerwise", 3)
  progress.start("e2e", 2)
  assert lines[-1] == "network 3 of 4: e2e depth 2; run eta 0:00:50"  # (2 + 3) units left
  now[0] = 34.0  # e2e: 2 s per unit, its own rate from now on.
  progress.end("e2e", 2)
  progress.start("e2e", 3)
  assert lines[-1] == "network 4 of 4: e2e depth 3; run eta 0:00:06"


def test_results_table_shows_baselines_and_each_method_at_its_deepest_depth():
  m = lambda p: {"psnr": p, "ssim": 0.5, "nmse": 0.1}
  summary = {"zero_filled": m(20.0), "e2e": {"2": m(25.0), "10": m(27.5)},
             "layerwise": {"3": m(26.0)}, "stages": {"layerwise": {"2": {"passes": 3.0}}},
             "config": {"depth": 10}}
  rows = console.results_table(summary).splitlines()
  assert "PSNR" in rows[0] and len(rows) == 4
  assert rows[1].split()[:2] == ["zero-filled", "20.00"]
  assert rows[2].split()[:3] == ["e2e", "10", "27.50"]
  assert rows[3].split()[:3] == ["layerwise", "3", "26.00"]
  text = console.finished_run(summary, "runs/x")
  assert "runs/x/summary.json" in text
  assert "next: python launch/evaluate.py --workdir=runs/x" in text
