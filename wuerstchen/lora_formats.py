"""Key names of Stage C LoRA files: which trainer wrote a key and which weight it means.

Every naming scheme we read is reduced to one spelling: the official StageC module path
(``down_blocks.0.2.attention.attn.out_proj``) plus, for a split q/k/v projection, which third of
the fused ``in_proj_weight`` it owns; text-encoder keys become Hugging Face CLIP names
(``text_model.encoder.layers.3.self_attn.q_proj``). The same tables spell names back out for the
tiny-LoRA writer, so reading and writing cannot drift apart.

Naming schemes (from the trainers' own conventions):

* official trainer (train/train_c_lora.py): ``weights.N.lora_down`` / ``weights.N.lora_up`` in
  module-traversal order, learned tokens as ``embeddings.embeddings`` + ``embeddings.indices``;
* kohya sd-scripts: ``lora_unet_<path with _>`` / ``lora_te_<HF path with _>`` and ``.alpha``,
  attention spelled ``attention_attn_to_q`` … ``attention_attn_out_proj``;
* OneTrainer: the same with ``lora_prior_unet_`` / ``lora_prior_te_``, bundled embeddings
  ``bundle_emb.<name>.clip_g``; its OMI variant is dotted (``unet.…attention.attn.in_proj.0``,
  ``clip_g.…``);
* diffusers / peft: dotted StableCascadeUNet names (``attention.to_q``, ``attention.to_out.0``)
  with ``lora_A`` / ``lora_B``, optionally prefixed ``prior.``, ``unet.``, ``transformer.``;
  ``text_encoder.`` for CLIP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

# The official trainer's config (configs/training/finetune_c_3b_lora.yaml) targets these modules.
OFFICIAL_MODULE_FILTERS: Tuple[str, ...] = (".attn",)

# CLIP-G's vocabulary; the official trainer appends new tokens after it.
CLIP_VOCAB_SIZE = 49408

QKV = ("q", "k", "v")

# ----------------------------------------------------------------------------------------------
# Stage C module names


_STAGE_C_MODULE = re.compile(
    r"^(?:"
    r"(?P<top>clip_txt_pooled_mapper|clip_txt_mapper|clip_img_mapper)"
    r"|(?P<seq>embedding|clf)_(?P<seq_i>\d+)"
    r"|(?P<scaler>down_downscalers|up_upscalers)_(?P<sc_i>\d+)_1_blocks_(?P<sc_j>\d+)"
    r"|(?P<repmap>down_repeat_mappers|up_repeat_mappers)_(?P<rm_i>\d+)_(?P<rm_j>\d+)"
    r"|(?P<blocks>down_blocks|up_blocks)_(?P<lvl>\d+)_(?P<idx>\d+)_(?P<sub>"
    r"depthwise|channelwise_[04]|kv_mapper_1|mapper(?:_[a-z0-9]+)?"
    r"|attention_attn_(?:to_[qkv]|out_proj|in_proj(?:_[012])?)"
    r"|attention_(?:to_[qkv]|to_out_0)"
    r"))$"
)

_TEXT_MODULE = re.compile(
    r"^(?:text_model_encoder_layers_(?P<layer>\d+)_(?P<sub>self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])"
    r"|(?P<proj>text_projection))$"
)


@dataclass(frozen=True)
class ModuleTarget:
    """Where one LoRA module lands.

    ``part`` is "stage_c" or "text". ``weight`` / ``bias`` are the parameter names (official
    StageC names, or Hugging Face CLIP keys). ``qkv`` is 0, 1 or 2 when the module is one third
    (q, k or v) of the fused ``in_proj_weight``; None when it is the whole tensor.
    """

    part: str
    module: str
    weight: str
    bias: str
    qkv: Optional[int] = None


def _stage_c_target(flat: str) -> Optional[ModuleTarget]:
    m = _STAGE_C_MODULE.match(flat)
    if m is None:
        return None
    if m["top"]:
        module = m["top"]
    elif m["seq"]:
        module = f"{m['seq']}.{m['seq_i']}"
    elif m["scaler"]:
        module = f"{m['scaler']}.{m['sc_i']}.1.blocks.{m['sc_j']}"
    elif m["repmap"]:
        module = f"{m['repmap']}.{m['rm_i']}.{m['rm_j']}"
    else:
        block = f"{m['blocks']}.{m['lvl']}.{m['idx']}"
        sub = m["sub"]
        if sub.startswith("attention"):
            attn = f"{block}.attention.attn"
            if sub.endswith(("out_proj", "to_out_0")):
                module = f"{attn}.out_proj"
            else:
                tail = sub.rsplit("_", 1)[-1]  # q / k / v / proj / 0..2
                qkv = QKV.index(tail) if tail in QKV else (int(tail) if tail.isdigit() else None)
                return ModuleTarget("stage_c", f"{attn}.in_proj", f"{attn}.in_proj_weight",
                                    f"{attn}.in_proj_bias", qkv)
        elif sub in ("channelwise_0", "channelwise_4", "kv_mapper_1"):
            head, idx = sub.rsplit("_", 1)
            module = f"{block}.{head}.{idx}"
        else:  # depthwise, mapper, mapper_<cond>
            module = f"{block}.{sub}"
    return ModuleTarget("stage_c", module, f"{module}.weight", f"{module}.bias")


def _text_target(flat: str) -> Optional[ModuleTarget]:
    m = _TEXT_MODULE.match(flat)
    if m is None:
        return None
    if m["proj"]:
        module = "text_projection"
    else:
        sub = m["sub"]
        if sub.startswith("self_attn"):
            sub = "self_attn." + sub[len("self_attn_"):]
        else:
            sub = "mlp." + sub[len("mlp_"):]
        module = f"text_model.encoder.layers.{m['layer']}.{sub}"
    return ModuleTarget("text", module, f"{module}.weight", f"{module}.bias")


# (prefix, naming scheme). Longest first so that "lora_prior_unet_" wins over "lora_unet_"-like
# overlaps; dotted prefixes are stripped before the '.' -> '_' flattening.
_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("lora_prior_unet_", "onetrainer"),
    ("lora_prior_te_", "onetrainer"),
    ("lora_unet_", "kohya"),
    ("lora_te_", "kohya"),
    ("lora_prior_unet.", "dotted"),
    ("lora_prior_te.", "dotted"),
    ("base_model.model.", "dotted"),
    ("diffusion_model.", "dotted"),
    ("text_encoder.", "dotted"),
    ("transformer.", "dotted"),
    ("clip_g.", "omi"),
    ("prior.", "dotted"),
    ("unet.", "omi"),
    ("", "dotted"),
)


def resolve_module(name: str) -> Optional[Tuple[ModuleTarget, str]]:
    """Map a LoRA module name (key without its ``.lora_down.weight``-like suffix) to its target.

    Returns (target, naming) where naming is "kohya", "onetrainer", "omi" or "dotted", or None
    when the name is not a Stage C or CLIP-G module.
    """
    for prefix, naming in _PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if naming in ("kohya", "onetrainer") and "." in rest:
            continue
        flat = rest.replace(".", "_")
        target = _stage_c_target(flat) or _text_target(flat)
        if target is not None:
            return target, naming
    return None


def format_module_name(fmt: str, target: ModuleTarget) -> str:
    """Spell a target the way a trainer writes it (the inverse of ``resolve_module``)."""
    module = target.module
    if target.part == "stage_c":
        if target.qkv is not None:
            attn = module[: -len(".in_proj")]
            dotted_diffusers = attn[: -len(".attn")] + f".to_{QKV[target.qkv]}"
            dotted_official = f"{attn}.to_{QKV[target.qkv]}"
        elif module.endswith(".attention.attn.out_proj"):
            dotted_diffusers = module[: -len(".attn.out_proj")] + ".to_out.0"
            dotted_official = module
        else:
            dotted_diffusers = dotted_official = module
        if fmt == "kohya":
            return "lora_unet_" + dotted_official.replace(".", "_")
        if fmt == "onetrainer":
            return "lora_prior_unet_" + dotted_official.replace(".", "_")
        if fmt == "diffusers":
            return "prior." + dotted_diffusers
        raise ValueError(f"no module naming for format {fmt!r}")
    if fmt == "kohya":
        return "lora_te_" + module.replace(".", "_")
    if fmt == "onetrainer":
        return "lora_prior_te_" + module.replace(".", "_")
    if fmt == "diffusers":
        return "text_encoder." + module
    raise ValueError(f"no module naming for format {fmt!r}")


# ----------------------------------------------------------------------------------------------
# Key suffixes

_SUFFIXES: Tuple[Tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(pattern), kind, scheme)
    for pattern, kind, scheme in (
        (r"^(.+)\.lora_down\.weight$", "down", "lora_down"),
        (r"^(.+)\.lora_up\.weight$", "up", "lora_down"),
        (r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$", "down", "peft"),
        (r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$", "up", "peft"),
        (r"^(.+)\.lora\.down\.weight$", "down", "peft"),
        (r"^(.+)\.lora\.up\.weight$", "up", "peft"),
        (r"^(.+)\.alpha$", "alpha", ""),
        (r"^(.+)\.diff$", "diff", ""),
        (r"^(.+)\.diff_b$", "diff_b", ""),
        (r"^(.+)\.(?:dora_scale|lora_magnitude_vector(?:\.[^.]+)?)$", "DoRA", ""),
        (r"^(.+)\.(?:hada_w[12]_[ab]|hada_t[12])$", "LoHa", ""),
        (r"^(.+)\.lokr_(?:w[12](?:_[ab])?|t2)$", "LoKr", ""),
        (r"^(.+)\.(?:oft_blocks|oft_diag|oft_R(?:\.[^.]+)?\.weight)$", "OFT", ""),
        (r"^(.+)\.lora_mid\.weight$", "LoCon with a Tucker core (lora_mid)", ""),
    )
)

UNSUPPORTED_KINDS = ("DoRA", "LoHa", "LoKr", "OFT", "LoCon with a Tucker core (lora_mid)")

OFFICIAL_WEIGHT_KEY = re.compile(r"^weights\.(\d+)\.lora_(down|up)$")
OFFICIAL_EMBEDDINGS = "embeddings.embeddings"
OFFICIAL_INDICES = "embeddings.indices"
BUNDLE_EMBEDDING_KEY = re.compile(r"^bundle_emb\.(.+)\.(clip_g|clip_g_out)$")


def split_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(module name, kind, suffix scheme) of a LoRA tensor key, or None for an unknown suffix."""
    for pattern, kind, scheme in _SUFFIXES:
        m = pattern.match(key)
        if m is not None:
            return m.group(1), kind, scheme
    return None


