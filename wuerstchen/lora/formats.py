"""Key names of LoRA files: which trainer wrote a key, and which weight of which network it means.

A LoRA key is ``<prefix><module><suffix>``. The suffix says what the tensor is (``lora_down``,
``hada_w1_a``, ``alpha``, ``diff`` …; see :data:`ROLES`), the prefix which trainer and which network
(``lora_unet_`` kohya, ``lora_prior_unet_`` OneTrainer, ``diffusion_model.`` ComfyUI, ``prior.``
diffusers …; see :data:`PREFIXES`), and the module is the network's own module path, dotted or
flattened with ``_``.

Which module paths exist is not written down here: :class:`NameTable` derives them from the
parameter names of the network itself (a meta-device build of the official Stage C config, and
the CLIP-G text tower's Hugging Face keys), with every index wildcarded, so a name is recognised
by its shape (``down_blocks.#.#.attention.attn.out_proj``) whatever the model size. What this
module does state are the trainers' own spellings of the fused attention projection
(:data:`ATTENTION_ALIASES`), which no model holds.

The official trainer (train/train_c_lora.py) names no modules at all: ``weights.N.lora_down`` /
``weights.N.lora_up`` in its traversal order (:func:`official_lora_modules`), learned tokens as
``embeddings.embeddings`` + ``embeddings.indices``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# The official trainer's config (configs/training/finetune_c_3b_lora.yaml) targets these modules.
OFFICIAL_MODULE_FILTERS: Tuple[str, ...] = (".attn",)

# CLIP's vocabulary size; the official trainer appends new tokens after it.
CLIP_VOCAB_SIZE = 49408

QKV = ("q", "k", "v")

OFFICIAL_WEIGHT_KEY = re.compile(r"^weights\.(\d+)\.lora_(down|up)$")
OFFICIAL_EMBEDDINGS = "embeddings.embeddings"
OFFICIAL_INDICES = "embeddings.indices"
BUNDLE_EMBEDDING_KEY = re.compile(r"^bundle_emb\.(.+)\.(clip_g|clip_g_out)$")


# ----------------------------------------------------------------------------------------------
# Key suffixes: what one tensor of a module is

# (pattern, role, scheme). ``scheme`` "peft" marks lora_A/lora_B spellings (diffusers files).
_SUFFIXES: Tuple[Tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(pattern), role, scheme)
    for pattern, role, scheme in (
        (r"^(.+)\.lora_down\.weight$", "down", ""),
        (r"^(.+)\.lora_up\.weight$", "up", ""),
        (r"^(.+)\.lora_mid\.weight$", "mid", ""),
        (r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$", "down", "peft"),
        (r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$", "up", "peft"),
        (r"^(.+)\.lora\.down\.weight$", "down", "peft"),
        (r"^(.+)\.lora\.up\.weight$", "up", "peft"),
        (r"^(.+)\.lora_linear_layer\.down\.weight$", "down", "peft"),
        (r"^(.+)\.lora_linear_layer\.up\.weight$", "up", "peft"),
        (r"^(.+)_lora\.down\.weight$", "down", "peft"),
        (r"^(.+)_lora\.up\.weight$", "up", "peft"),
        (r"^(.+)\.alpha$", "alpha", ""),
        (r"^(.+)\.dora_scale$", "dora_scale", ""),
        (r"^(.+)\.(?:diff|w_norm)$", "diff", ""),
        (r"^(.+)\.(?:diff_b|b_norm)$", "diff_b", ""),
        (r"^(.+)\.(hada_w[12]_[ab]|hada_t[12])$", "", ""),  # role = the suffix itself
        (r"^(.+)\.(lokr_w[12](?:_[ab])?|lokr_t[12])$", "", ""),
        (r"^(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$", "peft_dora", ""),
        (r"^(.+)\.(?:oft_blocks|oft_diag|oft_R(?:\.[^.]+)?\.weight)$", "oft", ""),
        (r"^(.+)\.(?:a1|a2|b1|b2)\.weight$", "glora", ""),
        (r"^(.+)\.(?:on_input|set_weight|reshape_weight)$", "other", ""),
    )
)

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
# Roles of adapters we do not compute, and how messages name them.
UNSUPPORTED_ROLES = {
    "peft_dora": "peft DoRA (lora_magnitude_vector)",
    "oft": "OFT",
    "glora": "GLoRA",
    "other": "IA3 / set_weight / reshape_weight",
}


def split_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(module name, role, scheme) of a LoRA tensor key, or None for a suffix no trainer writes."""
    for pattern, role, scheme in _SUFFIXES:
        m = pattern.match(key)
        if m is not None:
            return m.group(1), role or m.group(2), scheme
    return None


