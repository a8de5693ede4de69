"""ComfyUI-Wuerstchen core library: Stable Cascade (Würstchen v3) and Würstchen v2 networks, loading
and sampling (``cascade.Cascade`` and ``cascade_v2.CascadeV2`` run each from a folder of weights).

Framework-free: nothing here imports ComfyUI. The ComfyUI adapters live in ``nodes/``.
"""

__version__ = "0.1.0"
