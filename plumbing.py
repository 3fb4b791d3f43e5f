"""The scripts' plumbing: command line, devices, torchrun (DDP), data, checkpoints, the run log."""

import argparse
import contextlib
import datetime
import gzip
import os
import re
import sys
import time
from dataclasses import fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

from seqgan import Prior, PriorConfig, SeqganError, Tokenizer, TokenizerConfig

# -----------------------------------------------------------------------------
# command line, devices, torchrun (one process per GPU, nanoGPT's DDP pattern; rank 0 logs, writes)

def cli(main):
    """main(): a SeqganError is one `error: ...` line and exit 2; each rank leaves the group."""
    try:
        main()
    except SeqganError as e:  # one from a DataLoader worker comes in its traceback: the last line
        msg = str(e).strip().splitlines()[-1].split("SeqganError: ", 1)[-1]
        rank = os.environ.get("RANK", "0")  # an error can be one rank's own (a bad image)
        print(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        teardown()

def pick_device(name):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, refusing CUDA without a GPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SeqganError(f"--device {name} was asked for but this machine has no CUDA GPU; "
                          "use --device cpu")
    return torch.device(name)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}

def peak_flops(device, override=0.0):
    """Dense bf16 peak FLOP/s for MFU: the override, else PEAK_FLOPS by GPU name, else None."""
    if override or device.type != "cuda":
        return override or None
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)

def parser(doc, *config_classes, flags=None, defaults=None):
    """A parser with a flag per field in flags (None: all); flags not given stay out of the args."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in config_classes:
        group = p.add_argument_group(cls.__name__)
        for f in (f for f in fields(cls) if flags is None or f.name in flags):
            default = (defaults or {}).get(f.name, f.default)
            shown = "" if default in (None, "") else f" (default: {default})"
            kw = (dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else
                  dict(type=f.type if f.default is None else type(f.default)))  # None: annotation
            group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                               help=f.metadata["help"] + shown, **kw)
    return p

def config_from_args(cls, args, defaults=None):
    """Build a config: dataclass defaults < preset `defaults` < flags given on the command line."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in {**(defaults or {}), **vars(args)}.items() if k in names})

def run_checkpoint(out, resume, kind):
    """The checkpoint in OUT that --resume continues; None for a new run (which overwrites none)."""
    path = os.path.join(out, "ckpt.pt")
    if not resume and os.path.exists(path):
        raise SeqganError(f"{path} exists; pass --resume to continue it or choose another --out")
    return load_checkpoint(path, kind) if resume else None

def refuse_changes(given, saved, names, path):
    """A resumed run keeps what its checkpoint was trained with: contrary flags are refused."""
    for name in (n for n in names if n in given and given[n] != saved[n]):
        raise SeqganError(f"{path} was trained with --{name.replace('_', '-')} {saved[name]}, "
                          f"not {given[name]}; drop the flag or start a new --out")

def at_least_one(cfg, *names):
    """Refuse config fields below 1 (a run of 0 steps, or 0 images, would divide by zero later)."""
    if min(getattr(cfg, name) for name in names) < 1:
        flags = [f"--{name.replace('_', '-')}" for name in names]
        raise SeqganError(f"{', '.join(flags[:-1])} and {flags[-1]} must be at least 1")

def count_params(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

def setup_distributed(device_flag):
    """--device -> (ddp, rank, local_rank, world, device); every check before any rank waits."""
    device = pick_device(device_flag)
    if "RANK" not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if device.index is not None:
            raise SeqganError(f"--device {device_flag}: under torchrun each process takes the GPU "
                              "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        n_local = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1)  # on this node
        if n_local > (n_gpus := torch.cuda.device_count()):
            raise SeqganError(f"torchrun started {n_local} processes on this node, which has "
                              f"{n_gpus} GPU(s); pass --nproc_per_node {n_gpus} or fewer")
        torch.cuda.set_device(device := torch.device("cuda", local_rank))  # one GPU per process
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",  # 2 h, not NCCL's 10 min:
                            timeout=datetime.timedelta(hours=2))  # rank 0 may tokenize meanwhile
    return True, rank, local_rank, world, device

def wrap(module, compile, ddp, device, backend="inductor"):
    """What a trainer's steps run: compiled if asked, then wrapped in DDP (nanoGPT's order)."""
    module = torch.compile(module, backend=backend) if compile else module
    ids = [device.index] if device.type == "cuda" else None  # the one GPU of this process
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids) if ddp else module