def is_lora_key(key: str) -> bool:
    """Whether a tensor key is one a LoRA-style trainer writes (any adapter kind, tokens included)."""
    return bool(split_key(key) or OFFICIAL_WEIGHT_KEY.match(key) or BUNDLE_EMBEDDING_KEY.match(key)
                or key in (OFFICIAL_EMBEDDINGS, OFFICIAL_INDICES))


def looks_like_lora(keys: Iterable[str]) -> bool:
    """A file whose keys are mostly LoRA keys (LyCORIS-only and diff-only files included)."""
    keys = list(keys)
    return bool(keys) and 2 * sum(is_lora_key(k) for k in keys) >= len(keys)


# ----------------------------------------------------------------------------------------------
# Module names, derived from the networks' own parameter names


@dataclass(frozen=True)
class ModuleTarget:
    """Where one LoRA module lands.

    ``part`` is "stage_c" or "text". ``weight`` / ``bias`` are parameter names (official StageC
    names, or Hugging Face CLIP keys; ``bias`` is "" when the module has none). ``qkv`` is 0, 1
    or 2 when the module is one third (q, k or v) of a fused ``in_proj_weight``.
    """

    part: str
    module: str
    weight: str
    bias: str
    qkv: Optional[int] = None


# A trainer's spelling of a fused attention projection, relative to the attention module ``A``
# (the one owning ``in_proj_weight``) or to its parent ``P``: (part of the name after A or P,
# relative to, which projection, q/k/v index or None for all rows / "{q}" in the name).
ATTENTION_ALIASES: Tuple[Tuple[str, str, str, Optional[int]], ...] = (
    ("to_q", "A", "in_proj", 0),          # kohya / OneTrainer / ComfyUI's split attention
    ("to_k", "A", "in_proj", 1),
    ("to_v", "A", "in_proj", 2),
    ("in_proj.{q}", "A", "in_proj", None),  # OneTrainer's OMI files: in_proj.0 / .1 / .2
    ("to_out", "A", "out_proj", None),    # kohya's early stable-cascade branch
    ("to_q", "P", "in_proj", 0),          # diffusers StableCascadeUNet (Attention.to_q …)
    ("to_k", "P", "in_proj", 1),
    ("to_v", "P", "in_proj", 2),
    ("to_out.0", "P", "out_proj", None),
)

_DIGITS = re.compile(r"(?<![^_])\d+(?![^_])")  # a whole "_"-separated run of digits


def _flat_template(dotted: str) -> str:
    return "_".join("#" if seg.isdigit() else seg for seg in dotted.split("."))


@dataclass(frozen=True)
class _Entry:
    dotted: str  # module path with "#" for each index
    weight: str  # parameter name templates ("{m}" = the filled module path)
    bias: str
    qkv: Optional[int] = None
    qkv_slot: bool = False  # the last index of the name is the q/k/v index
    fixed_zero: bool = False  # the last index of the name must be 0 (diffusers' to_out.0)


class NameTable:
    """Module names of one network, spelled every way a trainer writes them, index-independent.

    Built from the network's parameter names: ``X.weight`` / ``X.bias`` make module ``X``; a
    packed parameter ``X.p_weight`` (``in_proj_weight``) makes module ``X.p``; any other
    parameter (``gamma``) is a module of its own. Every index is a wildcard, so the table of the
    3.6B model also names the modules of the lite and tiny models.
    """

    def __init__(self, part: str, param_names: Iterable[str]):
        self.part = part
        modules: Dict[str, Dict[str, str]] = {}
        for name in param_names:
            head, _, leaf = name.rpartition(".")
            if leaf in ("weight", "bias"):
                modules.setdefault(head, {})[leaf] = name
            elif leaf.endswith(("_weight", "_bias")):
                stem, _, kind = leaf.rpartition("_")
                modules.setdefault(f"{head}.{stem}" if head else stem, {})[kind] = name
            else:
                modules.setdefault(name, {})["weight"] = name
        self._entries: Dict[str, _Entry] = {}
        for module, params in modules.items():
            if "weight" not in params:
                continue
            template = re.sub(r"(?<![^.])\d+(?![^.])", "#", module)
            self._add(template, _Entry(template, _rel(params["weight"], module), _rel(params.get("bias", ""), module)))
            if module.endswith(".in_proj") and module[: -len(".in_proj")] + ".out_proj" in modules:
                self._add_attention_aliases(template[: -len(".in_proj")])

    def _add(self, dotted: str, entry: _Entry) -> None:
        key = _flat_template(dotted)
        old = self._entries.get(key)
        if old is not None and old != entry:
            raise RuntimeError(f"two modules flatten to the same LoRA name {key}: {old.dotted} and {entry.dotted}")
        self._entries[key] = entry

    def _add_attention_aliases(self, attn: str) -> None:
        parent = attn.rpartition(".")[0]
        for spelling, base, proj, qkv in ATTENTION_ALIASES:
            root = attn if base == "A" else parent
            weight, bias = ("{m}_weight", "{m}_bias") if proj == "in_proj" else ("{m}.weight", "{m}.bias")
            name = f"{root}.{spelling.replace('{q}', '#')}"
            fixed_zero = spelling.endswith(".0")
            if fixed_zero:
                name = name[:-1] + "#"
            self._add(name, _Entry(f"{attn}.{proj}", weight, bias, qkv, qkv_slot="{q}" in spelling,
                                   fixed_zero=fixed_zero))

    def resolve(self, flat: str) -> Optional[ModuleTarget]:
        """The target of a module name flattened with "_" (dots replaced), or None."""
        indices = _DIGITS.findall(flat)
        entry = self._entries.get(_DIGITS.sub("#", flat))
        if entry is None:
            return None
        qkv = entry.qkv
        if entry.qkv_slot or entry.fixed_zero:
            last = int(indices.pop())
            if entry.fixed_zero and last != 0:
                return None
            if entry.qkv_slot:
                if last > 2:
                    return None
                qkv = last
        filled = entry.dotted
        for index in indices:
            filled = filled.replace("#", str(int(index)), 1)
        if "#" in filled:
            return None
        bias = entry.bias.replace("{m}", filled) if entry.bias else ""
        return ModuleTarget(self.part, filled, entry.weight.replace("{m}", filled), bias, qkv)

    def templates(self) -> List[str]:
        """Every recognised flattened name, indices as "#" (for tests and docs)."""
        return sorted(self._entries)


