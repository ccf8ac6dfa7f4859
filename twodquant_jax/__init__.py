"""twodquant-jax: 2DQuant low-bit post-training quantization of SwinIR-light in JAX/Flax."""

__version__ = "0.1.0"
