"""Full-precision SwinIR-light x4: evaluation only."""

from configs import base


def get_config():
  return base.get_config(scale=4, bits=32, method="fp")
