"""Reading a network's constructor config off the shapes of its state dict.

One function per kind of network: ``fn(shapes, hint) -> (variant, config)``, where ``shapes``
maps the network's own keys (any wrapper prefix removed) to their shapes, and ``hint`` is an
optional config a file carries in its metadata for the few hyper-parameters that leave no trace
in shapes (attention heads of a non-official model). A config that matches an official one is
returned as that official config (``configs.py``), so the released files get exactly the official
hyper-parameters; anything else is "custom". Which function serves which kind is recorded in
:mod:`wuerstchen.files.kinds`.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..models import configs

Shapes = Mapping[str, Tuple[int, ...]]
Layout = Tuple[str, dict]


class LayoutError(ValueError):
    """Shapes that look like a known network but cannot be read as one."""


def has_keys(shapes: Shapes, keys: Sequence[str]) -> bool:
    return all(k in shapes for k in keys)


def _indices(shapes: Shapes, pattern: str) -> List[int]:
    rx = re.compile(pattern)
    found = set()
    for k in shapes:
        m = rx.match(k)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def _level_config(shapes: Shapes, prefix: str) -> Tuple[str, int]:
    """Block letters of one level's module list (e.g. 'CTA' repeated n times) -> ('CTA', n)."""
    letters = []
    for j in _indices(shapes, re.escape(prefix) + r"(\d+)\."):
        p = f"{prefix}{j}."
        if f"{p}depthwise.weight" in shapes:
            letters.append("C")
        elif f"{p}attention.attn.in_proj_weight" in shapes:
            letters.append("A")
        elif f"{p}mapper.weight" in shapes:
            letters.append("T")
        elif f"{p}channelwise.0.weight" in shapes:
            letters.append("F")
        else:
            raise LayoutError(f"unrecognised block at {p}")
    seq = "".join(letters)
    for period in range(1, len(seq) + 1):
        if len(seq) % period == 0 and seq[:period] * (len(seq) // period) == seq:
            return seq[:period], len(seq) // period
    return seq, 1


def _t_conds(shapes: Shapes, block_prefix: str) -> List[str]:
    names = []
    for k in shapes:
        m = re.match(re.escape(block_prefix) + r"mapper_(\w+)\.weight$", k)
        if m:
            names.append(m.group(1))
    order = ["sca", "crp"]
    return sorted(names, key=lambda n: (order.index(n) if n in order else 99, n))


def _unet_levels(shapes: Shapes) -> dict:
    """Shared StageB/StageC structure: widths, block counts, repeats, level configs."""
    levels = _indices(shapes, r"down_blocks\.(\d+)\.")
    ups = _indices(shapes, r"up_blocks\.(\d+)\.")
    if not levels or len(ups) != len(levels):
        raise LayoutError("down/up block lists do not match")
    level_config, down_counts, up_counts, c_hidden = [], [], [], []
    for i in levels:
        cfg, n = _level_config(shapes, f"down_blocks.{i}.")
        level_config.append(cfg)
        down_counts.append(n)
        c_hidden.append(shapes[f"down_blocks.{i}.0.depthwise.weight"][0] if cfg[0] == "C"
                        else _level_width(shapes, f"down_blocks.{i}.0."))
    for k in ups:
        cfg, n = _level_config(shapes, f"up_blocks.{k}.")
        up_counts.append(n)
    down_rep = [len(_indices(shapes, rf"down_repeat_mappers\.{i}\.(\d+)\.")) + 1 for i in levels]
    up_rep = [len(_indices(shapes, rf"up_repeat_mappers\.{k}\.(\d+)\.")) + 1 for k in ups]
    first_t = next(f"down_blocks.{i}.{j}." for i in levels for j in _indices(shapes, rf"down_blocks\.{i}\.(\d+)\.")
                   if f"down_blocks.{i}.{j}.mapper.weight" in shapes)
    c_r = shapes[first_t + "mapper.weight"][1]
    kernel = next(shapes[k][-1] for k in shapes if k.endswith("depthwise.weight"))
    nhead = [c // 64 if "A" in cfg else -1 for c, cfg in zip(c_hidden, level_config)]
    return dict(
        c_hidden=c_hidden, nhead=nhead, blocks=[down_counts, up_counts], block_repeat=[down_rep, up_rep],
        level_config=level_config, c_r=c_r, kernel_size=kernel, t_conds=_t_conds(shapes, first_t),
    )


def _level_width(shapes: Shapes, p: str) -> int:
    for suffix in ("attention.attn.out_proj.weight", "mapper.weight", "channelwise.4.weight"):
        if p + suffix in shapes:
            return shapes[p + suffix][0] // (2 if suffix == "mapper.weight" else 1)
    raise LayoutError(f"cannot infer width at {p}")


def _match_official(table: dict, inferred: dict, keys: Sequence[str]) -> Optional[str]:
    for variant, cfg in table.items():
        if all(cfg[k] == inferred[k] for k in keys):
            return variant
    return None


def stage_c(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    cfg = _unet_levels(shapes)
    c_cond, c_clip_text = shapes["clip_txt_mapper.weight"]
    cfg.update(
        c_in=shapes["embedding.1.weight"][1], c_out=shapes["clf.1.weight"][0], patch_size=1, c_cond=c_cond,
        c_clip_text=c_clip_text, c_clip_text_pooled=shapes["clip_txt_pooled_mapper.weight"][1],
        c_clip_img=shapes["clip_img_mapper.weight"][1], c_clip_seq=shapes["clip_txt_pooled_mapper.weight"][0] // c_cond,
        dropout=0.0, self_attn=True, switch_level=[False] * (len(cfg["c_hidden"]) - 1),
    )
    structural = ["c_hidden", "blocks", "block_repeat", "level_config", "c_cond", "c_clip_text", "c_clip_img", "t_conds"]
    variant = _match_official(configs.STAGE_C, cfg, structural)
    if variant:
        return variant, configs.official(configs.STAGE_C, variant)
    return _with_hint(cfg, hint, structural)


def stage_b(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    cfg = _unet_levels(shapes)
    attn = next(k for k in shapes if k.endswith("kv_mapper.1.weight"))
    c_cond = shapes[attn][1]
    cfg.update(
        c_in=shapes["embedding.1.weight"][1] // 4, c_out=shapes["clf.1.weight"][0] // 4, patch_size=2, c_cond=c_cond,
        c_clip=shapes["clip_mapper.weight"][1], c_clip_seq=shapes["clip_mapper.weight"][0] // c_cond,
        c_effnet=shapes["effnet_mapper.0.weight"][1], c_pixels=shapes["pixels_mapper.0.weight"][1],
        dropout=0.0, self_attn=True,
    )
    structural = ["c_hidden", "blocks", "block_repeat", "level_config", "c_cond", "c_clip", "c_effnet", "t_conds"]
    variant = _match_official(configs.STAGE_B, cfg, structural)
    if variant:
        return variant, configs.official(configs.STAGE_B, variant)
    return _with_hint(cfg, hint, structural)


def stage_a(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    codebook_size, c_latent = shapes.get("vquantizer.codebook.weight") or shapes["vquantizer.embedding.weight"]
    c_first = shapes["in_block.1.weight"][0]
    # Down path: one ResBlock per level (convs between); the bottleneck ResBlocks sit in the up path.
    levels = len({k.split(".")[1] for k in shapes if k.startswith("down_blocks.") and k.endswith(".gammas")})
    n_up_res = len({k.split(".")[1] for k in shapes if k.startswith("up_blocks.") and k.endswith(".gammas")})
    cfg = dict(levels=levels, bottleneck_blocks=n_up_res - (levels - 1), c_hidden=c_first * 2 ** (levels - 1),
               c_latent=c_latent, codebook_size=codebook_size, scale_factor=0.43)
    variant = "official" if cfg == configs.STAGE_A else "custom"
    return variant, cfg


def _effnet_setting(shapes: Shapes, prefix: str) -> Optional[list]:
    """Infer an EfficientNetV2 stage list from backbone shapes; strides follow V2-S."""
    stages = _indices(shapes, re.escape(prefix) + r"(\d+)\.")
    if len(stages) != 8:
        return None
    strides = [1, 2, 2, 2, 1, 2]
    setting = []
    for s_i, stage in enumerate(stages[1:-1]):
        layers = _indices(shapes, rf"{re.escape(prefix)}{stage}\.(\d+)\.")
        p = f"{prefix}{stage}.0.block."
        is_mb = any(k.startswith(p) and ".fc1." in k for k in shapes)
        if is_mb:
            expand_w = shapes[p + "0.0.weight"]  # 1x1 expand conv [hidden, in, 1, 1]
            dw = shapes[p + "1.0.weight"]  # depthwise [hidden, 1, k, k]
            project = shapes[p + "3.0.weight"]
            c_in, hidden, k, c_out = expand_w[1], expand_w[0], dw[-1], project[0]
            block = "MBConv"
        else:
            first = shapes[p + "0.0.weight"]  # kxk conv [hidden or out, in, k, k]
            c_in, k = first[1], first[-1]
            if p + "1.0.weight" in shapes:
                hidden, c_out = first[0], shapes[p + "1.0.weight"][0]
            else:
                hidden, c_out = first[0], first[0]
            block = "FusedMBConv"
        expand = hidden // c_in
        setting.append(dict(block=block, expand_ratio=expand, kernel=k, stride=strides[s_i],
                            input_channels=c_in, out_channels=c_out, num_layers=len(layers)))
    return setting


_V2S_SETTING_CHANNELS = [(24, 24, 2), (24, 48, 4), (48, 64, 4), (64, 128, 6), (128, 160, 9), (160, 256, 15)]


def effnet(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    c_latent = shapes["mapper.0.weight"][0]
    setting = _effnet_setting(shapes, "backbone.")
    cfg = dict(c_latent=c_latent)
    if setting and [(s["input_channels"], s["out_channels"], s["num_layers"]) for s in setting] != _V2S_SETTING_CHANNELS:
        cfg["backbone_setting"] = setting
    if hint and "backbone_setting" in hint:
        cfg["backbone_setting"] = hint["backbone_setting"]
    if shapes["mapper.0.weight"][1] != 1280:
        cfg["last_channel"] = shapes["mapper.0.weight"][1]
    return "official" if cfg == configs.EFFNET else "custom", cfg


def previewer(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    c_hidden, c_in = shapes["blocks.0.weight"][:2]
    last = max(_indices(shapes, r"blocks\.(\d+)\.weight"))
    cfg = dict(c_in=c_in, c_hidden=c_hidden, c_out=shapes[f"blocks.{last}.weight"][0])
    return "official" if cfg == configs.PREVIEWER else "custom", cfg


def controlnet(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    n_proj = len(_indices(shapes, r"projections\.(\d+)\."))
    c_proj = shapes["projections.0.2.weight"][0]
    if "backbone.0.0.weight" in shapes:
        mode, c_in = "effnet", shapes["backbone.0.0.weight"][1]
    elif "backbone.3.blocks.0.weight" in shapes:  # the residual conv blocks of the 'large' bottleneck
        mode, c_in = "large", shapes["backbone.0.weight"][1]
    else:
        mode, c_in = "simple", shapes["backbone.0.weight"][1]
    proj_blocks = None
    if hint and "proj_blocks" in hint:
        proj_blocks = list(hint["proj_blocks"])
    elif n_proj == len(configs.CONTROLNET_PROJ_BLOCKS):
        proj_blocks = list(configs.CONTROLNET_PROJ_BLOCKS)
    if proj_blocks is None or len(proj_blocks) != n_proj:
        raise LayoutError(
            f"a ControlNet with {n_proj} projection heads: cannot tell which Stage C blocks they feed "
            "(the released ControlNets have 8)"
        )
    cfg = dict(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode=mode)
    embd = shapes["projections.0.0.weight"][1]
    if mode == "effnet":
        setting = _effnet_setting(shapes, "backbone.")
        if setting and [(s["input_channels"], s["out_channels"], s["num_layers"]) for s in setting] != _V2S_SETTING_CHANNELS:
            cfg["backbone_setting"] = setting
        if embd != 1280:
            cfg["embd_channels"] = embd
    elif mode == "large":
        wide, hidden = shapes["backbone.0.weight"][0], shapes["backbone.2.weight"][0]
        if (wide, hidden) != (16384, 1024):
            cfg["large_hidden"] = [wide, hidden]
        if embd != 1280:
            cfg["embd_channels"] = embd
    variant = next((name for name, ref in configs.CONTROLNET.items() if ref == cfg), "custom")
    if variant == "custom" and mode == "effnet":
        variant = {1: "canny", 4: "inpainting"}.get(c_in, "custom")
    elif variant == "custom" and mode == "large":
        variant = "super_resolution"
    return variant, cfg


def _meta_tensors(shapes: Shapes) -> Dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def clip_text(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    from ..text import encoder as text

    heads = (hint or {}).get("num_attention_heads")
    try:
        cfg = text.config_from_state_dict(_meta_tensors(shapes), heads=heads)
    except (KeyError, ValueError) as exc:
        raise LayoutError(f"a CLIP text encoder that this pack cannot use ({exc})") from None
    width = cfg["width"]
    variant = "bigG" if width == 1280 else ("CLIP-L" if width == 768 else "custom")
    return variant, cfg


def clip_vision(shapes: Shapes, hint: Optional[dict] = None) -> Layout:
    from ..text import vision

    heads = (hint or {}).get("num_attention_heads")
    try:
        cfg = vision.vision_config_from_state_dict(_meta_tensors(shapes), heads=heads)
    except (KeyError, ValueError) as exc:
        raise LayoutError(f"a CLIP image encoder that this pack cannot use ({exc})") from None
    proj = cfg["projection_dim"]
    variant = "ViT-L-14" if proj == 768 else ("ViT-bigG-14" if proj == 1280 else "custom")
    return variant, cfg


def _with_hint(cfg: dict, hint: Optional[dict], structural: Sequence[str]) -> Layout:
    """A metadata config is used when it agrees with everything the shapes tell."""
    if hint and all(hint.get(k) == cfg.get(k) for k in structural):
        return "custom", dict(hint)
    return "custom", cfg