# ----------------------------------------------------------------------------------------------
# What a file we cannot use looks like


def _flat_names(keys: Iterable[str]) -> List[str]:
    out = []
    for key in keys:
        split = split_key(key)
        name = split[0] if split else key
        for prefix, _ in _PREFIXES[:-1]:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out.append(name.replace(".", "_"))
    return out


def _example(keys: Sequence[str], needle: str) -> str:
    for key in keys:
        if needle in key:
            return key
    return needle


def describe_foreign_lora(keys: Sequence[str]) -> Optional[str]:
    """Name the model family a LoRA was made for when it is clearly not Stage C, else None."""
    keys = list(keys)
    joined = "\n".join(keys)
    flat = _flat_names(keys)
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


_TOP_ORDER = ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "clip_norm", "embedding",
              "down_blocks", "down_downscalers", "down_repeat_mappers", "up_blocks", "up_upscalers",
              "up_repeat_mappers", "clf")
# Child names in registration order; siblings always come from one class, and each class's
# order (ResBlock: depthwise, norm, channelwise; AttnBlock: norm, attention, kv_mapper;
# TimestepBlock: mapper, mapper_sca, mapper_crp) is a sub-sequence of this list.
_CHILD_ORDER = ("depthwise", "norm", "attention", "attn", "out_proj", "kv_mapper", "channelwise",
                "mapper", "mapper_sca", "mapper_crp", "blocks")


