"""Text and vision towers: the official tokenizer, CLIP-G text encoder, CLIP ViT-L vision encoder,
prompt weights and textual-inversion embeddings.
"""
