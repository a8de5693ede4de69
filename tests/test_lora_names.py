"""Module names: every trainer's spelling of every full-size module resolves, checked against the
official manifests; names come from the models themselves; stray keys are reported, not fatal."""

import pytest
import torch
from conftest import load_manifest
from lora_helpers import parity_stage_c, stage_c, snapshot, assert_same  # noqa: F401

from wuerstchen.lora import LoraError, apply_loras, check_lora, describe_match, load_lora, parse_lora
from wuerstchen.lora.formats import resolve_module, stage_c_names, text_names
from wuerstchen.models.stage_c import StageC


def manifest_modules(name):
    """(module, weight key, bias key or None) for every weight-bearing module in a manifest."""
    keys = load_manifest(name)["keys"]
    out = []
    for key in keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            out.append((module, key, f"{module}.bias" if f"{module}.bias" in keys else None))
    return out, keys


def meta_model(name):
    with torch.device("meta"):
        return StageC(**load_manifest(name)["config"])


@pytest.mark.parametrize("manifest", ["stage_c", "stage_c_lite"])
def test_every_full_size_module_resolves_in_every_spelling(manifest):
    modules, keys = manifest_modules(manifest)
    for module, weight, bias in modules:
        flat = module.replace(".", "_")
        for name in (f"lora_unet_{flat}", f"lora_prior_unet_{flat}", f"diffusion_model.{module}", f"unet.{module}",
                     f"prior.{module}", f"transformer.{module}", module):
            target, _ = resolve_module(name)
            assert (target.weight, target.bias or None, target.qkv) == (weight, bias, None), name
    fused = [k[: -len(".in_proj_weight")] for k in keys if k.endswith(".in_proj_weight")]
    assert len(fused) == {"stage_c": 64, "stage_c_lite": 32}[manifest]
    for attn in fused:
        flat, block = attn.replace(".", "_"), attn[: -len(".attn")]
        for q, letter in enumerate("qkv"):
            for name in (f"lora_unet_{flat}_to_{letter}", f"lora_prior_unet_{flat}_to_{letter}",
                         f"diffusion_model.{attn}.to_{letter}", f"prior.{block}.to_{letter}",
                         f"unet.{attn}.in_proj.{q}"):
                target, _ = resolve_module(name)
                assert (target.weight, target.bias, target.qkv) == (f"{attn}.in_proj_weight", f"{attn}.in_proj_bias", q)
        for name in (f"lora_unet_{flat}_in_proj", f"unet.{attn}.in_proj"):
            assert resolve_module(name)[0].qkv is None
        assert resolve_module(f"prior.{block}.to_out.0")[0].weight == f"{attn}.out_proj.weight"
        assert resolve_module(f"prior.{block}.to_out.1") is None
        assert resolve_module(f"unet.{attn}.in_proj.3") is None


@pytest.mark.parametrize("manifest, count", [("stage_c", 64), ("stage_c_lite", 32)])
def test_kohyas_early_attention_to_out_spelling(manifest, count):
    keys = load_manifest(manifest)["keys"]
    width = load_manifest(manifest)["config"]["c_hidden"][0]
    outs = [k for k in keys if k.endswith(".attention.attn.out_proj.weight")]
    tensors = {}
    for key in outs:
        flat = key[: -len(".out_proj.weight")].replace(".", "_")
        tensors[f"lora_unet_{flat}_to_out.lora_down.weight"] = torch.zeros(1, width)
        tensors[f"lora_unet_{flat}_to_out.lora_up.weight"] = torch.zeros(width, 1)
    lora = parse_lora(tensors, name="early_kohya.safetensors")
    assert lora.format == "kohya" and not lora.unused
    assert sorted(d.target for d in lora.stage_c) == sorted(outs) and len(outs) == count
    match = check_lora(meta_model(manifest), lora)  # shapes only: a meta-device model is enough
    assert (match.matched, match.total, match.missing) == (count, count, [])


