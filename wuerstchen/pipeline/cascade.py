"""Text-to-image with the whole cascade from a folder of weight files (the CLI's engine).

Files are found by what they contain (keys and shapes), not by their names: a folder with the
official release, ComfyUI's single-file checkpoints, or renamed files all work.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import control
from ..inputs import limits
from . import stages as pipeline
from ..files import kinds as kind_table
from ..files.checkpoints import LoadedModel, build_module, inspect
from .control import Control
from ..files.management import ModelManager
from ..files.model_files import SkippedFile, skipped_for, walk
from .stages import Conditioning, LoraUse, StageBSettings, StageCSettings


logger = logging.getLogger("wuerstchen")


IMAGE_MODES = ("img2img", "variation")


class MissingWeightsError(FileNotFoundError):
    pass


def scan_models(root: os.PathLike | str, skipped: Optional[list] = None) -> Dict[str, List[tuple]]:
    """Every usable network below ``root``: kind -> [(path, detection)]; symlinks are followed.

    A file that cannot be used (corrupt, truncated, a FIFO, a symlink loop, ...) never ends the
    scan: it is skipped with a logged warning naming it and why, and recorded in ``skipped`` (a
    list of :class:`~wuerstchen.files.model_files.SkippedFile`) when one is given, so a missing-weights
    message can say "stage_b.safetensors was found but is truncated" instead of "missing".
    """
    root = Path(root)
    found: Dict[str, List[tuple]] = {}
    if not root.exists():
        return found
    for path in walk(root):
        try:
            dets = inspect(path)
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the good ones
            record = SkippedFile.from_error(path, exc)
            logger.warning("skipped %s: %s", path, record.reason)
            if skipped is not None:
                skipped.append(record)
            continue
        for det in dets:
            found.setdefault(det.kind, []).append((path, det))
    return found


def _prefer(entries: List[tuple], variant: Optional[str]) -> tuple:
    """Pick a file: the requested variant, else the release's main one (the full model rather than
    lite); single-purpose files before combined checkpoints."""
    def score(entry):
        path, det = entry
        return (
            0 if variant is None or det.variant == variant else 1,
            0 if det.variant == kind_table.get(det.kind).files[0].variant else 1,
            0 if det.prefix == "" else 1,
            str(path),
        )

    return sorted(entries, key=score)[0]


@dataclass
class CascadeFiles:
    parts: Dict[str, tuple] = field(default_factory=dict)  # kind -> (path, detection)
    controlnets: Dict[str, Path] = field(default_factory=dict)  # ControlNet variant -> file
    skipped: List[SkippedFile] = field(default_factory=list)  # files found but unusable, and why

    @classmethod
    def from_dir(cls, root: os.PathLike | str, stage_c_variant: Optional[str] = None,
                 stage_b_variant: Optional[str] = None) -> "CascadeFiles":
        skipped: List[SkippedFile] = []
        found = scan_models(root, skipped)
        parts = {}
        for kind, entries in found.items():
            variant = {"stage_c": stage_c_variant, "stage_b": stage_b_variant}.get(kind)
            parts[kind] = _prefer(entries, variant)
        controlnets: Dict[str, Path] = {}
        for path, det in sorted(found.get("controlnet", []), key=lambda e: (e[1].prefix != "", str(e[0]))):
            controlnets.setdefault(det.variant, path)
        return cls(parts, controlnets, skipped)

    def missing(self, kinds: Sequence[str]) -> List[str]:
        return [k for k in kinds if k not in self.parts]

    def complete_families(self) -> List[str]:
        """The model families (:data:`wuerstchen.files.kinds.FAMILIES`) whose text-to-image set is here."""
        return [name for name, fam in kind_table.FAMILIES.items() if not self.missing(fam.text_to_image)]

    def _missing_lines(self, missing: Sequence[str], family: Optional[str]) -> List[str]:
        lines = []
        for k in missing:
            kind = kind_table.get(k)
            purpose = f" ({kind.purpose})" if kind.purpose else ""
            sources = "; ".join(f"{', '.join(names)}  (download from {url})"
                                for url, names in kind.sources(family or kind.family))
            lines.append(f"  - {kind.title}{purpose}: one of {sources}")
            lines.extend(f"    {s.describe()}" for s in skipped_for(self.skipped, k))
        return lines

    def require(self, kinds: Sequence[str], root: os.PathLike | str, family: Optional[str] = None) -> None:
        """Raise :class:`MissingWeightsError` naming each missing kind's release files (those of
        ``family`` for a kind that two families share, the VQGAN; by default the kind's own family)."""
        missing = self.missing(kinds)
        if not missing:
            return
        lines = [f"Missing model weights in {root}:"] + self._missing_lines(missing, family)
        lines.append(_PUT_THEM_ANYWHERE.format(root=root))
        raise MissingWeightsError("\n".join(lines))

    def choose_family(self, root: os.PathLike | str, requested: Optional[str] = None) -> tuple:
        """``(family, note)``: ``requested``, else the one family whose set is complete here. With
        both complete, Stable Cascade, and ``note`` says how to pick Würstchen v2; with neither,
        :class:`MissingWeightsError` lists what each family misses (the nearer one first)."""
        if requested is not None:
            kind_table.FAMILIES[requested]  # noqa: B018 - a KeyError names an unknown family
            return requested, None
        complete = self.complete_families()
        if len(complete) == 1:
            return complete[0], self._partial_note(complete[0])
        if complete:
            other = [f for f in complete if f != kind_table.STABLE_CASCADE]
            return kind_table.STABLE_CASCADE, (
                f"{root} holds complete {kind_table.family_title(kind_table.STABLE_CASCADE)} and "
                + " and ".join(kind_table.family_title(f) for f in other) + " sets; using Stable Cascade ("
                + ", ".join(f"--family {kind_table.FAMILIES[f].short} for {kind_table.family_title(f)}" for f in other)
                + ")")
        families = sorted(kind_table.FAMILIES.values(), key=lambda f: len(self.missing(f.text_to_image)))
        lines = [f"Missing model weights in {root}: no model family is complete."]
        for fam in families:
            lines.append(f"For {fam.title} (--family {fam.short}):")
            lines += self._missing_lines(self.missing(fam.text_to_image), fam.name)
        lines.append(_PUT_THEM_ANYWHERE.format(root=root))
        raise MissingWeightsError("\n".join(lines))


    def _partial_note(self, chosen: str) -> Optional[str]:
        """When another family's files are here too but its set is incomplete, say so (a broken or
        missing file there would otherwise silently switch the family)."""
        notes = []
        for fam in kind_table.FAMILIES.values():
            if fam.name == chosen:
                continue
            own = [k for k in fam.text_to_image if kind_table.get(k).family == fam.name]
            present = [k for k in own if k in self.parts or skipped_for(self.skipped, k)]
            if not present:
                continue
            missing = self.missing(fam.text_to_image)
            broken = [s.describe() for k in missing for s in skipped_for(self.skipped, k)]
            notes.append(f"the {fam.title} set here is incomplete (missing: "
                         + ", ".join(kind_table.title(k) for k in missing) + ")"
                         + (f"; {'; '.join(broken)}" if broken else "")
                         + f"; pass --family {fam.short} to see what it needs")
        if not notes:
            return None
        return f"using {kind_table.family_title(chosen)}: " + "; ".join(notes)


