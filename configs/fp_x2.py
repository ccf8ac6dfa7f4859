"""Full-precision SwinIR-light x2: evaluation only."""

from configs import base


def get_config():
  return base.get_config(scale=2, bits=32, method="fp")
