"""Würstchen v2 in the graph through the shared nodes: loaders by role, Text Encode per tower, the
Stage C / Stage B samplers dispatching on the model's family, Semantic Encode with the v2
EfficientNet, Stage A Decode; and a clear message wherever the families are mixed.

Every v2 node result is compared with the library recipe (pipeline_v2, checked against the hub
pipeline in test_v2_pipeline) run on the same modules, so a wrong tower, scale or generator fails."""

import pytest
import torch

from node_helpers import load, run
from nodes import NODE_CLASS_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.files import tiny
from wuerstchen.pipeline import stages_v2 as v2
from wuerstchen.files.management import ModelManager
from wuerstchen.models.effnet import v2_effnet_to_raw

SIZE = 256  # the Empty Latent's minimum: a 6x6 prior latent, a 64x64 decoder latent
PRIOR = "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors"
DECODER = "model_v2_stage_b.pt"
VQGAN = "wuerstchen/vqgan/diffusion_pytorch_model.safetensors"
PRIOR_TEXT = "wuerstchen-prior/text_encoder/model.safetensors"
DECODER_TEXT = "wuerstchen/text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_v2")
    tiny.write_tiny_models(root / "wuerstchen")
    host.configure(root, manager=ModelManager())
    return root


def encode(clip, text):
    return run("WuerstchenTextEncode", clip=clip, text=text)[0]


def prior_sampler(stage_c, positive, negative, latent, seed=1, steps=3, **over):
    args = dict(seed=seed, steps=steps, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0, cfg_rho=0.7)
    args.update(over)
    return run("WuerstchenStageCSampler", stage_c=stage_c, positive=positive, negative=negative, latent=latent,
               **args)[0]


def decoder_sampler(stage_b, latent, positive, negative, seed=2, **over):
    args = dict(seed=seed, steps=2, cfg=0.0, shift=1.0, sampler="ddpm", width=0, height=0, cfg_rho=0.7)
    args.update(over)
    return run("WuerstchenStageBSampler", stage_b=stage_b, stage_c=latent, positive=positive, negative=negative,
               **args)[0]


@pytest.fixture(scope="module")
def graph(models):
    prior = load("WuerstchenStageCLoader", PRIOR, dtype="auto")
    decoder = load("WuerstchenStageBLoader", DECODER, dtype="auto")
    vqgan = load("WuerstchenStageALoader", VQGAN)
    prior_clip = load("WuerstchenCLIPTextLoader", PRIOR_TEXT, dtype="auto")
    decoder_clip = load("WuerstchenCLIPTextLoader", DECODER_TEXT, dtype="auto")
    latent, _ = run("WuerstchenEmptyLatent", width=SIZE, height=SIZE, compression=42.67, batch_size=1)
    return dict(prior=prior, decoder=decoder, vqgan=vqgan, prior_clip=prior_clip, decoder_clip=decoder_clip,
                prior_pos=encode(prior_clip, "a penguin"), prior_neg=encode(prior_clip, ""),
                decoder_pos=encode(decoder_clip, "a penguin"), decoder_neg=encode(decoder_clip, ""), latent=latent)


def test_loaders_give_the_v2_networks(graph):
    kinds = {name: graph[name].model.kind for name in ("prior", "decoder", "vqgan", "prior_clip", "decoder_clip")}
    assert kinds == dict(prior="v2_prior", decoder="v2_decoder", vqgan="stage_a", prior_clip="v2_prior_text",
                         decoder_clip="v2_decoder_text")
    assert graph["prior_pos"][0][1] == {"wuerstchen_text": "v2_prior_text"}  # no pooled vector in v2
    assert graph["prior_pos"][0][0].shape == (1, 77, tiny.V2_PRIOR_TEXT["hidden_size"])


def test_text_to_image_graph_is_the_library_recipe(graph):
    g = graph
    prior_latent = prior_sampler(g["prior"], g["prior_pos"], g["prior_neg"], g["latent"], seed=11)
    decoder_latent = decoder_sampler(g["decoder"], prior_latent, g["decoder_pos"], g["decoder_neg"], seed=12)
    (image,) = run("WuerstchenStageADecode", stage_a=g["vqgan"], latent=decoder_latent, tile_size=0)

    with torch.no_grad():
        prior_text = v2.encode_text_v2(g["prior_clip"].module, "a penguin")
        decoder_text = v2.encode_text_v2(g["decoder_clip"].module, "a penguin")
        x = v2.sample_prior_v2(g["prior"].module, prior_text, latent_size=(6, 6), generator=pipeline.cpu_generator(11),
                               settings=v2.PriorSettings(cfg=4.0, steps=3))
        d = v2.sample_decoder_v2(g["decoder"].module, v2_effnet_to_raw(x), decoder_text,
                                 generator=pipeline.cpu_generator(12), settings=v2.DecoderSettings(steps=2, cfg=0.0))
        expected = v2.decode_v2(g["vqgan"].module, d)
    assert prior_latent["wuerstchen_family"] == "wuerstchen_v2" and torch.equal(prior_latent["samples"], x)
    assert torch.allclose(decoder_latent["samples"], d * v2.V2_STAGE_A_SCALE)  # the raw VQGAN latent
    assert image.shape == (1, SIZE, SIZE, 3)
    assert torch.allclose(image.permute(0, 3, 1, 2), expected, atol=1e-5)


