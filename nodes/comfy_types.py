"""ComfyUI's IMAGE / MASK / LATENT / CONDITIONING layouts <-> the core's tensors: the one place
the nodes translate data. The core takes images [B, 3, H, W] and masks [B, 1, H, W] in [0, 1].

* IMAGE is [B, H, W, C] in [0, 1]; MASK is [B, H, W] (or [H, W]), 1 = selected.
* Stage C LATENT: ``{"samples": [B, 16, h, w]}`` at the official scale (ComfyUI's SC_Prior has
  scale 1), plus the size it was made for and its compression under our own keys.
* Stage B LATENT: ``{"samples": [B, 4, H/4, W/4]}`` as ComfyUI keeps it, the raw VQGAN encoder
  output, which is the official Stage B latent times 0.43, plus the size it was made for (its
  sides are rounded up to even, see :func:`wuerstchen.pipeline.stages.stage_b_latent_size`; the decode
  crops back to that size).
* CONDITIONING: ``[[clip_text [1, L, 1280], {"pooled_output": [1, 1280], ...}], ...]``, as
  ComfyUI's own Stable Cascade text encoding, so its conditioning nodes (concat, zero out, ...) keep
  working. Image-variation tokens ride along under our own key.

Würstchen v2 keeps the same layouts, marked with the family or tower that made them: its
conditioning is ``[[last_hidden_state [1, 77, W], {"wuerstchen_text": <text kind>}], ...]`` (no
pooled vector; the prior's bigG and the decoder's ViT-H tower each make their own), its prior
latents are 16-channel LATENTs like Stage C's (in the v2 EfficientNet's (y + 1)/42 space) marked
``"wuerstchen_family"``, and its decoder output is the raw VQGAN latent, exactly what a Stage B
LATENT holds, so the Stage A decode node serves both families.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from wuerstchen.files import kinds
from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.pipeline.stages import Conditioning
from wuerstchen.pipeline.stages_v2 import V2_STAGE_A_SCALE

from .host import NodeError

COND_IMAGE_TOKENS = "wuerstchen_clip_img"  # [1, N, 768] image embeddings, strength applied
LATENT_SIZE = "wuerstchen_size"  # (height, width) the Stage C latent was made for
LATENT_COMPRESSION = "wuerstchen_compression"
LATENT_FAMILY = "wuerstchen_family"  # the model family whose prior made a 16-channel latent
COND_TEXT = "wuerstchen_text"  # the text-encoder kind that made a Würstchen v2 conditioning


@contextlib.contextmanager
def node_errors(node: str) -> Iterator[None]:
    """The core's refusals (ValueError: bad settings, memory, non-finite results) as a NodeError
    that ComfyUI shows on ``node``, prefixed with the node's name once."""
    try:
        yield
    except NodeError:
        raise
    except ValueError as exc:
        message = str(exc)
        raise NodeError(message if message.startswith(node) else f"{node}: {message}") from None


# ------------------------------------------------------------------------------------------------
# IMAGE and MASK


def images_in(image: torch.Tensor, node: str = "", socket: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] (or [H, W, C]) -> [B, 3, H, W] (alpha dropped, grey expanded);
    empty or non-finite images and other layouts are a NodeError naming the node and socket."""
    where = f"{node}: '{socket}'" if node else f"'{socket}'"
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-1] not in (1, 3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeError(f"{where} must be an IMAGE [batch, height, width, 3], got {shape}")
    x = image if image.dim() == 4 else image.unsqueeze(0)
    try:
        return limits.check_images(x.permute(0, 3, 1, 2), where).contiguous()
    except limits.RequestError as exc:
        raise NodeError(str(exc)) from None


def images_out(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> ComfyUI IMAGE [B, H, W, 3]."""
    return images.permute(0, 2, 3, 1).contiguous()


