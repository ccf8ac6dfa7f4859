"""Command line: `python main.py --config=configs/x4_w2.py [--workdir=DIR] [--config.X=Y ...]`.

Thin by design: parses flags and calls `twodquant_jax.pipeline.run`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from twodquant_jax import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", "", "Output folder (default: runs/x<s>_w<b>_<method>).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  pipeline.run(FLAGS.config, FLAGS.workdir or None)


if __name__ == "__main__":
  app.run(main)
