"""``embedding:NAME`` reaches the text encoder from every entry point: the Text Encode node (ComfyUI's
``embeddings`` folders), the library's Cascade and the command line (``--embeddings``, default
``MODELS/embeddings``)."""

import pytest
import torch
from safetensors.torch import save_file

from nodes import NODE_CLASS_MAPPINGS, host
from wuerstchen import cli
from wuerstchen.files import tiny
from wuerstchen.pipeline.cascade import Cascade, CascadeFiles
from wuerstchen.files.management import ModelManager


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_with_embeddings")
    tiny.write_tiny_models(root / "wuerstchen")
    (root / "embeddings").mkdir()
    vectors = torch.randn(2, tiny.TEXT["hidden_size"], generator=torch.Generator().manual_seed(3))
    save_file({"clip_g": vectors}, str(root / "embeddings" / "inkstyle.safetensors"))
    return root


def _encode_node(text):
    node = NODE_CLASS_MAPPINGS["WuerstchenTextEncode"]()
    clip = NODE_CLASS_MAPPINGS["WuerstchenCLIPTextLoader"]().load("text_encoder/model.safetensors")[0]
    return node.encode(clip, text)[0][0][0]


def test_text_encode_node_reads_comfyui_embeddings_folder(models):
    host.configure(models, manager=ModelManager())
    with_embedding = _encode_node("a cat, embedding:inkstyle")
    as_text = _encode_node("a cat, embedding inkstyle")
    assert with_embedding.shape == as_text.shape and not torch.allclose(with_embedding, as_text)
    from nodes.host import NodeError

    with pytest.raises(NodeError, match="nosuchstyle"):
        _encode_node("a cat, embedding:nosuchstyle")


def test_cascade_and_cli_pass_their_embeddings_folder(models, tmp_path, capsys):
    root = models / "wuerstchen"
    cascade = Cascade(CascadeFiles.from_dir(root), ModelManager(), root=str(root), embeddings=models / "embeddings")
    plain = Cascade(CascadeFiles.from_dir(root), cascade.manager, root=str(root))
    used = cascade.encode_prompts(["embedding:inkstyle"]).clip_text
    ignored = plain.encode_prompts(["embedding:inkstyle"]).clip_text  # without a folder it is prompt text
    assert not torch.allclose(used, ignored)

    args = ["generate", "--models", str(root), "--embeddings", str(models / "embeddings"), "--width", "64",
            "--height", "64", "--c-steps", "1", "--b-steps", "1"]
    assert cli.main(args + ["--prompt", "embedding:inkstyle", "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main(args + ["--prompt", "embedding:missing", "--out", str(tmp_path / "b.png")]) != 0
    assert "missing" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
