"""Calling node classes the way ComfyUI does (imported by the node test files, not a test module)."""

from nodes import NODE_CLASS_MAPPINGS


def run(node_type, **kwargs):
    """Run a node by its id with keyword inputs; checks it returns one value per declared output."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), node_type
    return out


def load(node_type, name, **kwargs):
    """The first output of a loader node for the file ``name``."""
    key = "ckpt_name" if node_type == "WuerstchenCheckpointLoader" else "model_name"
    return run(node_type, **{key: name}, **kwargs)[0]
