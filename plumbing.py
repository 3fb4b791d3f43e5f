"""The scripts' shared plumbing: command line from the config dataclasses, devices, torchrun (DDP),
data, checkpoints and the run log. Nothing here is the method; that is seqgan.py."""

import argparse
import contextlib
import datetime
import gzip
import math
import os
import re
import sys
from dataclasses import fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

import seqgan
from seqgan import SeqganError

# -----------------------------------------------------------------------------
# command line, devices, runs

def cli(main):
    """Run a script's main(): a SeqganError becomes one `error: ...` line and exit code 2, and every
    rank leaves the process group, so torchrun stops the others instead of leaving them waiting."""
    try:
        main()
    except SeqganError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep its last line
            msg = msg.strip().splitlines()[-1].split("SeqganError: ", 1)[-1]
        rank = os.environ.get("RANK", "0")  # an error can be one rank's own (a bad image)
        print(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        teardown()

def pick_device(name):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, refusing CUDA without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SeqganError(f"--device {name} was asked for but this machine has no CUDA GPU; "
                          "use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SeqganError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None

# Dense bf16 tensor-core peak FLOP/s by GPU name, for MFU (nanoGPT hard-codes the A100's).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}

def peak_flops(device, override=0.0):
    """Peak FLOP/s for MFU: the override if given, else by GPU name; None if unknown."""
    if override or device.type != "cuda":
        return override or None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

def add_config_args(parser, *config_classes, flags=None, defaults=None):
    """A flag per field named in flags (None: every field), typed by its default; --help shows the
    preset `defaults`. Flags not given stay out of the namespace: presets, checkpoints fill them."""
    defaults = defaults or {}
    names = {f.name for cls in config_classes for f in fields(cls)}
    assert flags is None or set(flags) <= names, set(flags) - names
    for cls in config_classes:
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            if flags is not None and f.name not in flags:
                continue
            default, flag = defaults.get(f.name, f.default), "--" + f.name.replace("_", "-")
            shown = "" if default in (None, "") else f" (default: {default})"
            kw = dict(default=argparse.SUPPRESS, help=f.metadata["help"] + shown)
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            else:  # a None default: the annotation says the type
                group.add_argument(flag, type=type(f.default) if f.default is not None else f.type,
                                   **kw)

def config_from_args(cls, args, defaults=None):
    """Build a config: dataclass defaults < preset `defaults` < flags given on the command line."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in (defaults or {}).items() if k in names}
    kw.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**kw)

def run_checkpoint(out, resume, kind):
    """The checkpoint in OUT that --resume continues; None for a new run (which overwrites none)."""
    path = os.path.join(out, "ckpt.pt")
    if resume:
        return load_checkpoint(path, kind)
    if os.path.exists(path):
        raise SeqganError(f"{path} exists; pass --resume to continue it or choose another --out")
    return None

def refuse_changes(given, saved, names, path):
    """A resumed run keeps what its checkpoint was trained with: contrary flags are refused."""
    for name in names:
        if name in given and given[name] != saved[name]:
            raise SeqganError(f"{path} was trained with --{name.replace('_', '-')} {saved[name]}, "
                              f"not {given[name]}; drop the flag or start a new --out")

def at_least_one(cfg, *names):
    """Refuse config fields below 1 (a run of 0 steps, or 0 images, would divide by zero later)."""
    if min(getattr(cfg, name) for name in names) < 1:
        flags = [f"--{name.replace('_', '-')}" for name in names]
        raise SeqganError(f"{', '.join(flags[:-1])} and {flags[-1]} must be at least 1")

def count_params(module, trainable=False):
    """Parameters of a module; trainable=True: only those that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

# -----------------------------------------------------------------------------
# distributed: one process per GPU under torchrun (nanoGPT's DDP pattern)
#
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them each helper is the one-process case.
# Rank 0 alone logs and writes. A step's micro-steps all-reduce in the last backward only
# (require_backward_grad_sync, as nanoGPT), and each rank takes its own slice of the global batch.

# Rank 0 may tokenize a large data set for train_prior.py while the others wait at a barrier (NCCL's
# default timeout is 10 minutes). A crashed rank makes no one wait: torchrun stops the others.
DIST_TIMEOUT = datetime.timedelta(hours=2)

def setup_distributed(device_flag):
    """--device -> (ddp, rank, local_rank, world_size, device), joining the process group under
    torchrun: one GPU per process (cuda:LOCAL_RANK) with NCCL, gloo on CPU. Every check comes
    before init_process_group, so a bad flag stops every rank alike and none waits for the rest."""
    device = pick_device(device_flag)
    if "RANK" not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if device.index is not None:
            raise SeqganError(f"--device {device_flag}: under torchrun each process takes the GPU "
                              "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        n_local = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1)  # on this node
        n_gpus = torch.cuda.device_count()
        if n_local > n_gpus:
            raise SeqganError(f"torchrun started {n_local} processes on this node, which has "
                              f"{n_gpus} GPU(s); pass --nproc_per_node {n_gpus} or fewer "
                              "(one process per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return True, rank, local_rank, world, device

def wrap(module, compile, ddp, device, backend="inductor"):
    """What a trainer's steps run: compiled if asked, then wrapped in DDP (nanoGPT's order)."""
    module = torch.compile(module, backend=backend) if compile else module
    ids = [device.index] if device.type == "cuda" else None  # the one GPU of this process
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids) if ddp else module

def is_master():
    """True on rank 0, and in a run without torchrun."""
    return not dist.is_initialized() or dist.get_rank() == 0

def barrier():
    if dist.is_initialized():
        dist.barrier()

def teardown():
    """Leave the process group (the scripts' last line; cli() does it when a script fails)."""
    if dist.is_initialized():
        dist.destroy_process_group()

def shard(n, rank, world):
    """One rank's items of 0..n-1: contiguous, balanced; the ranks' shards in order are 0..n-1."""
    return range(rank * n // world, (rank + 1) * n // world)

def all_reduce_sum(t):
    """Sum a tensor over the ranks, in place; the tensor itself without torchrun."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t

def gather_rows(x):
    """Every rank's rows x (n_r, ...) concatenated in rank order, on every rank. all_gather needs
    one shape, so each rank pads to the largest n_r and the padding is cut off again."""
    if not dist.is_initialized():
        return x
    if dist.get_backend() == "gloo":
        x = x.cpu()  # gloo gathers CPU tensors only
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])

def batch_text(batch_size, grad_accum, world):
    """The global batch (per optimizer step, all ranks) spelled out: '256 (32 x 8 processes)'."""
    parts = ([str(batch_size)] + [f"{grad_accum} accum"] * (grad_accum > 1)
             + [f"{world} processes"] * (world > 1))
    return f"{batch_size * grad_accum * world}" + (f" ({' x '.join(parts)})" * (len(parts) > 1))

def check_enough_data(n, what, train_cfg, world):
    """Refuse data smaller than one global batch (batch x grad_accum x processes); -> that batch."""
    b, global_batch = train_cfg.batch_size, train_cfg.batch_size * train_cfg.grad_accum * world
    if n < global_batch:
        more = f" x {global_batch // b} (micro-steps x processes)" if global_batch > b else ""
        raise SeqganError(f"{train_cfg.data} has {n} {what}, fewer than --batch-size {b}{more}")
    return global_batch

# -----------------------------------------------------------------------------
# data: image folders, CIFAR-10 and Fashion-MNIST, as uint8 (3, S, S) tensors

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

def list_images(root):
    """Sorted image paths under root (recursive, by extension); an error if there are none."""
    if not os.path.isdir(root):
        raise SeqganError(f"image folder {root} does not exist; pass an existing folder of images")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True)
                   for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SeqganError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTS)}); "
                          "check the path")
    return paths

def load_image(path, size):
    """PIL -> RGB, shorter side resized to size, centre crop -> uint8 tensor (3, size, size)."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise SeqganError(f"cannot read image {path} ({e}); delete or replace it") from None
    s = size / min(img.size)
    if s != 1:
        w, h = max(size, round(img.width * s)), max(size, round(img.height * s))
        img = img.resize((w, h), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

class ImageFolder(torch.utils.data.Dataset):
    """Images found recursively under root. If every image sits in a subfolder, the first-level
    subfolder names (sorted) are the classes; else the data is unlabelled (label 0, no classes)."""
    def __init__(self, root, size):
        self.paths, self.size = list_images(root), size
        tops = [os.path.relpath(p, root).split(os.sep) for p in self.paths]
        labelled = all(len(t) > 1 for t in tops)
        self.classes = sorted({t[0] for t in tops}) if labelled else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[t[0]] if labelled else 0 for t in tops]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size), self.labels[i]

def load_cifar10(root, train):
    """CIFAR-10 as uint8 (N, 3, 32, 32) and labels. Under torchrun rank 0 alone downloads (two
    downloads would write one archive at once); the others wait at the barrier, then read it."""
    try:
        if is_master():
            torchvision.datasets.CIFAR10(root, train=train, download=True)
    except (OSError, RuntimeError):
        pass  # every rank reports it below
    barrier()
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=False)
    except (OSError, RuntimeError) as e:
        raise SeqganError(f"cannot download CIFAR-10 into {root} ({type(e).__name__}); put "
                          f"cifar-10-python.tar.gz there or pass --data IMAGE_FOLDER") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

def read_idx_gz(path):
    """An idx file (the MNIST format), gzipped -> numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)

def load_fashion_mnist(root, train):
    """Fashion-MNIST as uint8 (N, 3, 32, 32) (28 px padded to 32, grey as RGB) and labels."""
    split = "train" if train else "t10k"
    for d in (os.path.join(root, "fashion-mnist"), FASHION_MNIST_DIR):
        images, labels = (os.path.join(d, f"{split}-{k}-ubyte.gz") for k in ("images-idx3",
                                                                              "labels-idx1"))
        if os.path.isfile(images):
            x = F.pad(torch.from_numpy(read_idx_gz(images).copy()), (2, 2, 2, 2))  # (N, 32, 32)
            y = torch.from_numpy(read_idx_gz(labels).astype(np.int64))
            return x[:, None].expand(-1, 3, -1, -1).contiguous(), y
    raise SeqganError(f"Fashion-MNIST not found in {root}/fashion-mnist or {FASHION_MNIST_DIR}; "
                      "apt-get install dataset-fashion-mnist")

def load_dataset(name, root, size, train=True):
    """'cifar10' | 'fashion-mnist' (32 px) | an image folder -> (Dataset of (uint8 (3, S, S),
    label), number of classes)."""
    if name in ("cifar10", "fashion-mnist"):
        x, y = (load_cifar10 if name == "cifar10" else load_fashion_mnist)(root, train)
        return torch.utils.data.TensorDataset(x, y), 10
    ds = ImageFolder(name, size)
    return ds, len(ds.classes)

def export_test_images(name, out, n, root="data"):
    """The first n test images of 'cifar10' or 'fashion-mnist' as out/CLASS/NNNNN.png: the real
    images fid.py (FID reference, --recon) and sample.py --visualize read.
      python -c "import plumbing; plumbing.export_test_images('fashion-mnist', 'data/fm', 1000)" """
    ds, _ = load_dataset(name, root, 32, train=False)
    for i in range(min(n, len(ds))):
        x, y = ds[i]
        os.makedirs(os.path.join(out, str(int(y))), exist_ok=True)
        path = os.path.join(out, str(int(y)), f"{i:05d}.png")
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)

def to_input(x, device, size):
    """uint8 batch (B, 3, S, S) -> float on device in [-1, 1] at size x size."""
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(-1, 1)
    return x

# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, rebuilt from its config

def save_checkpoint(path, ckpt):
    """torch.save to a temp file, fsynced, renamed over path, then the folder fsynced: a kill or a
    power loss leaves the old checkpoint or the new one, whole."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    with contextlib.suppress(OSError):  # the rename lasts once the folder's entry does
        fd = os.open(folder, os.O_RDONLY)  # (not every file system fsyncs a folder)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def load_checkpoint(path, kind):
    """Load a checkpoint dict and check its kind ('tokenizer', 'prior' or 'tokens')."""
    if not os.path.isfile(path):
        raise SeqganError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not ours or damaged
        raise SeqganError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise SeqganError(f"{path} is a {found} checkpoint, expected a {kind} checkpoint")
    return ckpt

def clean_state_dict(sd):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') put in front of names."""
    prefix = re.compile(r"^(?:_orig_mod\.|module\.)+")
    return {prefix.sub("", k): v for k, v in sd.items()}

def model_from_checkpoint(ckpt):
    """A checkpoint's Tokenizer or Prior (by its kind) from its config and weights, frozen, eval."""
    model_cls, config_cls = dict(tokenizer=(seqgan.Tokenizer, seqgan.TokenizerConfig),
                                 prior=(seqgan.Prior, seqgan.PriorConfig))[ckpt["kind"]]
    try:
        model = model_cls(config_cls(**ckpt["model_config"]))
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except (TypeError, KeyError, RuntimeError) as e:
        raise SeqganError(f"{ckpt['kind']} checkpoint does not match this code's "
                          f"{model_cls.__name__} ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)

def load_tokenizer(path, device="cpu", ckpt=None):
    """A trained tokenizer with a pixel decoder, frozen, eval; ckpt: path's dict if already read."""
    tok = model_from_checkpoint(ckpt if ckpt is not None else load_checkpoint(path, "tokenizer"))
    if tok.cfg.feature_dim:
        raise SeqganError(f"{path} is a VQ-KD phase-1 tokenizer: it has no pixel decoder yet; run "
                          f"train_tokenizer.py --phase 2 --init {path} first")
    return tok.to(device)

# -----------------------------------------------------------------------------
# training runs: the log both trainers write, and the running means it reports

def run_log(out, master):
    """The trainers' log: on rank 0 each line goes above the progress bar and into OUT/log.txt."""
    path = os.path.join(out, "log.txt")
    if master:
        os.makedirs(out, exist_ok=True)

    def log(line):
        if master:
            tqdm.write(line)
            with open(path, "a") as f:
                f.write(line + "\n")
    return log

def log_start(log, header, ckpt, train_cfg, world, get_lr):
    """The first lines of a run: what it trains, and warnings if a resumed run's global batch or
    --steps changed (get_lr(step, train_cfg): the trainer's schedule, a function of --steps)."""
    log(header)
    if ckpt is None:
        return
    saved, saved_world = ckpt["train_config"], ckpt.get("world_size", 1)
    before = saved["batch_size"] * saved.get("grad_accum", 1) * saved_world
    if before != train_cfg.batch_size * train_cfg.grad_accum * world:
        now = batch_text(train_cfg.batch_size, train_cfg.grad_accum, world)
        log(f"warning: the checkpoint was trained with a global batch of {before} ({saved_world} "
            f"process(es)); continuing with a global batch of {now}, learning rate unchanged")
    steps, step = saved["steps"], ckpt["step"]
    was, now = get_lr(step, replace(train_cfg, steps=steps)), get_lr(step, train_cfg)
    if was != now:
        log(f"warning: --steps {train_cfg.steps}, the checkpoint's run had {steps}: the lr "
            f"schedule is a function of --steps, so step {step} takes lr {now:.2e} where the "
            f"{steps}-step curve had {was:.2e}")

class RunningMeans:
    """Running sums of detached scalars on the device, read back averaged over steps and ranks once
    per log interval (its one host sync); every rank reads the same, so a NaN stops all alike."""
    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, terms, scale=1.0):
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * scale

    def read(self, world, step, lr, ckpt_path):
        sums = all_reduce_sum(torch.stack(list(self.sums.values())))
        values = dict(zip(self.sums, (sums / (self.steps * world)).tolist()))
        self.sums, self.steps = {}, 0
        if not all(map(math.isfinite, values.values())):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise SeqganError(f"non-finite loss at step {step}: {terms}; lower --lr (now {lr}) or "
                              f"check the data. Last good checkpoint: {ckpt_path}")
        return values
