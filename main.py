"""Command line: `python main.py --config=configs/x4_w2.py [--workdir=DIR] [--config.X=Y ...]`.

Thin by design: flags -> `settings.parse` (every value checked once, here) -> the host
settings -> joining a multi-process run if one is configured (or detected) -> `pipeline.run`,
or `sweep.run` for a config with a `sweep` block (configs/sweep.py). The project's own errors
(bad settings, missing or corrupt files, a busy workdir, a failed download) end in ONE line
naming the file and what to do;
`--verbosity=1` or TWODQUANT_DEBUG=1 shows the traceback (and other packages' INFO logs, which
are otherwise hidden).
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from twodquant_jax import distributed, host_runtime, pipeline, settings, sweep
from twodquant_jax.data.download import DownloadError
from twodquant_jax.formats.torch_pickle import CheckpointError
from twodquant_jax.workdir import WorkdirError

PACKAGE = "twodquant_jax"

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


def debugging() -> bool:
  """Tracebacks and third-party INFO logs: `--verbosity=1` (or more) or TWODQUANT_DEBUG=1."""
  return FLAGS.verbosity >= 1 or os.environ.get("TWODQUANT_DEBUG", "") not in ("", "0")


class _OwnInfoOnly(logging_std.Filter):
  """Drops INFO/DEBUG records of other packages (orbax writes ~48 lines per checkpoint save,
  all through absl's logger) and keeps this project's, and every warning and error."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno >= logging_std.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return f"/{PACKAGE}/" in path or path.endswith("/main.py")


def setup_logging() -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  if not debugging():
    logging.get_absl_handler().addFilter(_OwnInfoOnly())


def fail_line(error: BaseException) -> str:
  """The one line a user sees for a project error: what happened (the message names the file
  or field) and what to do."""
  msg = " ".join(str(error).split()) or type(error).__name__
  hint = ""
  if isinstance(error, CheckpointError):
    hint = ("fix --config.model.checkpoint (a SwinIR-light .pth as released) or leave it empty "
            "to download the official weights")
  elif isinstance(error, FileNotFoundError):
    hint = "check the path in the config (--config.data.root, calib.*, model.*, dqc.val_root)"
  elif isinstance(error, (PermissionError, IsADirectoryError)):
    hint = "check the permissions of that path, or use another --workdir"
  elif isinstance(error, OSError):
    hint = "check the disk and the path"
  elif (isinstance(error, ValueError) and "remove or replace" not in msg
        and not getattr(error, "names_remedy", False)):  # the message says what to do
    hint = "fix, replace or remove that input"
  msg = msg.rstrip(".") if hint else msg
  tail = f"; {hint}" if hint else ""
  return (f"FATAL {type(error).__name__}: {msg}{tail} (traceback: --verbosity=1 or "
          "TWODQUANT_DEBUG=1)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    s = settings.parse(FLAGS.config)
  except ValueError as e:  # a bad value: one line naming the field, no usage text or traceback
    if debugging():
      raise
    sys.stderr.write(f"FATAL bad setting: {e} (the fields and their defaults are in "
                     "configs/base.py)\n")
    sys.exit(1)
  setup_logging()
  try:
    host = host_runtime.apply(s.host)  # before the backend starts
    logging.info("host: malloc %s, %d CPU device(s)", host["malloc"], host["cpu_devices"])
    distributed.initialize(s.distributed)
    (sweep if s.sweep else pipeline).run(s, FLAGS.workdir or None)
  except (ValueError, OSError, WorkdirError, DownloadError, distributed.PeerError) as e:
    if debugging():  # the project's own errors above: one line
      raise
    sys.stderr.write(fail_line(e) + "\n")
    if isinstance(e, distributed.PeerError):
      distributed.exit_now(1)  # the peers are gone: skip JAX's shutdown barrier
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
