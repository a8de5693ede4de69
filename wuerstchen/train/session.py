"""One training run from loaded models: latents encoded once, then the loop on the compute device."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from .dataset import Example, LatentSet, encode_examples
from .trainer import LoraTrainer, StepFn, TrainConfig


def encode_dataset(manager, effnet, examples: Sequence[Example], resolution: int) -> LatentSet:
    """The pictures checked and encoded by the semantic compressor (a ``LoadedModel`` of ``manager``)."""
    with manager.running(effnet):
        return encode_examples(effnet.module, examples, resolution)


def train(manager, stage_c, text_encoder, data: LatentSet, config: TrainConfig, *,
          on_step: Optional[StepFn] = None, checkpoint: Optional[os.PathLike] = None, save_every: int = 0,
          resume: Optional[os.PathLike] = None, should_stop: Optional[Callable[[], None]] = None,
          trainer_ready: Optional[Callable[[LoraTrainer], None]] = None) -> LoraTrainer:
    """Train a LoRA for ``stage_c`` (and ``text_encoder``'s learned tokens), both ``LoadedModel``\\ s of
    ``manager``, kept on the compute device while it runs. ``resume``: continue from that checkpoint.
    ``trainer_ready`` sees the trainer before the first update (to save it on an interrupt, say)."""
    models = [m for m in (stage_c, text_encoder) if m is not None]
    with manager.running(*models):
        trainer = LoraTrainer(stage_c.module, text_encoder.module if text_encoder is not None else None, data, config)
        if resume is not None:
            trainer.load_checkpoint(resume)
        if trainer_ready is not None:
            trainer_ready(trainer)
        trainer.run(on_step=on_step, checkpoint=checkpoint, save_every=save_every, should_stop=should_stop)
    return trainer
