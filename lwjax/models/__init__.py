"""Model families behind one interface (``interface.Family``): ``cnn`` and ``unrolled``.

A new family is a module that builds a ``Family`` and one entry in ``FAMILIES``."""
from lwjax.models import cnn
from lwjax.models import unrolled
from lwjax.models.interface import Family

FAMILIES: dict[str, Family] = {"cnn": cnn.FAMILY, "unrolled": unrolled.FAMILY}


def family(cfg) -> Family:
  """The model family of ``cfg`` (``--model``)."""
  return FAMILIES[cfg.model]
