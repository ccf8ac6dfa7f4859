"""2DQuant on SwinIR-light x3 with 2-bit weights and activations (W2A2)."""

from configs import base


def get_config():
  return base.get_config(scale=3, bits=2, method="2dquant")
