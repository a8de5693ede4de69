"""What one LoRA module does to one weight: the change it adds, for every adapter kind.

Each kind builds a dense change ``ΔW`` the shape of the weight (or of the q/k/v rows of a fused
projection) from its factors; the patch then adds ``strength · scale · ΔW``, or for DoRA rescales
the result per row or column (:func:`dora_merge`). The formulas are the ones LyCORIS defines and
ComfyUI applies (comfy/weight_adapter), so a file gives the same weight here as there:

* LoRA: ``ΔW = up @ down``; LoCon with a Tucker core: ``ΔW[o,i,k,l] = Σ up[o,a] mid[a,b,k,l] down[b,i]``;
  scale ``alpha / rank``.
* LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, each factor optionally Tucker
  (``Σ t[i,j,k,l] a[i,p] b[j,r]``); scale ``alpha / rank`` (rank = rows of ``w1_b``).
* LoKr: ``ΔW = w1 ⊗ w2`` (Kronecker), each side given whole or as ``a @ b`` (``w2`` optionally
  Tucker); scale ``alpha / rank`` where a side is factored (the rank of ``w2_b`` if both are), else 1.
* full diff: ``ΔW = diff``, scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

Rows = Optional[Tuple[int, int]]
KINDS = ("lora", "loha", "lokr", "diff")


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W[p, r, …] = Σ_ij core[i, j, …] · a[i, p] · b[j, r]`` (LyCORIS' CP/Tucker rebuild)."""
    return torch.einsum("ij...,ip,jr->pr...", core, a, b)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


