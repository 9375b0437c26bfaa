"""The one ``Masks`` type: weight masks keyed by parameter name.

It lives in ``models/`` because models is the lowest layer: the structural slicers here
(``models/slice_channels.py``), the client techniques and the offline tools all speak it, and
each of them may import ``models`` while ``models`` imports none of them.
"""

from __future__ import annotations

import torch

Masks = dict[str, torch.Tensor]  # parameter name ("blocks.0.mlp.fc1.weight") -> bool mask of its shape

__all__ = ["Masks"]
