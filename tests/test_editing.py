"""Layered editing core: the DDIM loop, inversion round trips and the key-mask attention hook."""

import math

import pytest
import torch
import torch.nn.functional as F

from editing_helpers import tiny_cascade
from wuerstchen.sampling import samplers as sampling
from wuerstchen.editing import attention_mask
from wuerstchen.editing.denoise import denoise
from wuerstchen.editing.guidance import Guidance
from wuerstchen.editing.inversion import invert, regenerate, round_trip_error
from wuerstchen.models import blocks
from wuerstchen.sampling.schedule import step_schedule


@pytest.fixture(scope="module")
def parts(tiny_dir):
    cascade = tiny_cascade(tiny_dir)
    stage_c = cascade.model("stage_c").module
    cond = cascade.encode_prompts(["a red ball on a table"])
    uncond = cascade.encode_prompts([""])
    latent = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    return stage_c, cond, uncond, latent


def test_denoise_is_the_ddim_sampler(parts):
    stage_c, cond, uncond, _ = parts
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    for cfg in (1.0, 3.0):
        guidance = Guidance.prepare(stage_c, cond, uncond, cfg=cfg)
        ours = denoise(stage_c, x, guidance, step_schedule(5, shift=2.0))[1]
        c_in, u_in = cond.stage_c_inputs(1, 20), uncond.stage_c_inputs(1, 20)
        theirs = sampling.sample(stage_c, x, c_in, u_in, steps=5, cfg=cfg, shift=2.0, sampler="ddim")
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), cfg


def test_inversion_round_trip_error_decreases_with_steps(parts):
    stage_c, cond, _, latent = parts
    guidance = Guidance.prepare(stage_c, cond)
    errors = {steps: round_trip_error(stage_c, latent, guidance, steps=steps) for steps in (5, 10, 20, 40)}
    values = [errors[s] for s in sorted(errors)]
    assert all(later < earlier for earlier, later in zip(values, values[1:])), errors
    assert values[-1] < 0.5 * values[0], errors
    refined = round_trip_error(stage_c, latent, guidance, steps=10, refine=3)
    assert refined < errors[10], (refined, errors)


def test_inverted_trajectory_regenerates_its_source_and_ends_clean(parts):
    stage_c, cond, _, latent = parts
    guidance = Guidance.prepare(stage_c, cond)
    trajectory = invert(stage_c, latent, guidance, steps=40, refine=6)
    assert trajectory.latents.shape == (41, 1, 16, 6, 6)
    assert torch.allclose(regenerate(stage_c, trajectory, guidance), latent, atol=5e-3)
    # the clean end is a·x0 + b·ε at logSNR 9.2: within 3% of the source
    assert torch.allclose(trajectory.latents[-1], latent, atol=0.05 * float(latent.abs().max()))


def _captured_sdpa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
        calls.append((q, k, v, attn_mask))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", spy)
    return calls, original


def test_key_mask_gives_exactly_zero_weight_to_masked_keys(parts, monkeypatch):
    stage_c, cond, uncond, latent = parts
    hole = torch.zeros(2, 6, 6, dtype=torch.bool)
    hole[0, 1:4, 2:5] = True  # instance 0 has a hole, instance 1 none
    x = torch.cat([latent, latent.flip(-1)])
    guidance = Guidance.prepare(stage_c, cond, uncond, batch=2, cfg=2.0)
    calls, sdpa = _captured_sdpa(monkeypatch)
    with attention_mask.key_mask(stage_c, hole) as hooked:
        guidance(stage_c, x, torch.tensor(0.5))
    assert len(hooked) == 4 and len(calls) == 4  # the tiny Stage C's four self-attention blocks
    masked_keys = hole.reshape(2, 36)
    for q, k, v, keep in list(calls):
        assert q.shape[0] == 4  # the [cond; uncond] batch
        # the probabilities, computed here from q and k: softmax(q·kᵀ/√d) over the keys kept
        logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = keep.expand(-1, 1, q.shape[2], -1)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        for row in range(4):
            inst = row % 2
            image = probs[row, :, :, :36]
            assert torch.all(image[..., masked_keys[inst]] == 0)  # exactly zero, not small
            assert torch.all(image[..., ~masked_keys[inst]] > 0)
            assert torch.all(probs[row, :, :, 36:] > 0)  # conditioning keys keep their weight
        # and the attention output is those probabilities times v
        ours = probs @ v.float()
        theirs = sdpa(q, k, v, attn_mask=keep)
        assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_key_mask_changes_only_the_masked_instance_and_is_restored(parts):
    stage_c, cond, _, latent = parts
    x = torch.cat([latent, latent])
    guidance = Guidance.prepare(stage_c, cond, batch=2)
    r = torch.tensor(0.7)
    plain = guidance(stage_c, x, r)
    hole = torch.zeros(2, 6, 6, dtype=torch.bool)
    hole[1, :3, :3] = True
    with attention_mask.key_mask(stage_c, hole):
        masked = guidance(stage_c, x, r)
    assert torch.allclose(masked[0], plain[0], atol=1e-5)  # no hole: the same prediction
    assert not torch.allclose(masked[1], plain[1], atol=1e-3)
    modules = attention_mask.self_attention_modules(stage_c)
    assert all("_sdpa" not in m.__dict__ for m in modules)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_mask.key_mask(stage_c, hole):
            raise RuntimeError("boom")
    assert all("_sdpa" not in m.__dict__ for m in modules)
    assert torch.equal(guidance(stage_c, x, r), plain)


def test_key_mask_refuses_a_hole_of_the_wrong_size(parts):
    stage_c, cond, _, latent = parts
    guidance = Guidance.prepare(stage_c, cond)
    with attention_mask.key_mask(stage_c, torch.zeros(1, 5, 5, dtype=torch.bool)):
        with pytest.raises(ValueError, match="image tokens"):
            guidance(stage_c, latent, torch.tensor(0.5))
