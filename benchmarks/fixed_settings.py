"""`--set FIELD=VALUE` of benchmarks/engine_settings.py and stack_settings.py: EngineConfig
fields that keep one value in every run while another field's values are compared."""

from __future__ import annotations

import yaml

from ray_inference.config import EngineConfig


def parse(items: tuple[str, ...] | list[str], varied: str) -> dict:
    """{field: value} from FIELD=VALUE items (values YAML); ValueError names a bad item."""
    fixed = {}
    for item in items:
        field, equals, value = item.partition("=")
        if not equals or field not in EngineConfig.model_fields or field == varied:
            raise ValueError(f"{item!r} is not FIELD=VALUE for an engine field other than "
                             f"{varied}")
        fixed[field] = yaml.safe_load(value)
    return fixed