def test_text_encoder_names_from_every_trainer_and_comfyuis_extract():
    keys = load_manifest("clip_text_bigg14")["keys"]
    hf_weights = [k for k in keys if k.endswith(".weight") and k.startswith(("text_model.", "text_projection"))]
    layer_modules = [k[: -len(".weight")] for k in hf_weights if ".encoder.layers." in k and "layer_norm" not in k]
    assert len(layer_modules) == 32 * 6  # q, k, v, out, fc1, fc2 per layer: 192
    for key in hf_weights:
        module = key[: -len(".weight")]
        target, naming = resolve_module(f"text_encoders.clip_g.transformer.{module}")
        assert (target.part, target.weight, naming) == ("text", key, "comfyui")
        bias = f"{module}.bias"
        assert target.bias == (bias if bias in keys else ""), module
    for module in layer_modules + ["text_projection"]:
        for name in (f"lora_te_{module.replace('.', '_')}", f"lora_prior_te_{module.replace('.', '_')}",
                     f"text_encoder.{module}", f"clip_g.{module}"):
            assert resolve_module(name)[0].weight == f"{module}.weight", name


def test_name_tables_come_from_the_models():
    # Every Stage C parameter of the 3.6B model is some module's weight or bias in the table.
    with torch.device("meta"):
        model = StageC(**load_manifest("stage_c")["config"])
    table = stage_c_names()
    for name, _ in model.named_parameters():
        head, _, leaf = name.rpartition(".")
        module = head if leaf in ("weight", "bias") else (name if "_" not in leaf else f"{head}.{leaf.rsplit('_', 1)[0]}")
        target = table.resolve(module.replace(".", "_"))
        assert target is not None and name in (target.weight, target.bias), name
    # no hand-written module list: the templates are the model's names with indices wildcarded
    assert "down_blocks_#_#_attention_attn_out_proj" in table.templates()
    assert "text_model_encoder_layers_#_self_attn_q_proj" in text_names().templates()
    assert resolve_module("lora_unet_down_blocks_0_0_no_such_layer") is None


def test_a_stray_sdxl_key_no_longer_refuses_a_stage_c_file(stage_c, tmp_path, caplog):
    from safetensors.torch import save_file

    from wuerstchen.files.tiny import write_tiny_lora

    tensors = write_tiny_lora(None, "kohya", stage_c)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level("WARNING", logger="wuerstchen.lora"):
        lora = load_lora(tmp_path / "mixed.safetensors")
    assert "mixed.safetensors: 2 of" in caplog.text and "lora_te1_text_model_encoder_layers_0_mlp_fc1" in caplog.text
    assert len(lora.unused) == 2 and all(why == "not a Stable Cascade Stage C or CLIP-G module" for _, why in lora.unused)
    before = snapshot(stage_c)
    with apply_loras(stage_c, [(lora, 1.0)]) as patch:
        assert patch.report[0].matched == patch.report[0].total == len(lora.stage_c)
        summary = describe_match(lora, patch.report)
    assert summary.startswith(f"mixed.safetensors: applied {len(lora.stage_c)} of {len(lora.stage_c)} modules; "
                              "2 keys not for this model, e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1")
    assert_same(stage_c, before)


def test_a_file_with_only_foreign_keys_is_still_refused():
    with pytest.raises(LoraError, match="this is an SDXL LoRA"):
        parse_lora({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8),
                    "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2),
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)})


def test_lycoris_and_diff_only_files_are_recognised_as_loras(tmp_path):
    """A file of LoHa or plain diffs has no lora_* key: it is still listed as a LoRA and a model loader
    still says it is one; a model with one odd key is not mistaken for a LoRA."""
    from wuerstchen.files import checkpoints
    from wuerstchen.lora.formats import looks_like_lora

    loha = {f"lora_unet_down_blocks_0_1_channelwise_0.hada_w{i}_{ab}": (2, 4) for i in (1, 2) for ab in "ab"}
    diffs = {"diffusion_model.clf.1.diff": (16, 32, 1, 1), "diffusion_model.clf.1.diff_b": (16,)}
    assert looks_like_lora(loha) and looks_like_lora(diffs)
    assert "a LoRA" in checkpoints.describe_foreign(loha)
    model_keys = {f"down_blocks.0.{i}.mapper.weight": (8, 8) for i in range(5)}
    assert not looks_like_lora({**model_keys, "down_blocks.0.0.alpha": ()})

    import torch
    from safetensors.torch import save_file

    from nodes import host

    folder = tmp_path / "models"
    (folder / "loras").mkdir(parents=True)
    save_file({k: torch.zeros(v) for k, v in loha.items()}, str(folder / "loras" / "loha.safetensors"))
    assert host._kinds_in(folder / "loras" / "loha.safetensors") == {"lora"}