def is_master():  # rank 0, or the one process without torchrun
    return not dist.is_initialized() or dist.get_rank() == 0

def barrier():
    if dist.is_initialized():
        dist.barrier()

def teardown():  # the scripts' last line; cli() calls it when a script fails
    if dist.is_initialized():
        dist.destroy_process_group()

def shard(n, rank, world):  # one rank's contiguous, balanced part of 0..n-1
    return range(rank * n // world, (rank + 1) * n // world)

def all_reduce_sum(t):  # in place; the tensor itself without torchrun
    if dist.is_initialized():
        dist.all_reduce(t)
    return t

def gather_rows(x):  # every rank's rows x (n_r, ...) in rank order, on every rank (CPU)
    if not dist.is_initialized():
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())  # pickled: any n_r
    return torch.cat(parts)

def run_text(train_cfg, device, world, step):
    """'device cuda:0 x 2 processes | global batch 64 (32 x 2 processes) | start step 0'."""
    b, k = train_cfg.batch_size, train_cfg.grad_accum
    parts = [str(b)] + [f"{k} accum"] * (k > 1) + [f"{world} processes"] * (world > 1)
    batch = f"{b * k * world}" + (f" ({' x '.join(parts)})" if len(parts) > 1 else "")
    return (f"device {device}{f' x {world} processes' if world > 1 else ''} | global batch {batch}"
            f" | start step {step}")

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

def list_images(root):  # sorted, recursive, by extension; an error if there are none
    if not os.path.isdir(root):
        raise SeqganError(f"image folder {root} does not exist; pass an existing folder of images")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True)
                   for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SeqganError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    return paths

def load_image(path, size=0):
    """PIL RGB -> uint8 (3, H, W); size: the shorter side bicubic-resized to it, centre crop."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:  # cli() makes one line of it, even from a DataLoader worker
        raise SeqganError(f"cannot read image {path} ({e}); delete or replace it") from None
    if size:
        s = size / min(img.size)  # (a resize to the same size is a copy)
        img = img.resize([max(size, round(n * s)) for n in img.size], Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)

class ImageFolder(torch.utils.data.Dataset):
    """Images under root, labelled by first-level subfolder (sorted) if all are in one, else 0."""
    def __init__(self, root, size):
        self.paths, self.size = list_images(root), size
        tops = [os.path.relpath(p, root).split(os.sep) for p in self.paths]
        self.classes = sorted({t[0] for t in tops}) if all(len(t) > 1 for t in tops) else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index.get(t[0], 0) for t in tops]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size), self.labels[i]

def load_cifar10(root, train):  # uint8 (N, 3, 32, 32), labels; rank 0 alone downloads it
    if is_master():
        with contextlib.suppress(OSError, RuntimeError):  # every rank reports it below
            torchvision.datasets.CIFAR10(root, train=train, download=True)
    barrier()
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=False)
    except (OSError, RuntimeError) as e:
        raise SeqganError(f"cannot download CIFAR-10 into {root} ({type(e).__name__}); put "
                          f"cifar-10-python.tar.gz there or pass --data IMAGE_FOLDER") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

def read_idx_gz(path):  # a gzipped idx file (MNIST's format) -> uint8 tensor
    with gzip.open(path, "rb") as f:
        data = f.read()
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * data[3]).view(shape)

def load_fashion_mnist(root, train):
    """Fashion-MNIST as uint8 (N, 3, 32, 32) (28 px padded to 32, grey as RGB) and labels."""
    for d in (os.path.join(root, "fashion-mnist"), FASHION_MNIST_DIR):
        path = os.path.join(d, ("train" if train else "t10k") + "-%s-ubyte.gz")
        if os.path.isfile(path % "images-idx3"):
            x = F.pad(read_idx_gz(path % "images-idx3"), (2, 2, 2, 2))[:, None]  # (N, 1, 32, 32)
            return x.expand(-1, 3, -1, -1).contiguous(), read_idx_gz(path % "labels-idx1").long()
    raise SeqganError(f"Fashion-MNIST not found in {root}/fashion-mnist or {FASHION_MNIST_DIR}; "
                      "apt-get install dataset-fashion-mnist")

def load_dataset(name, root, size, train=True):
    """'cifar10' | 'fashion-mnist' (32 px) | an image folder -> (Dataset, number of classes)."""
    if name in ("cifar10", "fashion-mnist"):
        x, y = (load_cifar10 if name == "cifar10" else load_fashion_mnist)(root, train)
        return torch.utils.data.TensorDataset(x, y), 10
    ds = ImageFolder(name, size)
    return ds, len(ds.classes)

def export_test_images(name, out, n, root="data"):
    """The first n test images of 'cifar10' or 'fashion-mnist' as out/CLASS/NNNNN.png: fid.py's
    reference and --recon images, sample.py --visualize's (README: the command)."""
    xs, ys = (load_cifar10 if name == "cifar10" else load_fashion_mnist)(root, train=False)
    for i, (x, y) in enumerate(zip(xs[:n], ys[:n].tolist())):
        os.makedirs(os.path.join(out, str(y)), exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(os.path.join(out, str(y), f"{i:05d}.png"))

def to_input(x, device, size):  # uint8 (B, 3, S, S) -> float in [-1, 1] on device, size x size
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1)
    if x.shape[-1] != size:  # bicubic overshoots: clamped
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp_(-1, 1)
    return x