def _rel(param: str, module: str) -> str:
    """A parameter name relative to its module: "{m}.weight", "{m}_weight" or "{m}" itself."""
    return "{m}" + param[len(module):] if param else ""


@lru_cache(maxsize=1)
def stage_c_names() -> NameTable:
    """Stage C's module names, from a meta-device build of every official Stage C config."""
    import torch

    from ..models.configs import STAGE_C
    from ..models.stage_c import StageC

    names: List[str] = []
    for config in STAGE_C.values():
        with torch.device("meta"):
            names += [n for n, _ in StageC(**config).named_parameters()]
    return NameTable("stage_c", dict.fromkeys(names))


@lru_cache(maxsize=1)
def text_names() -> NameTable:
    """CLIP-G's module names: the Hugging Face keys our text encoder accepts."""
    from ..text.encoder import BIGG14_TEXT_CONFIG, hf_text_key_names

    return NameTable("text", hf_text_key_names(BIGG14_TEXT_CONFIG["layers"]))


# (prefix, naming scheme, part or None for either, flattened with "_"). Longest first.
PREFIXES: Tuple[Tuple[str, str, Optional[str], bool], ...] = (
    ("lora_prior_unet_", "onetrainer", "stage_c", True),
    ("lora_prior_te_", "onetrainer", "text", True),
    ("lora_unet_", "kohya", "stage_c", True),
    ("lora_te_", "kohya", "text", True),
    ("lora_prior_unet.", "dotted", "stage_c", False),
    ("lora_prior_te.", "dotted", "text", False),
    ("text_encoders.clip_g.transformer.", "comfyui", "text", False),  # ComfyUI's Extract and Save LoRA
    ("diffusion_model.", "comfyui", "stage_c", False),
    ("base_model.model.", "dotted", None, False),
    ("text_encoder.", "dotted", "text", False),
    ("transformer.", "dotted", "stage_c", False),
    ("clip_g.", "omi", "text", False),
    ("prior.", "dotted", "stage_c", False),
    ("unet.", "omi", "stage_c", False),
    ("", "dotted", None, False),
)


def resolve_module(name: str) -> Optional[Tuple[ModuleTarget, str]]:
    """Map a LoRA module name (a key without its suffix) to its target.

    Returns (target, naming) where naming is "kohya", "onetrainer", "comfyui", "omi" or
    "dotted", or None when the name is not a Stage C or CLIP-G module.
    """
    for prefix, naming, part, flat in PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if flat and "." in rest:
            continue
        key = rest.replace(".", "_")
        tables = [stage_c_names(), text_names()] if part is None else \
            [stage_c_names() if part == "stage_c" else text_names()]
        for table in tables:
            target = table.resolve(key)
            if target is not None:
                return target, naming
    return None


