"""The training loop of the official Stage C LoRA recipe (``train/train_c_lora.py``).

Per optimizer update: ``accum`` micro-batches of ``batch`` latents from one aspect bucket; 5 % of
captions replaced by the empty prompt (the official text dropout for CFG); noise, time and loss
weight from :mod:`.gdf`; the MSE of the predicted noise weighted by P2, divided by ``accum``;
AdamW (lr 1e-4, linear warm-up), gradients clipped to norm 1. Every random draw comes from one CPU
generator, so a run is reproduced by its seed and resumed exactly from a checkpoint (LoRA,
optimizer, step, generator, loss history), written atomically every ``save_every`` updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..lora import OFFICIAL_MODULE_FILTERS
from .dataset import LatentSet
from .gdf import TrainingGDF, diffusion_loss
from .lora_params import LearnedTokens, StageCLora, TokenSpec, checkpointed_blocks, frozen, normal_tensors

CHECKPOINT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

StepFn = Callable[[int, int, Dict[str, float]], None]


@dataclass
class TrainConfig:
    """The recipe. Defaults are the official config's where it has one (rank 4, '.attn', lr 1e-4,
    warm-up 1 update, 768 px buckets, 5 % text dropout, clip 1.0); batch 1 x accum 1 by default
    (the official 32 = 8 per GPU x 4 accumulation is for a cluster)."""

    steps: int = 1000
    rank: int = 4
    lr: float = 1e-4
    warmup: int = 1
    batch: int = 1
    accum: int = 1
    resolution: int = 768
    module_filters: Tuple[str, ...] = OFFICIAL_MODULE_FILTERS
    tokens: Tuple[TokenSpec, ...] = ()
    text_dropout: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = True

    def __post_init__(self):
        self.module_filters = tuple(self.module_filters)
        self.tokens = tuple(t if isinstance(t, TokenSpec) else TokenSpec.parse(t) for t in self.tokens)
        for name in ("steps", "rank", "batch", "accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or not self.lr > 0 or not 0 <= self.text_dropout <= 1:
            raise ValueError("warmup must be >= 0, lr > 0 and text_dropout in [0, 1]")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["tokens"] = [[t.token, t.init] for t in self.tokens]
        return json.dumps(d, sort_keys=True)


def lr_at(update: int, config: TrainConfig) -> float:
    """Learning rate of the ``update``-th optimizer step (1-based): linear warm-up to ``lr``."""
    if config.warmup <= 0:
        return config.lr
    return config.lr * min(1.0, update / config.warmup)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LoraTrainer:
    """Trains a Stage C LoRA (and learned tokens) on encoded pictures; the models are never changed
    outside :meth:`session`, and are left exactly as they were however the session ends."""

    def __init__(self, stage_c: nn.Module, text_encoder: Optional[nn.Module], data: LatentSet,
                 config: TrainConfig, gdf: TrainingGDF = TrainingGDF()):
        if len(data) == 0:
            raise ValueError("no training examples")
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; these must train
            self._setup(stage_c, text_encoder, data, config, gdf)

    def _setup(self, stage_c, text_encoder, data: LatentSet, config: TrainConfig, gdf: TrainingGDF) -> None:
        if any(t.is_inference() for t in data.latents):
            data = LatentSet([t.clone() for t in data.latents], data.captions,
                             [None if e is None else (e[0].clone(), e[1].clone()) for e in data.encoded], data.buckets)
        self.stage_c, self.text_encoder, self.data, self.config, self.gdf = stage_c, text_encoder, data, config, gdf
        self.device = next(stage_c.parameters()).device
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.lora = StageCLora(stage_c, config.rank, config.module_filters, self.generator)
        self.tokens: Optional[LearnedTokens] = None
        if config.tokens:
            if text_encoder is None:
                raise ValueError("learned tokens need the text encoder")
            self.tokens = LearnedTokens(config.tokens, text_encoder.token_embedding.weight).to(
                text_encoder.token_embedding.weight.device)
        self.params = list(self.lora.parameters()) + ([self.tokens.embeddings] if self.tokens else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.amp = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self._text_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._c_clip_img = stage_c.clip_img_mapper.in_features

    # -- text --------------------------------------------------------------------------------

    def _cached_text(self, caption: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if caption not in self._text_cache:
            if self.text_encoder is None:
                raise ValueError("captions need the text encoder (or pre-encoded captions)")
            param = self.text_encoder.token_embedding.weight
            with torch.no_grad():
                ids, mask = self.text_encoder.tokenize([caption])
                out = self.text_encoder(ids.to(param.device), mask.to(param.device))
            self._text_cache[caption] = (out.clip_text[0].float(), out.clip_text_pooled[0].float())
        return self._text_cache[caption]

    def _text(self, indices: Sequence[int], dropped: Sequence[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
        captions = ["" if d else self.data.captions[i] for i, d in zip(indices, dropped)]
        if self.tokens is not None:
            clip_text, pooled = self.tokens.encode(self.text_encoder, captions)
            return clip_text.float(), pooled.float()
        rows = []
        for i, caption, d in zip(indices, captions, dropped):
            encoded = self.data.encoded[i]
            rows.append(encoded if encoded is not None and not d else self._cached_text(caption))
        return (torch.stack([r[0] for r in rows]).to(self.device), torch.stack([r[1] for r in rows]).to(self.device))

    # -- one update --------------------------------------------------------------------------

    def _draw_batch(self) -> List[int]:
        g = self.generator
        first = int(torch.randint(len(self.data), (1,), generator=g))
        bucket = self.data.buckets[tuple(self.data.latents[first].shape[-2:])]
        rest = [bucket[int(j)] for j in torch.randint(len(bucket), (self.config.batch - 1,), generator=g)]
        return [first] + rest

    def micro_loss(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-example MSE, the weighted loss / accum) of one micro-batch; draws from the generator."""
        indices = self._draw_batch()
        dropped = (torch.rand(len(indices), generator=self.generator) < self.config.text_dropout).tolist()
        x0 = torch.stack([self.data.latents[i] for i in indices]).to(self.device)
        clip_text, pooled = self._text(indices, dropped)
        diffused = self.gdf.diffuse(x0, self.generator)
        clip_img = torch.zeros(len(indices), 1, self._c_clip_img, device=self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
               else contextlib.nullcontext())
        with ctx:
            pred = self.stage_c(diffused.noised, diffused.noise_cond, clip_text=clip_text,
                                clip_text_pooled=pooled, clip_img=clip_img)
        return diffusion_loss(pred, diffused, self.config.accum)

    def train_step(self) -> Dict[str, float]:
        """One optimizer update (inside :meth:`session`); returns and records its losses."""
        cfg = self.config
        raw, weighted = 0.0, 0.0
        for _ in range(cfg.accum):
            per_example, loss = self.micro_loss()
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            raw += float(per_example.detach().mean()) / cfg.accum
            weighted += float(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step + 1, cfg)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": raw, "weighted_loss": weighted, "grad_norm": grad_norm,
                  "lr": lr_at(self.step, cfg)}
        self.history.append(record)
        return record

    @contextlib.contextmanager
    def session(self) -> Iterator["LoraTrainer"]:
        """The models frozen, the LoRA attached and the blocks checkpointed inside the block; all undone after."""
        with torch.inference_mode(False), torch.enable_grad(), frozen(self.stage_c, self.text_encoder), \
                normal_tensors(self.stage_c, self.text_encoder), self.lora.attached(self.stage_c), \
                checkpointed_blocks(self.stage_c, self.config.gradient_checkpointing):
            yield self

    def run(self, until: Optional[int] = None, on_step: Optional[StepFn] = None,
            checkpoint: Optional[os.PathLike] = None, save_every: int = 0,
            should_stop: Optional[Callable[[], None]] = None) -> List[Dict[str, float]]:
        """Train to update ``until`` (default: the config's steps). ``on_step(step, total, record)``
        after each update (it may raise to interrupt: the models are restored and the last checkpoint
        stays as it was); a checkpoint every ``save_every`` updates and at the end when a path is given."""
        total = int(until or self.config.steps)
        with self.session():
            while self.step < total:
                if should_stop is not None:
                    should_stop()
                record = self.train_step()
                if checkpoint is not None and save_every and self.step % save_every == 0 and self.step < total:
                    self.save_checkpoint(checkpoint)
                if on_step is not None:
                    on_step(self.step, total, record)
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return self.history

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_json(),
            "step": self.step,
            "lora": {k: v.detach().clone() for k, v in self.lora.state_dict().items()},
            "tokens": None if self.tokens is None else self.tokens.embeddings.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{source}: not a training checkpoint of this version")
        ours, theirs = json.loads(self.config.to_json()), json.loads(state["config"])
        differ = [k for k in ("rank", "module_filters", "tokens", "resolution", "batch", "accum", "seed")
                  if ours.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"{source} was made with other settings ({', '.join(f'{k}={theirs.get(k)}' for k in differ)}); "
                             "resume with the same ones")
        self.lora.load_state_dict(state["lora"])
        if self.tokens is not None:
            with torch.no_grad():
                self.tokens.embeddings.copy_(state["tokens"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"])
        self.step = int(state["step"])
        self.history = [dict(r) for r in state["history"]]

    def save_checkpoint(self, path: os.PathLike) -> None:
        """Write atomically (a temporary file renamed over the old one): an interrupted write never
        leaves a broken checkpoint."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), str(tmp))
        os.replace(tmp, path)

    def load_checkpoint(self, path: os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
        self.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True), source=str(path))
