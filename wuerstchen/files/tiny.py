"""Tiny random checkpoints in every official layout, under the official file names.

For smoke runs, tests and demos without the real weights: each file has the real key layout
(so our loaders identify it exactly as they identify the release) but tiny widths, and carries
the few hyper-parameters that shapes cannot show in its safetensors metadata. The images these
make are noise; they only prove that the whole cascade runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .checkpoints import CONFIG_METADATA_KEY, build_module
from .kinds import BUNDLES, KINDS, STABLE_CASCADE
from ..storage.weights_io import save_safetensors

TEXT = dict(vocab_size=49408, hidden_size=24, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
VISION = dict(hidden_size=32, intermediate_size=64, projection_dim=20, num_hidden_layers=2, num_attention_heads=4,
              image_size=224, patch_size=14, hidden_act="quick_gelu")

STAGE_C = dict(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=32, c_hidden=[32, 32], nhead=[2, 2],
               blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
               c_clip_text=TEXT["hidden_size"], c_clip_text_pooled=TEXT["projection_dim"],
               c_clip_img=VISION["projection_dim"], c_clip_seq=4, kernel_size=3, dropout=[0, 0], self_attn=True,
               t_conds=["sca", "crp"], switch_level=[False])
STAGE_C_LITE = dict(STAGE_C, c_cond=24, c_hidden=[24, 24], nhead=[2, 2])
STAGE_B = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=24, c_hidden=[8, 16, 24, 24], nhead=[-1, -1, 2, 2],
               blocks=[[1, 1, 1, 1], [1, 1, 1, 1]], block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]],
               level_config=["CT", "CT", "CTA", "CTA"], c_clip=TEXT["projection_dim"], c_clip_seq=4, c_effnet=16,
               c_pixels=3, kernel_size=3, dropout=[0, 0, 0, 0], self_attn=True, t_conds=["sca"])
STAGE_B_LITE = dict(STAGE_B, c_hidden=[8, 12, 16, 16])
STAGE_A = dict(levels=2, bottleneck_blocks=2, c_hidden=16, c_latent=4, codebook_size=32, scale_factor=0.43)
EFFNET_SETTING = [
    dict(block="FusedMBConv", expand_ratio=1, kernel=3, stride=1, input_channels=8, out_channels=8, num_layers=1),
    dict(block="FusedMBConv", expand_ratio=2, kernel=3, stride=2, input_channels=8, out_channels=8, num_layers=1),
    dict(block="FusedMBConv", expand_ratio=2, kernel=3, stride=2, input_channels=8, out_channels=16, num_layers=1),
    dict(block="MBConv", expand_ratio=2, kernel=3, stride=2, input_channels=16, out_channels=16, num_layers=1),
    dict(block="MBConv", expand_ratio=2, kernel=3, stride=1, input_channels=16, out_channels=16, num_layers=1),
    dict(block="MBConv", expand_ratio=2, kernel=3, stride=2, input_channels=16, out_channels=24, num_layers=1),
]
EFFNET = dict(c_latent=16, backbone_setting=EFFNET_SETTING, last_channel=32)
PREVIEWER = dict(c_in=16, c_hidden=32, c_out=3)
# The tiny Stage C makes 4 ResBlock calls (one per level, down then up).
_PROJ = [0, 1, 2, 3]
CONTROLNETS = {
    "canny": dict(c_in=1, c_proj=32, proj_blocks=_PROJ, bottleneck_mode="effnet", backbone_setting=EFFNET_SETTING,
                  embd_channels=32),
    "inpainting": dict(c_in=4, c_proj=32, proj_blocks=_PROJ, bottleneck_mode="effnet",
                       backbone_setting=EFFNET_SETTING, embd_channels=32),
    "super_resolution": dict(c_in=16, c_proj=32, proj_blocks=_PROJ, bottleneck_mode="large", large_hidden=[16, 16],
                             embd_channels=16),
}

# Würstchen v2. The original .pt files carry no metadata, so these tiny sizes keep the released rule
# for what shapes cannot show (heads = width / 64, at least 1; dropout 0.1).
V2_PRIOR_TEXT = dict(vocab_size=49408, hidden_size=24, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
V2_DECODER_TEXT = dict(V2_PRIOR_TEXT, hidden_size=16, intermediate_size=32, num_attention_heads=2)
V2_PRIOR = dict(c_in=16, c=32, c_cond=V2_PRIOR_TEXT["hidden_size"], c_r=64, depth=2, nhead=1, dropout=0.1)
V2_DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=16, c_hidden=[8, 16, 24, 24], nhead=[-1, 1, 1, 1],
                  blocks=[1, 1, 1, 1], level_config=["CT", "CTA", "CTA", "CTA"],
                  inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=V2_DECODER_TEXT["hidden_size"],
                  kernel_size=3, dropout=0.1)
V2_EFFNET = dict(EFFNET, family="v2")

LORA_FORMATS = ("official", "kohya", "onetrainer", "diffusers")
# The workflow lora.json loads this name.
LORA_WORKFLOW_FILE = "wuerstchen_tiny_lora.safetensors"


def _random_module_state(kind: str, config: dict, seed: int) -> Dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    module = build_module(kind, config)
    state = {}
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in module.state_dict().items():
        v = value.detach().clone()
        if v.is_floating_point():
            if key.endswith("running_var"):
                v = torch.rand(v.shape, generator=gen) + 0.5
            elif torch.count_nonzero(v) == 0:
                v = torch.randn(v.shape, generator=gen) * 0.05
        state[key] = v.contiguous()
    return state


def _hf_clip_state(prefix: str, cfg: dict, seed: int, vision: bool) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w, m = cfg["hidden_size"], cfg["intermediate_size"]

    def rnd(*shape, scale=0.05):
        return torch.randn(shape, generator=gen) * scale

    def norm(name):
        return {f"{name}.weight": 1 + rnd(w, scale=0.1), f"{name}.bias": rnd(w, scale=0.1)}

    sd: Dict[str, torch.Tensor] = {}
    if vision:
        n_pos = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
        p = cfg["patch_size"]
        sd.update({
            f"{prefix}embeddings.class_embedding": rnd(w, scale=0.5),
            f"{prefix}embeddings.patch_embedding.weight": rnd(w, 3, p, p, scale=0.05),
            f"{prefix}embeddings.position_embedding.weight": rnd(n_pos, w, scale=0.5),
        })
        sd.update(norm(f"{prefix}pre_layrnorm"))
    else:
        sd.update({
            f"{prefix}embeddings.token_embedding.weight": rnd(cfg["vocab_size"], w, scale=0.5),
            f"{prefix}embeddings.position_embedding.weight": rnd(cfg["max_position_embeddings"], w, scale=0.5),
        })
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{lp}self_attn.{proj}.weight"] = rnd(w, w, scale=0.3)
            sd[f"{lp}self_attn.{proj}.bias"] = rnd(w, scale=0.1)
        sd.update(norm(f"{lp}layer_norm1"))
        sd.update(norm(f"{lp}layer_norm2"))
        sd[f"{lp}mlp.fc1.weight"] = rnd(m, w, scale=0.3)
        sd[f"{lp}mlp.fc1.bias"] = rnd(m, scale=0.1)
        sd[f"{lp}mlp.fc2.weight"] = rnd(w, m, scale=0.3)
        sd[f"{lp}mlp.fc2.bias"] = rnd(w, scale=0.1)
    if vision:
        sd.update(norm(f"{prefix}post_layernorm"))
    else:
        sd.update(norm(f"{prefix}final_layer_norm"))
    return sd


def text_encoder_state(seed: int = 0, prefix: str = "") -> Dict[str, torch.Tensor]:
    sd = _hf_clip_state(prefix + "text_model.", TEXT, seed, vision=False)
    sd[prefix + "text_projection.weight"] = torch.randn(TEXT["projection_dim"], TEXT["hidden_size"],
                                                        generator=torch.Generator().manual_seed(seed + 7)) * 0.3
    return sd


def vision_encoder_state(seed: int = 0, prefix: str = "") -> Dict[str, torch.Tensor]:
    sd = _hf_clip_state(prefix + "vision_model.", VISION, seed, vision=True)
    sd[prefix + "visual_projection.weight"] = torch.randn(VISION["projection_dim"], VISION["hidden_size"],
                                                          generator=torch.Generator().manual_seed(seed + 9)) * 0.3
    return sd


def _meta(**configs) -> Dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps(configs)}


def _prefixed(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _cast(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}


# The tiny config of each (kind, variant) of the release; kinds.KINDS says which files hold which.
TINY_CONFIGS = {
    ("stage_c", "full"): STAGE_C, ("stage_c", "lite"): STAGE_C_LITE,
    ("stage_b", "full"): STAGE_B, ("stage_b", "lite"): STAGE_B_LITE,
    ("stage_a", "official"): STAGE_A, ("effnet", "official"): EFFNET, ("previewer", "official"): PREVIEWER,
    ("clip_text", "bigG"): TEXT, ("clip_vision", "ViT-L-14"): VISION,
    **{("controlnet", name): cfg for name, cfg in CONTROLNETS.items()},
    ("v2_prior", "official"): V2_PRIOR, ("v2_decoder", "official"): V2_DECODER, ("v2_effnet", "official"): V2_EFFNET,
    ("v2_prior_text", "bigG"): V2_PRIOR_TEXT, ("v2_decoder_text", "ViT-H-14"): V2_DECODER_TEXT,
}


def tiny_state(kind: str, variant: str, seed: int) -> Dict[str, torch.Tensor]:
    """Random tensors in the official layout of ``kind``'s ``variant``, at its tiny size (float32)."""
    config = TINY_CONFIGS[(kind, variant)]
    if kind == "clip_text":
        return text_encoder_state(seed)
    if kind == "clip_vision":
        return vision_encoder_state(seed)
    if kind in ("v2_prior_text", "v2_decoder_text"):  # CLIPTextModel: no projection
        return _hf_clip_state("text_model.", config, seed, vision=False)
    return _random_module_state(kind, config, seed)


