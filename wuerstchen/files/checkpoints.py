"""Identify weight files from their keys and shapes, and load them.

Never from file names: users rename files freely. A file is read as a set of (key, shape)
pairs; each kind of network (:mod:`wuerstchen.files.kinds`) has marker keys, and its config is read
off the shapes (:mod:`wuerstchen.files.layouts`, with the official values for hyper-parameters that
leave no trace in a state dict). The module is then built on the meta device and filled with
``assign=True`` directly in the requested dtype and device, so a 3.6B model never exists twice
in memory and is never randomly initialised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import kinds as kind_table
from . import layouts
from .layouts import LayoutError, Shapes
from ..models.ops import fp8_weight_names, is_fp8
from ..storage.weights_io import WeightFileError, WeightSource

CONFIG_METADATA_KEY = "wuerstchen_config"


class CheckpointError(ValueError):
    """A file that is not the model the caller asked for, or whose tensors do not fit it."""


@dataclass
class Detection:
    """One network found in a file: what it is and where its keys live.

    ``siblings`` maps a key the network uses (relative to ``prefix``) to ``(file key, transposed)``
    for tensors a file keeps beside the network rather than under its prefix.
    """

    kind: str
    variant: str
    config: dict
    prefix: str = ""
    siblings: Dict[str, Tuple[str, bool]] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return kind_table.title(self.kind, self.variant)


@dataclass
class LoadedModel:
    """A loaded network and what it is. ``module`` is in eval mode with grads off."""

    kind: str
    variant: str
    config: dict
    module: nn.Module
    path: Optional[Path] = None
    dtype: Optional[torch.dtype] = None  # the weights' dtype (fp8 when its matrix weights are stored so)
    compute_dtype: Optional[torch.dtype] = None  # the dtype it computes in (its norms', biases')

    @property
    def title(self) -> str:
        return kind_table.title(self.kind, self.variant)


# ----------------------------------------------------------------------------------------------
# Detection


def _strip(shapes: Shapes, prefix: str) -> Dict[str, Tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _metadata_config(metadata: Mapping[str, str]) -> Dict[str, dict]:
    """Config hints a file may carry (``{kind: config}`` JSON): hyper-parameters that shapes cannot
    show, e.g. attention heads of small test models. Shapes are still checked against them."""
    raw = metadata.get(CONFIG_METADATA_KEY) if metadata else None
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in cfg.items() if isinstance(v, dict)} if isinstance(cfg, dict) else {}


def _locations(kind: kind_table.ModelKind, shapes: Shapes) -> List[str]:
    """Key prefixes under which ``kind`` may sit in a file, most likely first."""
    if not kind.anywhere:
        return [p for p in kind_table.WRAPPER_PREFIXES if p == "" or any(k.startswith(p) for k in shapes)]
    found: Dict[str, None] = {}
    for key in shapes:
        for markers in kind.markers:
            if key.endswith(markers[0]):
                prefix = key[: len(key) - len(markers[0])]
                if prefix == "" or prefix.endswith("."):
                    found.setdefault(prefix, None)
    return list(found)


def _siblings(kind: kind_table.ModelKind, shapes: Shapes, sub: Dict[str, Tuple[int, ...]],
              prefix: str) -> Dict[str, Tuple[str, bool]]:
    """Tensors of ``kind`` that a file keeps beside the network (see ``ModelKind.siblings``)."""
    if not kind.siblings or any(name in sub for name, _ in kind.siblings):
        return {}
    target = kind.siblings[0][0]
    parent = prefix
    while True:
        for name, transposed in kind.siblings:
            if parent + name in shapes:
                return {target: (parent + name, transposed)}
        if not parent:
            return {}
        parts = parent.rstrip(".").split(".")
        parent = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""


def _identify(kind: kind_table.ModelKind, shapes: Shapes, prefix: str, hints: Dict[str, dict]) -> Optional[Detection]:
    sub = _strip(shapes, prefix)
    if not any(layouts.has_keys(sub, keys) for keys in kind.markers):
        return None
    siblings = _siblings(kind, shapes, sub, prefix)
    for name, (key, transposed) in siblings.items():
        sub[name] = tuple(shapes[key])[::-1] if transposed else tuple(shapes[key])
    if not kind.identifies(sub, hints):  # keys that must be absent, last checks (siblings included)
        return None
    try:
        variant, config = kind.layout(sub, hints.get(kind.name))
    except LayoutError as exc:
        raise CheckpointError(str(exc)) from None
    except (KeyError, StopIteration, IndexError) as exc:
        raise CheckpointError(f"the file looks like {kind.title} but its layout is incomplete ({exc})") from None
    return Detection(kind.name, variant, config, prefix, siblings)


def detect_parts(shapes: Shapes, metadata: Optional[Mapping[str, str]] = None) -> List[Detection]:
    """Every network in a state dict (one for a plain file, several for combined checkpoints).

    At each key prefix the first kind (in :data:`wuerstchen.files.kinds.KINDS` order) whose markers are
    there is taken; a kind that may sit anywhere (the CLIP towers) is taken once, where it is
    first found.
    """
    hints = _metadata_config(metadata or {})
    found: List[Detection] = []
    taken = set()
    for kind in kind_table.KINDS.values():
        for prefix in _locations(kind, shapes):
            if prefix in taken and not kind.anywhere:
                continue
            det = _identify(kind, shapes, prefix, hints)
            if det is not None:
                found.append(det)
                taken.add(prefix)
                if kind.anywhere:
                    break
    return found


def describe_foreign(shapes: Shapes) -> str:
    """A short guess at what a file we cannot use is, for error messages."""
    keys = list(shapes)
    joined = "\n".join(keys[:4000])

    def any_key(*needles):
        return any(n in joined for n in needles)

    from ..lora.formats import looks_like_lora

    if looks_like_lora(keys):
        return "a LoRA (load it with the Wuerstchen LoRA loader, not as a model)"
    if any_key("double_blocks.", "single_blocks."):
        return "a Flux model"
    if any_key("joint_blocks."):
        return "an SD3 model"
    if any_key("input_blocks.") and any_key("label_emb."):
        return "an SDXL UNet/checkpoint"
    if any_key("input_blocks.") and any_key("cond_stage_model."):
        return "a Stable Diffusion 1.x/2.x checkpoint"
    if any_key("input_blocks.", "middle_block."):
        return "a Stable Diffusion UNet"
    if any_key("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.up.0"):
        return "a VAE of another model family"
    if any_key("encoder.block.0.layer.0.SelfAttention", "shared.weight"):
        return "a T5 text encoder"
    if any_key("text_model.embeddings"):
        return "a CLIP text encoder"
    return "not a model this pack knows"


# ----------------------------------------------------------------------------------------------
# Building and loading


def build_module(kind: str, config: dict) -> nn.Module:
    """Construct an (unfilled) module of ``kind``; call under ``torch.device('meta')`` to skip init."""
    build = kind_table.get(kind).build
    if build is None:
        raise CheckpointError(f"{kind_table.title(kind)} is built from its state dict, not from a config")
    return build(dict(config))


def _check_shapes(module: nn.Module, shapes: Shapes, name: str, title: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{name}: the tensors do not fit {title}:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, e.g. " + ", ".join(f"{k} {list(expected[k])}" for k in missing[:5]))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, e.g. " + ", ".join(f"{k} {list(shapes[k])}" for k in unexpected[:5]))
    if wrong:
        lines.append("  shape mismatches, e.g. " + ", ".join(
            f"{k}: file {list(shapes[k])} vs model {list(expected[k])}" for k in wrong[:5]))
    raise CheckpointError("\n".join(lines))


def _family_note(parts: Sequence[Detection], kinds: Optional[Sequence[str]]) -> str:
    """' (a Würstchen v2 file, not Stable Cascade)' when the file is of another family than asked for."""
    found = {kind_table.get(p.kind).family for p in parts}
    asked = {kind_table.get(k).family for k in kinds or ()}
    if not asked or found & asked or len(found) != 1:
        return ""
    (family,) = found
    others = " or ".join(kind_table.family_title(f) for f in sorted(asked))
    return f" (a {kind_table.family_title(family)} file, not {others})"


def _accepted_list(kinds: Optional[Sequence[str]]) -> str:
    names = kinds or list(kind_table.KINDS)
    return "; ".join(f"{kind_table.title(k)}: {kind_table.get(k).file_names()}" for k in names)


def inspect(path: os.PathLike | str) -> List[Detection]:
    """What networks a file holds (raises WeightFileError for unreadable files)."""
    src = WeightSource(path)
    return detect_parts(src.shapes(), src.metadata)


def load(
    path: os.PathLike | str,
    *,
    kinds: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    compute_dtype: Optional[torch.dtype] = None,
) -> LoadedModel:
    """Load the one network of ``kinds`` (any known kind if None) that the file holds."""
    parts = load_parts(path, kinds=kinds, dtype=dtype, device=device, compute_dtype=compute_dtype)
    if kinds:
        for k in kinds:
            if k in parts:
                return parts[k]
    return next(iter(parts.values()))


def load_parts(
    path: os.PathLike | str,
    *,
    kinds: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    compute_dtype: Optional[torch.dtype] = None,
) -> Dict[str, LoadedModel]:
    """Load every network of ``kinds`` found in the file (combined checkpoints hold several).

    An fp8 ``dtype`` stores the matrix weights (:func:`~wuerstchen.models.ops.fp8_weight_names`)
    of kinds marked ``fp8`` in fp8 and everything else in ``compute_dtype`` (float32 if None);
    kinds that cannot compute from fp8 weights load wholly in ``compute_dtype``.
    """
    path = Path(path)
    if dtype is not None and is_fp8(dtype) and compute_dtype is None:
        compute_dtype = torch.float32
    try:
        src = WeightSource(path)
    except WeightFileError as exc:
        raise CheckpointError(str(exc)) from None
    shapes = src.shapes()
    try:
        parts = detect_parts(shapes, src.metadata)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    wanted = [p for p in parts if kinds is None or p.kind in kinds]
    if not wanted:
        if parts:
            what = " + ".join(p.title for p in parts) + _family_note(parts, kinds)
        else:
            what = describe_foreign(shapes)
        expected = ", ".join(kind_table.title(k) for k in kinds) if kinds else "a model this pack knows"
        raise CheckpointError(
            f"{path.name}: expected {expected}, but this file looks like {what}. "
            f"Files accepted here: {_accepted_list(kinds)}."
        )
    loaded: Dict[str, LoadedModel] = {}
    for det in wanted:
        if det.kind in loaded:
            continue
        fp8 = dtype is not None and is_fp8(dtype)
        try:  # wrong dtypes, NaN/inf values, a file cut short while reading
            if fp8 and not kind_table.get(det.kind).fp8:
                loaded[det.kind] = _load_detection(src, path, shapes, det, compute_dtype, device)
            else:
                loaded[det.kind] = _load_detection(src, path, shapes, det, dtype, device,
                                                   compute_dtype if fp8 else None)
        except WeightFileError as exc:
            raise CheckpointError(str(exc)) from None
    return loaded


def _read_network(src: WeightSource, shapes: Shapes, det: Detection, keys: Sequence[str], dtype, device) -> Dict[str, torch.Tensor]:
    """The network's tensors by its own key names, siblings included (transposed where stored so)."""
    tensors = src.read([det.prefix + k for k in keys], dtype=dtype, device=device, strip_prefix=det.prefix)
    for name, (key, transposed) in det.siblings.items():
        t = src.read([key], dtype=dtype, device=device)[key]
        tensors[name] = t.t().contiguous() if transposed else t
    return tensors


