"""Architecture definitions: which tensors a model has, before, in and after its layers.

Definitions are data (``architectures/*.json``, read through importlib.resources) or are
inferred from tensor names for unknown models. See docs/architectures.md.
"""

from .config_values import get_config_value, set_config_value
from .definition import ArchitectureDefinition, WeightInfo
from .inference import infer_architecture
from .parsing import parse_definition
from .registry import find_architecture, load_definitions, read_definitions

__all__ = [
    "ArchitectureDefinition",
    "WeightInfo",
    "find_architecture",
    "get_config_value",
    "infer_architecture",
    "load_definitions",
    "parse_definition",
    "read_definitions",
    "set_config_value",
]
