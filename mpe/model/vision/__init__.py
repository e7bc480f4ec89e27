"""The image tower: a SigLIP-style ViT with attention pooling, and its preprocessing."""
