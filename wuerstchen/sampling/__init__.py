"""Sampling: the gdf schedules (Stable Cascade, Würstchen v2), the samplers and their per-step
inputs, and block streaming for stages that do not fit the device. Below inputs, text and pipeline.
"""
