"""Client-local techniques as plugins (``techniques/base.py``: the hooks and the registry).

Importing this package registers every technique; a new one is a module here plus its line below.
Mechanics that several techniques or offline tools share live beside them: ``sparsity.py``
(masks, Robust Bird search, Flying Bird drop-and-regrow, FLOPs), ``pruning.py`` (IMP, refill,
greedy row grouping), ``random_init.py`` (random pruning at init, NTK scaling), ``uvc_search.py`` (UVC),
``l2o/`` (learned-optimizer training).
"""

# Registration order matters (hooks run in import order), so these imports are not sorted.
# isort: off
from techniques import faults  # noqa: F401  (first: a crash or timeout happens before other work)
from techniques import sparse_base  # noqa: F401  (the "sparse" section, before its techniques)
from techniques import robust_bird, flying_bird, random_pruning, structured, uvc  # noqa: F401
from techniques import diversity, optimizers  # noqa: F401

# isort: on
from techniques.base import SECTIONS, TECHNIQUES, Technique, register_technique

__all__ = ["SECTIONS", "TECHNIQUES", "Technique", "register_technique"]
