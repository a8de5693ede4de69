"""All or nothing: a LoRA that cannot be applied completely leaves the cached model, its tokenizer
and its learned words exactly as they were, and a later valid LoRA still works."""

import pytest
import torch
from lora_helpers import (TEXT_CONFIG, assert_same, parity_stage_c, parity_text_encoder, snapshot,  # noqa: F401
                          stage_c, text_encoder)

from wuerstchen.lora import LoraError, LoraFile, TokenEmbedding, apply_loras, check_lora, load_lora, parse_lora
from wuerstchen.files.tiny import write_tiny_lora

PROMPT = "a photo of tinytoken_0 and tinytoken_1 at night"


def encode(model):
    with torch.no_grad():
        return model.encode_prompts(PROMPT)


def valid_token_lora(stage_c_model):
    """OneTrainer-style: a CLIP-G LoRA for every layer plus a learned token "tinytoken" (2 vectors)."""
    return parse_lora(write_tiny_lora(None, "onetrainer", stage_c_model, text_config=TEXT_CONFIG, seed=5),
                      name="good.safetensors")


def with_tokens(lora, *embeddings):
    """The same LoRA with other learned tokens: files the parser would refuse, to test apply itself."""
    return LoraFile(lora.name, lora.format, lora.stage_c, lora.text, list(embeddings), lora.num_keys)


def assert_untouched(model, before_params, before_encoding):
    assert_same(model, before_params)
    assert model.tokenizer.added_tokens == {} and model.added_token_embedding is None
    after = encode(model)
    assert all(torch.equal(a, b) for a, b in zip(after, before_encoding))


def test_a_valid_token_lora_works_after_every_failed_one(text_encoder, stage_c):
    good = valid_token_lora(stage_c)
    before_params, before_encoding = snapshot(text_encoder), encode(text_encoder)
    width = text_encoder.width
    bad_files = {
        "token of another width": with_tokens(good, TokenEmbedding("tinytoken", torch.randn(2, width + 6), "x")),
        "'!' in a token word": with_tokens(good, TokenEmbedding("fine", torch.randn(1, width), "a"),
                                           TokenEmbedding("bad!tok", torch.randn(1, width), "b")),
        "a text weight that does not fit": LoraFile("misfit", "kohya", [], [
            *good.text[:3], good.text[3].replace(factors={"up": torch.zeros(25, 2), "down": torch.zeros(2, 24)})],
            good.embeddings, 0),
    }
    for why, bad in bad_files.items():
        with pytest.raises(LoraError):
            apply_loras(text_encoder, [(good, 1.0), (bad, 1.0)], part="text")
        assert_untouched(text_encoder, before_params, before_encoding), why
    with apply_loras(text_encoder, [(good, 1.0)], part="text"):
        assert set(text_encoder.tokenizer.added_tokens) == {"tinytoken_0", "tinytoken_1"}
        assert not torch.equal(encode(text_encoder)[0], before_encoding[0])
    assert_untouched(text_encoder, before_params, before_encoding)


def test_a_failure_while_registering_tokens_puts_the_weights_back(text_encoder, stage_c, monkeypatch):
    good = valid_token_lora(stage_c)
    originals = {n: p.data for n, p in text_encoder.named_parameters()}
    before_params, before_encoding = snapshot(text_encoder), encode(text_encoder)

    def broken(words, vectors):
        raise RuntimeError("out of memory while growing the table")

    monkeypatch.setattr(text_encoder, "add_token_embeddings", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_loras(text_encoder, [(good, 1.0)], part="text")
    monkeypatch.undo()
    for name, p in text_encoder.named_parameters():  # the very same tensors, not copies
        assert p.data is originals[name] or p.data.data_ptr() == originals[name].data_ptr(), name
    assert_untouched(text_encoder, before_params, before_encoding)


def test_unpatching_gives_a_replaced_word_its_previous_vector(text_encoder, stage_c):
    good = valid_token_lora(stage_c)
    mine = torch.randn(1, text_encoder.width, generator=torch.Generator().manual_seed(3))
    text_encoder.add_token_embeddings(["TinyToken_1"], mine)
    with apply_loras(text_encoder, [(good, 1.0)], part="text"):
        assert not torch.equal(text_encoder.added_token_vectors()["tinytoken_1"], mine[0])
    assert list(text_encoder.tokenizer.added_tokens) == ["tinytoken_1"]
    assert torch.equal(text_encoder.added_token_vectors()["tinytoken_1"], mine[0])


def test_check_lora_refuses_tokens_of_another_width_without_touching_anything(text_encoder, stage_c):
    good = valid_token_lora(stage_c)
    wide = with_tokens(good, TokenEmbedding("wide", torch.randn(1, 1280), "bundle_emb.wide"))
    before = snapshot(text_encoder)
    with pytest.raises(LoraError, match=r"learned token 'wide' .* 1280 wide but the text encoder's embeddings are 24"):
        check_lora(text_encoder, wide, "text")
    assert_same(text_encoder, before)


@pytest.mark.parametrize("tensors, message", [
    ({"bundle_emb.bad!tok.clip_g": torch.zeros(1, 24)}, r"learned token bundle_emb.bad!tok cannot be used: .*'!'"),
    ({"bundle_emb.a.clip_g": torch.zeros(1, 24), "bundle_emb.b.clip_g": torch.zeros(1, 16)},
     r"different widths \[16, 24\]"),
    ({"bundle_emb. x.clip_g": torch.zeros(1, 24)}, "without outer whitespace"),
    ({"embeddings.embeddings": torch.zeros(2, 24), "embeddings.indices": torch.tensor([49408])},
     "embeddings.indices is missing or of another length"),
])
def test_files_whose_tokens_cannot_be_registered_are_refused_on_load(tmp_path, tensors, message):
    from safetensors.torch import save_file

    tensors = dict(tensors)
    tensors["lora_unet_clip_txt_mapper.lora_down.weight"] = torch.zeros(2, 24)
    tensors["lora_unet_clip_txt_mapper.lora_up.weight"] = torch.zeros(40, 2)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match=message):
        load_lora(tmp_path / "bad.safetensors")


def test_stage_c_patch_is_all_or_nothing_across_a_stack(stage_c):
    good = parse_lora(write_tiny_lora(None, "kohya", stage_c, seed=1), name="good.safetensors")
    bad = parse_lora({"lora_unet_clip_txt_mapper.lora_down.weight": torch.zeros(2, 24),
                      "lora_unet_clip_txt_mapper.lora_up.weight": torch.zeros(40, 2),
                      "lora_unet_down_blocks_0_0_channelwise_0.lora_down.weight": torch.zeros(2, 31),
                      "lora_unet_down_blocks_0_0_channelwise_0.lora_up.weight": torch.zeros(128, 2)}, name="bad")
    before = snapshot(stage_c)
    with pytest.raises(LoraError, match="1 of 2 Stage C modules have shapes that do not fit"):
        apply_loras(stage_c, [(good, 1.0), (bad, 1.0)])
    assert_same(stage_c, before)