def _save_pickled(tensors_by_container: Dict[str, Dict[str, torch.Tensor]], path: Path) -> None:
    """An original-style ``.pt`` file: a dict of plain tensor dicts (what ``torch.load(weights_only=True)`` reads)."""
    torch.save({name: dict(state) for name, state in tensors_by_container.items()}, str(path))


def write_tiny_models(root, seed: int = 0, families: Optional[Sequence[str]] = None) -> List[Path]:
    """Write the whole tiny release under ``root`` (every official file name in its layout and key
    spelling, ComfyUI's single-file checkpoints, and the original Würstchen v2 ``.pt`` files as dicts
    of tensor dicts); returns the written paths. ``families``: only those families' files (and LoRAs
    only with Stable Cascade's)."""
    root = Path(root)
    written: List[Path] = []
    bundle_names = {b.name for b in BUNDLES}

    def target(rel: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(path)
        return path

    def save(rel: str, state, metadata=None):
        save_safetensors(state, target(rel), metadata=metadata)

    states: Dict[tuple, Dict[str, torch.Tensor]] = {}

    def state_of(kind_name: str, variant: str) -> Dict[str, torch.Tensor]:
        if (kind_name, variant) not in states:
            states[(kind_name, variant)] = tiny_state(kind_name, variant, seed + len(states))
        return states[(kind_name, variant)]

    def wanted(family: str) -> bool:
        return families is None or family in families

    for kind in KINDS.values():
        for file in kind.files:
            if file.name in bundle_names or not wanted(kind.family_of(file)):
                continue
            state = _cast(state_of(kind.name, file.variant), file.dtype)
            if file.spelling:
                state = kind.spellings[file.spelling](state)
            if file.container:
                _save_pickled({file.container: state}, target(file.name))
            else:
                save(file.name, state, _meta(**{kind.name: TINY_CONFIGS[(kind.name, file.variant)]}))

    for bundle in BUNDLES:
        if not wanted(KINDS[next(iter(bundle.parts))].family):
            continue
        parts, hints = {}, {}
        for kind_name, prefix in bundle.parts.items():
            variant = KINDS[kind_name].files[0].variant
            parts[prefix] = _cast(state_of(kind_name, variant), bundle.dtype)
            hints[kind_name] = TINY_CONFIGS[(kind_name, variant)]
        if bundle.name.endswith(".pt"):  # each part under its container key
            _save_pickled({prefix.rstrip("."): state for prefix, state in parts.items()}, target(bundle.name))
        else:
            state = {k: v for prefix, part in parts.items() for k, v in _prefixed(part, prefix).items()}
            save(bundle.name, state, _meta(**hints))

    if wanted(STABLE_CASCADE):
        written.extend(write_tiny_loras(root, seed=seed + 40))
    return written


def write_tiny_loras(folder, seed: int = 0) -> List[Path]:
    """One tiny Stage C LoRA per supported format (the official one under the workflow's name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, fmt in enumerate(LORA_FORMATS):
        name = LORA_WORKFLOW_FILE if fmt == "official" else f"wuerstchen_tiny_lora_{fmt}.safetensors"
        path = folder / name
        write_tiny_lora(path, fmt, STAGE_C, rank=2, seed=seed + i, text_config=TEXT)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Tiny LoRAs in every naming scheme


def _stage_c_shapes(stage_c) -> Dict[str, tuple]:
    """Parameter shapes, in model order, of a StageC module or of a StageC config built on meta."""
    from torch import nn

    if isinstance(stage_c, nn.Module):
        return {n: tuple(p.shape) for n, p in stage_c.named_parameters()}
    from ..models.stage_c import StageC

    with torch.device("meta"):
        model = StageC(**stage_c)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _tiny_stage_c_targets(shapes) -> list:
    """Every attention q/k/v/out, plus one of each other kind of layer (linear and 1x1 conv)."""
    import re

    from ..lora.formats import ModuleTarget, official_lora_modules

    targets = []
    for name in official_lora_modules(shapes, (".attn",)):
        if name.endswith(".in_proj_weight"):
            attn = name[: -len(".in_proj_weight")]
            for q in range(3):
                targets.append(ModuleTarget("stage_c", f"{attn}.in_proj", name, f"{attn}.in_proj_bias", q))
        else:
            module = name[: -len(".weight")]
            targets.append(ModuleTarget("stage_c", module, name, f"{module}.bias"))
    wanted = [r"\.kv_mapper\.1$", r"\.channelwise\.0$", r"\.channelwise\.4$", r"\.\d+\.mapper$",
              r"\.\d+\.mapper_[a-z0-9]+$", r"^embedding\.1$", r"^clip_txt_mapper$"]
    modules = [n[: -len(".weight")] for n in official_lora_modules(shapes, ("",)) if n.endswith(".weight")]
    for pattern in wanted:
        for module in modules:
            if re.search(pattern, module):
                targets.append(ModuleTarget("stage_c", module, f"{module}.weight", f"{module}.bias"))
                break
    return targets


def _tiny_text_targets(text_config) -> list:
    from ..lora.formats import ModuleTarget

    width = int(text_config["hidden_size"])
    mlp = int(text_config.get("intermediate_size", 4 * width))
    proj = int(text_config.get("projection_dim", width))
    out = []
    for layer in range(int(text_config["num_hidden_layers"])):
        base = f"text_model.encoder.layers.{layer}"
        for sub, o, i in (("self_attn.q_proj", width, width), ("self_attn.k_proj", width, width),
                          ("self_attn.v_proj", width, width), ("self_attn.out_proj", width, width),
                          ("mlp.fc1", mlp, width), ("mlp.fc2", width, mlp)):
            module = f"{base}.{sub}"
            out.append((ModuleTarget("text", module, f"{module}.weight", f"{module}.bias"), o, i))
    out.append((ModuleTarget("text", "text_projection", "text_projection.weight", ""), proj, width))
    return out


def write_tiny_lora(path, fmt: str, stage_c_config, rank: int = 2, seed: int = 0,
                    text_config=None) -> Dict[str, torch.Tensor]:
    """Write a small random LoRA for ``stage_c_config`` (a StageC config dict or module) in ``fmt``.

    ``fmt`` is one of :data:`wuerstchen.lora.FORMATS`. The official format covers what the
    official trainer targets (every attention ``in_proj`` and ``out_proj``); the others cover
    q/k/v/out of every attention block plus one kv_mapper, ResBlock linear, TimestepBlock mapper,
    1x1 conv and the text mapper. With ``text_config`` (Hugging Face CLIPTextConfig names:
    hidden_size, intermediate_size, num_hidden_layers, projection_dim) text-encoder LoRAs and
    learned tokens are added too. Returns the tensors; writes them as safetensors when ``path``
    is given.
    """
    from ..lora.formats import CLIP_VOCAB_SIZE, OFFICIAL_EMBEDDINGS, OFFICIAL_INDICES, format_module_name, \
        official_lora_modules
    from ..lora.parse import FORMATS

    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    shapes = _stage_c_shapes(stage_c_config)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    out: Dict[str, torch.Tensor] = {}
    if fmt == "official":
        for i, name in enumerate(official_lora_modules(shapes)):
            shape = shapes[name]
            out[f"weights.{i}.lora_down"] = randn(rank, shape[1])
            out[f"weights.{i}.lora_up"] = randn(shape[0], rank)
        if text_config is not None:
            width = int(text_config["hidden_size"])
            vocab = int(text_config.get("vocab_size", CLIP_VOCAB_SIZE))
            out[OFFICIAL_EMBEDDINGS] = randn(2, width)
            out[OFFICIAL_INDICES] = torch.tensor([min(320, vocab - 1), CLIP_VOCAB_SIZE], dtype=torch.int64)
        _save_lora(out, path, fmt)
        return out

    # kohya writes alpha (scale alpha/rank), OneTrainer too; peft files usually carry none.
    alpha = {"kohya": rank / 2, "onetrainer": 1.0, "diffusers": None, "comfyui": None}[fmt]
    down_key, up_key = (("lora_A.weight", "lora_B.weight") if fmt == "diffusers"
                        else ("lora_down.weight", "lora_up.weight"))
    entries = []
    for target in _tiny_stage_c_targets(shapes):
        shape = shapes[target.weight]
        out_f = shape[0] // 3 if target.qkv is not None else shape[0]
        entries.append((target, out_f, tuple(shape[1:])))
    if text_config is not None:
        entries += [(t, o, (i,)) for t, o, i in _tiny_text_targets(text_config)]
    for target, out_f, inner in entries:
        key = format_module_name(fmt, target)
        conv = len(inner) > 1
        out[f"{key}.{down_key}"] = randn(rank, *inner) if conv else randn(rank, inner[0])
        out[f"{key}.{up_key}"] = randn(out_f, rank, *([1] * (len(inner) - 1))) if conv else randn(out_f, rank)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    if text_config is not None and fmt == "onetrainer":
        out["bundle_emb.tinytoken.clip_g"] = randn(2, int(text_config["hidden_size"]))
    _save_lora(out, path, fmt)
    return out


def _save_lora(tensors: Dict[str, torch.Tensor], path, fmt: str) -> None:
    if path is not None:
        save_safetensors(tensors, path, metadata={"wuerstchen_tiny_lora_format": fmt})
