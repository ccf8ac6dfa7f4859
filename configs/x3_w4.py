"""2DQuant on SwinIR-light x3 with 4-bit weights and activations (W4A4)."""

from configs import base


def get_config():
  return base.get_config(scale=3, bits=4, method="2dquant")
