"""Files every part of lwjax writes and reads: atomic writes (temp file + rename) and JSON."""
import contextlib
import json
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path):
  """Yields a temporary path beside ``path``; on success it is renamed onto ``path``.

  A crash leaves either the old file or none, plus at most a hidden ``.<name>.<hex>.tmp`` that no
  reader looks at."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_json(path, value, sort_keys: bool = True) -> None:
  """``value`` as indented JSON, atomically; a file that already holds it is not rewritten."""
  path = Path(path)
  text = json.dumps(value, indent=1, sort_keys=sort_keys)
  if path.is_file() and path.read_text() == text:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path) as tmp:
    tmp.write_text(text)


def read_json(path):
  """The value in the JSON file ``path``; one that cannot be parsed is a ValueError naming it.

  Every JSON file lwjax reads (config.json, data.json, summary.json, stage reports, eval.json)
  goes through here."""
  text = Path(path).read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e}): the file is damaged (a full disk, or "
                     "edited by hand?); restore it or move it away") from None


def read_json_lines(path) -> list:
  """The values of the JSON-lines file ``path`` (blank lines skipped); a line that cannot be
  parsed is a ValueError naming the file and the line."""
  out = []
  for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except ValueError as e:
        raise ValueError(f"{path}: line {number} is not valid JSON ({e}): the file is "
                         "damaged; restore it or remove that line") from None
  return out
