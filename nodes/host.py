"""Everything the nodes need from their host: ComfyUI when it is there, plain fallbacks when not.

Model folders, the shared model manager (with ComfyUI's device choice, its memory manager and
Cancel button plugged in), progress bars with live previews. Without ComfyUI (tests, scripts)
the model folders are the ComfyUI-style sub-folders of one root (``WUERSTCHEN_MODELS_DIR`` or
:func:`configure`), and progress goes nowhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from wuerstchen.files.kinds import KINDS, OWN_FOLDER
from wuerstchen.files.management import ManagerHooks, ModelManager

try:  # inside ComfyUI
    import comfy.model_management as comfy_mm
    import comfy.utils as comfy_utils
    import folder_paths

    IN_COMFYUI = True
except ImportError:  # plain Python, CI
    comfy_mm = comfy_utils = folder_paths = None
    IN_COMFYUI = False

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")

# Which ComfyUI model folders each loader lists: those of the model kinds that fill its role (our
# folder first; e.g. the Stage C loader's role is filled by Stable Cascade's Stage C and the
# Würstchen v2 prior), plus the roles that are not one kind of network (LoRAs, single-file checkpoints).
FOLDERS = {
    **{role: tuple(dict.fromkeys(f for kind in KINDS.values() if kind.slot == role for f in kind.folder_list()))
       for role in dict.fromkeys(kind.slot for kind in KINDS.values())},
    "lora": ("loras", OWN_FOLDER),
    "checkpoint": ("checkpoints", OWN_FOLDER),
}

# Fallback layout without ComfyUI: folder name -> sub-folders of the models root.
_SUBFOLDERS = {
    OWN_FOLDER: ("wuerstchen",), "diffusion_models": ("unet", "diffusion_models"), "checkpoints": ("checkpoints",),
    "vae": ("vae",), "vae_approx": ("vae_approx",), "text_encoders": ("text_encoders", "clip"),
    "clip_vision": ("clip_vision",), "controlnet": ("controlnet",), "loras": ("loras",),
}


class NodeError(ValueError):
    """A user-facing error: ComfyUI shows the message on the node."""


class ComfyHooks(ManagerHooks):
    """The model manager's integration points, answered by ComfyUI. What stays on the GPU is
    ComfyUI's call: our networks are models in its memory manager (nodes/comfy_memory.py), loaded
    whole or partly (the rest streamed) in the room it grants, as its --lowvram/--novram modes
    and its free memory allow, and unloaded when it needs the room or is told to free memory."""

    def compute_device(self) -> torch.device:
        return comfy_mm.get_torch_device()

    def offload_device(self) -> torch.device:
        return comfy_mm.unet_offload_device()

    def check_interrupt(self) -> None:
        comfy_mm.throw_exception_if_processing_interrupted()

    def supports_bf16(self, device: torch.device) -> bool:
        if device.type == "cpu":
            return False
        return bool(comfy_mm.should_use_bf16(device))

    def placer(self, manager: ModelManager):
        from .comfy_memory import ComfyPlacer

        return ComfyPlacer(manager)


@dataclass
class PackState:
    """The pack's one piece of shared state: the model manager and where models live."""

    manager: ModelManager
    models_root: Optional[Path] = None


def _make_state() -> PackState:
    if IN_COMFYUI:
        own = os.path.join(folder_paths.models_dir, OWN_FOLDER)
        folder_paths.add_model_folder_path(OWN_FOLDER, own)
        os.makedirs(own, exist_ok=True)
        return PackState(ModelManager(hooks=ComfyHooks()))
    root = os.environ.get("WUERSTCHEN_MODELS_DIR")
    return PackState(ModelManager(), Path(root) if root else None)


_STATE: Optional[PackState] = None


def state() -> PackState:
    global _STATE
    if _STATE is None:
        _STATE = _make_state()
    return _STATE


def configure(models_root: os.PathLike | str | None = None, manager: Optional[ModelManager] = None) -> PackState:
    """Point the pack at a models root (outside ComfyUI) and/or a fresh manager; returns the state."""
    st = state()
    if models_root is not None:
        st.models_root = Path(models_root)
    if manager is not None:
        st.manager = manager
    return st


def manager() -> ModelManager:
    return state().manager


# ------------------------------------------------------------------------------------------------
# Model files


def _folder_dirs(folder: str) -> List[Path]:
    state()  # in ComfyUI, creating the state registers models/wuerstchen with folder_paths
    if IN_COMFYUI:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    root = state().models_root
    if root is None:
        return []
    return [root / sub for sub in _SUBFOLDERS.get(folder, (folder,))]


def _list_dir(directory: Path) -> List[str]:
    """Model files below ``directory`` (symlinked files and folders followed, loops cut)."""
    from wuerstchen.files.model_files import is_regular_file, walk

    if not directory.is_dir():
        return []
    return [path.relative_to(directory).as_posix() for path in walk(directory, MODEL_EXTENSIONS)
            if is_regular_file(path)]


_KIND_CACHE: Dict[tuple, Optional[set]] = {}


