"""Storage, the lowest layer: safetensors headers checked before reading, weight files read and
written (safetensors, weights-only pickles). Imports nothing else of the core.
"""
