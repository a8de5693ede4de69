"""Identify Stable Cascade weight files from their keys and shapes, and load them.

Never from file names: users rename files freely. A file is read as a set of (key, shape)
pairs; each known network has marker keys, and its config is inferred from shapes (with the
official values for hyper-parameters that leave no trace in a state dict). The module is then
built on the meta device and filled with ``assign=True`` directly in the requested dtype and
device, so a 3.6B model never exists twice in memory and is never randomly initialised.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import configs
from .weights_io import WeightFileError, WeightSource

Shapes = Mapping[str, Tuple[int, ...]]

KIND_TITLES = {
    "stage_c": "Stage C (text-conditional prior)",
    "stage_b": "Stage B (latent decoder)",
    "stage_a": "Stage A (VQGAN)",
    "effnet": "EfficientNet semantic compressor (effnet_encoder)",
    "previewer": "Stage C previewer",
    "controlnet": "Stage C ControlNet",
    "clip_text": "CLIP ViT-bigG-14 text encoder",
    "clip_vision": "CLIP ViT-L/14 image encoder",
}

# What each official file of the release is, for messages and the README.
OFFICIAL_FILES = {
    "stage_c": ["stage_c.safetensors", "stage_c_bf16.safetensors", "stage_c_lite.safetensors", "stage_c_lite_bf16.safetensors"],
    "stage_b": ["stage_b.safetensors", "stage_b_bf16.safetensors", "stage_b_lite.safetensors", "stage_b_lite_bf16.safetensors"],
    "stage_a": ["stage_a.safetensors"],
    "effnet": ["effnet_encoder.safetensors"],
    "previewer": ["previewer.safetensors"],
    "controlnet": ["controlnet/canny.safetensors", "controlnet/inpainting.safetensors", "controlnet/super_resolution.safetensors"],
    "clip_text": ["text_encoder/model.safetensors"],
    "clip_vision": ["image_encoder/model.safetensors (stable-cascade-prior)"],
}

CONFIG_METADATA_KEY = "wuerstchen_config"


class CheckpointError(ValueError):
    """A file that is not the model the caller asked for, or whose tensors do not fit it."""


@dataclass
class Detection:
    """One network found in a file: what it is and where its keys live."""

    kind: str
    variant: str
    config: dict
    prefix: str = ""

    @property
    def title(self) -> str:
        return configs.VARIANT_TITLES.get((self.kind, self.variant), f"{KIND_TITLES[self.kind]} [{self.variant}]")


@dataclass
class LoadedModel:
    """A loaded network and what it is. ``module`` is in eval mode with grads off."""

    kind: str
    variant: str
    config: dict
    module: nn.Module
    path: Optional[Path] = None
    dtype: Optional[torch.dtype] = None

    @property
    def title(self) -> str:
        return Detection(self.kind, self.variant, self.config).title


# ----------------------------------------------------------------------------------------------
# Detection


def _has(shapes: Shapes, *keys: str) -> bool:
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
            raise CheckpointError(f"unrecognised block at {p}")
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
        raise CheckpointError("down/up block lists do not match")
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
    raise CheckpointError(f"cannot infer width at {p}")


def _match_official(table: dict, inferred: dict, keys: Sequence[str]) -> Optional[str]:
    for variant, cfg in table.items():
        if all(cfg[k] == inferred[k] for k in keys):
            return variant
    return None


def _detect_stage_c(shapes: Shapes, hint: Optional[dict] = None) -> Detection:
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
        return Detection("stage_c", variant, configs.official(configs.STAGE_C, variant))
    return _with_hint(Detection("stage_c", "custom", cfg), hint, structural)


def _detect_stage_b(shapes: Shapes, hint: Optional[dict] = None) -> Detection:
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
        return Detection("stage_b", variant, configs.official(configs.STAGE_B, variant))
    return _with_hint(Detection("stage_b", "custom", cfg), hint, structural)


def _detect_stage_a(shapes: Shapes) -> Detection:
    codebook_size, c_latent = shapes.get("vquantizer.codebook.weight") or shapes["vquantizer.embedding.weight"]
    c_first = shapes["in_block.1.weight"][0]
    # Down path: one ResBlock per level (convs between); the bottleneck ResBlocks sit in the up path.
    levels = len({k.split(".")[1] for k in shapes if k.startswith("down_blocks.") and k.endswith(".gammas")})
    n_up_res = len({k.split(".")[1] for k in shapes if k.startswith("up_blocks.") and k.endswith(".gammas")})
    cfg = dict(levels=levels, bottleneck_blocks=n_up_res - (levels - 1), c_hidden=c_first * 2 ** (levels - 1),
               c_latent=c_latent, codebook_size=codebook_size, scale_factor=0.43)
    variant = "official" if cfg == configs.STAGE_A else "custom"
    return Detection("stage_a", variant, cfg)


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


def _detect_effnet(shapes: Shapes, metadata_cfg: Optional[dict]) -> Detection:
    c_latent = shapes["mapper.0.weight"][0]
    setting = _effnet_setting(shapes, "backbone.")
    cfg = dict(c_latent=c_latent)
    if setting and [(s["input_channels"], s["out_channels"], s["num_layers"]) for s in setting] != _V2S_SETTING_CHANNELS:
        cfg["backbone_setting"] = setting
    if metadata_cfg and "backbone_setting" in metadata_cfg:
        cfg["backbone_setting"] = metadata_cfg["backbone_setting"]
    if shapes["mapper.0.weight"][1] != 1280:
        cfg["last_channel"] = shapes["mapper.0.weight"][1]
    return Detection("effnet", "official" if cfg == configs.EFFNET else "custom", cfg)


def _detect_previewer(shapes: Shapes) -> Detection:
    c_hidden, c_in = shapes["blocks.0.weight"][:2]
    last = max(_indices(shapes, r"blocks\.(\d+)\.weight"))
    cfg = dict(c_in=c_in, c_hidden=c_hidden, c_out=shapes[f"blocks.{last}.weight"][0])
    return Detection("previewer", "official" if cfg == configs.PREVIEWER else "custom", cfg)


def _detect_controlnet(shapes: Shapes, metadata_cfg: Optional[dict]) -> Detection:
    n_proj = len(_indices(shapes, r"projections\.(\d+)\."))
    c_proj = shapes["projections.0.2.weight"][0]
    if "backbone.0.0.weight" in shapes:
        mode, c_in = "effnet", shapes["backbone.0.0.weight"][1]
    elif "backbone.3.blocks.0.weight" in shapes:  # the residual conv blocks of the 'large' bottleneck
        mode, c_in = "large", shapes["backbone.0.weight"][1]
    else:
        mode, c_in = "simple", shapes["backbone.0.weight"][1]
    proj_blocks = None
    if metadata_cfg and "proj_blocks" in metadata_cfg:
        proj_blocks = list(metadata_cfg["proj_blocks"])
    elif n_proj == len(configs.CONTROLNET_PROJ_BLOCKS):
        proj_blocks = list(configs.CONTROLNET_PROJ_BLOCKS)
    if proj_blocks is None or len(proj_blocks) != n_proj:
        raise CheckpointError(
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
    return Detection("controlnet", variant, cfg)


def _meta_tensors(shapes: Shapes, prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith(prefix)}


def _detect_clip_text(shapes: Shapes, prefix: str, hint: Optional[dict] = None) -> Detection:
    from . import text

    heads = (hint or {}).get("num_attention_heads")
    sub = _meta_tensors(shapes, prefix)
    if "text_projection.weight" not in sub and "text_projection" not in sub:
        outside = _find_outside_projection(shapes, prefix)
        if outside is not None:
            key, transpose = outside
            shape = tuple(shapes[key])
            sub["text_projection.weight"] = torch.empty(shape[::-1] if transpose else shape, device="meta")
    try:
        cfg = text.config_from_state_dict(sub, heads=heads)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"a CLIP text encoder that Stable Cascade cannot use ({exc})") from None
    width = cfg["width"]
    variant = "bigG" if width == 1280 else ("CLIP-L" if width == 768 else "custom")
    return Detection("clip_text", variant, cfg, prefix)


def _detect_clip_vision(shapes: Shapes, prefix: str, hint: Optional[dict] = None) -> Detection:
    from . import vision

    heads = (hint or {}).get("num_attention_heads")
    try:
        cfg = vision.vision_config_from_state_dict(_meta_tensors(shapes, prefix), heads=heads)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"a CLIP image encoder that Stable Cascade cannot use ({exc})") from None
    proj = cfg["projection_dim"]
    variant = "ViT-L-14" if proj == 768 else ("ViT-bigG-14" if proj == 1280 else "custom")
    return Detection("clip_vision", variant, cfg, prefix)


def _find_outside_projection(shapes: Shapes, prefix: str) -> Optional[Tuple[str, bool]]:
    """ComfyUI-style checkpoints keep the text projection beside, not inside, the text tower."""
    parent = prefix
    for _ in range(4):
        for cand, transpose in ((parent + "text_projection.weight", False), (parent + "text_projection", True)):
            if cand in shapes:
                return cand, transpose
        if not parent:
            break
        parts = parent.rstrip(".").split(".")
        parent = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    return None


def _strip(shapes: Shapes, prefix: str) -> Dict[str, Tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _metadata_config(metadata: Mapping[str, str]) -> Dict[str, dict]:
    """Config hints a file may carry (``{kind: config}`` JSON): hyper-parameters that shapes cannot
    show, e.g. attention heads of small test models. Shapes are still checked against them."""
    raw = metadata.get(CONFIG_METADATA_KEY) if metadata else None
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in cfg.items() if isinstance(v, dict)} if isinstance(cfg, dict) else {}


def _with_hint(det: Detection, hint: Optional[dict], structural: Sequence[str]) -> Detection:
    """Use a metadata config when it agrees with everything the shapes tell."""
    if det.variant == "custom" and hint and all(hint.get(k) == det.config.get(k) for k in structural):
        return Detection(det.kind, det.variant, dict(hint), det.prefix)
    return det


def detect_parts(shapes: Shapes, metadata: Optional[Mapping[str, str]] = None) -> List[Detection]:
    """Every network in a state dict (one for a plain file, several for combined checkpoints)."""
    hints = _metadata_config(metadata or {})
    found: List[Detection] = []
    for prefix in _candidate_prefixes(shapes):
        sub = _strip(shapes, prefix)
        det = _detect_single(sub, hints)
        if det is not None:
            det.prefix = prefix + det.prefix
            found.append(det)
    # Text/vision towers live under arbitrary wrappers (text_encoder.clip_g.transformer., ...).
    seen_text = any(d.kind == "clip_text" for d in found)
    seen_vision = any(d.kind == "clip_vision" for d in found)
    for key in shapes:
        if not seen_text and key.endswith("text_model.embeddings.token_embedding.weight"):
            found.append(_detect_clip_text(shapes, key[: -len("text_model.embeddings.token_embedding.weight")],
                                           hints.get("clip_text")))
            seen_text = True
        if not seen_vision and key.endswith("vision_model.embeddings.class_embedding"):
            found.append(_detect_clip_vision(shapes, key[: -len("vision_model.embeddings.class_embedding")],
                                             hints.get("clip_vision")))
            seen_vision = True
    if not seen_text:
        for key in shapes:
            if key.endswith("token_embedding.weight") and key[: -len("token_embedding.weight")] + "ln_final.weight" in shapes:
                found.append(_detect_clip_text(shapes, key[: -len("token_embedding.weight")], hints.get("clip_text")))
                break
    return found


_WRAPPER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.", "vae.", "first_stage_model.",
                     "vae.encoder.", "vae.previewer.", "encoder.", "previewer.", "module.")


def _candidate_prefixes(shapes: Shapes) -> List[str]:
    present = []
    for p in _WRAPPER_PREFIXES:
        if p == "" or any(k.startswith(p) for k in shapes):
            present.append(p)
    return present


def _detect_single(shapes: Shapes, hints: Dict[str, dict]) -> Optional[Detection]:
    try:
        if _has(shapes, "clip_txt_mapper.weight", "clip_img_mapper.weight", "embedding.1.weight"):
            return _detect_stage_c(shapes, hints.get("stage_c"))
        if _has(shapes, "effnet_mapper.0.weight", "pixels_mapper.0.weight", "clip_mapper.weight"):
            return _detect_stage_b(shapes, hints.get("stage_b"))
        if _has(shapes, "in_block.1.weight") and ("vquantizer.codebook.weight" in shapes
                                                  or "vquantizer.embedding.weight" in shapes):
            return _detect_stage_a(shapes)
        if _has(shapes, "projections.0.0.weight", "projections.0.2.weight") and any(k.startswith("backbone.") for k in shapes):
            return _detect_controlnet(shapes, hints.get("controlnet"))
        if _has(shapes, "backbone.0.0.weight", "mapper.0.weight", "mapper.1.running_var"):
            return _detect_effnet(shapes, hints.get("effnet"))
        if _has(shapes, "blocks.0.weight", "blocks.2.running_mean") and "blocks.0.weight" in shapes and len(shapes["blocks.0.weight"]) == 4:
            return _detect_previewer(shapes)
    except (KeyError, StopIteration, IndexError) as exc:
        raise CheckpointError(f"the file looks like a Stable Cascade network but its layout is incomplete ({exc})") from None
    return None


def describe_foreign(shapes: Shapes) -> str:
    """A short guess at what a file we cannot use is, for error messages."""
    keys = list(shapes)
    joined = "\n".join(keys[:4000])

    def any_key(*needles):
        return any(n in joined for n in needles)

    if any_key("lora_down", "lora_up", "lora_A", "lora_B", ".alpha"):
        return "a LoRA (load it with the Wuerstchen LoRA loader, not as a model)"
    if any_key("projection.weight") and any_key("cond_mapper.0.weight") and any_key(".kv_mapper."):
        return "a Würstchen v2 prior (warp-ai/wuerstchen-prior), not Stable Cascade's Stage C"
    if any_key("clip_mapper.weight") and any_key("effnet_mappers."):
        return "a Würstchen v2 decoder (warp-ai/wuerstchen), not Stable Cascade's Stage B"
    if any_key("double_blocks.", "single_blocks."):
        return "a Flux model"
    if any_key("joint_blocks."):
        return "an SD3 model"
    if any_key("input_blocks.") and any_key("label_emb."):
        return "an SDXL UNet/checkpoint"
    if any_key("input_blocks.") and any_key("cond_stage_model."):
        return "a Stable Diffusion 1.x/2.x checkpoint"
    if any_key("input_blocks.", "middle_block."):
        return "a Stable Diffusion UNet"
    if any_key("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.up.0"):
        return "a VAE of another model family"
    if any_key("encoder.block.0.layer.0.SelfAttention", "shared.weight"):
        return "a T5 text encoder"
    if any_key("text_model.embeddings"):
        return "a CLIP text encoder"
    return "not a model this pack knows"


# ----------------------------------------------------------------------------------------------
# Building and loading


def build_module(kind: str, config: dict) -> nn.Module:
    """Construct an (unfilled) module of ``kind``; call under ``torch.device('meta')`` to skip init."""
    from . import models

    cfg = dict(config)
    if kind == "stage_c":
        return models.StageC(**cfg)
    if kind == "stage_b":
        return models.StageB(**cfg)
    if kind == "stage_a":
        return models.StageA(**cfg)
    if kind == "effnet":
        return models.EfficientNetEncoder(**cfg)
    if kind == "previewer":
        return models.Previewer(**cfg)
    if kind == "controlnet":
        return models.ControlNet(**cfg)
    raise CheckpointError(f"no module builder for {kind}")


def _check_shapes(module: nn.Module, shapes: Shapes, name: str, title: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{name}: the tensors do not fit {title}:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, e.g. " + ", ".join(f"{k} {list(expected[k])}" for k in missing[:5]))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, e.g. " + ", ".join(f"{k} {list(shapes[k])}" for k in unexpected[:5]))
    if wrong:
        lines.append("  shape mismatches, e.g. " + ", ".join(
            f"{k}: file {list(shapes[k])} vs model {list(expected[k])}" for k in wrong[:5]))
    raise CheckpointError("\n".join(lines))


def _accepted_list(kinds: Optional[Sequence[str]]) -> str:
    kinds = kinds or list(OFFICIAL_FILES)
    return "; ".join(f"{KIND_TITLES[k]}: {', '.join(OFFICIAL_FILES[k])}" for k in kinds)


def inspect(path: os.PathLike | str) -> List[Detection]:
    """What networks a file holds (raises WeightFileError for unreadable files)."""
    src = WeightSource(path)
    return detect_parts(src.shapes(), src.metadata)


def load(
    path: os.PathLike | str,
    *,
    kinds: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Load the one network of ``kinds`` (any known kind if None) that the file holds."""
    parts = load_parts(path, kinds=kinds, dtype=dtype, device=device)
    if kinds:
        for k in kinds:
            if k in parts:
                return parts[k]
    return next(iter(parts.values()))