def _load_detection(src: WeightSource, path: Path, shapes: Shapes, det: Detection, dtype, device,
                    compute_dtype=None) -> LoadedModel:
    """Build the detected network and fill it from the file; with ``compute_dtype`` (fp8 storage)
    only its matrix weights are read in ``dtype``, the rest in ``compute_dtype``."""
    kind = kind_table.get(det.kind)
    own_keys = [k for k in _strip(shapes, det.prefix)]
    if kind.from_state_dict is not None:
        src.check_floating([det.prefix + k for k in own_keys if not _ignorable(k)]
                           + [key for key, _ in det.siblings.values()], det.title)
        sd = _read_network(src, shapes, det, own_keys, dtype, device)
        try:
            module = kind.from_state_dict(sd, dtype, device, det.config)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path.name}: cannot load {det.title}: {exc}") from None
        return _finish(LoadedModel(det.kind, det.variant, det.config, module, path), dtype)

    sub_shapes = {k: v for k, v in _strip(shapes, det.prefix).items() if not _ignorable(k)}
    try:
        with torch.device("meta"):
            module = build_module(det.kind, det.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path.name}: cannot build {det.title} from the config read off its shapes ({exc}); a "
            f"non-official model needs its config in the file's '{CONFIG_METADATA_KEY}' metadata"
        ) from None
    module_keys = list(module.state_dict().keys())
    expected = module.state_dict()
    low = set(fp8_weight_names(module)) if compute_dtype is not None else set()
    if kind.respell is None:
        _check_shapes(module, sub_shapes, path.name, det.title)
        src.check_floating([det.prefix + k for k in module_keys if expected[k].is_floating_point()], det.title)
        raw = _read_network(src, shapes, det, [k for k in module_keys if k not in low], compute_dtype or dtype, device)
        if low:
            raw.update(_read_network(src, shapes, det, [k for k in module_keys if k in low], dtype, device))
    else:  # the file may spell keys another way: check the respelled shapes, then read and respell
        meta = {k: torch.empty(v, device="meta") for k, v in sub_shapes.items()}
        kind.respell(meta)
        _check_shapes(module, {k: tuple(t.shape) for k, t in meta.items()}, path.name, det.title)
        src.check_floating([det.prefix + k for k in sub_shapes if k not in expected or expected[k].is_floating_point()],
                           det.title)
        # Keys the module shares are read in their final dtype; the others in the file's, respelled
        # (e.g. q, k, v concatenated), then cast once.
        same = [k for k in sub_shapes if k in expected]
        raw = _read_network(src, shapes, det, [k for k in same if k not in low], compute_dtype or dtype, device)
        raw.update(_read_network(src, shapes, det, [k for k in same if k in low], dtype, device))
        raw.update(_read_network(src, shapes, det, [k for k in sub_shapes if k not in expected], None, device))
        kind.respell(raw)
        for k in module_keys:
            want = dtype if k in low else compute_dtype or dtype
            if want is not None and raw[k].is_floating_point() and raw[k].dtype != want:
                raw[k] = raw[k].to(want)
    module.load_state_dict({k: raw[k] for k in module_keys}, strict=True, assign=True)
    _require_filled_buffers(module)
    return _finish(LoadedModel(det.kind, det.variant, det.config, module, path), dtype, compute_dtype)


def _ignorable(key: str) -> bool:
    return key.endswith("position_ids")


def _require_filled_buffers(module: nn.Module) -> None:
    """Every buffer must have come from the file: none may be left on the meta device."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                raise CheckpointError(f"buffer {name} of {type(mod).__name__} was not filled from the file")


def _finish(model: LoadedModel, dtype, compute_dtype=None) -> LoadedModel:
    model.module.eval()
    model.module.requires_grad_(False)
    first = next((p for p in model.module.parameters()), None)
    model.dtype = dtype if compute_dtype is not None else first.dtype if first is not None else dtype
    model.compute_dtype = compute_dtype or model.dtype
    return model
