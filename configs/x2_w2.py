"""2DQuant on SwinIR-light x2 with 2-bit weights and activations (W2A2)."""

from configs import base


def get_config():
  return base.get_config(scale=2, bits=2, method="2dquant")
