"""Shared test fixtures: where the official reference data lives, and how to read it."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `import wuerstchen` / `import nodes` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))
REFERENCE_DIR = Path(os.environ.get("WUERSTCHEN_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))
PARITY_DIR = REFERENCE_DIR / "parity"
MANIFEST_DIR = REFERENCE_DIR / "manifests"
V2_DIR = REFERENCE_DIR / "v2"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"reference data missing: {path}. Tests need ../shared/reference beside the repository "
            "(or WUERSTCHEN_REFERENCE pointing at it)."
        )
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _require(PARITY_DIR)


@pytest.fixture(scope="session")
def manifest_dir() -> Path:
    return _require(MANIFEST_DIR)


def _load_vector(folder: Path, name: str):
    from safetensors.torch import load_file

    meta = json.loads(_require(folder / f"{name}.json").read_text())
    weights_path = folder / f"{name}.weights.safetensors"
    weights = load_file(str(weights_path)) if weights_path.exists() else None
    io_path = folder / f"{name}.io.safetensors"
    io = load_file(str(io_path)) if io_path.exists() else {}
    return meta, weights, io


def load_parity(name: str):
    """Return (json, weights state dict or None, io tensors) for a parity vector."""
    return _load_vector(PARITY_DIR, name)


def call_kwargs(call: dict, io) -> dict:
    """Keyword arguments of a recorded call: tensors by io key, list arguments with their None entries,
    other arguments by value."""
    kwargs = {}
    for arg in call["args"]:
        if "list" in arg:
            kwargs[arg["name"]] = [None if item is None else io[item["key"]] for item in arg["list"]]
        else:
            kwargs[arg["name"]] = io[arg["key"]] if "key" in arg else arg["value"]
    return kwargs


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The whole tiny release (every official file name, both families), written once; read-only."""
    from wuerstchen.files.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny_release")
    write_tiny_models(root)
    return root


def load_manifest(name: str) -> dict:
    return json.loads(_require(MANIFEST_DIR / f"{name}.json").read_text())


def load_v2(name: str):
    """Return (json, weights state dict or None, io tensors) for a Würstchen v2 vector (``v2/NAME``)."""
    return _load_vector(V2_DIR, name)


def recorded_seed(text: str) -> int:
    """The seed in a JSON field such as ``"torch.Generator().manual_seed(4010)"``."""
    import re

    match = re.search(r"manual_seed\((\d+)\)", text)
    if match is None:
        raise ValueError(f"no manual_seed(...) in {text!r}")
    return int(match.group(1))


def load_v2_file(name: str):
    """A named file of ``v2/`` (e.g. ``v2_prior_sampling.weights.safetensors``) as a state dict."""
    from safetensors.torch import load_file

    return load_file(str(_require(V2_DIR / name)))
