"""The losses under their public name: ``mpe.losses`` is ``mpe.model.losses`` (kept for code written against
mpe 0.1, when the losses were a top-level module)."""

from mpe.model.losses import *  # noqa: F401,F403
from mpe.model.losses import __all__  # noqa: F401