def load_parts(
    path: os.PathLike | str,
    *,
    kinds: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
) -> Dict[str, LoadedModel]:
    """Load every network of ``kinds`` found in the file (combined checkpoints hold several)."""
    path = Path(path)
    try:
        src = WeightSource(path)
    except WeightFileError as exc:
        raise CheckpointError(str(exc)) from None
    shapes = src.shapes()
    try:
        parts = detect_parts(shapes, src.metadata)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    wanted = [p for p in parts if kinds is None or p.kind in kinds]
    if not wanted:
        if parts:
            what = " + ".join(p.title for p in parts)
        else:
            what = describe_foreign(shapes)
        expected = ", ".join(KIND_TITLES[k] for k in kinds) if kinds else "a Stable Cascade network"
        raise CheckpointError(
            f"{path.name}: expected {expected}, but this file looks like {what}. "
            f"Files accepted here: {_accepted_list(kinds)}."
        )
    loaded: Dict[str, LoadedModel] = {}
    for det in wanted:
        if det.kind in loaded:
            continue
        try:  # wrong dtypes, NaN/inf values, a file cut short while reading
            loaded[det.kind] = _load_detection(src, path, shapes, det, dtype, device)
        except WeightFileError as exc:
            raise CheckpointError(str(exc)) from None
    return loaded


