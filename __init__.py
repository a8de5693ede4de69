"""ComfyUI-Wuerstchen: Stable Cascade for ComfyUI with official-model parity.

ComfyUI imports this file. The core library (``wuerstchen/``) is imported by its absolute name,
so the pack folder is put at the *end* of ``sys.path`` (ComfyUI's own modules, e.g. its
``nodes``, keep precedence).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:  # imported as a package (ComfyUI); a bare import (pytest rootdir) has no nodes to offer
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # pragma: no cover
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
