"""2DQuant on SwinIR-light x4 with 2-bit weights and activations (W2A2)."""

from configs import base


def get_config():
  return base.get_config(scale=4, bits=2, method="2dquant")
