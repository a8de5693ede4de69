"""CLIP conditioning: official tokenization, text/image towers, preprocessing, prompt weights."""

import json

import numpy as np
import pytest
import torch
from conftest import PARITY_DIR, load_manifest, load_parity

from wuerstchen.inputs.preprocess import (PIPELINES, clip_preprocess, clip_preprocess_official,
                                   short_side_size)
from wuerstchen.text.encoder import (BIGG14_TEXT_CONFIG, CLIPTextEncoder, config_from_state_dict,
                             convert_text_state_dict, tokenize)
from wuerstchen.text.tokenizer import CLIPTokenizer, parse_prompt_weights
from wuerstchen.text.vision import (VITL14_VISION_CONFIG, CLIPVisionEncoder,
                               vision_config_from_state_dict)

TOKENIZER_CASES = json.loads((PARITY_DIR / "tokenizer_cases.json").read_text())["cases"]
PLAIN = "a photograph of an astronaut riding a horse"  # 'astronaut' is token 5 (after BOS)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def text_parity():
    return load_parity("clip_text")


@pytest.fixture(scope="module")
def text_model(text_parity):
    meta, weights, _ = text_parity
    return CLIPTextEncoder.from_state_dict(weights, heads=meta["config"]["num_attention_heads"])


@pytest.fixture(scope="module")
def vision_parity():
    return load_parity("clip_vision")


def fresh_text_model(text_parity):
    """A model with its own tensors (loading assigns, i.e. shares, the given tensors)."""
    meta, weights, _ = text_parity
    return CLIPTextEncoder.from_state_dict({k: v.clone() for k, v in weights.items()},
                                           heads=meta["config"]["num_attention_heads"])


def meta_state_dict(manifest):
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for k, (shape, dtype) in manifest["keys"].items()}


# ---- tokenizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=lambda c: f"{c['index']}-{c['category']}")
def test_tokenizer_matches_official_ids_and_mask(case):
    ids, mask = tokenize(case["text"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (1, 77)
    assert ids[0].tolist() == case["hf_ids"]
    ones = case["hf_attention_mask_ones"]
    assert mask[0].tolist() == [1] * ones + [0] * (77 - ones)


def test_tokenizer_batch_and_text_reexport():
    texts = [c["text"] for c in TOKENIZER_CASES]
    ids, mask = tokenize(texts)
    assert ids.shape == (len(texts), 77)
    assert ids.tolist() == [c["hf_ids"] for c in TOKENIZER_CASES]
    assert mask.sum(1).tolist() == [c["hf_attention_mask_ones"] for c in TOKENIZER_CASES]


def test_added_tokens_are_single_ids_and_removable():
    tok = CLIPTokenizer()
    plain = tok.encode("a [fernando] dog")
    assert tok.add_tokens(["[fernando]", "<sks>"]) == [49408, 49409]
    assert tok.encode("a [Fernando] dog") == [plain[0], 49408, plain[-1]]
    assert tok.encode("<SKS>!") == [49409, 0]
    assert tok.add_tokens(["[fernando]"]) == [49408]  # already known: same id
    tok.remove_tokens(["[fernando]"])
    assert tok.added_tokens == {"<sks>": 49408}  # renumbered
    assert tok.encode("a [fernando] dog") == plain
    with pytest.raises(KeyError, match="not an added token"):
        tok.remove_tokens(["[nobody]"])


# ---- prompt weight syntax ----------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[cat] x", [("cat", 1 / 1.1), (" x", 1.0)]),
    ("a (red cat:1.3), b", [("a ", 1.0), ("red cat", 1.3), (", b", 1.0)]),
    ("((a:1.5) b:0.5)", [("a", 1.5), (" b", 0.5)]),
    ("(a [b])", [("a ", 1.1), ("b", 1.1 / 1.1)]),
    (r"\(x\) \[y\] (z)", [("(x) [y] ", 1.0), ("z", 1.1)]),
    ("x) (y", [("x) (y", 1.0)]),
    ("(a:b) (c:d)", [("a:b", 1.1), (" ", 1.0), ("c:d", 1.1)]),  # not a number: text (inf/nan are refused)
])
def test_parse_prompt_weights(text, expected):
    got = parse_prompt_weights(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_parse_prompt_weights_keeps_added_words():
    assert parse_prompt_weights("a [Fernando] (b)", protected=["[fernando]"]) == [
        ("a [Fernando] ", 1.0), ("b", pytest.approx(1.1))]
    assert parse_prompt_weights("([fernando]:1.2)", protected=["[fernando]"]) == [
        ("[fernando]", 1.2)]


# ---- text encoder parity -------------------------------------------------------------------
@pytest.mark.parametrize("call", ["call0", "call1"])
def test_text_encoder_matches_official(text_parity, text_model, call):
    meta, _, io = text_parity
    outputs = {o["key"]: o for c in meta["calls"] if c["id"] == call for o in c["outputs"]}
    mask = io.get(f"{call}.in.attention_mask")
    assert (mask is not None) == (call == "call0")
    with torch.no_grad():
        out = text_model(io[f"{call}.in.input_ids"], mask, output_hidden_states=True)
        clip_text, clip_text_pooled = text_model.encode(io[f"{call}.in.input_ids"], mask)
    ours = {
        "clip_text": clip_text, "clip_text_pooled": clip_text_pooled,
        "last_hidden_state": out.last_hidden_state, "pooled_output": out.pooled_output,
        "text_embeds": out.clip_text_pooled[:, 0],
        **{f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)},
    }
    assert len(out.hidden_states) == meta["config"]["num_hidden_layers"] + 1
    for name, value in ours.items():
        ref = outputs[f"{call}.out.{name}"]
        assert list(value.shape) == ref["shape"], name
        assert max_err(value, io[f"{call}.out.{name}"]) <= ref["suggested_atol"], name
    assert torch.equal(out.pooled_index, io[f"{call}.out.pooled_index"])
    assert torch.equal(out.clip_text, clip_text)


