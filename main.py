"""Command line: `python main.py --config=configs/x4_w2.py [--workdir=DIR] [--config.X=Y ...]`.

Thin by design: parses flags, joins a multi-process run if one is configured (or detected),
and calls `twodquant_jax.pipeline.run`, or `twodquant_jax.sweep.run` for a config with a
`sweep` block (configs/sweep.py).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from twodquant_jax import distributed, pipeline, sweep
from twodquant_jax.settings import distributed_settings

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", "", "Output folder (default: runs/x<s>_w<b>_<method>).")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error (not a traceback) for an unknown config field."""
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as e:  # ml_collections' way of saying "no such field"
    if not (e.args and isinstance(e.args[0], KeyError)):
      raise
    field = str(e.args[0]).strip("'\"")
    sys.stderr.write(f"FATAL Flags parsing error: unknown config field {field!r} in a "
                     "--config.* override (the fields are in configs/base.py)\n")
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  job = sweep if "sweep" in FLAGS.config else pipeline
  try:
    job.validate(FLAGS.config)
  except ValueError as e:  # a bad value: say so without a traceback
    raise app.UsageError(str(e)) from e
  logging.set_verbosity(logging.INFO)
  distributed.initialize(distributed_settings(FLAGS.config))
  job.run(FLAGS.config, FLAGS.workdir or None)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
