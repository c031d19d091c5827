"""Development installs only (not part of the wheel, which ships ``vnet`` whole).

``vnet`` is one package split over two source trees, ``shared/vnet`` (with the
``__init__``) and ``services/vnet``; an editable install puts both trees on ``sys.path``.
``vnet/__init__`` extends ``__path__`` when it runs, but tools that look a package up
without importing it (grimp, so ``lint-imports``) read ``find_spec("vnet")`` and would see
only the first half. This finder, which ``site`` loads at start-up because ``shared/`` is on
the path, answers that lookup with both halves. It costs one list walk, once.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class _SplitVnetFinder:
    @classmethod
    def find_spec(cls, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "vnet":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        locations = spec.submodule_search_locations if spec is not None else None
        if locations is not None:
            for entry in sys.path:
                half = os.path.join(entry or ".", "vnet")
                if half not in locations and os.path.isdir(half):
                    locations.append(half)
        return spec


sys.meta_path.insert(0, _SplitVnetFinder)