def test_padding_mask_changes_only_padded_rows(text_parity, text_model):
    _, _, io = text_parity
    ids, mask = io["call0.in.input_ids"], io["call0.in.attention_mask"]
    with torch.no_grad():
        masked, _ = text_model.encode(ids, mask)
        unmasked, _ = text_model.encode(ids)
    real = mask.bool()
    assert max_err(masked[real], unmasked[real]) < 1e-5
    assert max_err(masked[~real], unmasked[~real]) > 0.1  # the official mask matters


def test_config_inferred_from_parity_weights(text_parity):
    meta, weights, _ = text_parity
    c = meta["config"]
    assert config_from_state_dict(weights, heads=4) == dict(
        width=c["hidden_size"], layers=c["num_hidden_layers"], heads=4,
        mlp_width=c["intermediate_size"], vocab_size=c["vocab_size"],
        context_length=c["max_position_embeddings"], projection_dim=c["projection_dim"],
        activation="gelu")


def test_text_loading_with_prefixes_position_ids_and_dtype(text_parity, text_model):
    _, weights, io = text_parity
    reference = text_model.state_dict()
    extra = {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    for prefix in ("", "text_encoder.", "model.", "clip_g.transformer."):
        sd = {prefix + k: v for k, v in {**weights, **extra}.items()}
        if prefix:  # another model in the same file is left alone
            sd["stage_c.something.weight"] = torch.zeros(2)
        loaded = CLIPTextEncoder.from_state_dict(sd, heads=4)
        assert loaded.state_dict().keys() == reference.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    half = CLIPTextEncoder.from_state_dict(weights, dtype=torch.bfloat16, heads=4)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        approx, _ = half.encode(io["call0.in.input_ids"], io["call0.in.attention_mask"])
    assert max_err(approx, io["call0.out.clip_text"]) < 0.5  # bf16 runs, roughly right
    with pytest.raises(KeyError, match="unexpected keys"):
        bogus = {**weights, "text_model.encoder.bogus.weight": torch.zeros(1)}
        CLIPTextEncoder.from_state_dict(bogus, heads=4)


def test_open_clip_layout_loads_and_matches_open_clip(text_parity, text_model):
    """Our state dict is open_clip's text tower layout (text_projection transposed)."""
    from open_clip.transformer import TextTransformer

    _, _, io = text_parity
    sd = dict(text_model.state_dict())
    sd["text_projection"] = sd.pop("text_projection.weight").t()
    sd["logit_scale"] = torch.tensor(4.6)
    reloaded = CLIPTextEncoder.from_state_dict({"model." + k: v for k, v in sd.items()}, heads=4)
    assert all(torch.equal(reloaded.state_dict()[k], v)
               for k, v in text_model.state_dict().items())
    tower = TextTransformer(context_length=77, vocab_size=49408, width=24, heads=4, layers=3,
                            mlp_ratio=64 / 24, output_dim=24)
    tower.load_state_dict({k: v for k, v in sd.items() if k != "logit_scale"}, strict=True)
    with torch.no_grad():  # open_clip has no padding mask: compare with call1
        features = tower.eval()(io["call1.in.input_ids"])
    assert max_err(features, io["call1.out.text_embeds"]) < 1e-4


def test_hf_key_to_param_applies_lora_style_deltas(text_parity):
    _, weights, io = text_parity
    model = fresh_text_model(text_parity)
    assert model.hf_key_to_param("text_model.encoder.layers.1.self_attn.k_proj.weight") == (
        "transformer.resblocks.1.attn.in_proj_weight", slice(24, 48))
    assert model.hf_key_to_param("text_model.encoder.layers.2.mlp.fc1") == (
        "transformer.resblocks.2.mlp.c_fc.weight", None)
    assert model.hf_key_to_param("encoder.layers.0.self_attn.v_proj.bias") == (
        "transformer.resblocks.0.attn.in_proj_bias", slice(48, 72))
    gen = torch.Generator().manual_seed(0)
    deltas = {k: 0.1 * torch.randn(weights[k].shape, generator=gen) for k in (
        "text_model.encoder.layers.1.self_attn.v_proj.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.bias",
        "text_model.encoder.layers.2.mlp.fc2.weight", "text_projection.weight")}
    patched_hf = CLIPTextEncoder.from_state_dict(
        {k: v + deltas[k] if k in deltas else v for k, v in weights.items()}, heads=4)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            name, rows = model.hf_key_to_param(key)
            (params[name] if rows is None else params[name][rows]).add_(delta)
    ids, mask = io["call0.in.input_ids"], io["call0.in.attention_mask"]
    with torch.no_grad():
        for a, b in zip(model.encode(ids, mask), patched_hf.encode(ids, mask)):
            assert torch.equal(a, b)
    with pytest.raises(KeyError):
        model.hf_key_to_param("text_model.encoder.layers.0.self_attn.w_proj.weight")


# ---- full-size manifests -------------------------------------------------------------------
def test_bigg14_manifest_loads_on_meta():
    manifest = load_manifest("clip_text_bigg14")
    sd = meta_state_dict(manifest)
    config = config_from_state_dict(sd)
    assert config == {k: v for k, v in BIGG14_TEXT_CONFIG.items() if k != "layer_norm_eps"}
    with torch.device("meta"):
        model = CLIPTextEncoder(**config)
    ours = convert_text_state_dict(sd)
    model.load_state_dict(ours, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert all(p.is_meta for p in model.parameters())
    # every released key has a home of the right shape (what LoRA patching relies on)
    params = dict(model.named_parameters())
    for key, (shape, _) in manifest["keys"].items():
        name, rows = model.hf_key_to_param(key)
        target = params[name] if rows is None else params[name][rows]
        assert list(target.shape) == shape, key
    loaded = CLIPTextEncoder.from_state_dict(sd, dtype=torch.bfloat16)
    assert loaded.transformer.resblocks[31].attn.in_proj_weight.shape == (3840, 1280)
    assert isinstance(loaded.transformer.resblocks[0].mlp[1], torch.nn.GELU)
    assert loaded.transformer.resblocks[0].mlp[1].approximate == "none"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name,activation", [("clip_vision_vitl14", "quick_gelu"),
                                             ("clip_vision_bigg14", "gelu")])
