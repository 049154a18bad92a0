"""Registry of supported model families, keyed by the config's `model_type`."""

from __future__ import annotations

from adapmoe_cli.errors import CheckpointError
from adapmoe_cli.families.base import ExpertKey, ModelFamily, MoEShape
from adapmoe_cli.families.mixtral import Mixtral

FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (Mixtral(),)}

__all__ = ["FAMILIES", "ExpertKey", "ModelFamily", "MoEShape", "get_family"]


def get_family(model_type: str | None) -> ModelFamily:
    try:
        return FAMILIES[str(model_type)]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise CheckpointError(
            f"unsupported model family {model_type!r}: adapmoe supports {known} "
            "(see docs/architecture.md to add one)"
        ) from None
