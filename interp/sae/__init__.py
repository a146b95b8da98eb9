"""Sparse autoencoders on vision features cached in a results store (sae_lens), SAE-Rad descriptions,
compiled reports and ground-truth scores; CLI ``python -m interp.sae``."""