def format_module_name(fmt: str, target: ModuleTarget) -> str:
    """Spell a target the way a trainer writes it (the inverse of :func:`resolve_module`)."""
    module = target.module
    if target.part == "stage_c":
        if target.qkv is not None:
            attn = module[: -len(".in_proj")]
            split = f"{attn}.to_{QKV[target.qkv]}"
            diffusers = attn.rpartition(".")[0] + f".to_{QKV[target.qkv]}"
        elif module.endswith(".attn.out_proj"):
            split = module
            diffusers = module[: -len(".attn.out_proj")] + ".to_out.0"
        else:
            split = diffusers = module
        spelled = {"kohya": "lora_unet_" + split.replace(".", "_"),
                   "onetrainer": "lora_prior_unet_" + split.replace(".", "_"),
                   "diffusers": "prior." + diffusers,
                   "comfyui": "diffusion_model." + split}
    else:
        spelled = {"kohya": "lora_te_" + module.replace(".", "_"),
                   "onetrainer": "lora_prior_te_" + module.replace(".", "_"),
                   "diffusers": "text_encoder." + module,
                   "comfyui": "text_encoders.clip_g.transformer." + module}
    if fmt not in spelled:
        raise ValueError(f"no module naming for format {fmt!r}")
    return spelled[fmt]


# ----------------------------------------------------------------------------------------------
# What a file for another model family looks like


def _example(keys: Sequence[str], needle: str) -> str:
    for key in keys:
        if needle in key:
            return key
    return needle


def describe_foreign_lora(keys: Sequence[str]) -> Optional[str]:
    """Name the model family a LoRA was made for when its keys clearly are not Stage C, else None."""
    keys = list(keys)
    joined = "\n".join(keys)
    flat = []
    for key in keys:
        split = split_key(key)
        name = split[0] if split else key
        for prefix, *_ in PREFIXES[:-1]:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        flat.append(name.replace(".", "_"))
    flat_joined = "\n".join(flat)

    def has(*needles: str) -> bool:
        return any(n in joined for n in needles)

    if has("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block",
           "input_blocks.", "output_blocks.", "middle_block."):
        sdxl = has("lora_te1_", "lora_te2_", "text_encoder_2.", "input_blocks_7_1_transformer_blocks_1",
                   "input_blocks.7.1.transformer_blocks.1", "label_emb")
        family = "an SDXL LoRA" if sdxl else "a Stable Diffusion 1.x/2.x (or SDXL) LoRA"
        return f"{family} ({_example(keys, 'input_blocks')[:60]}…)"
    if has("attentions_0_transformer_blocks", ".attentions.0.transformer_blocks", "lora_te1_", "lora_te2_",
           "text_encoder_2."):
        return f"a Stable Diffusion / SDXL LoRA in diffusers naming ({_example(keys, 'attentions')[:60]}…)"
    if re.search(r"(?m)^(?:down|up)_blocks_[2-9]_", flat_joined) or has("effnet_mapper", "pixels_mapper") or re.search(
        r"(?m)(?:^|_)clip_mapper(?:$|_)", flat_joined
    ):
        return "a Stage B LoRA (it has Stage B modules such as levels 2-3 or effnet/pixels/clip mappers)"
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "a Flux LoRA"
    if has("joint_blocks"):
        return "an SD3 LoRA"
    if has("transformer_blocks"):
        return "a LoRA for a diffusion transformer (not Stable Cascade)"
    if re.search(r"(?m)^blocks_\d+_(?:attention|kv_mapper|channelwise)", flat_joined) or has("cond_mapper"):
        return "a Würstchen v2 prior LoRA (warp-ai/wuerstchen-prior), not Stable Cascade's Stage C"
    return None


# ----------------------------------------------------------------------------------------------
# The official trainer's module order


def official_lora_modules(param_names: Iterable[str],
                          module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS) -> List[str]:
    """Parameter names in the order of the official trainer's ``weights.N`` entries.

    ``param_names`` must be in the model's own order (``named_parameters()`` or state-dict
    order). The trainer wraps every module whose name contains one of ``module_filters`` and
    owns a ``weight`` (Linear, Conv2d) or else an ``in_proj_weight`` (MultiheadAttention), walking
    ``named_modules()``; a wrapper is registered as a child *after* the module's own children, so a
    module's LoRA comes after every LoRA inside it (an attention's ``out_proj`` before its fused
    ``in_proj_weight``). In parameter order that is: sorted by the position of the last parameter
    under the module, deeper modules first on a tie.
    """
    names = [n for n in dict.fromkeys(param_names)]
    owned: Dict[str, str] = {}
    for name in names:
        if name.endswith(".in_proj_weight"):
            module = name[: -len(".in_proj_weight")]
            owned.setdefault(module, name)
        elif name.endswith(".weight"):
            owned[name[: -len(".weight")]] = name
    last: Dict[str, int] = {}
    for position, name in enumerate(names):
        parts = name.split(".")
        for depth in range(1, len(parts)):
            last[".".join(parts[:depth])] = position
    chosen = [(last[m], -m.count("."), name) for m, name in owned.items() if any(f in m for f in module_filters)]
    chosen.sort()
    return [name for _, _, name in chosen]