def mask_in(mask: Optional[torch.Tensor], node: str = "", socket: str = "mask") -> Optional[torch.Tensor]:
    """ComfyUI MASK [B, H, W] or [H, W] (also [B, 1, H, W], [B, H, W, 1]) -> [B, 1, H, W]; an empty
    mask or another layout is a NodeError naming the node and socket."""
    if mask is None:
        return None
    try:
        return limits.check_masks(mask, f"{node}: '{socket}'" if node else f"'{socket}'")
    except limits.RequestError as exc:
        raise NodeError(str(exc)) from None


def to_pil(images: torch.Tensor):
    """The first of [B, 3, H, W] images as a PIL picture (progress-bar previews)."""
    from PIL import Image

    return Image.fromarray((images[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# LATENT


def stage_c_out(samples: torch.Tensor, size: Tuple[int, int], compression: float,
                family: Optional[str] = None) -> dict:
    """A Stage C / prior LATENT; ``family``: the family whose models made it (None: an empty latent)."""
    out = {"samples": samples, LATENT_SIZE: (int(size[0]), int(size[1])), LATENT_COMPRESSION: float(compression)}
    if family is not None:
        out[LATENT_FAMILY] = family
    return out


def stage_c_size(latent: dict) -> Tuple[Tuple[int, int], float]:
    """((H, W), compression) a Stage C LATENT stands for (see :func:`wuerstchen.pipeline.stages.output_size`)."""
    compression = float(latent.get(LATENT_COMPRESSION, pipeline.OFFICIAL_COMPRESSION))
    return pipeline.output_size(tuple(latent["samples"].shape[-2:]), latent.get(LATENT_SIZE), compression), compression


def stage_c_in(latent: dict, channels: int, node: str, socket: str, family: str = kinds.STABLE_CASCADE) -> torch.Tensor:
    """A 16-channel prior latent for ``family``'s models (an empty latent, which no family made, fits both)."""
    samples = latent["samples"]
    if samples.dim() != 4 or samples.shape[1] != channels:
        raise NodeError(f"{node}: '{socket}' must be a Stage C latent with {channels} channels, got shape "
                        f"{list(samples.shape)} (use Wuerstchen Empty Latent's stage_c output)")
    made_by = latent.get(LATENT_FAMILY, family)
    if made_by != family:
        raise NodeError(f"{node}: '{socket}' is a {kinds.family_title(made_by)} latent, but the model here is "
                        f"{kinds.family_title(family)}; their latents live in different spaces: make it with "
                        f"{kinds.family_title(family)} models (or start from Wuerstchen Empty Latent)")
    return samples


def stage_b_out(latent: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> dict:
    out = {"samples": latent * pipeline.STAGE_A_SCALE}
    if size is not None:
        out[LATENT_SIZE] = (int(size[0]), int(size[1]))
    return out


def stage_b_in(latent: dict, node: str = "", socket: str = "latent") -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.numel() == 0:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else None
        raise NodeError(f"{node}: '{socket}' must be a Stage B latent [batch, 4, height, width], got {shape}")
    return samples.float() / pipeline.STAGE_A_SCALE


def stage_b_size(latent: dict) -> Optional[Tuple[int, int]]:
    """The (H, W) a Stage B LATENT was made for, if it still fits the latent (a latent resized by
    another node has lost it), else None: the decode then keeps every pixel."""
    size = latent.get(LATENT_SIZE)
    if size is None:
        return None
    h, w = latent["samples"].shape[-2:]
    fits = (math.ceil(size[0] / pipeline.STAGE_B_COMPRESSION) <= h <= pipeline.stage_b_latent_size(*size)[0]
            and math.ceil(size[1] / pipeline.STAGE_B_COMPRESSION) <= w <= pipeline.stage_b_latent_size(*size)[1])
    return (int(size[0]), int(size[1])) if fits else None


def v2_decoder_out(latent: torch.Tensor) -> dict:
    """A Würstchen v2 decoder result as a Stage B LATENT: the raw VQGAN latent (v2 decodes 0.3764 · x)."""
    return {"samples": latent * V2_STAGE_A_SCALE}


# ------------------------------------------------------------------------------------------------
# CONDITIONING


def conditioning_out(cond: Conditioning) -> list:
    out = []
    for i in range(cond.clip_text.shape[0]):
        extras = {"pooled_output": cond.clip_text_pooled[i:i + 1, 0]}
        if cond.clip_img is not None:
            extras[COND_IMAGE_TOKENS] = cond.clip_img[i:i + 1]
        out.append([cond.clip_text[i:i + 1], extras])
    return out


def conditioning_in(conditioning, node: str, socket: str) -> Conditioning:
    """Our Conditioning from a CONDITIONING socket (ours, or ComfyUI's Stable Cascade encoding)."""
    if not conditioning:
        raise NodeError(f"{node}: '{socket}' is empty; wire a Wuerstchen Text Encode (an empty prompt for the negative)")
    texts, pooled, images = [], [], []
    for entry in conditioning:
        tensor, extras = entry[0], entry[1]
        if extras.get(COND_TEXT) in kinds.KINDS:
            raise NodeError(f"{node}: '{socket}' was encoded with the {kinds.title(extras[COND_TEXT])}, a "
                            f"{kinds.family_title(kinds.get(extras[COND_TEXT]).family)} model; Stable Cascade needs "
                            f"conditioning from the {kinds.title('clip_text')} (text_encoder/model.safetensors)")
        p = extras.get("pooled_output")
        if p is None:
            raise NodeError(f"{node}: '{socket}' has no pooled text embedding; encode it with Wuerstchen Text Encode "
                            "(or ComfyUI's CLIP Text Encode with a Stable Cascade CLIP)")
        texts.append(tensor.float())
        pooled.append(p.float().reshape(tensor.shape[0], 1, -1))
        images.append(extras.get(COND_IMAGE_TOKENS))
    if len({t.shape[1] for t in texts}) > 1:
        n = max(t.shape[1] for t in texts)
        texts = [pipeline.repeat_tokens(t, n) for t in texts]
    clip_img = None
    if any(i is not None for i in images):
        n = max(i.shape[1] for i in images if i is not None)
        width = next(i.shape[-1] for i in images if i is not None)
        filled = [pipeline.pad_tokens(i.float(), n) if i is not None else torch.zeros(1, n, width) for i in images]
        clip_img = torch.cat(filled)
    return Conditioning(torch.cat(texts), torch.cat(pooled), clip_img)


def v2_conditioning_out(sequence: torch.Tensor, text_kind: str) -> list:
    """Würstchen v2 text conditioning ``[B, L, W]`` (``last_hidden_state``) -> CONDITIONING, one entry per prompt."""
    return [[sequence[i:i + 1], {COND_TEXT: text_kind}] for i in range(sequence.shape[0])]


def v2_conditioning_in(conditioning, text_kind: str, node: str, socket: str) -> torch.Tensor:
    """The ``[B, L, W]`` text sequence of a Würstchen v2 CONDITIONING made by ``text_kind``'s tower."""
    want = kinds.title(text_kind)
    if not conditioning:
        raise NodeError(f"{node}: '{socket}' is empty; wire a Wuerstchen Text Encode with the {want} "
                        "(an empty prompt for the negative)")
    texts = []
    for entry in conditioning:
        tensor, extras = entry[0], entry[1]
        made_by = extras.get(COND_TEXT)
        if made_by != text_kind:
            what = (f"the {kinds.title(made_by)}" if made_by in kinds.KINDS
                    else f"the {kinds.title('clip_text')} (Stable Cascade)" if "pooled_output" in extras
                    else "another text encoder")
            raise NodeError(f"{node}: '{socket}' was encoded with {what}; this Würstchen v2 model needs conditioning "
                            f"from the {want} ({kinds.get(text_kind).file_names()}) through Wuerstchen Text Encode")
        texts.append(tensor.float())
    n = max(t.shape[1] for t in texts)
    return torch.cat([pipeline.repeat_tokens(t, n) if t.shape[1] != n else t for t in texts])
