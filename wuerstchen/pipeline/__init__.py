"""The pipeline: stage functions (Stage C, B, A, semantic encoding), ControlNet inputs and the
two whole cascades (Stable Cascade, Würstchen v2) run from a folder of weights.
"""
