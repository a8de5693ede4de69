"""Compare our LoRA weights with ComfyUI's own LoRA code on the same files (not part of CI).

Writes LoRA files of every kind ComfyUI reads (LoRA, LoCon with a Tucker core, LoHa with and
without Tucker cores, LoKr whole / factored / Tucker, DoRA on rows and on columns, full diffs of
weights and biases) for the tiny Stage C and the tiny CLIP-G, applies each with our
``apply_loras`` and with ComfyUI's ``comfy.lora.load_lora`` + ``calculate_weight``, and prints
JSON with the largest difference per file. ComfyUI keeps q/k/v as separate weights; ours are rows
of one fused tensor, compared row block by row block.

Run with ComfyUI's environment, e.g.::

    /work/comfy/venv/bin/python tools/comfy_lora_parity.py --comfy /work/comfy/ComfyUI
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def comfy_stage_c_state(ours: dict) -> dict:
    """Our StageC state dict in ComfyUI's layout (q/k/v split, ``diffusion_model.`` prefix)."""
    out = {}
    for key, value in ours.items():
        if key.endswith(".attn.in_proj_weight") or key.endswith(".attn.in_proj_bias"):
            head, kind = key.rsplit(".in_proj_", 1)
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"diffusion_model.{head}.{part}.{kind}"] = chunk
        else:
            out[f"diffusion_model.{key}"] = value
    return out


def ours_in_comfy_layout(model, part: str) -> dict:
    if part == "stage_c":
        return comfy_stage_c_state({k: v.detach() for k, v in model.state_dict().items()})
    from wuerstchen.text.encoder import hf_text_key_names

    params = dict(model.named_parameters())
    out = {}
    for hf in hf_text_key_names(len(model.transformer.resblocks)):
        name, rows = model.hf_key_to_param(hf)
        value = params[name].detach()
        out["clip_g.transformer." + hf] = value if rows is None else value[rows]
    return out


