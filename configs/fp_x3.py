"""Full-precision SwinIR-light x3: evaluation only."""

from configs import base


def get_config():
  return base.get_config(scale=3, bits=32, method="fp")
