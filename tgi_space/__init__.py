"""tgi-space: lossless SPACE speculative decoding for Text Generation Inference.

`from tgi_space import LLM, SamplingParams` works as in vLLM; the names are imported on first
use, so `import tgi_space` (which every console script does) stays cheap and does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> module that defines it
    "LLM": "tgi_space.llm",
    "RequestOutput": "tgi_space.llm",
    "SamplingParams": "tgi_space.sampling",
    "EngineConfig": "tgi_space.config",
    "SpacePolicy": "tgi_space.config",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from tgi_space.config import EngineConfig, SpacePolicy
    from tgi_space.llm import LLM, RequestOutput
    from tgi_space.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    """Import an exported name on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tgi_space' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