def cases(stage_c_sd, text_sd, rank=2, seed=0):
    """name -> (part, LoRA state dict, strength)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    lin, conv, wide, q = ("lora_unet_clip_txt_mapper", "lora_unet_down_blocks_0_0_depthwise",
                          "lora_prior_unet_down_blocks_0_0_channelwise_0", "lora_unet_down_blocks_0_2_attention_attn_to_q")
    o_lin, i_lin = stage_c_sd["clip_txt_mapper.weight"].shape
    c = stage_c_sd["down_blocks.0.0.depthwise.weight"].shape[0]
    o_w, i_w = stage_c_sd["down_blocks.0.0.channelwise.0.weight"].shape
    width = stage_c_sd["down_blocks.0.2.attention.attn.in_proj_weight"].shape[1]
    from wuerstchen.files.tiny import STAGE_C, TEXT, write_tiny_lora

    out = {
        "kohya lora": ("stage_c", write_tiny_lora(None, "kohya", STAGE_C, rank=rank, seed=1), 0.7),
        "onetrainer lora": ("stage_c", write_tiny_lora(None, "onetrainer", STAGE_C, rank=rank, seed=2), -1.3),
        "locon tucker": ("stage_c", {f"{conv}.lora_up.weight": rnd(c, rank, 1, 1), f"{conv}.lora_down.weight": rnd(rank, 1, 1, 1),
                                     f"{conv}.lora_mid.weight": rnd(rank, rank, 3, 3), f"{conv}.alpha": torch.tensor(1.0)}, 0.8),
        "loha": ("stage_c", {f"{lin}.hada_w1_a": rnd(o_lin, rank), f"{lin}.hada_w1_b": rnd(rank, i_lin),
                             f"{lin}.hada_w2_a": rnd(o_lin, rank), f"{lin}.hada_w2_b": rnd(rank, i_lin),
                             f"{lin}.alpha": torch.tensor(3.0)}, 0.9),
        "loha tucker": ("stage_c", {f"{conv}.hada_t1": rnd(rank, rank, 3, 3), f"{conv}.hada_w1_a": rnd(rank, c),
                                    f"{conv}.hada_w1_b": rnd(rank, 1), f"{conv}.hada_t2": rnd(rank, rank, 3, 3),
                                    f"{conv}.hada_w2_a": rnd(rank, c), f"{conv}.hada_w2_b": rnd(rank, 1)}, 1.0),
        "lokr factored w2": ("stage_c", {f"{wide}.lokr_w1": rnd(8, 4), f"{wide}.lokr_w2_a": rnd(o_w // 8, rank),
                                         f"{wide}.lokr_w2_b": rnd(rank, i_w // 4), f"{wide}.alpha": torch.tensor(1.0)}, 0.5),
        "lokr whole": ("stage_c", {f"{q}.lokr_w1": rnd(4, 2), f"{q}.lokr_w2": rnd(width // 4, width // 2)}, 1.0),
        "lokr tucker": ("stage_c", {f"{conv}.lokr_w1_a": rnd(4, rank), f"{conv}.lokr_w1_b": rnd(rank, 1),
                                    f"{conv}.lokr_t2": rnd(rank, rank, 3, 3), f"{conv}.lokr_w2_a": rnd(rank, c // 4),
                                    f"{conv}.lokr_w2_b": rnd(rank, 1), f"{conv}.alpha": torch.tensor(4.0)}, 0.6),
        "dora rows": ("stage_c", {f"{lin}.lora_up.weight": rnd(o_lin, rank), f"{lin}.lora_down.weight": rnd(rank, i_lin),
                                  f"{lin}.dora_scale": 1 + rnd(o_lin, 1), f"{lin}.alpha": torch.tensor(1.0)}, 0.6),
        "dora columns": ("stage_c", {f"{q}.hada_w1_a": rnd(width, rank), f"{q}.hada_w1_b": rnd(rank, width),
                                     f"{q}.hada_w2_a": rnd(width, rank), f"{q}.hada_w2_b": rnd(rank, width),
                                     f"{q}.dora_scale": 1 + rnd(1, width)}, 1.0),
        "dora columns strength": ("stage_c", {f"{lin}.lora_up.weight": rnd(o_lin, rank),
                                              f"{lin}.lora_down.weight": rnd(rank, i_lin),
                                              f"{lin}.dora_scale": 1 + rnd(1, i_lin)}, 0.4),
        "comfyui full diff": ("stage_c", {
            "diffusion_model.down_blocks.0.2.attention.attn.to_k.diff": rnd(width, width),
            "diffusion_model.down_blocks.0.2.attention.attn.to_k.diff_b": rnd(width),
            "diffusion_model.down_blocks.0.0.channelwise.0.diff": rnd(o_w, i_w)}, 0.3),
        "kohya text": ("text", {k: v for k, v in write_tiny_lora(None, "kohya", STAGE_C, text_config=TEXT, seed=3).items()
                                if k.startswith("lora_te_")}, 0.75),
    }
    te = "text_encoders.clip_g.transformer.text_model"
    h = text_sd["text_model.encoder.layers.0.self_attn.q_proj.weight"].shape[0]
    out["comfyui extract text"] = ("text", {
        f"{te}.encoder.layers.1.self_attn.v_proj.lora_up.weight": rnd(h, rank),
        f"{te}.encoder.layers.1.self_attn.v_proj.lora_down.weight": rnd(rank, h),
        f"{te}.encoder.layers.0.mlp.fc1.diff_b": rnd(text_sd["text_model.encoder.layers.0.mlp.fc1.bias"].shape[0]),
        f"{te}.final_layer_norm.diff": rnd(h), f"{te}.final_layer_norm.diff_b": rnd(h)}, 1.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", default="/work/comfy/ComfyUI", help="ComfyUI checkout")
    args = ap.parse_args()
    sys.path[:0] = [str(REPO), args.comfy]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.lora
    import comfy.model_base

    from wuerstchen.files import tiny
    from wuerstchen.lora import apply_loras, parse_lora
    from wuerstchen.models.stage_c import StageC
    from wuerstchen.text.encoder import CLIPTextEncoder

    stage_c_sd = tiny._random_module_state("stage_c", tiny.STAGE_C, 0)
    stage_c = StageC(**tiny.STAGE_C)
    stage_c.load_state_dict(stage_c_sd)
    text_sd = tiny.text_encoder_state(7)
    text = CLIPTextEncoder.from_state_dict(text_sd, heads=tiny.TEXT["num_attention_heads"])

    class FakeC(comfy.model_base.StableCascade_C):
        def __init__(self, sd):  # no nn.Module set-up: only what the key map reads
            self._sd = sd
            self.model_config = type("Config", (), {"unet_config": {}})()

        def state_dict(self):
            return self._sd

    class FakeClip:
        def __init__(self, sd):
            self._sd = sd

        def state_dict(self):
            return self._sd

    comfy_c = comfy_stage_c_state(stage_c_sd)
    comfy_text = {"clip_g.transformer." + k: v for k, v in text_sd.items()}
    key_maps = {"stage_c": comfy.lora.model_lora_keys_unet(FakeC(comfy_c), {}),
                "text": comfy.lora.model_lora_keys_clip(FakeClip(comfy_text), {})}
    bases = {"stage_c": comfy_c, "text": ours_in_comfy_layout(text, "text")}
    models = {"stage_c": stage_c, "text": text}
    errors = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    report = {}
    for name, (part, lora_sd, strength) in cases(stage_c_sd, text_sd).items():
        errors.clear()
        patches = comfy.lora.load_lora(lora_sd, key_maps[part], log_missing=False)
        theirs = {}
        for key, patch in patches.items():
            weight = bases[part][key].to(torch.float32, copy=True)
            theirs[key] = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], weight, key)
        lora = parse_lora(lora_sd, name=name)
        with apply_loras(models[part], [(lora, strength)], part=part):
            ours = ours_in_comfy_layout(models[part], part)
        changed = {k for k in ours if not torch.equal(ours[k], bases[part][k])}
        entry = {"comfy_keys": len(theirs), "our_changed_keys": len(changed),
                 "max_abs_diff": max((float((ours[k].float() - theirs[k]).abs().max()) for k in theirs), default=0.0)}
        if changed - set(theirs):
            entry["keys_comfy_does_not_map"] = sorted(changed - set(theirs))
        if errors:
            entry["comfy_errors"] = sorted(set(errors))
        report[name] = entry
    print(json.dumps(report, indent=1))
    compared = {n: r for n, r in report.items() if "comfy_errors" not in r}
    worst = max(r["max_abs_diff"] for r in compared.values())
    ok = all(r["comfy_keys"] for r in compared.values()) and worst < 1e-5
    print(json.dumps({"cases": len(report), "compared": len(compared), "max_abs_diff": worst,
                      "comfy_failed": sorted(set(report) - set(compared)), "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
