"""ComfyUI-Wuerstchen core library: Stable Cascade (Würstchen v3) networks, loading and sampling.

Framework-free: nothing here imports ComfyUI. The ComfyUI adapters live in ``nodes/``.
"""

__version__ = "0.1.0"
