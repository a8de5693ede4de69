"""Stage C and CLIP-G LoRAs: read every common file format, patch all or nothing, undo exactly.

The work is split by job: :mod:`.formats` knows the trainers' key names, :mod:`.parse` turns a
file into changes to named weights and learned tokens, :mod:`.deltas` holds the math of each
adapter kind (LoRA, LoCon, LoHa, LoKr, DoRA, full diffs), :mod:`.match` binds a LoRA to a loaded
model and explains a mismatch, and :mod:`.apply` patches and unpatches.

Entry points: ``load_lora(path)`` and ``apply_loras(model, [(lora, strength), …], part="stage_c"
| "text")``, which returns a handle to undo the patch (also a context manager).
"""

from .apply import LoraPatch, LoraStack, apply_loras, check_lora, patched_tensors
from .deltas import WeightDelta
from .formats import OFFICIAL_MODULE_FILTERS, official_lora_modules
from .match import LoraMatch, describe_match, stage_c_deltas
from .parse import FORMATS, IndexedLora, LoraError, LoraFile, TokenEmbedding, load_lora, parse_lora

__all__ = [
    "FORMATS", "LoraError", "WeightDelta", "TokenEmbedding", "IndexedLora", "LoraFile", "LoraMatch", "LoraPatch",
    "LoraStack", "OFFICIAL_MODULE_FILTERS", "load_lora", "parse_lora", "official_lora_modules", "stage_c_deltas",
    "patched_tensors", "check_lora", "apply_loras", "describe_match",
]

