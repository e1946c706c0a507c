"""Reference VAE: the paper's comparison of a diagonal VAE, a beta-VAE and a structured VAE.

Run ``python -m examples.vae --help`` from the repository root.
"""