def test_vision_manifests_load_on_meta(name, activation):
    manifest = load_manifest(name)
    sd = meta_state_dict(manifest)
    config = vision_config_from_state_dict(sd, activation=activation)
    expected = manifest["config"]
    assert (config["width"], config["layers"], config["heads"], config["mlp_width"],
            config["projection_dim"], config["image_size"], config["patch_size"]) == (
        expected["hidden_size"], expected["num_hidden_layers"], expected["num_attention_heads"],
        expected["intermediate_size"], expected["projection_dim"], expected["image_size"],
        expected["patch_size"])
    if name == "clip_vision_vitl14":
        assert config == {k: v for k, v in VITL14_VISION_CONFIG.items() if k != "layer_norm_eps"}
    model = CLIPVisionEncoder.from_state_dict(sd, activation=activation)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert all(p.is_meta for p in model.parameters())


# ---- encode_prompts: weights, long prompts, added words -------------------------------------
def test_unweighted_prompt_is_bit_identical_to_official_path(text_model):
    with torch.no_grad():
        official = text_model.encode(*tokenize(PLAIN))
        for prompt in (PLAIN, "a photograph of an (astronaut:1.0) riding a horse"):
            got = text_model.encode_prompts(prompt)
            assert all(torch.equal(a, b) for a, b in zip(got, official)), prompt


