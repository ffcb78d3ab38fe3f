"""Shared pieces of the experiment scripts: the base config, logging, result files."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BaseConfig", "setup_logging", "write_json", "to_jsonable"]


@dataclass
class BaseConfig:
    """Keys every experiment accepts (``configs/base.yaml``); experiment configs subclass it."""

    seed: int = 0  # master seed; every random draw derives from it through torch.Generator
    output_dir: str = "outputs"  # where results.json, results.md and figures are written
    log_level: str = "INFO"  # logging level name (DEBUG, INFO, WARNING, ...)


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once (a no-op when a handler is already installed)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log_level {level!r}; use DEBUG, INFO, WARNING or ERROR.")
    logging.basicConfig(level=numeric, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from nested containers of tensors, numbers and strings.

    Non-finite floats become strings ("inf", "nan") because strict JSON has no literal for them.
    """
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented strict JSON, atomically (``runs.write_text_atomic``)."""
    from ..runs import write_text_atomic  # lazy: runs imports transformers

    return write_text_atomic(path, json.dumps(to_jsonable(data), indent=1) + "\n")