def test_steps_zero_is_the_hub_grid_and_guidance_uses_the_negative(graph):
    g = graph
    got = prior_sampler(g["prior"], g["prior_pos"], g["prior_neg"], g["latent"], seed=4, steps=0)["samples"]
    with torch.no_grad():
        text = v2.encode_text_v2(g["prior_clip"].module, "a penguin", "")
        ref = v2.sample_prior_v2(g["prior"].module, text, latent_size=(6, 6), generator=pipeline.cpu_generator(4))
    assert v2.PriorSettings().grid().numel() == 30 and torch.equal(got, ref)
    other_negative = encode(g["prior_clip"], "blurry")
    assert not torch.equal(got, prior_sampler(g["prior"], g["prior_pos"], other_negative, g["latent"], seed=4,
                                              steps=0)["samples"])


def test_img2img_with_the_v2_semantic_compressor(graph):
    g = graph
    effnet = load("WuerstchenSemanticCompressorLoader", DECODER)
    assert effnet.model.kind == "v2_effnet"
    picture = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    (encoded,) = run("WuerstchenSemanticEncode", semantic_compressor=effnet, image=picture, compression=42.67)
    assert encoded["wuerstchen_family"] == "wuerstchen_v2" and encoded["samples"].shape == (1, 16, 6, 6)
    with torch.no_grad():
        ref_latent = v2.encode_semantic_v2(effnet.module, picture.permute(0, 3, 1, 2), (6, 6))
    assert torch.allclose(encoded["samples"], ref_latent, atol=1e-6)
    ref_latent = encoded["samples"]
    # any picture size: its latent sides are rounded to a multiple of 3 (300 px wide: ceil(7.03) = 8 -> 9)
    (odd,) = run("WuerstchenSemanticEncode", semantic_compressor=effnet, image=picture[:, :128, :1].expand(1, 128, 300, 3),
                 compression=42.67)
    assert odd["samples"].shape[-2:] == (3, 9)
    got = prior_sampler(g["prior"], g["prior_pos"], g["prior_neg"], encoded, seed=5, denoise=0.5)["samples"]
    with torch.no_grad():
        text = v2.encode_text_v2(g["prior_clip"].module, "a penguin", "")
        ref = v2.sample_prior_v2(g["prior"].module, text, latent_size=(6, 6), generator=pipeline.cpu_generator(5),
                                 settings=v2.PriorSettings(steps=3), init_latent=ref_latent, denoise=0.5)
    assert torch.equal(got, ref)


def test_checkpoint_loader_opens_the_original_stage_b_file(models):
    parts = run("WuerstchenCheckpointLoader", ckpt_name=DECODER, dtype="auto")
    outputs = NODE_CLASS_MAPPINGS["WuerstchenCheckpointLoader"].RETURN_NAMES
    got = {name: h.model.kind for name, h in zip(outputs, parts) if h is not None}
    assert got == {"stage_b": "v2_decoder", "semantic_compressor": "v2_effnet"}


def _fails(match, node_type, **kwargs):
    with pytest.raises(NodeError, match=match):
        run(node_type, **kwargs)


