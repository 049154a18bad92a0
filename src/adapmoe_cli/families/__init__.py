"""Registry of supported model families, keyed by the config's `model_type` (rows in table.py)."""

from __future__ import annotations

import difflib

from adapmoe_cli.errors import CheckpointError
from adapmoe_cli.families.base import EXPERT_PARTS, ExpertKey, ModelFamily, MoEShape, is_weight
from adapmoe_cli.families.table import FAMILY_ROWS

FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in FAMILY_ROWS}

__all__ = ["EXPERT_PARTS", "FAMILIES", "ExpertKey", "ModelFamily", "MoEShape", "get_family", "is_weight"]


def get_family(model_type: object) -> ModelFamily:
    try:
        return FAMILIES[str(model_type)]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        near = difflib.get_close_matches(str(model_type), list(FAMILIES), n=1, cutoff=0.5)
        hint = f"; the nearest is {near[0]}" if near else ""
        raise CheckpointError(
            f"unsupported model family {model_type!r}: adapmoe supports {known}{hint} "
            "(docs/architecture.md says how to add one)"
        ) from None
