"""Shared defaults for every run; the per-scale/bits files only set `scale`, `bits`, `method`.

Values marked (paper) are the paper's choices, the defaults; (code) marks the released code's
alternative where the two differ (../shared/docs/SPEC.md). Override anything from the command
line, e.g. `--config.dqc.steps=500 --config.bits=3`.
"""

import ml_collections


def get_config(scale: int = 4, bits: int = 4, method: str = "2dquant") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # fp | bicubic | minmax | percentile | dobi | 2dquant | all (all = the Table-3 comparison), or a
  # row beyond the paper: dobi+ch | dobi+rot | dobi+smooth | dobi+bc | dobi+ch+rot | dobi++ |
  # 2dquant+ch | 2dquant+rot | 2dquant+smooth | 2dquant+bc | 2dquant+round | 2dquant+ch+rot |
  # 2dquant++ (twodquant_jax/methods.py, docs/beyond.md); beyond = all of those; all+ = every row;
  # or a comma-separated list
  c.method = method
  c.scale = scale
  c.bits = bits
  c.seed = 0
  c.progress = True  # progress bars (off anyway when stderr is not a terminal)
  c.matmul_precision = "highest"  # full fp32 matmuls on GPU (TF32 would move the bounds)

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # local .pth; empty = download the official release file (sha256-checked)
  c.model.cache_dir = ""  # empty = $TWODQUANT_CACHE/weights or ~/.cache/twodquant_jax/weights
  c.model.bounds = ""  # evaluate given bounds (bounds.json or the authors' net_Q_*.pth), skip calibration
  # evaluate a packed low-bit file (model_<method>_x{s}_w{b}.safetensors) without the FP checkpoint:
  # weights and bounds come from the file, `method` only names the results row
  c.model.packed = ""

  c.data = ml_collections.ConfigDict()
  # <root>/<Name>/HR/*.png (+ LR_bicubic/X{s}), used as it is; empty = the sets in data.cache
  c.data.root = ""
  # Data downloads (twodquant_jax/data/fetch.py, sources in twodquant_jax/data/sources.py).
  c.data.download = True  # fetch missing sets (and weights) into the caches; False: no network
  c.data.cache = ""  # empty = $TWODQUANT_CACHE/data or ~/.cache/twodquant_jax/data
  c.data.mirror = ""  # http(s)://host[/prefix]: replaces every source's scheme+host, same paths
  # JSON {original URL: sha256} replacing the registry's digests for files the mirror holds in
  # another version (e.g. a test mirror); only with data.mirror, and never recorded in the cache
  c.data.mirror_checksums = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.datasets = "Set5,Set14,B100,Urban100,Manga109"
  c.eval.batch_size = 8  # at most this many images (or tiles) of one padded size per jitted call
  c.eval.tile = 0  # LR tile size for large images (multiple of 8); 0 = whole images
  # LR pixels shared by neighbouring tiles. Each SR pixel is taken from the tile where it is
  # farthest from an inner edge (eval.tile_blend); at tile 64 the tiled PSNR is then within
  # 0.002 dB of whole images from overlap 8 up (docs/running.md, docs/measured/robustness.md).
  c.eval.tile_overlap = 16
  c.eval.save_sr = False  # write the SR PNGs to <workdir>/sr/<method>/<dataset>/
  # run images of every size through a few compiled shapes (exact: features outside each image
  # are zeroed before convolutions and shifted windows roll around the image's own size);
  # False: one compile per distinct padded image size (the BasicSR way, equal results)
  c.eval.buckets = True
  c.eval.engine = "fake"  # quantized forward: fake (float fake-quant) | int (int8 matmuls + corrections)
  # quantized rows: also the PSNR (Y, crop = scale) of each SR against the FP model's SR ("vs FP",
  # FP-fidelity); the FP SRs are computed first (uint8, about 3 bytes per HR pixel are kept)
  c.eval.vs_fp = True

  c.calib = ml_collections.ConfigDict()
  # training images (the paper: DF2K HR); empty = DIV2K's 800 train HR images from data.cache
  c.calib.root = ""
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
  # sorted: exact, on the host (fast on CPU) | brute: vmapped XLA scan with float64 error sums
  # (exact too; equal bounds) | auto: brute on GPU/TPU, sorted on CPU
  c.dobi.search = "auto"

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
  # What the student's Swin blocks keep for the backward pass (docs/measured/memory.md#remat):
  # off | matmuls (the matmul outputs and attention probabilities; the element-wise work is
  # recomputed) | full (only each block's input; block pairs scanned) | auto (matmuls on a CPU,
  # off on a GPU). Batch 4 on CPU, XLA's need per device / peak: off 2.34 / 10.5 GB, matmuls
  # 1.23 / 6.2 GB at ~1.07x the step's wall time, full 0.31 / 2.0 GB at ~1.3x.
  c.dqc.remat = "auto"
  # True: the step runs as separately compiled pieces (teacher, embedding, one forward-with-VJP
  # and one backward per distinct Swin block, loss, Adam), so the 24 blocks compile as 2
  # (docs/measured/compile-staged.md); False: one program with every block unrolled.
  c.dqc.staged = True
  # auto: the largest divisor of the batch whose compiled step fits the device memory (XLA's
  # memory analysis against the GPU's bytes_limit, or on CPU the available RAM with headroom);
  # decided once per configuration and cached (ptq/dqc/memory.py). An integer N > 0: microbatches
  # of at most N (largest divisor of the batch; exact for both losses). Batch 32 in one piece
  # needs ~48 GB of XLA temp memory on CPU; microbatches of 8 ~14 GB, of 4 ~6 GB. 0 = whole batch.
  c.dqc.microbatch = "auto"
  c.dqc.checkpoint_every = 200  # orbax checkpoint interval (steps); resumes automatically
  c.dqc.keep_checkpoints = 2
  c.dqc.log_every = 10
  c.dqc.val_root = ""  # held-out validation images (NOT a test benchmark); empty = none
  c.dqc.val_every = 500
  c.dqc.val_images = 10
  c.dqc.val_crop = 256  # validation HR crop (pixels) so one compile serves every image; 0 = whole
  c.dqc.data_workers = 0  # threads making training batches; 0 = automatic

  # --- speed / compilation (docs/speed.md)
  # Persistent XLA compilation cache: a second run of the same configuration does not recompile.
  # Empty = off. Set once at startup (pipeline.run).
  c.compile_cache = "default"  # <$TWODQUANT_CACHE or ~/.cache/twodquant_jax>/xla; a path; "" = off
  # Host process (twodquant_jax/host_runtime.py), applied by main.py before the backend starts.
  # host_malloc: where XLA:CPU's host buffers come from (it frees a multi-GB buffer and ~2 M
  # smaller blocks every step); the process is never re-executed. 'auto': glibc 'keep'
  # in-process, or tcmalloc if already preloaded; 'tcmalloc': requires it preloaded, e.g.
  # LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python main.py ... (a batch-4
  # CPU step 2.4 -> 2.2 s, half the memory); 'keep': glibc keeps freed memory for reuse;
  # 'system': glibc as is.
  c.host_malloc = "auto"
  # XLA devices of the CPU backend: 'auto' = the count set in XLA_FLAGS
  # (--xla_force_host_platform_device_count) if any, else one per usable core (at most 8,
  # dividing dqc.batch_size) for a single-process run that trains DQC, else 1; or a number.
  # Splitting the data-parallel step keeps every core busy (measured in docs/speed.md).
  c.cpu_devices = "auto"
  # Packed export (formats/packed.py): after each quantized method, write its b-bit weight codes, all
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

  # Robustness (docs/running.md): evaluation memory budget, workdir overwrite.
  # LR pixels (after padding) per jitted evaluation call: peak memory grows with it (~50 KB
  # per padded LR pixel at x4 on CPU, measured); eval.batch_size stays a cap on the images per
  # call. An image above the budget runs alone. 0 = no budget (batch_size only).
  c.eval.batch_pixels = 256 * 256
  # center: each SR pixel from the tile where it is farthest from an inner edge | mean: average
  # the overlaps (the old way: 0.01-0.08 dB below whole images, window attention lacks context)
  c.eval.tile_blend = "center"
  c.overwrite = False  # allow a run whose config differs from the workdir's finished run
  # Multi-process runs on jax.distributed (twodquant_jax/distributed.py). All empty: one
  # process, unless JAX's cluster auto-detection finds a cluster (SLURM, Open MPI, TPU pod...).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator = ""  # HOST:PORT of process 0 (every process names the same)
  c.distributed.num_processes = 0  # with coordinator: how many processes join
  c.distributed.process_id = -1  # with coordinator: this process's index, 0 .. num_processes-1
  c.distributed.timeout_s = 100  # a peer silent this long (missed heartbeats) stops the others
  c.distributed.init_timeout_s = 300  # wait this long for every process to join (and leave)
  c.distributed.auto = True  # no coordinator: try JAX's cluster auto-detection if one is found
  return c
