"""The Würstchen v2 recipe (pipeline_v2) against the hub combined pipeline run (v2_pipeline), link by link."""

import pytest
import torch

from conftest import load_v2, load_v2_file, recorded_seed
from wuerstchen.pipeline import stages_v2 as v2
from wuerstchen.models import EfficientNetEncoder, StageA, WuerstchenDiffNeXt, WuerstchenPrior
from wuerstchen.models.effnet import v2_effnet_to_raw
from wuerstchen.models.stage_a import stage_a_config_from_diffusers
from wuerstchen.pipeline.stages import semantic_input
from wuerstchen.text.encoder import CLIPTextEncoder, tokenize


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def chain():
    meta, _, io = load_v2("v2_pipeline")
    towers = {}
    for name in ("v2_clip_text_prior", "v2_clip_text_decoder"):
        tmeta, sd, _ = load_v2(name)
        towers[name] = CLIPTextEncoder.from_state_dict(sd, heads=tmeta["config"]["num_attention_heads"])
    prior_meta, _, _ = load_v2("v2_prior")
    prior = WuerstchenPrior(**prior_meta["config"])
    prior.load_state_dict(load_v2_file("v2_prior_sampling.weights.safetensors"), strict=True)
    decoder_meta, _, _ = load_v2("v2_decoder")
    decoder = WuerstchenDiffNeXt(**decoder_meta["config"])
    decoder.load_state_dict(load_v2_file("v2_decoder_sampling.weights.safetensors"), strict=True)
    vq_meta, vq_sd, _ = load_v2("v2_vqgan")
    stage_a = StageA(**stage_a_config_from_diffusers(vq_meta["config"]))
    stage_a.load_state_dict(vq_sd, strict=True)
    return meta, io, towers, prior.eval(), decoder.eval(), stage_a.eval()


def test_whole_chain_link_by_link(chain):
    meta, io, towers, prior, decoder, stage_a = chain
    with torch.no_grad():
        prior_text, _ = towers["v2_clip_text_prior"].encode(io["prior_text.input_ids"], io["prior_text.attention_mask"])
        decoder_text, _ = towers["v2_clip_text_decoder"].encode(io["decoder_text.input_ids"],
                                                                io["decoder_text.attention_mask"])
    assert (prior_text - io["prior_text.last_hidden_state"]).abs().max() < 1e-4
    assert (decoder_text - io["decoder_text.last_hidden_state"]).abs().max() < 1e-4
    # the recorded rows are [prompt, negative ""]: the unconditional prior input is an embedding, not zeros
    assert meta["call"]["negative_prompt"] is None and prior_text[1].abs().min() > 0
    call = meta["call"]
    result = v2.text_to_image_v2(
        prior, decoder, stage_a, v2.V2Text(prior_text[:1], prior_text[1:]), v2.V2Text(decoder_text, decoder_text),
        height=call["height"], width=call["width"], seed=recorded_seed(call["generator"]),
        prior_settings=v2.PriorSettings(cfg=call["prior_guidance_scale"]),
        decoder_settings=v2.DecoderSettings(steps=call["num_inference_steps"], cfg=call["decoder_guidance_scale"]))
    assert v2.PriorSettings().grid().numel() == 30 and v2.DecoderSettings().steps == 12  # the hub defaults
    assert rel_err(result.prior_latent, io["prior_final_x"]) < 1e-3
    assert rel_err(result.image_embeddings, io["image_embeddings"]) < 1e-3
    assert rel_err(result.decoder_latent, io["decoder_final_x"]) < 1e-3
    assert rel_err(result.images, io["image"]) < 1e-3
    assert result.images.shape == io["image"].shape and 0 <= result.images.min() and result.images.max() <= 1
    # the fixed links, exactly as the pipeline computes them
    assert torch.equal(v2_effnet_to_raw(io["prior_final_x"]), io["image_embeddings"])
    assert torch.equal(v2.V2_STAGE_A_SCALE * io["decoder_final_x"], io["vqgan_decode_input"])
    assert (v2.decode_v2(stage_a, io["decoder_final_x"]) - io["image"]).abs().max() < 1e-5


def test_size_table(chain):
    meta, _, _, _, decoder, _ = chain
    for row in meta["size_rules"]["table"]:
        side = row["image_side"]
        assert v2.prior_latent_size(side, side) == (row["prior_latent_side"],) * 2
        assert v2.decoder_latent_size(*v2.prior_latent_size(side, side)) == (row["decoder_latent_side"],) * 2
        assert v2.output_size(side, side) == (row["image_side_out"],) * 2
        if row["decoder_runs"]:
            v2.check_size_v2(side, side)
        else:
            with pytest.raises(ValueError, match=f"cannot make {side}x{side}"):
                v2.check_size_v2(side, side)
            fixed = v2.round_size_v2(side, side)
            v2.check_size_v2(*fixed)
            assert fixed[0] % 128 == 0 and abs(fixed[0] - side) <= 64
    assert v2.round_size_v2(960, 700) == (1024, 640) and v2.round_size_v2(1000, 1024) == (1024, 1024)
    # the tiny decoder has the released 4-level structure: it really cannot take a 17x17 prior latent
    text = torch.zeros(1, 77, decoder.clip_mapper.in_features)
    with pytest.raises(ValueError, match=f"multiples of {decoder.size_multiple}"):
        v2.sample_decoder_v2(decoder, torch.zeros(1, 16, 17, 17), v2.V2Text(text, text),
                             generator=torch.Generator().manual_seed(0))