def _kinds_in(path: Path) -> Optional[set]:
    """Kinds of network a file holds ({'lora'} for LoRAs), from its header; None if unreadable."""
    try:
        st = path.stat()  # follows symlinks: a changed link target is a changed file
    except OSError:
        return None
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _KIND_CACHE:
        from wuerstchen.files.checkpoints import inspect
        from wuerstchen.lora.formats import looks_like_lora
        from wuerstchen.storage.weights_io import SafetensorsFile

        try:
            if path.suffix.lower() in (".safetensors", ".sft"):
                keys = SafetensorsFile(path).keys()
                if looks_like_lora(keys):
                    _KIND_CACHE[key] = {"lora"}
                    return _KIND_CACHE[key]
            _KIND_CACHE[key] = {d.kind for d in inspect(path)}
        except Exception:  # unreadable or foreign: listed, the loader explains on use
            _KIND_CACHE[key] = None
    return _KIND_CACHE[key]


def _fits(role: str, path: Path) -> bool:
    kinds = _kinds_in(path)
    if kinds is None:
        return True
    if role == "checkpoint":
        return len(kinds) > 1
    return role in kinds or any(KINDS[k].slot == role for k in kinds if k in KINDS)


def list_models(role: str) -> List[str]:
    """File names a loader offers, relative to their model folder (sub-folders included).

    Our own ``models/wuerstchen`` folder holds every kind of file, so there only the files whose
    header shows the loader's kind are offered; ComfyUI's typed folders are listed as they are.
    """
    state()  # registers models/wuerstchen before the first listing (object_info comes before any load)
    seen: Dict[str, None] = {}
    for folder in FOLDERS[role]:
        if IN_COMFYUI:
            try:
                names = folder_paths.get_filename_list(folder)
            except KeyError:
                names = []
            names = [n.replace(os.sep, "/") for n in names if n.lower().endswith(MODEL_EXTENSIONS)]
        else:
            names = [n for d in _folder_dirs(folder) for n in _list_dir(d)]
        if folder == OWN_FOLDER:
            names = [n for n in names if any(_fits(role, d / n) for d in _folder_dirs(folder) if (d / n).is_file())]
        for n in sorted(names):
            seen.setdefault(n, None)
    return list(seen) or ["(no model files found)"]


def resolve_model(role: str, name: str) -> Path:
    """The file behind a name from :func:`list_models`; never a name outside the model folders.

    The name itself must stay inside a model folder (no absolute paths, no ``..``) and be a
    model file name; what it is a symlink to is the user's choice (a shared model store), so
    links are followed. The path is returned as spelled under the folder, so its name and
    suffix are the listed ones, not a link target's (a hub cache blob has no suffix).
    """
    from wuerstchen.storage.weights_io import WeightFileError, check_regular_file

    parts = Path(name).parts if name else ()
    if (not name or "\0" in name or name.startswith("(") or os.path.isabs(name) or ".." in parts
            or not name.lower().endswith(MODEL_EXTENSIONS)):
        raise NodeError(f"{name!r} is not a model file from the list; pick one of the files in the model folders "
                        f"({', '.join(FOLDERS[role])})")
    for folder in FOLDERS[role]:
        for directory in _folder_dirs(folder):
            candidate = directory / name
            if not os.path.lexists(candidate):
                continue
            try:
                check_regular_file(candidate)
            except WeightFileError as exc:
                raise NodeError(f"model file {name!r} in {directory}: {exc.reason}") from None
            return candidate
    raise NodeError(f"model file {name!r} was not found in the model folders for this loader "
                    f"({', '.join(FOLDERS[role])}, plus models/{OWN_FOLDER})")


def embedding_folders() -> List[Path]:
    """Where ``embedding:NAME`` in a prompt looks: ComfyUI's ``embeddings`` folders (outside ComfyUI,
    ``<models root>/embeddings``). Pass to ``encode_prompts(..., embeddings=...)``."""
    return _folder_dirs("embeddings")


# ------------------------------------------------------------------------------------------------
# Progress, previews, interruption


class Progress:
    """A progress bar (ComfyUI's, with live previews) that also honours the Cancel button."""

    def __init__(self, total: int, preview: Optional[Callable[[torch.Tensor], object]] = None):
        self.total = max(int(total), 1)
        self.preview = preview
        self.bar = comfy_utils.ProgressBar(self.total) if IN_COMFYUI else None

    def __call__(self, step: int, total: int, x0: Optional[torch.Tensor] = None) -> None:
        if IN_COMFYUI:
            comfy_mm.throw_exception_if_processing_interrupted()
        if self.bar is None:
            return
        image = None
        if self.preview is not None and x0 is not None:
            pil = self.preview(x0)
            if pil is not None:
                image = ("JPEG", pil, 512)
        self.bar.update_absolute(step, total, image)


def previews_enabled() -> bool:
    if not IN_COMFYUI:
        return False
    try:
        from comfy.cli_args import LatentPreviewMethod, args

        return args.preview_method != LatentPreviewMethod.NoPreviews
    except Exception:  # older/newer ComfyUI without these names: show previews
        return True