@dataclass(frozen=True, eq=False)
class WeightDelta:
    """One adapter module's change to one parameter.

    ``target`` is an official StageC parameter name (part "stage_c") or a Hugging Face CLIP key
    (part "text"); ``rows`` limits the change to rows [start, stop) of it (the q, k or v third of
    a fused ``in_proj_weight``). ``factors`` are the file's tensors by role (``up``/``down``/
    ``mid``, ``hada_w1_a``…, ``lokr_w1``…, ``diff``). With ``broadcast`` (the official trainer's
    LoRA on a convolution) the [out, in] product is added at every kernel position.
    ``dora_scale`` makes it a DoRA module (see :func:`dora_merge`).
    """

    target: str
    source: str
    scale: float
    kind: str = "lora"
    factors: Dict[str, torch.Tensor] = field(default_factory=dict)
    rows: Rows = None
    broadcast: bool = False
    dora_scale: Optional[torch.Tensor] = None

    # -- the plain LoRA factors, by name ---------------------------------------------------------
    @property
    def up(self) -> Optional[torch.Tensor]:
        return self.factors.get("up")

    @property
    def down(self) -> Optional[torch.Tensor]:
        return self.factors.get("down")

    @property
    def diff(self) -> Optional[torch.Tensor]:
        return self.factors.get("diff")

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def replace(self, **changes) -> "WeightDelta":
        fields = dict(target=self.target, source=self.source, scale=self.scale, kind=self.kind,
                      factors=self.factors, rows=self.rows, broadcast=self.broadcast, dora_scale=self.dora_scale)
        fields.update(changes)
        return WeightDelta(**fields)

    # -- shapes ----------------------------------------------------------------------------------
    def natural_shape(self) -> Tuple[int, ...]:
        """The shape of ΔW as the factors give it (before reshaping onto the weight)."""
        f = self.factors
        if self.kind == "diff":
            return tuple(f["diff"].shape)
        if self.kind == "lora":
            up, down, mid = f["up"], f["down"], f.get("mid")
            if mid is not None:
                return (up.shape[0], down.shape[1]) + tuple(mid.shape[2:])
            return (up.shape[0], math.prod(down.shape[1:]))
        if self.kind == "loha":
            return self._hadamard_side_shape(1)
        w1, w2 = self._kron_side_shape(1), self._kron_side_shape(2)
        if len(w2) == 4 and len(w1) == 2:
            w1 = w1 + (1, 1)
        if len(w1) != len(w2):
            return (w1[0] * w2[0], -1)
        return tuple(a * b for a, b in zip(w1, w2))

    def _hadamard_side_shape(self, side: int) -> Tuple[int, ...]:
        f = self.factors
        a, b, t = f[f"hada_w{side}_a"], f[f"hada_w{side}_b"], f.get(f"hada_t{side}")
        if t is not None:
            return (a.shape[1], b.shape[1]) + tuple(t.shape[2:])
        return (a.shape[0], math.prod(b.shape[1:]))

    def _kron_side_shape(self, side: int) -> Tuple[int, ...]:
        f = self.factors
        whole = f.get(f"lokr_w{side}")
        if whole is not None:
            return tuple(whole.shape)
        a, b, t = f[f"lokr_w{side}_a"], f[f"lokr_w{side}_b"], f.get(f"lokr_t{side}")
        if t is not None:
            return (a.shape[1], b.shape[1]) + tuple(t.shape[2:])
        return (a.shape[0], math.prod(b.shape[1:]))

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether this change can be added to a parameter of ``shape`` (rows already applied)."""
        shape = tuple(shape)
        if not shape:
            return False
        if self.rows is not None:
            start, stop = self.rows
            if stop > shape[0] or start < 0 or stop <= start:
                return False
            shape = (stop - start,) + shape[1:]
        if self.dora_scale is not None and not self._dora_fits(shape):
            return False
        natural = self.natural_shape()
        if self.kind == "diff":
            return natural == shape or (math.prod(natural) == math.prod(shape) and natural[0] == shape[0])
        if natural[0] != shape[0]:
            return False
        if self.broadcast:
            return len(shape) >= 2 and len(natural) == 2 and natural[1] == shape[1]
        if -1 in natural:
            return False
        return math.prod(natural) == math.prod(shape)

    def _dora_fits(self, shape: Tuple[int, ...]) -> bool:
        n = self.dora_scale.numel()
        on_rows = self.dora_scale.shape[0] == shape[0]
        return len(shape) >= 2 and (n == shape[0] if on_rows else n == shape[1])

    # -- values ----------------------------------------------------------------------------------
    def tensor(self, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
        """ΔW shaped like the target rows, without scale or strength, in ``dtype``."""
        shape = tuple(shape)
        f = {k: v.to(device=device, dtype=dtype) for k, v in self.factors.items()}
        if self.kind == "diff":
            return f["diff"].reshape(shape)
        if self.kind == "lora":
            if "mid" in f:
                product = torch.einsum("oa,ab...,bi->oi...", _flat2(f["up"]), f["mid"], _flat2(f["down"]))
            else:
                product = _mm(f["up"], f["down"])
            if self.broadcast and len(shape) > 2:
                return product.reshape(shape[:2] + (1,) * (len(shape) - 2)).expand(shape)
        elif self.kind == "loha":
            product = self._hadamard_side(f, 1) * self._hadamard_side(f, 2)
        else:
            w1, w2 = self._kron_side(f, 1), self._kron_side(f, 2)
            if w2.dim() == 4 and w1.dim() == 2:
                w1 = w1[:, :, None, None]
            product = torch.kron(w1, w2)
        return product.reshape(shape)

    @staticmethod
    def _hadamard_side(f, side: int) -> torch.Tensor:
        a, b, t = f[f"hada_w{side}_a"], f[f"hada_w{side}_b"], f.get(f"hada_t{side}")
        return tucker(t, a, b) if t is not None else _mm(a, b)

    @staticmethod
    def _kron_side(f, side: int) -> torch.Tensor:
        whole = f.get(f"lokr_w{side}")
        if whole is not None:
            return whole
        a, b, t = f[f"lokr_w{side}_a"], f[f"lokr_w{side}_b"], f.get(f"lokr_t{side}")
        return tucker(t, a, b) if t is not None else _mm(a, b)

    def describe(self) -> str:
        rows = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[1]}"
        parts = " ".join(f"{k} {list(v.shape)}" for k, v in self.factors.items())
        dora = " + DoRA" if self.dora_scale is not None else ""
        return f"{self.target}{rows} <- {self.kind}{dora} ({parts})"


def _flat2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1])


def dora_merge(weight: torch.Tensor, change: torch.Tensor, dora_scale: torch.Tensor,
               strength: float) -> torch.Tensor:
    """The weight after a DoRA module, as ComfyUI computes it (comfy/weight_adapter/base.py).

    ``change`` is the scaled ΔW (alpha / rank included, strength not). The merged weight
    ``W + ΔW`` is rescaled to the file's magnitudes ``dora_scale`` along one axis:

    * ``dora_scale`` with one entry per output row (``[out, 1, …]``, LyCORIS ``wd_on_out``): each
      row is divided by the norm of that row of the *original* weight (ComfyUI's convention);
    * otherwise one entry per input column (``[1, in, …]``, the LyCORIS default): each column is
      divided by the norm of that column of the *merged* weight.

    A tiny epsilon keeps zero norms finite. Strength interpolates between the original and the
    rescaled weight: ``W + strength · (W_dora − W)``.
    """
    merged = weight + change
    eps = torch.finfo(weight.dtype).eps
    scale = dora_scale.to(device=weight.device, dtype=weight.dtype)
    if scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (weight.dim() - 1))
        scale = scale.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape((1, -1) + (1,) * (weight.dim() - 2))
        scale = scale.reshape(norm.shape)
    rescaled = merged * (scale / (norm + eps))
    if strength == 1.0:
        return rescaled
    return weight + strength * (rescaled - weight)
