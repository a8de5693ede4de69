"""Inputs: every request checked before work (numbers, sizes, images, masks, memory estimates and
probes), image files read at their bit depth, the official image preprocessing.
"""
