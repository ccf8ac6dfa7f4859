"""Shared defaults for every run; the per-scale/bits files only set `scale`, `bits`, `method`.

Values marked (paper) are the paper's choices, the defaults; (code) marks the released code's
alternative where the two differ (../shared/docs/SPEC.md). Override anything from the command
line, e.g. `--config.dqc.steps=500 --config.bits=3`.
"""

import ml_collections


def get_config(scale: int = 4, bits: int = 4, method: str = "2dquant") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # fp | bicubic | minmax | percentile | dobi | 2dquant | all (all = the Table-3 comparison)
  c.method = method
  c.scale = scale
  c.bits = bits
  c.seed = 0
  c.progress = True  # progress bars (off anyway when stderr is not a terminal)
  c.matmul_precision = "highest"  # full fp32 matmuls on GPU (TF32 would move the bounds)

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # local .pth; empty = download the official release file (sha256-checked)
  c.model.cache_dir = ""  # download cache; empty = $TWODQUANT_CACHE or ~/.cache/twodquant_jax
  c.model.bounds = ""  # evaluate given bounds (bounds.json or the authors' net_Q_*.pth), skip calibration
  # evaluate a packed low-bit file (model_<method>_x{s}_w{b}.safetensors) without the FP checkpoint:
  # weights and bounds come from the file, `method` only names the results row
  c.model.packed = ""

  c.data = ml_collections.ConfigDict()
  c.data.root = "data/benchmarks"  # <root>/<Name>/HR/*.png (+ LR_bicubic/X{s})

  c.eval = ml_collections.ConfigDict()
  c.eval.datasets = "Set5,Set14,B100,Urban100,Manga109"
  c.eval.batch_size = 8  # images (or tiles) of the same padded size per jitted call
  c.eval.tile = 0  # LR tile size for large images (multiple of 8); 0 = whole images
  c.eval.tile_overlap = 32
  c.eval.save_sr = False  # write the SR PNGs to <workdir>/sr/<method>/<dataset>/
  c.eval.engine = "fake"  # quantized forward: fake (float fake-quant) | int (int8 matmuls + corrections)

  c.calib = ml_collections.ConfigDict()
  c.calib.root = "data/DF2K/HR"  # training images (DF2K HR; ../shared/data/calib here)
  c.calib.batch_file = ""  # .npz with an 'lr' uint8 (N, 64, 64, 3) array: use it as the calibration batch
  c.calib.num_patches = 32  # (paper) the first batch of the training stream
  c.calib.lr_size = 64
  c.calib.augment = True  # random flips and 90/180/270 rotations

  c.dobi = ml_collections.ConfigDict()
  c.dobi.num_candidates = 100  # K
  # paper: exact errors, one-sided for attention map and fc2 input | reference: as the released
  # code runs (symmetric everywhere; near-equal candidates decided by its float32 error norm)
  c.dobi.strategy = "paper"
  c.dobi.tie = "auto"  # last: <= (paper pseudo-code) | first: strict < (code) | auto: per strategy
  c.dobi.search = "auto"  # sorted: exact, on the host (fast on CPU) | brute: vmapped XLA scan | auto: brute on GPU/TPU

  c.percentile = ml_collections.ConfigDict()
  c.percentile.low = 0.01
  c.percentile.high = 99.99

  c.dqc = ml_collections.ConfigDict()
  c.dqc.steps = 3000  # (paper); code: 4000
  c.dqc.batch_size = 32  # (paper); code: 16
  c.dqc.lr = 1e-2
  c.dqc.b1 = 0.9
  c.dqc.b2 = 0.999  # (paper); code: 0.99
  c.dqc.eps = 1e-8  # as PyTorch's Adam; matters with the reference loss scaling
  c.dqc.schedule = "cosine"  # cosine (paper) | constant (code)
  c.dqc.loss = "reference"  # reference: the released code's loss, which gave the paper's numbers | paper: Eq. 4-6
  c.dqc.feature_weight = 5.0  # lambda of the paper loss (the code's weight)
  c.dqc.augment = True
  # recompute Swin block activations in the backward pass (jax.checkpoint). On the CPU backend
  # XLA's temp memory did not shrink with it (5.95 GB at batch 4 either way); off by default.
  c.dqc.remat = False
  # >0: accumulate gradients over microbatches of at most this size (exact for both losses; the
  # largest divisor of the batch is used). Batch 32 in one piece needs ~48 GB of XLA temp memory
  # on CPU; microbatches of 8 need ~14 GB, of 4 ~6 GB. 0 = the whole batch at once.
  c.dqc.microbatch = 8
  c.dqc.checkpoint_every = 200  # orbax checkpoint interval (steps); resumes automatically
  c.dqc.keep_checkpoints = 2
  c.dqc.log_every = 10
  c.dqc.val_root = ""  # held-out validation images (NOT a test benchmark); empty = none
  c.dqc.val_every = 500
  c.dqc.val_images = 10
  c.dqc.val_crop = 256  # validation HR crop (pixels) so one compile serves every image; 0 = whole
  c.dqc.data_workers = 0  # threads making training batches; 0 = automatic

  # Packed export (io/packed.py): after each quantized method, write its b-bit weight codes, all
  # bounds and the float tensors to <workdir>/model_<method>_x{s}_w{b}.safetensors
  c.export = ml_collections.ConfigDict()
  c.export.packed = False

  c.report = ml_collections.ConfigDict()
  c.report.figures = False  # histograms, bound percentiles, visual crops, loss curve (PNG)
  c.report.visual_images = "Set5/baby,Set14/comic"  # dataset/image for the visual comparison
  c.report.calib_patches = 4  # calibration patches for histograms/percentiles (0 = all)
  c.report.hist_quantizers = (
      "layers.0.residual_group.blocks.0.attn.qkv.q.weight_quantizer,"
      "layers.0.residual_group.blocks.0.mlp.fc2.act_quantizer,"
      "layers.3.residual_group.blocks.5.attn.mymodule_a")
  return c