def _segment_key(segment: str, table: Sequence[str]):
    if segment.isdigit():
        return (0, int(segment), "")
    rank = table.index(segment) if segment in table else len(table)
    return (1, rank, segment)


def official_order_key(module: str):
    """Sort key giving the order in which the official trainer lists a module's LoRA.

    apply_lora registers LoRAs while walking ``named_modules()`` (pre-order) and the trainer then
    collects them with ``modules()``: a parametrization lives in a child added *after* a module's
    own children, so a module's LoRA sorts after everything inside it. For MultiheadAttention that
    puts ``out_proj`` (a child) before the fused ``in_proj_weight`` (the module's own).
    """
    parts = module.split(".")
    key = [_segment_key(parts[0], _TOP_ORDER)]
    key += [_segment_key(p, _CHILD_ORDER) for p in parts[1:]]
    key.append((9, 0, ""))
    return tuple(key)


def official_lora_modules(param_names: Iterable[str],
                          module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS) -> List[str]:
    """StageC parameter names in the order of the official trainer's ``weights.N`` entries.

    The trainer wraps every module whose name contains one of ``module_filters`` and that owns a
    ``weight`` parameter (Linear, Conv2d) or, failing that, an ``in_proj_weight``
    (MultiheadAttention). Index N of a saved LoRA is position N of this list.
    """
    names = set(param_names)
    chosen = []
    for name in names:
        if name.endswith(".in_proj_weight"):
            module = name[: -len(".in_proj_weight")]
        elif name.endswith(".weight"):
            module = name[: -len(".weight")]
        else:
            continue
        if any(f in module for f in module_filters):
            chosen.append((official_order_key(module), name))
    chosen.sort()
    return [name for _, name in chosen]
