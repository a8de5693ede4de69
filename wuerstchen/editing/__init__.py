"""Layered editing on Stage C, after DesignEdit (Jia et al. 2024): decompose a picture into object
layers and a background whose holes are filled by key-masked self-attention, place the layers
again, fuse them into one latent at a chosen step and denoise; Stage B then keeps the source's
VQGAN latent outside the edited region.

Modules, each doing one thing:

* :mod:`.guidance` — Stage C conditioning prepared for one edit (cfg 1 or batched CFG);
* :mod:`.denoise` — a DDIM (eta 0) loop over a slice of the schedule with a per-step hook;
* :mod:`.inversion` — DDIM inversion of a Stage C latent into its trajectory;
* :mod:`.attention_mask` — the key-mask hook on Stage C's self-attention;
* :mod:`.masks` — ComfyUI MASK pictures to latent cells, dilation and feathering;
* :mod:`.layers` — object and background layers, and their transforms;
* :mod:`.fusion` — background filling and layer fusion into one Stage C latent;
* :mod:`.operations` — remove, move, scale, flip, pan and zoom out on top of the layers;
* :mod:`.stage_b` — edit-aware Stage B (source latent kept outside the edit).

Nothing in the rest of the package imports this one; it is a layer above pipeline and sampling.
"""