def test_mixing_the_families_is_explained_on_the_node(graph, models):
    g = graph
    sc_clip = load("WuerstchenCLIPTextLoader", "text_encoder/model.safetensors", dtype="auto")
    sc_stage_c = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="auto")
    sc_stage_b = load("WuerstchenStageBLoader", "stage_b.safetensors", dtype="auto")
    sc_pos = encode(sc_clip, "a penguin")
    base = dict(stage_c=g["prior"], positive=g["prior_pos"], negative=g["prior_neg"], latent=g["latent"], seed=1,
                steps=2, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0, cfg_rho=0.7)
    sampler = "WuerstchenStageCSampler"
    # conditioning from the wrong tower or family
    _fails(r"'positive' was encoded with the CLIP ViT-bigG-14 text encoder \(Stable Cascade\).*Würstchen v2 prior "
           r"text encoder", sampler, **{**base, "positive": sc_pos})
    _fails(r"'negative' was encoded with the Würstchen v2 decoder text encoder", sampler,
           **{**base, "negative": g["decoder_neg"]})
    _fails(r"'positive' was encoded with the Würstchen v2 prior text encoder.*Stable Cascade needs", sampler,
           **{**base, "stage_c": sc_stage_c})
    _fails(r"'conditioning' was encoded with the Würstchen v2 prior", "WuerstchenImageVariation",
           conditioning=g["prior_pos"], clip_vision=load("WuerstchenCLIPVisionLoader", "image_encoder/model.safetensors"),
           image=torch.rand(1, 64, 64, 3), strength=1.0)
    # Stable Cascade-only inputs and settings
    _fails(r"sampler to ddpm", sampler, **{**base, "sampler": "euler"})
    _fails(r"'previewer' is connected.*Würstchen v2 prior", sampler,
           **base, previewer=load("WuerstchenPreviewerLoader", "previewer.safetensors"))
    _fails(r"'clip' got Würstchen v2 prior text encoder \(CLIP ViT-bigG-14\), a Würstchen v2 model, but "
           r"WuerstchenLoraLoader works with Stable Cascade \(Würstchen v3\) only", "WuerstchenLoraLoader", stage_c=sc_stage_c, lora_name="wuerstchen_tiny_lora.safetensors",
           strength_model=1.0, strength_clip=1.0, clip=g["prior_clip"])
    _fails(r"'stage_c' got Würstchen v2 prior \(stage C\), a Würstchen v2 model, but WuerstchenLoraLoader works with "
           r"Stable Cascade",
           "WuerstchenLoraLoader", stage_c=g["prior"], lora_name="wuerstchen_tiny_lora.safetensors",
           strength_model=1.0, strength_clip=1.0)
    # latents of the other family
    sc_latent = prior_sampler(sc_stage_c, sc_pos, encode(sc_clip, ""), g["latent"], steps=1)
    v2_latent = prior_sampler(g["prior"], g["prior_pos"], g["prior_neg"], g["latent"], steps=1)
    _fails(r"'stage_c' is a Stable Cascade \(Würstchen v3\) latent, but the model here is Würstchen v2",
           "WuerstchenStageBSampler", stage_b=g["decoder"], stage_c=sc_latent, positive=g["decoder_pos"],
           negative=g["decoder_neg"], seed=1, steps=1, cfg=0.0, shift=1.0, sampler="ddpm", width=0, height=0,
           cfg_rho=0.7)
    _fails(r"'stage_c' is a Würstchen v2 latent", "WuerstchenStageBSampler", stage_b=sc_stage_b, stage_c=v2_latent,
           positive=sc_pos, negative=sc_pos, seed=1, steps=1, cfg=1.1, shift=1.0, sampler="ddpm", width=0, height=0,
           cfg_rho=0.7)
    _fails(r"'latent' is a Würstchen v2 latent", "WuerstchenPreviewDecode",
           previewer=load("WuerstchenPreviewerLoader", "previewer.safetensors"), latent=v2_latent)
    _fails(r"output size follows the prior latent \(6x6 makes 256x256\)", "WuerstchenStageBSampler",
           stage_b=g["decoder"], stage_c=v2_latent, positive=g["decoder_pos"], negative=g["decoder_neg"], seed=1,
           steps=1, cfg=0.0, shift=1.0, sampler="ddpm", width=512, height=0, cfg_rho=0.7)
    # a size the decoder cannot take is refused at the prior, with sizes that work
    wide, _ = run("WuerstchenEmptyLatent", width=960, height=SIZE, compression=42.67, batch_size=1)
    _fails(r"prior latent of 23x6.*make the image 1024x256", sampler, **{**base, "latent": wide})


def test_a_file_in_the_wrong_loader_names_the_loader_that_takes_it(models):
    with pytest.raises(NodeError) as info:
        load("WuerstchenStageBLoader", PRIOR, dtype="auto")
    msg = str(info.value)
    assert "Würstchen v2 prior (stage C)" in msg and "Load it with Wuerstchen Stage C Loader (WuerstchenStageCLoader)" in msg
    with pytest.raises(NodeError) as info:
        load("WuerstchenPreviewerLoader", DECODER)
    msg = str(info.value)
    assert "Wuerstchen Stage B Loader" in msg and "Wuerstchen Semantic Compressor Loader" in msg
    assert "Wuerstchen Checkpoint Loader (single file)" in msg
