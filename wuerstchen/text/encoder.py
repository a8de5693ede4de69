"""CLIP ViT-bigG-14 text encoder, called exactly as the official Stable Cascade code calls it.

Stage C is conditioned on ``clip_text`` = the output of the *last block before* the final
LayerNorm ([B, 77, 1280]) and ``clip_text_pooled`` = the final-LN state at the first EOS,
projected ([B, 1, 1280]).  The official call passes the tokenizer's attention mask, so padded
positions are masked as attention keys (on top of the causal mask); padding uses id 0.

The block stack is open_clip's ``Transformer``; the state dict uses open_clip names (fused
``in_proj``) except ``text_projection``, kept as a bias-free Linear in the Hugging Face
orientation [proj, width] so that LoRA deltas keyed by HF names need no transposition.
Loading accepts the Hugging Face layout of the released ``text_encoder/model.safetensors`` (with
or without the ``text_model.`` wrapper) and open_clip's layout.

Würstchen v2 (``family="v2"``) uses two projection-free towers (``CLIPTextModel``): bigG for the
prior and ViT-H-14 for the decoder. Both are conditioned on ``last_hidden_state``, the output
*after* the final LayerNorm, and tokenize with pad id 49407 and ``!`` as an ordinary character
(see :mod:`wuerstchen.text.tokenizer`). :meth:`CLIPTextEncoder.encode` returns the family's sequence.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .clip_transformer import (assemble, build_transformer, find_prefix, hf_layer_key_names,
                               hf_layer_key_to_param, place, run_blocks, unknown_keys_error)
from .tokenizer import (EOS_ID, MAX_CONTENT_TOKENS, CLIPTokenizer, parse_prompt_weights,
                        split_embedding_refs, tokenize)

__all__ = [
    "BIGG14_TEXT_CONFIG", "V2_PRIOR_TEXT_CONFIG", "V2_DECODER_TEXT_CONFIG", "CLIPTextEncoder", "TextEncoding",
    "config_from_state_dict", "convert_text_state_dict", "hf_text_key_names", "hf_text_key_to_param", "tokenize",
]

TEXT_FAMILIES = ("v3", "v2")
"""Stable Cascade (v3) and Würstchen v2: which tokenizer, and which sequence conditions the model."""

BIGG14_TEXT_CONFIG = MappingProxyType(dict(
    width=1280, layers=32, heads=20, mlp_width=5120, vocab_size=49408, context_length=77,
    projection_dim=1280, activation="gelu", layer_norm_eps=1e-5,
))
V2_PRIOR_TEXT_CONFIG = MappingProxyType({**BIGG14_TEXT_CONFIG, "projection_dim": None, "family": "v2"})
"""Würstchen v2 prior text tower: bigG without projection (warp-ai/wuerstchen-prior ``text_encoder/``)."""
V2_DECODER_TEXT_CONFIG = MappingProxyType(dict(
    width=1024, layers=24, heads=16, mlp_width=4096, vocab_size=49408, context_length=77,
    projection_dim=None, activation="gelu", layer_norm_eps=1e-5, family="v2",
))
"""Würstchen v2 decoder text tower: CLIP ViT-H-14 without projection (warp-ai/wuerstchen ``text_encoder/``)."""

_HF_ANCHOR = "text_model.embeddings.token_embedding.weight"
_HF_BARE_ANCHOR = "embeddings.token_embedding.weight"  # HF names without the text_model. wrapper
_OPEN_CLIP_ANCHOR = "token_embedding.weight"
_HF_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection.weight",
}
_HF_LAYER_HEAD = "text_model.encoder.layers."
# Keys of other towers / training state that may share a file with the text tower.
_FOREIGN_HF = ("vision_model.", "visual_projection.", "logit_scale", "logit_bias")
_FOREIGN_OPEN_CLIP = ("visual.", "logit_scale", "logit_bias", "attn_mask")


class TextEncoding(NamedTuple):
    """Everything one text-encoder call produces (Hugging Face names where they exist)."""

    clip_text: torch.Tensor          # [B, L, W] last block output, before the final LayerNorm
    clip_text_pooled: torch.Tensor | None  # [B, 1, P] projected pooled state; None without projection
    last_hidden_state: torch.Tensor  # [B, L, W] after the final LayerNorm
    pooled_output: torch.Tensor      # [B, W] last_hidden_state at pooled_index
    pooled_index: torch.Tensor       # [B] first position holding the EOS id 49407
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings, then each block's output


def hf_text_key_to_param(hf_key: str, width: int) -> tuple[str, slice | None]:
    """Map a Hugging Face text-encoder key to ``(our parameter name, rows or None)``.

    Accepts parameter keys (``...q_proj.weight``) or module paths (``...q_proj``, meaning the
    weight), with or without the leading ``text_model.``.  ``rows`` selects the part of the
    fused ``in_proj`` tensor that a q/k/v key corresponds to.
    """
    key = hf_key
    if not key.endswith((".weight", ".bias")):
        key += ".weight"
    if not key.startswith("text_model.") and key != "text_projection.weight":
        key = "text_model." + key
    if key in _HF_RENAMES:
        return _HF_RENAMES[key], None
    if key.startswith(_HF_LAYER_HEAD):
        return hf_layer_key_to_param(key[len(_HF_LAYER_HEAD):], width)
    raise KeyError(f"not a CLIP text-encoder parameter: {hf_key!r}")


def hf_text_key_names(layers: int) -> list[str]:
    """Every Hugging Face key of a text tower with ``layers`` blocks (what hf_text_key_to_param maps)."""
    names = list(_HF_RENAMES)
    for index in range(layers):
        names += [_HF_LAYER_HEAD + key for key in hf_layer_key_names(index)]
    return names


def convert_text_state_dict(sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                            dtype: torch.dtype | None = None,
                            device=None) -> dict[str, torch.Tensor]:
    """Any supported layout -> this module's state dict (cast/moved tensor by tensor).

    The tower is found by its token-embedding key; ``prefix`` overrides that search.  Keys
    outside the prefix belong to other models and are ignored, as are ``position_ids``,
    ``logit_scale`` and other towers of a full CLIP checkpoint.  Anything else unknown raises.
    """
    if prefix is None:
        prefix, _ = find_prefix(sd.keys(), (_HF_ANCHOR, _HF_BARE_ANCHOR, _OPEN_CLIP_ANCHOR), "CLIP text")
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if _HF_BARE_ANCHOR in own and _HF_ANCHOR not in own:  # put the wrapper back (quirk 16)
        own = {(k if k.startswith(_FOREIGN_HF) or k == "text_projection.weight" else "text_model." + k): v
               for k, v in own.items()}
    hf = _HF_ANCHOR in own
    pieces: dict[str, list[tuple[slice | None, torch.Tensor]]] = {}
    unknown = []
    if hf:
        width = own[_HF_ANCHOR].shape[1]
        for key, tensor in own.items():
            if key.endswith("position_ids") or key.startswith(_FOREIGN_HF):
                continue
            try:
                name, rows = hf_text_key_to_param(key, width)
            except KeyError:
                unknown.append(prefix + key)
                continue
            pieces.setdefault(name, []).append((rows, place(tensor, dtype, device)))
    else:
        width = own[_OPEN_CLIP_ANCHOR].shape[1]
        for key, tensor in own.items():
            if key.startswith(_FOREIGN_OPEN_CLIP):
                continue
            if key == "text_projection":  # open_clip keeps [width, proj]: y = x @ P
                key, tensor = "text_projection.weight", tensor.t().contiguous()
            elif not key.startswith(("token_embedding.", "positional_embedding", "transformer.",
                                     "ln_final.", "text_projection.weight")):
                unknown.append(prefix + key)
                continue
            pieces[key] = [(None, place(tensor, dtype, device))]
    if unknown:
        raise unknown_keys_error("CLIP text", unknown)
    return assemble(pieces, width, "CLIP text")


def config_from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                           heads: int | None = None, activation: str = "gelu",
                           require_projection: bool = True) -> dict:
    """Constructor kwargs inferred from tensor shapes (HF or open_clip layout).

    Heads cannot be read from shapes: the default is width // 64 (true for every released CLIP
    text tower, e.g. 20 for bigG, 16 for ViT-H-14).  The activation defaults to exact GELU as in
    ViT-bigG-14 and ViT-H-14.  Without ``require_projection`` a tower without text projection
    (Würstchen v2's ``CLIPTextModel``) gets ``projection_dim`` None.
    """
    ours = convert_text_state_dict(sd, prefix=prefix, device="meta")
    vocab_size, width = ours["token_embedding.weight"].shape
    if "text_projection.weight" not in ours and require_projection:
        raise KeyError("the state dict has no text projection; Stable Cascade needs the "
                       "CLIPTextModelWithProjection weights (text_encoder/model.safetensors)")
    layers = 0
    while f"transformer.resblocks.{layers}.ln_1.weight" in ours:
        layers += 1
    return dict(
        width=width, layers=layers, heads=heads or max(1, width // 64),
        mlp_width=ours["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width,
        vocab_size=vocab_size, context_length=ours["positional_embedding"].shape[0],
        projection_dim=ours["text_projection.weight"].shape[0] if "text_projection.weight" in ours else None,
        activation=activation,
    )


class CLIPTextEncoder(nn.Module):
    """CLIP text tower (default: ViT-bigG-14 as Stable Cascade uses it) with its tokenizer.

    ``projection_dim`` None builds a tower without text projection (no pooled output).
    ``family`` picks the tokenizer and the sequence :meth:`encode` returns: "v3" (Stable Cascade)
    the last block's output before the final LayerNorm, "v2" (Würstchen v2) ``last_hidden_state``.
    """

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 20,
                 mlp_width: int = 5120, vocab_size: int = 49408, context_length: int = 77,
                 projection_dim: int | None = 1280, activation: str = "gelu",
                 layer_norm_eps: float = 1e-5, family: str = "v3"):
        super().__init__()
        if family not in TEXT_FAMILIES:
            raise ValueError(f"CLIPTextEncoder family must be one of {TEXT_FAMILIES}, got {family!r}")
        self.family = family
        self.width, self.heads, self.context_length = width, heads, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = build_transformer(width, layers, heads, mlp_width, activation,
                                             layer_norm_eps)
        self.ln_final = nn.LayerNorm(width, eps=layer_norm_eps)
        self.text_projection = None if projection_dim is None else nn.Linear(width, projection_dim, bias=False)
        # Rows for words added with add_token_embeddings (ids from vocab_size on).
        self.register_buffer("added_token_embedding", None, persistent=False)
        self.tokenizer = CLIPTokenizer(family=family)

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device=None, *, prefix: str | None = None, heads: int | None = None,
                        activation: str = "gelu", family: str | None = None) -> "CLIPTextEncoder":
        """Build on meta and fill with the (converted) tensors directly, in ``dtype``.

        ``family`` None means "v3" for a tower with text projection (Stable Cascade's
        ``CLIPTextModelWithProjection``) and "v2" for one without (Würstchen v2's ``CLIPTextModel``).
        """
        config = config_from_state_dict(sd, prefix=prefix, heads=heads, activation=activation,
                                        require_projection=family == "v3")
        if family is None:
            family = "v3" if config["projection_dim"] is not None else "v2"
        config["family"] = family
        ours = convert_text_state_dict(sd, prefix=prefix, dtype=dtype, device=device)
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict(ours, strict=True, assign=True)
        return model.eval()

    def hf_key_to_param(self, hf_key: str) -> tuple[str, slice | None]:
        """Where a Hugging Face-named weight lives here: ``(parameter name, rows or None)``."""
        return hf_text_key_to_param(hf_key, self.width)

    # ---- added words (textual-inversion style tokens of LoRAs) -------------------------
    def add_token_embeddings(self, words: Sequence[str], vectors: torch.Tensor) -> list[int]:
        """Make ``words`` single tokens whose input embeddings are ``vectors`` [N, width].

        This is what the official LoRA trainer does with ``tokenizer.add_tokens``: the words get
        ids from 49408 on and are matched case-insensitively in prompts.  Re-adding a word
        replaces its vector.  Returns the ids.  Everything is checked before anything changes:
        on a ValueError the tokenizer and the table are as they were.
        """
        words = list(words)
        if vectors.ndim != 2 or vectors.shape != (len(words), self.width):
            raise ValueError(f"vectors must be [{len(words)}, {self.width}] for {len(words)} "
                             f"word(s), got {list(vectors.shape)}")
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("token vectors hold NaN or infinite values")
        keys = [self.tokenizer.check_added_word(word) for word in words]
        weight = self.token_embedding.weight
        rows = dict(self.added_token_vectors())
        rows.update(zip(keys, vectors.to(device=weight.device, dtype=weight.dtype)))
        ids = self.tokenizer.add_tokens(keys)  # cannot fail now; existing words keep their ids
        self.added_token_embedding = torch.stack([rows[w] for w in self.tokenizer.added_tokens])
        return ids

    def remove_token_embeddings(self, words: Sequence[str] | None = None) -> None:
        """Forget added words (all when None); the remaining ones are renumbered."""
        rows = self.added_token_vectors()
        self.tokenizer.remove_tokens(words)
        kept = self.tokenizer.added_tokens
        self.added_token_embedding = torch.stack([rows[w] for w in kept]) if kept else None

    def added_token_vectors(self) -> dict[str, torch.Tensor]:
        """Each added word (normalised) and its vector."""
        table = self.added_token_embedding
        words = list(self.tokenizer.added_tokens)  # in id order
        if table is None or table.shape[0] != len(words):
            if words or table is not None:
                raise RuntimeError(f"added words {words} and their vectors are out of step")
            return {}
        return {word: table[i] for i, word in enumerate(words)}

    def embed_tokens(self, input_ids: torch.Tensor, inline_embeddings: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Token embeddings, including the rows of added words.

        ``inline_embeddings`` [K, width] are vectors given for this call only (textual-inversion
        embeddings in a prompt): id ``-1 - k`` stands for row k.
        """
        base = self.token_embedding.num_embeddings
        extra = self.added_token_embedding
        limit = base + (0 if extra is None else extra.shape[0])
        low = 0 if inline_embeddings is None else -int(inline_embeddings.shape[0])
        if input_ids.numel() and (int(input_ids.max()) >= limit or int(input_ids.min()) < low):
            raise ValueError(f"token ids must lie in [{low}, {limit}); got {int(input_ids.min())}.."
                             f"{int(input_ids.max())} ({limit - base} added word(s))")
        if extra is None and inline_embeddings is None:
            return self.token_embedding(input_ids)
        embedded = self.token_embedding(input_ids.clamp(min=0, max=base - 1))
        if extra is not None:
            added = extra.to(embedded.dtype)[(input_ids - base).clamp(min=0, max=extra.shape[0] - 1)]
            embedded = torch.where((input_ids >= base).unsqueeze(-1), added, embedded)
        if inline_embeddings is not None:
            rows = inline_embeddings.to(device=embedded.device, dtype=embedded.dtype)
            inline = rows[(-1 - input_ids).clamp(min=0, max=rows.shape[0] - 1)]
            embedded = torch.where((input_ids < 0).unsqueeze(-1), inline, embedded)
        return embedded

    # ---- encoding ----------------------------------------------------------------------
    def _attention_bias(self, attention_mask: torch.Tensor | None, length: int,
                        dtype: torch.dtype, device) -> torch.Tensor:
        """Additive mask: causal, plus padded keys masked when a mask is given (official)."""
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(device=device).bool()[:, None, :]
            allowed = allowed.repeat_interleave(self.heads, 0)  # [B * heads, L, L]
        blocked = torch.finfo(dtype).min
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return bias.masked_fill_(~allowed, blocked)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, *,
                inline_embeddings: torch.Tensor | None = None) -> TextEncoding:
        """Run the tower.  Pass the tokenizer's ``attention_mask`` for the official behaviour;
        without it only the causal mask applies (open_clip's behaviour).  For
        ``inline_embeddings`` see :meth:`embed_tokens`."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.context_length:
            raise ValueError(f"input_ids must be [B, <= {self.context_length}], got "
                             f"{list(input_ids.shape)}")
        device = self.token_embedding.weight.device
        input_ids = input_ids.to(device)
        length = input_ids.shape[1]
        x = self.embed_tokens(input_ids, inline_embeddings) + self.positional_embedding[:length]
        bias = self._attention_bias(attention_mask, length, x.dtype, device)
        clip_text, hidden = run_blocks(self.transformer, x, bias, collect=output_hidden_states)
        last = self.ln_final(clip_text)
        # First EOS, as transformers does for eos_token_id 49407 (0 for a row without one).
        index = (input_ids == EOS_ID).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=device), index]
        projection = self.text_projection
        return TextEncoding(
            clip_text=clip_text,
            clip_text_pooled=None if projection is None else projection(pooled).unsqueeze(1),
            last_hidden_state=last,
            pooled_output=pooled,
            pooled_index=index,
            hidden_states=(x, *hidden) if output_hidden_states else None,
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               inline_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning of this family: ``(sequence [B, L, W], pooled [B, 1, P] or None)``.

        "v3": Stable Cascade's ``(clip_text, clip_text_pooled)``; "v2": ``last_hidden_state``
        (after the final LayerNorm) and the pooled vector, None for v2's projection-free towers.
        For ``inline_embeddings`` see :meth:`embed_tokens`.
        """
        out = self.forward(input_ids, attention_mask, inline_embeddings=inline_embeddings)
        sequence = out.last_hidden_state if self.family == "v2" else out.clip_text
        return sequence, out.clip_text_pooled

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Official tokenization, also knowing this encoder's added words."""
        return self.tokenizer(prompts)

    def encode_prompts(self, prompts: str | Sequence[str], *, weights: bool = True,
                       long_prompts: bool = True, embeddings=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> ``(sequence [B, 77*k, W], pooled [B, 1, P] or None)``, as :meth:`encode`
        (for "v3" ``clip_text`` and ``clip_text_pooled``; for "v2" ``last_hidden_state`` and None).

        * A prompt without weights that fits in 75 tokens gives exactly the official encoding.
        * Longer prompts (``long_prompts``) are cut into windows of 75 tokens, each encoded as
          BOS + tokens + EOS padded to 77, and concatenated along the sequence; the pooled
          vector comes from the first window, which equals the official (truncated) encoding.
          Without ``long_prompts`` the prompt is truncated like the official code does.
          All prompts of one call must need the same number of windows.
        * ``weights``: ComfyUI syntax ``(word:1.3)``, ``(word)`` = x1.1, ``[word]`` = /1.1,
          ``\\(`` for a literal bracket.  Each weighted token's sequence row becomes
          ``z_empty + w * (z - z_empty)``, with z_empty the encoding of the empty prompt at the
          same position (ComfyUI's rule); the pooled vector is not weighted.
        * ``embeddings``: where ``embedding:NAME`` (ComfyUI's textual-inversion syntax; also
          ``embedding:NAME:1.2`` or ``(embedding:NAME:1.2)``) finds its vectors — a folder, a
          list of folders, a mapping name -> tensor/file, or a callable name -> tensor (see
          :func:`wuerstchen.text.embeddings.embedding_resolver`).  Each vector takes one token
          position.  Without it, such text is ordinary prompt text (the official behaviour).
        """
        from .embeddings import embedding_resolver

        resolver = embedding_resolver(embeddings)
        inline: list[torch.Tensor] = []
        found: dict[str, list[int]] = {}
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode_prompts() needs at least one prompt")
        windows, window_weights, counts = [], [], []
        for prompt in prompts:
            ids, token_weights = self._weighted_ids(prompt, weights, resolver, inline, found)
            if not long_prompts:
                ids, token_weights = ids[:MAX_CONTENT_TOKENS], token_weights[:MAX_CONTENT_TOKENS]
            starts = range(0, max(len(ids), 1), MAX_CONTENT_TOKENS)
            for s in starts:
                windows.append(self.tokenizer.window(ids[s:s + MAX_CONTENT_TOKENS]))
                chunk = token_weights[s:s + MAX_CONTENT_TOKENS]
                padding = [1.0] * (self.context_length - 1 - len(chunk))
                window_weights.append([1.0, *chunk, *padding])
            counts.append(len(starts))
        if len(set(counts)) > 1:
            raise ValueError(f"prompts need different numbers of 75-token windows ({counts}); "
                             "encode them in separate calls")
        device = self.token_embedding.weight.device
        input_ids = torch.tensor([w[0] for w in windows], dtype=torch.long, device=device)
        mask = torch.tensor([w[1] for w in windows], dtype=torch.long, device=device)
        clip_text, pooled = self.encode(input_ids, mask,
                                        inline_embeddings=torch.cat(inline) if inline else None)
        scale = torch.tensor(window_weights, dtype=torch.float32, device=device).unsqueeze(-1)
        if bool((scale != 1.0).any()):
            empty_text, _ = self.encode(*self.tokenizer(""))
            z, z_empty = clip_text.float(), empty_text.float()
            weighted = (z_empty + (z - z_empty) * scale).to(clip_text.dtype)
            clip_text = torch.where(scale != 1.0, weighted, clip_text)
        per_prompt = counts[0]
        clip_text = clip_text.reshape(len(prompts), per_prompt * clip_text.shape[1], -1)
        return clip_text, None if pooled is None else pooled[::per_prompt]

    def _weighted_ids(self, prompt: str, weights: bool, resolver=None, inline=None, found=None
                      ) -> tuple[list[int], list[float]]:
        pieces = (parse_prompt_weights(prompt, protected=self.tokenizer.added_tokens)
                  if weights else [(prompt, 1.0)])
        ids, token_weights = [], []
        for text, weight in pieces:
            for part in (split_embedding_refs(text) if resolver is not None else [text]):
                if isinstance(part, str):
                    piece_ids, piece_weight = self.tokenizer.encode(part), weight
                else:
                    name, explicit = part
                    piece_ids = self._embedding_ids(name, resolver, inline, found)
                    piece_weight = weight if explicit is None else explicit
                ids += piece_ids
                token_weights += [piece_weight] * len(piece_ids)
        return ids, token_weights

    def _embedding_ids(self, name: str, resolver, inline: list, found: dict) -> list[int]:
        """Inline ids (-1 - row) of a textual-inversion embedding's vectors, loaded once per call."""
        from .embeddings import EmbeddingError

        if name not in found:
            vectors = resolver(name)
            if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.dim() not in (1, 2):
                raise EmbeddingError(f"embedding:{name}: expected vectors [n, {self.width}], got "
                                     f"{type(vectors).__name__} {list(getattr(vectors, 'shape', []))}")
            vectors = vectors.reshape(-1, vectors.shape[-1])
            if vectors.shape[-1] != self.width:
                raise EmbeddingError(f"embedding:{name} has vectors {vectors.shape[-1]} wide, but this text encoder "
                                     f"takes {self.width}: it was made for another text encoder (768 = CLIP-L of "
                                     "SD 1.x, 1024 = SD 2.x, 1280 = the CLIP-G of SDXL and Stable Cascade)")
            if not bool(torch.isfinite(vectors).all()):
                raise EmbeddingError(f"embedding:{name} holds NaN or infinite values")
            start = sum(int(t.shape[0]) for t in inline)
            inline.append(vectors.detach())
            found[name] = [-1 - (start + k) for k in range(vectors.shape[0])]
        return list(found[name])
