"""ComfyUI-Wuerstchen core library: Stable Cascade (Würstchen v3) and Würstchen v2 networks, loading
and sampling (``pipeline.cascade.Cascade`` and ``pipeline.cascade_v2.CascadeV2`` run each from a folder of weights).

Framework-free: nothing here imports ComfyUI. The ComfyUI adapters live in ``nodes/``.
"""

__version__ = "0.1.0"

# The core's packages, lowest layer first. A module imports only from its own package or from a
# lower layer; packages that share a layer do not import each other (tests/test_layers.py checks).
LAYERS = (
    ("storage",),                        # safetensors headers, reading and writing weight files
    ("models",),                         # the networks and their configs (compression factors too)
    ("sampling",),                       # schedules, samplers, block streaming
    ("inputs",),                         # request limits, memory probes, images, preprocessing
    ("text",),                           # tokenizer, CLIP text and vision towers, embeddings
    ("lora",),                           # LoRA files: reading, matching, applying
    ("files",),                          # layouts, the kinds table, detection, loading, the model manager
    ("pipeline",),                       # stage functions, ControlNets, the two cascades
    ("options", "train", "editing"),     # generate's options; LoRA training; layered editing
    ("batch",),                          # many generate jobs, in process or on Ray
    ("cli",),                            # python -m wuerstchen COMMAND, one module per command
)
