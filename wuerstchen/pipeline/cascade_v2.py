"""Würstchen v2 from a folder of weight files: prior -> ×42 − 1 -> decoder -> VQGAN, with offloading.

The v2 sibling of :class:`wuerstchen.pipeline.cascade.Cascade`: the same file discovery
(:class:`~wuerstchen.pipeline.cascade.CascadeFiles`, files found by content in either release layout) and
the same model manager; the recipe is :mod:`wuerstchen.pipeline.stages_v2` (the hub combined pipeline's
defaults). LoRAs, ControlNets and image variations are Stable Cascade features: v2 has none.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..files import kinds as kind_table
from ..inputs import limits
from . import stages_v2 as v2
from .cascade import FolderCascade
from ..models.effnet import v2_effnet_to_raw
from .stages import cpu_generator

FAMILY = kind_table.WUERSTCHEN_V2
Prompts = Union[str, Sequence[str]]


class CascadeV2(FolderCascade):
    """Würstchen v2 text-to-image (and img2img from the v2 EfficientNet) from a folder of weights."""

    family = FAMILY

    def encode_text(self, kind: str, prompts: Prompts, negative: Optional[Prompts] = None,
                    num_images_per_prompt: int = 1) -> v2.V2Text:
        """Both guidance sides of one tower (``v2_prior_text`` or ``v2_decoder_text``)."""
        te = self.model(kind)
        with self.manager.running(te):
            return v2.encode_text_v2(te.module, prompts, negative, num_images_per_prompt=num_images_per_prompt,
                                     embeddings=self.embeddings)

    def encode_image(self, images: torch.Tensor, latent_size: Tuple[int, int]) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> prior-space latents of ``latent_size`` (v2 EfficientNet)."""
        eff = self.model("v2_effnet")
        with self.manager.running(eff):
            return v2.encode_semantic_v2(eff.module, images, latent_size)

    @torch.no_grad()
    def generate(
        self,
        prompt: Prompts,
        negative: Optional[Prompts] = None,
        *,
        width: int = 1024,
        height: int = 1024,
        batch: int = 1,
        seed: int = 0,
        prior: v2.PriorSettings = v2.PriorSettings(),
        decoder: v2.DecoderSettings = v2.DecoderSettings(),
        image: Optional[torch.Tensor] = None,
        denoise: float = 0.6,
        progress: Optional[Callable[[str, int, int], None]] = None,
    ) -> torch.Tensor:
        """Images [B, 3, H', W'] in [0, 1], where (H', W') = :func:`~wuerstchen.pipeline.stages_v2.output_size`
        (the size the chain really makes: 1000 gives 1024; sizes it cannot make are refused first).

        ``batch`` images per prompt; ``negative`` (one for all, or one per prompt) is the
        unconditional side of both stages (default: the empty prompt, as the hub pipelines).
        ``image`` ([N, 3, H, W] in [0, 1]) starts the prior from its v2 EfficientNet encoding,
        noised to ``denoise`` (img2img). One CPU generator seeded with ``seed`` feeds the prior and
        then the decoder, as the combined hub pipeline does, so a seed gives the same image anywhere.
        """
        v2.check_size_v2(height, width)
        batch = limits.check_batch(batch)
        needed = list(kind_table.FAMILIES[FAMILY].text_to_image)
        if image is not None:
            image = limits.check_images(image, "the img2img image")
            limits.check_number(denoise, "denoise", above=0, maximum=1, official=0.6)
            needed.append(kind_table.FAMILIES[FAMILY].img2img)
        self.files.require(needed, self.root, FAMILY)

        prior_text = self.encode_text("v2_prior_text", prompt, negative, batch)
        decoder_text = self.encode_text("v2_decoder_text", prompt, negative, batch)
        latent_size = v2.prior_latent_size(height, width)
        init_latent = None
        if image is not None:
            init_latent = self.encode_image(image, latent_size)
            n = prior_text.cond.shape[0]
            if init_latent.shape[0] not in (1, n):
                raise ValueError(f"{init_latent.shape[0]} input images for {n} images to make; give one image, "
                                 "or one per image")
            init_latent = init_latent.expand(n, -1, -1, -1) if init_latent.shape[0] == 1 else init_latent

        def report(stage):
            def step(i, n, x):
                self.manager.hooks.check_interrupt()
                if progress is not None:
                    progress(stage, i, n)

            return step

        generator = cpu_generator(seed)
        pr = self.model("v2_prior")
        with self.manager.running(pr):
            prior_latent = v2.sample_prior_v2(pr.module, prior_text, latent_size=latent_size, generator=generator,
                                              settings=prior, init_latent=init_latent, denoise=denoise,
                                              callback=report("prior"))
        dec = self.model("v2_decoder")
        with self.manager.running(dec):
            decoder_latent = v2.sample_decoder_v2(dec.module, v2_effnet_to_raw(prior_latent), decoder_text,
                                                  generator=generator, settings=decoder, callback=report("decoder"))
        vq = self.model("stage_a")
        with self.manager.running(vq):
            return v2.decode_v2(vq.module, decoder_latent)
