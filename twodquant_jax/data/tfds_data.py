"""TensorFlow Datasets support that works without TensorFlow (array_record + random access).

* ``SRBenchmark``: a TFDS builder for a benchmark folder ``<root>/<Name>/HR/*.png`` at one
  scale (one BuilderConfig per set and scale). Examples hold ``hr`` and ``lr`` as uint8
  ``Tensor`` features (zlib-compressed) and the image ``name``; it is built with
  ``file_format='array_record'`` and read with ``builder.as_data_source('test')``, both of which
  need no TensorFlow. Pixels are exactly what ``benchmarks.load_benchmark`` returns (mod-cropped
  HR; official LR when the folder has it, else MATLAB-style bicubic LR).
* ``div2k_data_source``: random access to TFDS's own ``div2k`` dataset for users who have it
  prepared in array_record format (preparing it from scratch needs TensorFlow and the network).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

try:
  import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "twodquant_jax.data.tfds_data needs tensorflow-datasets and array-record (not "
      "TensorFlow): pip install 'twodquant-jax[tfds]'.") from e

from twodquant_jax.data.benchmarks import BenchmarkImage
from twodquant_jax.data.benchmarks import load_benchmark

PathLike = Union[str, os.PathLike]

SPLIT = "test"
FILE_FORMAT = "array_record"


@dataclasses.dataclass
class SRBenchmarkConfig(tfds.core.BuilderConfig):
  """One benchmark set at one scale; ``matlab_exact`` is passed on to ``load_benchmark``."""
  benchmark: str = ""
  scale: int = 4
  matlab_exact: bool = True


def benchmark_config(name: str, scale: int, *, matlab_exact: bool = True) -> SRBenchmarkConfig:
  """The config for set ``name`` at ``scale``, e.g. ``set5_x4`` (``set5_x4_float`` if not exact).

  ``matlab_exact`` only matters for sets without official LR images (see ``load_benchmark``).
  """
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale}.")
  if not name or "/" in name or ":" in name:
    raise ValueError(f"Bad benchmark name {name!r}.")
  config_name = f"{name.lower()}_x{int(scale)}" + ("" if matlab_exact else "_float")
  return SRBenchmarkConfig(
      name=config_name, version=SRBenchmark.VERSION, benchmark=name, scale=int(scale),
      matlab_exact=matlab_exact,
      description=f"{name} x{int(scale)}: mod-cropped HR and its LR (official when present).")


class SRBenchmark(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder for ``<root>/<Name>/HR/*.png`` (+ ``LR_bicubic/X{s}``); one split, ``test``.

  Not added to TFDS's global registry: make it with ``benchmark_builder``. ``root`` is needed
  only to generate; reading an already prepared ``data_dir`` works without it.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "hr, lr uint8 Tensors (zlib) and the image name."}

  # TFDS looks for a checksums file beside the builder's code through `code_path`, which in
  # tfds 4.9.10 imports the `importlib_resources` backport (declared only for Python < 3.9) for
  # any builder defined inside a package. Nothing is downloaded here, so there is no code path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, root: Optional[PathLike] = None, **kwargs: Any):
    self._root = Path(root) if root is not None else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    image = lambda: tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                         encoding="zlib")
    return tfds.core.DatasetInfo(
        builder=self,
        description="A super-resolution benchmark set as (lr, hr) uint8 RGB pairs.",
        features=tfds.features.FeaturesDict(
            {"hr": image(), "lr": image(), "name": tfds.features.Text()}),
        disable_shuffling=True,  # keep the folder loader's (sorted) order
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # local files only
    if self._root is None:
      raise ValueError(
          f"SRBenchmark {self.builder_config.name} is not prepared in {self.data_dir} and no "
          "root folder was given to generate it from (benchmark_builder(root=...)).")
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    config = self.builder_config
    for item in load_benchmark(self._root, config.benchmark, config.scale,
                               matlab_exact=config.matlab_exact):
      yield item.name, {"hr": item.hr, "lr": item.lr, "name": item.name}


def benchmark_builder(data_dir: PathLike, name: str, scale: int, *,
                      root: Optional[PathLike] = None,
                      matlab_exact: bool = True) -> SRBenchmark:
  """The ``SRBenchmark`` builder of set ``name`` at ``scale`` stored under ``data_dir``.

  ``root`` is the folder holding ``<Name>/HR`` (needed only by ``download_and_prepare``).
  """
  return SRBenchmark(root=root, data_dir=os.fspath(data_dir), file_format=FILE_FORMAT,
                     config=benchmark_config(name, scale, matlab_exact=matlab_exact))


def prepare_benchmark(root: PathLike, name: str, scale: int, data_dir: PathLike, *,
                      matlab_exact: bool = True) -> SRBenchmark:
  """Builds set ``name`` at ``scale`` from ``root`` into ``data_dir`` (a no-op if already there).

  Returns:
    The prepared builder; ``builder.as_data_source('test')`` gives random access to examples
    ``{'hr', 'lr': uint8 HxWx3, 'name': bytes}``.
  """
  builder = benchmark_builder(data_dir, name, scale, root=root, matlab_exact=matlab_exact)
  builder.download_and_prepare(file_format=FILE_FORMAT)
  return builder


def load_benchmark_tfds(data_dir: PathLike, name: str, scale: int, *,
                        matlab_exact: bool = True) -> list[BenchmarkImage]:
  """Reads a prepared set back as ``BenchmarkImage``s (same order and pixels as the folder loader).

  Raises:
    FileNotFoundError: the set is not prepared in ``data_dir`` (run ``prepare_benchmark``).
  """
  builder = benchmark_builder(data_dir, name, scale, matlab_exact=matlab_exact)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS set {builder.builder_config.name} is not prepared in {data_dir} (expected "
        f"{builder.data_dir}); run prepare_benchmark(root, {name!r}, {scale}, data_dir) first.")
  source = builder.as_data_source(SPLIT)
  return [_to_benchmark_image(source[i]) for i in range(len(source))]


def _to_benchmark_image(example: dict[str, Any]) -> BenchmarkImage:
  """A data-source record (name as bytes) as a BenchmarkImage."""
  name = example["name"]
  if isinstance(name, bytes):
    name = name.decode("utf-8")
  return BenchmarkImage(name=str(name), lr=np.asarray(example["lr"]),
                        hr=np.asarray(example["hr"]))


def div2k_data_source(scale: int, split: str = "validation", *,
                      data_dir: Optional[PathLike] = None, kind: str = "bicubic",
                      download: bool = False) -> Sequence[dict[str, Any]]:
  """Random access to TFDS ``div2k/{kind}_x{scale}`` (records ``{'hr', 'lr'}`` uint8 HxWx3).

  Works without TensorFlow only when the dataset is already prepared in ``data_dir`` in the
  array_record format; TFDS's div2k builder itself uses TensorFlow (``tf.io.gfile``) and the
  network to generate. ``download=True`` tries that.

  Raises:
    RuntimeError: the dataset cannot be opened, with what to do about it.
  """
  name = f"div2k/{kind}_x{int(scale)}"
  try:
    return tfds.data_source(
        name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download, builder_kwargs={"file_format": FILE_FORMAT})
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"TFDS dataset {name} (split {split!r}) is not available as array_record in "
        f"{data_dir or 'the default TFDS data_dir'}: {type(e).__name__}: {e}\n"
        f"Preparing it needs TensorFlow and network access; on such a machine run\n"
        f"  tfds build {name} --file_format=array_record"
        f"{'' if data_dir is None else f' --data_dir={data_dir}'}\n"
        "and copy the data_dir here, or use an image folder (patches.load_patch_source / "
        "benchmarks.load_benchmark) instead.") from e
