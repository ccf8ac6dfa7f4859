"""2DQuant on SwinIR-light x4 with 3-bit weights and activations (W3A3)."""

from configs import base


def get_config():
  return base.get_config(scale=4, bits=3, method="2dquant")