def test_decoder_guidance_uses_zero_effnet_and_negative_text(chain):
    _, _, _, _, decoder, _ = chain
    meta, _, io = load_v2("v2_sampling_decoder_cfg")
    x = v2.sample_decoder_v2(decoder, io["cond.effnet"], v2.V2Text(io["cond.clip"], io["uncond.clip"]),
                             generator=torch.Generator().manual_seed(recorded_seed(meta["call"]["generator"])),
                             settings=v2.DecoderSettings(steps=meta["num_steps"], cfg=meta["call"]["guidance_scale"]))
    assert rel_err(x, io["final_x"]) < 1e-3


def small_v2_tower():
    torch.manual_seed(0)
    model = CLIPTextEncoder(width=16, layers=1, heads=2, mlp_width=32, projection_dim=None, family="v2")
    torch.nn.init.normal_(model.positional_embedding, std=0.5)
    return model.eval()


def test_encode_text_v2_sides():
    model = small_v2_tower()
    with torch.no_grad():
        plain = v2.encode_text_v2(model, ["a fox!", "snow"], num_images_per_prompt=2)
        ref = model(*tokenize(["a fox!", "snow", ""], family="v2")).last_hidden_state
        negative = v2.encode_text_v2(model, ["a fox!", "snow"], "blurry")
        neg_ref = model(*tokenize("blurry", family="v2")).last_hidden_state
    assert plain.cond.shape == (4, 77, 16)
    assert torch.equal(plain.cond, ref[:2].repeat_interleave(2, dim=0))
    assert torch.equal(plain.uncond, ref[2:].expand(4, -1, -1))  # the embedding of "", not zeros
    assert torch.equal(negative.uncond, neg_ref.expand(2, -1, -1))
    with pytest.raises(ValueError, match="negative prompts"):
        v2.encode_text_v2(model, ["a", "b", "c"], ["x", "y"])
    stable_cascade = CLIPTextEncoder(width=16, layers=1, heads=2, mlp_width=32, projection_dim=8)
    with pytest.raises(ValueError, match="family 'v2'"):
        v2.encode_text_v2(stable_cascade, "a fox")


class SpyPrior(torch.nn.Module):
    """The prior, recording the model times it is called with."""

    def __init__(self, prior):
        super().__init__()
        self.prior, self.projection, self.times = prior, prior.projection, []

    def forward(self, x, r, c):
        self.times.append(r[0].item())
        return self.prior(x, r, c)


def test_prior_img2img_starts_at_denoise(chain):
    _, io, _, prior, _, _ = chain
    spy = SpyPrior(prior)
    width = prior.cond_mapper[0].in_features
    text = v2.V2Text(torch.randn(1, 77, width), torch.randn(1, 77, width))
    out = v2.sample_prior_v2(spy, text, latent_size=(3, 3), generator=torch.Generator().manual_seed(0),
                             init_latent=io["prior_final_x"], denoise=0.5)
    assert spy.times[0] == 0.5 and spy.times[1:] == [t for t in v2.PriorSettings().grid().tolist() if 0 < t < 0.5]
    assert out.shape == io["prior_final_x"].shape
    spy.times.clear()
    v2.sample_prior_v2(spy, text, latent_size=(3, 3), generator=torch.Generator().manual_seed(0),
                       settings=v2.PriorSettings(steps=60))
    assert len(spy.times) == 60 and spy.times[:2] == [1.0, pytest.approx(59 / 60)]


def test_encode_semantic_v2_is_the_v2_effnet_on_the_resized_image():
    meta, sd, _ = load_v2("v2_effnet_encoder")
    effnet = EfficientNetEncoder(**meta["config"], backbone_setting=meta["backbone_setting"], family="v2")
    effnet.load_state_dict(sd, strict=True)
    effnet.eval()
    images = torch.rand(1, 3, 100, 130, generator=torch.Generator().manual_seed(0))
    latent = v2.encode_semantic_v2(effnet, images, latent_size=(3, 4))
    with torch.no_grad():
        assert torch.equal(latent, effnet(semantic_input(images, (3, 4))))
    with pytest.raises(ValueError, match="family='v2'"):
        v2.encode_semantic_v2(EfficientNetEncoder(backbone_setting=meta["backbone_setting"]), images)