def _load_detection(src: WeightSource, path: Path, shapes: Shapes, det: Detection, dtype, device) -> LoadedModel:
    if det.kind in ("clip_text", "clip_vision"):
        keys = [k for k in shapes if k.startswith(det.prefix)]
        src.check_floating([k for k in keys if not _ignorable(k)], det.title)
        sd = src.read(keys, dtype=dtype, device=device, strip_prefix=det.prefix)
        try:
            if det.kind == "clip_text":
                from .text import CLIPTextEncoder

                outside = None if ("text_projection.weight" in sd or "text_projection" in sd) else \
                    _find_outside_projection(shapes, det.prefix)
                if outside is not None:
                    key, transpose = outside
                    t = src.read([key], dtype=dtype, device=device)[key]
                    sd["text_projection.weight"] = t.t().contiguous() if transpose else t
                module = CLIPTextEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=det.config["heads"])
            else:
                from .vision import CLIPVisionEncoder

                module = CLIPVisionEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=det.config["heads"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path.name}: cannot load {det.title}: {exc}") from None
        return _finish(LoadedModel(det.kind, det.variant, det.config, module, path), dtype)

    sub_shapes = _strip(shapes, det.prefix)
    try:
        with torch.device("meta"):
            module = build_module(det.kind, det.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path.name}: cannot build {det.title} from the config read off its shapes ({exc}); a "
            f"non-official model needs its config in the file's '{CONFIG_METADATA_KEY}' metadata"
        ) from None
    module_keys = list(module.state_dict().keys())
    # File key for each module key (diffusers' VQGAN names the codebook differently).
    file_key = {k: _ALIASES.get(k, k) if _ALIASES.get(k, k) in sub_shapes and k not in sub_shapes else k
                for k in module_keys}
    renamed = {next((m for m, f in file_key.items() if f == k), k): v for k, v in sub_shapes.items()}
    _check_shapes(module, {k: v for k, v in renamed.items() if not _ignorable(k)}, path.name, det.title)
    expected = module.state_dict()
    src.check_floating([det.prefix + file_key[k] for k in module_keys if expected[k].is_floating_point()], det.title)
    raw = src.read([det.prefix + file_key[k] for k in module_keys], dtype=dtype, device=device, strip_prefix=det.prefix)
    sd = {k: raw[file_key[k]] for k in module_keys}
    module.load_state_dict(sd, strict=True, assign=True)
    _materialize_leftover_meta(module, device)
    return _finish(LoadedModel(det.kind, det.variant, det.config, module, path), dtype)


# Our key -> another layout's spelling of the same tensor.
_ALIASES = {"vquantizer.codebook.weight": "vquantizer.embedding.weight"}


def _ignorable(key: str) -> bool:
    return key.endswith("position_ids")


def _materialize_leftover_meta(module: nn.Module, device) -> None:
    """Every buffer must have come from the file: none may be left on the meta device."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                raise CheckpointError(f"buffer {name} of {type(mod).__name__} was not filled from the file")


def _finish(model: LoadedModel, dtype) -> LoadedModel:
    model.module.eval()
    model.module.requires_grad_(False)
    first = next((p for p in model.module.parameters()), None)
    model.dtype = first.dtype if first is not None else dtype
    return model