_PUT_THEM_ANYWHERE = ("Put the files anywhere under {root} (sub-folders are fine); they are recognised by their "
                      "contents, not their names. ComfyUI users can point --models at ComfyUI/models.")


class FolderCascade:
    """What a cascade of either family needs from a folder: its files, the manager that loads them,
    and where ``embedding:NAME`` in a prompt is looked up."""

    family = kind_table.STABLE_CASCADE

    def __init__(self, files: CascadeFiles, manager: Optional[ModelManager] = None, root: str = ".",
                 embeddings=None):
        self.files = files
        self.manager = manager or ModelManager()
        self.root = root
        self.embeddings = embeddings

    def model(self, kind: str) -> LoadedModel:
        """The network of ``kind`` the folder holds, loaded (once) by the manager."""
        self.files.require([kind], self.root, self.family)
        path, _det = self.files.parts[kind]
        return self.manager.load(path, [kind])


class Cascade(FolderCascade):
    """Stage C -> Stage B -> Stage A from a folder of weights, with offloading between stages."""

    def controlnet_file(self, kind: str) -> Path:
        """The ControlNet file for ``kind`` (canny, inpainting, super_resolution), found by content."""
        if kind not in self.files.controlnets:
            net = kind_table.get("controlnet")
            names = [f.name for f in net.files if f.variant == kind]
            raise MissingWeightsError(
                f"Missing model weights in {self.root}: no {kind} ControlNet. Download "
                f"{', '.join(names) or kind} from {net.download} and put it anywhere under {self.root}.")
        return self.files.controlnets[kind]

    def controlnet(self, kind: str) -> LoadedModel:
        return self.manager.load(self.controlnet_file(kind), ["controlnet"])

    def encode_prompts(self, prompts: Sequence[str], loras: Sequence[LoraUse] = ()) -> Conditioning:
        te = self.model("clip_text")
        with self.manager.running(te):
            return pipeline.encode_text(te.module, prompts, loras, self.embeddings)

    def control_hints(self, controls: Sequence[Control]) -> List[tuple]:
        """(ControlNet, prepared hint) per request: the net found by kind, its input made by the recipe."""
        hints = []
        for c in controls:
            net = self.controlnet(c.kind)
            effnet = self.model("effnet") if c.kind == "super_resolution" else None
            with self.manager.running(*([effnet] if effnet else [])):
                inp = control.control_input(c.kind, c.image, c.mask, effnet.module if effnet else None)
            hints.append((net, control.Hint(net.module, inp, c.strength, c.start, c.end)))
        return hints

    def _shapes_of(self, kind: str) -> torch.nn.Module:
        """The network a file holds, built on the meta device from its config (shapes only, no weights)."""
        _path, det = self.files.parts[kind]
        with torch.device("meta"):
            return build_module(kind, det.config)

    def check_request(self, *, width: int, height: int, batch: int, stage_c: StageCSettings,
                      stage_b: StageBSettings, image: Optional[torch.Tensor], image_mode: str, compression: float,
                      controls: Sequence[Control]) -> Optional[torch.Tensor]:
        """Everything :meth:`generate` checks before it loads a model: sizes, batch, settings, the
        image, the ControlNets' widths against Stage C's and the memory the run needs (from the files'
        configs). Raises :class:`~wuerstchen.inputs.limits.RequestError`; returns the image as [N, 3, H, W]."""
        height, width = pipeline.check_size(height, width)
        batch = limits.check_batch(batch)
        compression = limits.check_compression(compression)
        stage_c.check()
        stage_b.check()
        if image_mode not in IMAGE_MODES:
            raise limits.RequestError(f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
        if image is not None:
            image = limits.check_images(image, f"the {image_mode} image")
            if image_mode == "img2img" and image.shape[0] not in (1, batch):
                raise limits.RequestError(f"{image.shape[0]} img2img images for a batch of {batch}; give one image "
                                          "or one per image of the batch")
            if image_mode == "img2img" and stage_c.denoise >= 1.0:
                raise limits.RequestError("an img2img image was given but Stage C denoise is 1, which starts from "
                                          "noise and ignores it; set denoise below 1 (official notebook: 0.6)")
        needed = ["stage_c", "stage_b", "stage_a", "clip_text"]
        if image is not None:
            needed.append("effnet" if image_mode == "img2img" else "clip_vision")
        if any(c.kind == "super_resolution" for c in controls):
            needed.append("effnet")
        self.files.require(needed, self.root)
        for c in controls:
            self.controlnet_file(c.kind)

        sc, sb, sa = (self._shapes_of(k) for k in ("stage_c", "stage_b", "stage_a"))
        widths = control.injection_widths(sc)
        for c in controls:
            det = next(d for d in inspect(self.files.controlnets[c.kind]) if d.kind == "controlnet")
            control.check_widths(c.kind, int(det.config["c_proj"]), det.config["proj_blocks"], widths)
        latent_c = pipeline.stage_c_latent_size(height, width, compression)
        latent_b = pipeline.stage_b_latent_size(height, width, sb.embedding[0].downscale_factor)
        img2img = image is not None and image_mode == "img2img"
        needs = limits.estimate(batch=batch, size=(height, width), stage_c=(sc, latent_c, stage_c.cfg != 1),
                                stage_b=(sb, latent_b, stage_b.cfg != 1),
                                stage_a=(sa, latent_b, pipeline.auto_tile(*latent_b)),
                                semantic=latent_c if img2img else None, dtype=self.manager.weight_dtype())
        limits.check_memory(needs, self.manager.device, f"{width}x{height}, batch {batch}, compression {compression:g}",
                            "lower the size or the batch, or raise the compression")
        return image

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative: str = "",
        *,
        width: int = 1024,
        height: int = 1024,
        batch: int = 1,
        seed: int = 0,
        stage_c: StageCSettings = StageCSettings(),
        stage_b: StageBSettings = StageBSettings(),
        image: Optional[torch.Tensor] = None,
        image_mode: str = "img2img",
        compression: float = pipeline.OFFICIAL_COMPRESSION,
        loras: Sequence[LoraUse] = (),
        controls: Sequence[Control] = (),
        progress: Optional[Callable[[str, int, int], None]] = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]. ``image`` ([N, 3, H, W] in [0, 1]) is the img2img source
        (``image_mode='img2img'``, strength = ``stage_c.denoise``) or the variation reference.
        ``loras`` stack on Stage C (model strength) and on CLIP-G for both prompts (text strength);
        ``controls`` chain ControlNet hints on Stage C, their step ranges counted in the steps run.

        The request is checked before any model loads (:meth:`check_request`); any size from 64 to
        8192 pixels works (Stage B runs on even latent sides, the image is cropped back)."""
        image = self.check_request(width=width, height=height, batch=batch, stage_c=stage_c, stage_b=stage_b,
                                   image=image, image_mode=image_mode, compression=compression, controls=controls)
        hints = self.control_hints(controls)
        for use in loras:  # refuse a LoRA for another model, and say what applies, before any sampling
            use.check(self.model("stage_c").module, self.model("clip_text").module, who="generate")

        cond = self.encode_prompts([prompt], loras)
        uncond = self.encode_prompts([negative], loras)
        init_latent = None
        if image is not None and image_mode == "variation":
            vis = self.model("clip_vision")
            with self.manager.running(vis):
                embeds = pipeline.encode_image_embeds(vis.module, image)
            cond = pipeline.with_image_embeds(cond, embeds)
        elif image is not None:
            eff = self.model("effnet")
            latent_size = pipeline.stage_c_latent_size(height, width, compression)
            with self.manager.running(eff):
                init_latent = pipeline.encode_semantic(eff.module, image, latent_size)
            init_latent = init_latent[:1].expand(batch, -1, -1, -1) if init_latent.shape[0] == 1 else init_latent

        h_c, w_c = pipeline.stage_c_latent_size(height, width, compression)
        sc = self.model("stage_c")

        def report(stage):
            def step(i, n, x0):
                self.manager.hooks.check_interrupt()
                if progress is not None:
                    progress(stage, i, n)

            return step

        with self.manager.running(sc, *[net for net, _ in hints]):
            latent_c = pipeline.sample_stage_c(
                sc.module, cond, uncond, shape=(batch, 16, h_c, w_c), init_latent=init_latent,
                seed=seed, settings=stage_c, loras=loras, control=[hint for _, hint in hints],
                callback=report("stage_c"),
            )
        sb = self.model("stage_b")
        with self.manager.running(sb):
            latent_b = pipeline.sample_stage_b(
                sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled, size=(height, width),
                seed=seed, settings=stage_b, callback=report("stage_b"),
            )
        sa = self.model("stage_a")
        with self.manager.running(sa):
            images = pipeline.decode_stage_a(sa.module, latent_b)
        return pipeline.crop_to(images, (height, width))
