"""Where each data set comes from: URLs, archive layout, digests, licences (a registry, no I/O).

Every set lands as `<root>/<Name>/HR/*.png` (the layout `benchmarks.load_benchmark` and
`patches.load_patch_source` read). `data/fetch.py` downloads and lays them out.

Digests: DIV2K's (sha256 and size) are the ones TFDS publishes for its `div2k` builder
(tensorflow-datasets 4.9.10, `tensorflow_datasets/datasets/div2k/checksums.tsv`, row of
DIV2K_train_HR.zip: 3530603713 bytes; copied here and compared equal when tensorflow-datasets
left the requirements, so the package is not needed to trust them). Set5's are pinned to the files of JingyunLiang/SwinIR @ 6545850
(testsets/Set5/HR). The Hugging Face archives of Set14 / B100 / Urban100 have no published
digest: they are trusted on first use (the first download's digest is recorded in
`<cache>/checksums.json` and every later download must match it).

Calibration / DQC training set: the paper uses DF2K (DIV2K train 800 + Flickr2K 2650 HR
images). Only DIV2K's 800 training images are downloaded (3.5 GB, with a published digest);
Flickr2K is not (a large archive without a published digest): put DF2K's HR images in one
folder and pass `--config.calib.root=<folder>` for the paper's exact data.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Remote:
  """One file to download. `sha256` None: trusted on first use."""
  url: str
  sha256: str | None = None
  size: int | None = None  # bytes, where known


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set and how to lay it out as `<root>/<name>/HR/*.png`.

  `kind`: 'files' (each remote file is one HR image, saved under its own name) or 'archive'
  (a zip / tar.gz; the PNGs whose parent folder is named `folder`, or every PNG at any depth
  when `folder` is empty, are copied flat into HR/). `images`: how many HR images the set has.
  """
  name: str
  kind: str
  remotes: tuple[Remote, ...]
  images: int
  licence: str
  folder: str = ""
  about: str = ""
  downloadable: bool = True


_SWINIR_SET5 = "https://raw.githubusercontent.com/JingyunLiang/SwinIR/main/testsets/Set5/HR/"
_HF = "https://huggingface.co/datasets/eugenesiow/{0}/resolve/main/data/{0}_HR.tar.gz"
_HF_LICENCE = ("research use; redistributed by the eugenesiow/{0} Hugging Face dataset (no licence "
               "stated for the images; cite the set's original paper)")

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        name="Set5", kind="files", images=5,
        remotes=tuple(Remote(_SWINIR_SET5 + f"{stem}.png", digest, size) for stem, digest, size in (
            ("baby", "158417bf319058274bbea8b7d4995a12cb70dc7ff1cdf6351bde7e3d4e22d06a", 371264),
            ("bird", "1b20dfba6635f99d501144a949e1568363a91cc08231dc92d9537f883c23c9a8", 120453),
            ("butterfly", "58be740fd17ead6029eb8344c46720c392eaf120907dc623475aa768260e6548",
             127529),
            ("head", "ec18fffd17f8a54ff04a19d03697988e9ba8ad4092ac4c792d19dbf7c967d59d", 113787),
            ("woman", "b15112110e3e7d91b840d6131a00f0f5c22d54f4ac93a81e3ed0f6ab62d08106", 118848),
        )),
        licence="research use (Bevilacqua et al., BMVC 2012); copies from the SwinIR "
                "repository (Apache-2.0 code), official file names",
        about="SwinIR repository testsets/Set5/HR (digests pinned to commit 6545850)"),
    Source(name="Set14", kind="archive", images=14, remotes=(Remote(_HF.format("Set14")),),
           licence=_HF_LICENCE.format("Set14") + " (Zeyde et al., 2010)",
           about="eugenesiow/Set14 Hugging Face dataset, HR archive"),
    Source(name="B100", kind="archive", images=100, remotes=(Remote(_HF.format("BSD100")),),
           licence=_HF_LICENCE.format("BSD100") + " (Martin et al., ICCV 2001)",
           about="eugenesiow/BSD100 Hugging Face dataset, HR archive"),
    Source(name="Urban100", kind="archive", images=100,
           remotes=(Remote(_HF.format("Urban100")),),
           licence=_HF_LICENCE.format("Urban100") + " (Huang et al., CVPR 2015)",
           about="eugenesiow/Urban100 Hugging Face dataset, HR archive"),
    Source(name="Manga109", kind="manual", images=109, remotes=(), downloadable=False,
           licence="academic use only, distributed by its authors on request "
                   "(http://www.manga109.org/en/download.html)",
           about="not downloaded: request it from its authors and put its 109 PNGs in "
                 "<root>/Manga109/HR/"),
    Source(name="DIV2K", kind="archive", images=800, folder="DIV2K_train_HR",
           remotes=(Remote("https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
                           "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
                           3530603713),),
           licence="academic research only (DIV2K, Agustsson & Timofte, CVPRW 2017)",
           about="DIV2K training HR images from its authors' site (sha256 as published by TFDS); "
                 "stands in for DF2K as the calibration / DQC training set"),
)}

CALIB_SET = "DIV2K"  # the set downloaded for calibration and DQC training


def source(name: str) -> Source:
  """The registry entry of `name`, or a one-line error listing the known sets."""
  if name not in SOURCES:
    raise ValueError(f"no download source for data set {name!r} (known: {', '.join(SOURCES)}); "
                   f"put it in <root>/{name}/HR/ and pass --config.data.root=<root>")
  return SOURCES[name]
