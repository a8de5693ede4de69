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


def load_parity(name: str):
    """Return (json, weights state dict or None, io tensors) for a parity vector."""
    from safetensors.torch import load_file

    meta = json.loads(_require(PARITY_DIR / f"{name}.json").read_text())
    weights_path = PARITY_DIR / f"{name}.weights.safetensors"
    weights = load_file(str(weights_path)) if weights_path.exists() else None
    io_path = PARITY_DIR / f"{name}.io.safetensors"
    io = load_file(str(io_path)) if io_path.exists() else {}
    return meta, weights, io


def load_manifest(name: str) -> dict:
    return json.loads(_require(MANIFEST_DIR / f"{name}.json").read_text())


def load_v2(name: str):
    """Return (json, weights state dict or None, io tensors) for a Würstchen v2 vector (``v2/NAME``)."""
    from safetensors.torch import load_file

    meta = json.loads(_require(V2_DIR / f"{name}.json").read_text())
    weights_path = V2_DIR / f"{name}.weights.safetensors"
    weights = load_file(str(weights_path)) if weights_path.exists() else None
    io_path = V2_DIR / f"{name}.io.safetensors"
    io = load_file(str(io_path)) if io_path.exists() else {}
    return meta, weights, io


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
