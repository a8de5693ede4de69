"""Textual-inversion embeddings in prompts: ``embedding:NAME`` (ComfyUI's syntax) puts the file's
vectors at its token positions, exactly as a vocabulary row holding them would; bad names, widths
and files get a message naming the embedding."""

import copy

import pytest
import torch
from conftest import load_parity
from safetensors.torch import save_file

from wuerstchen.text.embeddings import EmbeddingError, EmbeddingFolders, read_embedding_file
from wuerstchen.text.encoder import CLIPTextEncoder

WIDTH = 24


@pytest.fixture(scope="module")
def encoder():
    _, weights, _ = load_parity("clip_text")
    return CLIPTextEncoder.from_state_dict(weights, heads=4)


@pytest.fixture()
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "embeddings"
    (root / "styles").mkdir(parents=True)
    vectors = {"clip_g": torch.randn(2, WIDTH, generator=g), "clip_l": torch.randn(2, 16, generator=g)}
    save_file(vectors, str(root / "styles" / "ink.safetensors"))  # SDXL-style: both encoders' parts
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH, generator=g)}, "name": "old", "step": 500},
               str(root / "old.pt"))  # Automatic1111's layout
    torch.save(torch.randn(3, WIDTH, generator=g), str(root / "three.bin"))
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, str(root / "sd15.safetensors"))
    save_file({"bundle_emb.a.clip_g": torch.randn(1, WIDTH, generator=g),  # a OneTrainer LoRA's tokens
               "bundle_emb.b.clip_g": torch.randn(2, WIDTH, generator=g),
               "lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(root / "onetrainer.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((root / "styles" / "ink.safetensors").read_bytes())
    return root, vectors


def row_encoding(encoder, pieces, mask_len=None):
    """Reference: the vectors as vocabulary rows 1000, 1001, … of a copy of the encoder."""
    twin = copy.deepcopy(encoder)
    ids, row = [], 1000
    for piece in pieces:
        if isinstance(piece, str):
            ids += twin.tokenizer.encode(piece)
        else:
            for vector in piece:
                with torch.no_grad():
                    twin.token_embedding.weight[row] = vector
                ids.append(row)
                row += 1
    window, mask = twin.tokenizer.window(ids)
    with torch.no_grad():
        return twin.encode(torch.tensor([window]), torch.tensor([mask]))


def test_embedding_vectors_take_their_token_positions(encoder, folder):
    root, vectors = folder
    with torch.no_grad():
        text, pooled = encoder.encode_prompts("a photo, embedding:styles/ink, at night", embeddings=root)
    want_text, want_pooled = row_encoding(encoder, ["a photo, ", vectors["clip_g"], ", at night"])
    assert torch.equal(text, want_text) and torch.equal(pooled, want_pooled)
    assert encoder.tokenizer.added_tokens == {} and encoder.added_token_embedding is None  # nothing registered


def test_every_file_layout(encoder, folder):
    root, _ = folder
    resolver = EmbeddingFolders([root])
    old = torch.load(str(root / "old.pt"), weights_only=True)["string_to_param"]["*"]
    assert torch.equal(resolver("old"), old)
    assert torch.equal(resolver("three.bin"), torch.load(str(root / "three.bin"), weights_only=True))
    from safetensors.torch import load_file

    bundle = load_file(str(root / "onetrainer.safetensors"))
    assert torch.equal(resolver("onetrainer"), torch.cat([bundle["bundle_emb.a.clip_g"], bundle["bundle_emb.b.clip_g"]]))
    with torch.no_grad():
        text, _ = encoder.encode_prompts("embedding:three x embedding:old", embeddings=[root])
    want, _ = row_encoding(encoder, [resolver("three"), " x ", old])
    assert torch.equal(text, want)


def test_weights_apply_to_embedding_tokens(encoder, folder):
    root, _ = folder
    with torch.no_grad():
        plain, _ = encoder.encode_prompts("a embedding:styles/ink b", embeddings=root)
        bare, _ = encoder.encode_prompts("a embedding:styles/ink:1.5 b", embeddings=root)
        bracket, _ = encoder.encode_prompts("a (embedding:styles/ink:1.5) b", embeddings=root)
        empty, _ = encoder.encode_prompts("")
    assert torch.equal(bare, bracket)
    changed = (bare != plain).any(-1)[0].nonzero().flatten().tolist()
    assert changed == [2, 3]  # BOS, "a", then the two vectors
    want = empty[0, 2:4] + 1.5 * (plain[0, 2:4] - empty[0, 2:4])
    assert torch.allclose(bare[0, 2:4], want, atol=1e-6, rtol=0)


def test_without_a_resolver_the_text_is_ordinary_prompt_text(encoder):
    with torch.no_grad():
        text, _ = encoder.encode_prompts("embedding:ink")
        official, _ = encoder.encode(*encoder.tokenizer("embedding:ink"))
    assert torch.equal(text, official)


def test_mappings_and_callables_resolve_too(encoder):
    vector = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, _ = encoder.encode_prompts("x embedding:v", embeddings={"v": vector})
        b, _ = encoder.encode_prompts("x embedding:v", embeddings=lambda name: vector)
    want, _ = row_encoding(encoder, ["x ", vector])
    assert torch.equal(a, want) and torch.equal(b, want)


@pytest.mark.parametrize("prompt, message", [
    ("a embedding:nope b", r"embedding:nope: no such file in .*embeddings .*available: old, onetrainer, sd15, styles/ink, three"),
    ("embedding:../outside", r"embedding:../outside: no such file"),
    ("embedding:sd15", r"embedding:sd15 has vectors 768 wide, but this text encoder takes 24"),
])
def test_missing_and_foreign_embeddings_are_named(encoder, folder, prompt, message):
    root, _ = folder
    with pytest.raises(EmbeddingError, match=message):
        encoder.encode_prompts(prompt, embeddings=root)


class Payload:
    """Any object that is not a tensor: weights_only loading must refuse to build it."""


def test_unsafe_or_broken_files_are_refused(tmp_path):
    torch.save({"clip_g": torch.zeros(1, WIDTH), "x": Payload()}, str(tmp_path / "evil.pt"))
    with pytest.raises(EmbeddingError, match="evil.pt cannot be read safely"):
        read_embedding_file(tmp_path / "evil.pt", "evil")
    save_file({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(EmbeddingError, match="no single set of vectors"):
        read_embedding_file(tmp_path / "two.safetensors", "two")
    save_file({"clip_g": torch.full((1, WIDTH), float("nan"))}, str(tmp_path / "nan.safetensors"))
    _, weights, _ = load_parity("clip_text")
    encoder = CLIPTextEncoder.from_state_dict(weights, heads=4)
    with pytest.raises(EmbeddingError, match="embedding:nan.*NaN"):
        encoder.encode_prompts("embedding:nan", embeddings=tmp_path)


def test_the_nodes_look_in_the_embeddings_folder(tmp_path):
    from nodes import host

    st = host.state()
    saved = st.models_root
    try:
        host.configure(tmp_path)
        assert host.embedding_folders() == [tmp_path / "embeddings"]
    finally:
        st.models_root = saved
