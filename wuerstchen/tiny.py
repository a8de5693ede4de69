"""Tiny random checkpoints in every official layout, under the official file names.

For smoke runs, tests and demos without the real weights: each file has the real key layout
(so our loaders identify it exactly as they identify the release) but tiny widths, and carries
the few hyper-parameters that shapes cannot show in its safetensors metadata. The images these
make are noise; they only prove that the whole cascade runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from .checkpoints import CONFIG_METADATA_KEY, build_module
from .kinds import BUNDLES, KINDS
from .weights_io import save_safetensors

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
}


def tiny_state(kind: str, variant: str, seed: int) -> Dict[str, torch.Tensor]:
    """Random tensors in the official layout of ``kind``'s ``variant``, at its tiny size (float32)."""
    config = TINY_CONFIGS[(kind, variant)]
    if kind == "clip_text":
        return text_encoder_state(seed)
    if kind == "clip_vision":
        return vision_encoder_state(seed)
    return _random_module_state(kind, config, seed)


def write_tiny_models(root, seed: int = 0) -> List[Path]:
    """Write the whole tiny release under ``root`` (every official file name, and ComfyUI's
    single-file checkpoints); returns the written paths."""
    root = Path(root)
    written: List[Path] = []

    def save(rel: str, state, metadata=None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, path, metadata=metadata)
        written.append(path)

    states: Dict[tuple, Dict[str, torch.Tensor]] = {}
    for kind in KINDS.values():
        for file in kind.files:
            key = (kind.name, file.variant)
            if key not in states:
                states[key] = tiny_state(kind.name, file.variant, seed + len(states))
            save(file.name, _cast(states[key], file.dtype), _meta(**{kind.name: TINY_CONFIGS[key]}))

    for bundle in BUNDLES:
        state, hints = {}, {}
        for kind_name, prefix in bundle.parts.items():
            variant = KINDS[kind_name].files[0].variant
            state.update(_prefixed(states[(kind_name, variant)], prefix))
            hints[kind_name] = TINY_CONFIGS[(kind_name, variant)]
        save(bundle.name, _cast(state, bundle.dtype), _meta(**hints))

    written.extend(write_tiny_loras(root, seed=seed + 40))
    return written


def write_tiny_loras(folder, seed: int = 0) -> List[Path]:
    """One tiny Stage C LoRA per supported format (the official one under the workflow's name)."""
    from . import lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, fmt in enumerate(LORA_FORMATS):
        name = LORA_WORKFLOW_FILE if fmt == "official" else f"wuerstchen_tiny_lora_{fmt}.safetensors"
        path = folder / name
        lora.write_tiny_lora(path, fmt, STAGE_C, rank=2, seed=seed + i, text_config=TEXT)
        paths.append(path)
    return paths
