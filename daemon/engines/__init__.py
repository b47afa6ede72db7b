"""Engines, by name. Imported lazily: an engine module may import torch or
exllamav2, which must happen inside a worker process only."""

from __future__ import annotations

import importlib

from exgen.daemon.engines.base import Engine, EngineUnavailable

ENGINES: dict[str, str] = {
    "synthetic": "exgen.daemon.engines.synthetic:SyntheticEngine",
    "transformers": "exgen.daemon.engines.hf:TransformersEngine",
    "exllamav2": "exgen.daemon.engines.exl2:ExLlamaV2Engine",
    "exllamav3": "exgen.daemon.engines.exl3:ExLlamaV3Engine",
}
ENGINE_NAMES = ("auto", *ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The Engine class for a concrete engine name (not ``auto``)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise EngineUnavailable(
            f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"{name} unavailable: {exc}") from exc
    cls: type[Engine] = getattr(module, class_name)
    return cls