@pytest.mark.parametrize("syntax,weight", [("(astronaut:1.3)", 1.3), ("(astronaut)", 1.1),
                                           ("[astronaut]", 1 / 1.1), ("((astronaut))", 1.21)])
def test_weight_changes_only_its_token_rows(text_model, syntax, weight):
    with torch.no_grad():
        plain_text, plain_pooled = text_model.encode(*tokenize(PLAIN))
        empty_text, _ = text_model.encode(*tokenize(""))
        text, pooled = text_model.encode_prompts(PLAIN.replace("astronaut", syntax))
    assert torch.equal(pooled, plain_pooled)
    changed = (text != plain_text).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [5]
    expected = empty_text[0, 5] + weight * (plain_text[0, 5] - empty_text[0, 5])
    assert max_err(text[0, 5], expected) < 1e-6


def test_long_prompt_windows(text_parity, text_model):
    _, _, io = text_parity
    long_case = TOKENIZER_CASES[39]
    assert long_case["untruncated_length_hf"] > 77
    tok = text_model.tokenizer
    content = tok.encode(long_case["text"])
    with torch.no_grad():
        text, pooled = text_model.encode_prompts(long_case["text"])
        second_ids, second_mask = (torch.tensor([r]) for r in tok.window(content[75:150]))
        second, _ = text_model.encode(second_ids, second_mask)
        truncated = text_model.encode_prompts(long_case["text"], long_prompts=False)
    windows = -(-len(content) // 75)
    assert text.shape == (1, 77 * windows, 24) and pooled.shape == (1, 1, 24)
    # the first window is the official (truncated) encoding: row 3 of the parity call
    assert max_err(text[0, :77], io["call0.out.clip_text"][3]) < 1e-4
    assert max_err(pooled[0], io["call0.out.clip_text_pooled"][3]) < 1e-4
    assert torch.equal(text[:, 77:154], second)
    # same window, batched with another one: equal up to float noise
    assert max_err(truncated[0], text[:, :77]) < 1e-5 and max_err(truncated[1], pooled) < 1e-5
    with pytest.raises(ValueError, match="windows"):
        text_model.encode_prompts([long_case["text"], "short"])
    batch, batch_pooled = text_model.encode_prompts([PLAIN, "", "Wow! What a view!!"])
    assert batch.shape == (3, 77, 24) and batch_pooled.shape == (3, 1, 24)


def test_added_token_embeddings_are_used(text_parity):
    model = fresh_text_model(text_parity)
    vector = torch.randn(1, 24, generator=torch.Generator().manual_seed(1))
    prompt = "a photo of [Fernando] at night"
    with torch.no_grad():
        before, _ = model.encode_prompts(prompt)
        assert model.add_token_embeddings(["[fernando]"], vector) == [49408]
        ids, mask = model.tokenize(prompt)
        assert ids[0, 4] == 49408 and (ids[0, :8] < 49408).sum() == 7
        out = model(ids, mask, output_hidden_states=True)
        assert torch.equal(out.hidden_states[0][0, 4], vector[0] + model.positional_embedding[4])
        # same result as a vocabulary row holding the vector
        twin = fresh_text_model(text_parity)
        twin.token_embedding.weight[1000] = vector[0]
        twin_ids = torch.where(ids == 49408, 1000, ids)
        assert all(torch.equal(a, b) for a, b in zip(model.encode(ids, mask),
                                                     twin.encode(twin_ids, mask)))
        added, _ = model.encode_prompts(prompt)
        weighted, _ = model.encode_prompts("a photo of ([Fernando]:1.5) at night")
        model.remove_token_embeddings()
        after, _ = model.encode_prompts(prompt)
    assert torch.equal(added[0, :8], out.clip_text[0, :8])
    assert (weighted != added).any(-1)[0].nonzero().flatten().tolist() == [4]
    assert torch.equal(after, before)
    assert model.added_token_embedding is None
    with pytest.raises(ValueError, match="vectors must be"):
        model.add_token_embeddings(["[a]", "[b]"], vector)
    with pytest.raises(ValueError, match="token ids must lie"):
        model.encode(torch.full((1, 77), 49408))


# ---- image tower ---------------------------------------------------------------------------
def test_vision_encoder_matches_official(vision_parity):
    meta, weights, io = vision_parity
    config = meta["config"]
    model = CLIPVisionEncoder.from_state_dict(weights, heads=config["num_attention_heads"])
    outputs = {o["key"]: o for o in meta["calls"][0]["outputs"]}
    with torch.no_grad():
        out = model(io["call0.in.pixel_values"], output_hidden_states=True)
        embeds = model.encode(io["call0.in.pixel_values"])
        open_clip_embeds = model.visual(io["call0.in.pixel_values"])
    ours = {"image_embeds": embeds, "pooled_output": out.pooled_output,
            "last_hidden_state": out.last_hidden_state,
            **{f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)}}
    for name, value in ours.items():
        ref = outputs[f"call0.out.{name}"]
        assert list(value.shape) == ref["shape"], name
        assert max_err(value, io[f"call0.out.{name}"]) <= ref["suggested_atol"], name
    assert max_err(open_clip_embeds, embeds) < 1e-5  # the layout is open_clip's