# -----------------------------------------------------------------------------
# runs: checkpoints (one dict, written atomically, rebuilt from its config), the log, running means

def save_checkpoint(path, ckpt):
    """Atomic and durable (a kill or a power loss leaves the old file or the new one, whole)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)  # (flushes f)
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(folder, os.O_RDONLY)  # the rename lasts once the folder's entry does
    with contextlib.suppress(OSError):  # (not every file system fsyncs a folder)
        os.fsync(fd)
    os.close(fd)

def load_checkpoint(path, kind):  # a checkpoint dict of that kind: tokenizer, prior or tokens
    if not os.path.isfile(path):
        raise SeqganError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not ours or damaged
        raise SeqganError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if (found := ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else "unknown") != kind:
        raise SeqganError(f"{path} is a {found} checkpoint, expected a {kind} checkpoint")
    return ckpt

def clean_state_dict(sd):  # without the prefixes of torch.compile and DDP
    return {re.sub(r"^(?:_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}

def model_from_checkpoint(ckpt):
    """A checkpoint's Tokenizer or Prior (by its kind) from its config and weights, frozen, eval."""
    model_cls, config_cls = dict(tokenizer=(Tokenizer, TokenizerConfig),
                                 prior=(Prior, PriorConfig))[ckpt["kind"]]
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

def run_log(out, master):  # on rank 0 each line goes above the progress bar and to OUT/log.txt
    if master:
        os.makedirs(out, exist_ok=True)
    def log(line):
        if master:
            tqdm.write(line)
            with open(os.path.join(out, "log.txt"), "a") as f:
                f.write(line + "\n")
    return log

def log_start(log, header, ckpt, train_cfg, world, get_lr):
    """The header; warnings if a resumed run changed its global batch or --steps (get_lr's)."""
    log(header)
    if ckpt is None:
        return
    saved, saved_world, step = ckpt["train_config"], ckpt.get("world_size", 1), ckpt["step"]
    before, steps = saved["batch_size"] * saved.get("grad_accum", 1) * saved_world, saved["steps"]
    if before != (batch := train_cfg.batch_size * train_cfg.grad_accum * world):
        log(f"warning: the checkpoint was trained with a global batch of {before} ({saved_world} "
            f"process(es)); continuing with a global batch of {batch}, learning rate unchanged")
    was, now = get_lr(step, replace(train_cfg, steps=steps)), get_lr(step, train_cfg)
    if was != now:
        log(f"warning: --steps {train_cfg.steps}, the checkpoint's run had {steps}: the lr "
            f"schedule is a function of --steps, so step {step} takes lr {now:.2e}, not {was:.2e}")

class RunningMeans:
    """Scalars summed on the device once per step, read as means over steps and ranks (with the
    steps per second since the last read or restart): a NaN stops every rank."""
    def __init__(self):
        self.sums, self.steps, self.t0 = {}, 0, time.time()

    def add(self, terms):
        self.sums = {k: self.sums.get(k, 0) + v.detach().float() for k, v in terms.items()}
        self.steps += 1

    def read(self, world, step, lr, ckpt_path):
        sums = all_reduce_sum(torch.stack(list(self.sums.values())))
        values = dict(zip(self.sums, (sums / (self.steps * world)).tolist()))  # the one host sync
        rate = self.steps / (time.time() - self.t0)
        self.sums, self.steps, self.t0 = {}, 0, time.time()
        if not np.isfinite(list(values.values())).all():
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise SeqganError(f"non-finite loss at step {step}: {terms}; lower --lr (now {lr}) or "
                              f"check the data. Last good checkpoint: {ckpt_path}")
        return values, rate
