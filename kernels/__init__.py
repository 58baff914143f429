"""Vocab-parallel KL kernels (Triton) and their pure-torch references."""