def test_vision_loading_prefixes_and_open_clip_layout(vision_parity):
    _, weights, _ = vision_parity
    reference = CLIPVisionEncoder.from_state_dict(weights, heads=4).state_dict()
    extra = {"vision_model.embeddings.position_ids": torch.arange(10)[None]}
    for prefix in ("", "clip_vision.", "image_encoder."):
        sd = {prefix + k: v for k, v in {**weights, **extra}.items()}
        loaded = CLIPVisionEncoder.from_state_dict(sd, heads=4).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    open_clip_sd = {**reference, "logit_scale": torch.tensor(1.0),
                    "token_embedding.weight": torch.zeros(3, 2)}  # a full open_clip CLIP file
    loaded = CLIPVisionEncoder.from_state_dict(open_clip_sd, heads=4).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    with pytest.raises(KeyError, match="unexpected keys"):
        CLIPVisionEncoder.from_state_dict({**weights, "vision_model.extra.weight": torch.zeros(1)},
                                          heads=4)


def test_encode_images_preprocesses_officially():
    torch.manual_seed(0)
    model = CLIPVisionEncoder(image_size=224, patch_size=14, width=32, layers=1, heads=4,
                              mlp_width=64, projection_dim=20).eval()
    images = [np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    with torch.no_grad():
        clip_img = model.encode_images(images)
        expected = model.encode(clip_preprocess_official(images))
    assert clip_img.shape == (1, 1, 20) and torch.equal(clip_img[:, 0], expected)


# ---- preprocessing -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocess_parity():
    return load_parity("clip_preprocess")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_preprocess_pipelines_match_reference(preprocess_parity, pipeline):
    meta, _, io = preprocess_parity
    images = [io["in.image0"], io["in.image1"]]
    out = clip_preprocess(images, pipeline)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    assert max_err(out, io[f"out.{pipeline}"]) <= meta["suggested_atol"]["value"]


def test_preprocess_input_layouts_agree(preprocess_parity):
    from PIL import Image

    _, _, io = preprocess_parity
    uint8 = [io["in.image0"], io["in.image1"]]
    reference = clip_preprocess_official(uint8)
    assert torch.equal(clip_preprocess_official([t.numpy() for t in uint8]), reference)
    assert torch.equal(clip_preprocess_official([Image.fromarray(t.numpy()) for t in uint8]),
                       reference)
    comfy = io["in.image0"].float().div(255)[None]  # ComfyUI IMAGE: float [B, H, W, 3]
    assert torch.equal(clip_preprocess_official(comfy)[0], reference[0])
    assert max_err(clip_preprocess(uint8, "official"), reference) > 0.1  # the 768 step matters
    with pytest.raises(ValueError, match="pipeline"):
        clip_preprocess(uint8, "hf")


def test_preprocess_geometry(preprocess_parity):
    meta, _, _ = preprocess_parity
    for geometry in meta["geometry"]:
        h, w = geometry["height"], geometry["width"]
        assert list(short_side_size(h, w, 224)) == geometry["direct_resize"]
        notebook = short_side_size(h, w, 768)
        assert list(notebook) == geometry["notebook_resize_768"]
        assert list(short_side_size(*notebook, 224)) == geometry["notebook_resize_224"]
    # through the 768 step a side can come out one pixel shorter than a direct resize
    assert short_side_size(45, 31, 224) == (325, 224)
    assert short_side_size(*short_side_size(45, 31, 768), 224) == (324, 224)
