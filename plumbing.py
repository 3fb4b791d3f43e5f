"""The scripts' shared plumbing: command line from the config dataclasses, devices, torchrun (DDP),
data, checkpoints and the run log. Nothing here is the method; that is seqgan.py."""

import argparse
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
# command line and devices

def cli(main):
    """Run a script's main(); turn a SeqganError into `error: ...` and exit code 2. Under torchrun every
    rank leaves the process group on the way out, error or not, and a failing rank exits non-zero,
    so torchrun stops the others instead of leaving them waiting in a collective."""
    try:
        main()
    except SeqganError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep its last line
            msg = msg.strip().splitlines()[-1].split("SeqganError: ", 1)[-1]
        rank = os.environ.get("RANK", "0")  # an error can be one rank's own (a bad image in its shard)
        print(f"error: {msg}" if rank == "0" else f"error (rank {rank}): {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, refusing CUDA without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SeqganError(f"--device {name} was asked for but this machine has no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SeqganError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None




# Dense bf16 tensor-core peak FLOP/s by GPU name, for MFU (nanoGPT hard-codes the A100's).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device, override=0.0):
    """Peak FLOP/s used for MFU: the override if given, else looked up by GPU name; None if unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def add_config_args(parser, *config_classes, defaults=None):
    """One flag per dataclass field (--image-size for image_size); the type comes from the default.
    Flags left out stay absent from the namespace, so presets and checkpoints can fill them."""
    defaults = defaults or {}
    for cls in config_classes:
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            if not f.metadata.get("flag", True):
                continue
            default = defaults.get(f.name, f.default)
            flag = "--" + f.name.replace("_", "-")
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help = f.metadata["help"] + ("" if default in (None, "") else f" (default: {shown})")
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
            elif isinstance(f.default, tuple):
                group.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")),
                                   default=argparse.SUPPRESS, metavar="A,B,..", help=help)
            else:
                kind = f.type if f.default is None else type(f.default)  # None: the annotation says the type
                group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help)


def config_from_args(cls, args, defaults=None):
    """Build a config: dataclass defaults < preset `defaults` < flags given on the command line."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in (defaults or {}).items() if k in names}
    kw.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**kw)


def count_params(module, trainable=False):
    """Parameters of a module; trainable=True: only those that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# -----------------------------------------------------------------------------
# distributed: one process per GPU under torchrun (nanoGPT's DDP pattern)
#
# torchrun (python -m torch.distributed.run) sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE in
# every process it starts; a plain `python script.py` sets none of them, and each helper below then
# reduces to the one-process case. Rank 0 is the master: it alone logs and writes files.
#
# How the trainers use it (train_tokenizer.py, train_prior.py): every rank resolves the config and the
# checkpoint itself; the model is compiled first, then wrapped in DistributedDataParallel, and the plain
# module (raw_model) is what checkpoints, evaluation and sampling use. A step runs grad_accum micro-steps,
# each loss divided by their number, and DDP all-reduces the gradients only in the last micro-step's
# backward: the official way is the no_sync() context manager, which only toggles
# require_backward_grad_sync (nanoGPT toggles it directly, as the trainers do). Each rank takes its own
# slice of the same global batch, so 2 ranks x batch b see what 1 rank x 2b sees. Logged numbers are
# summed over the ranks once per log interval (RunningMeans); rank 0 alone evaluates and writes files,
# and the other ranks wait for it in the next gradient all-reduce.


# Collectives wait this long for a slow rank: rank 0 may tokenize a large data set for train_prior.py
# while the others wait at a barrier (NCCL's default is 10 minutes). A crashed rank does not make
# the others wait this long: torchrun stops them as soon as one process exits with an error.
DIST_TIMEOUT = datetime.timedelta(hours=2)


def ddp_ids(device):
    """DistributedDataParallel's device_ids: the one GPU of this process, None on CPU (gloo)."""
    return [device.index] if device.type == "cuda" else None


def setup_distributed(device_flag, backend="auto"):
    """--device and --backend -> (ddp, rank, local_rank, world_size, device), joining the process group
    under torchrun: one GPU per process (cuda:LOCAL_RANK), NCCL on GPUs and gloo on CPU. Every check
    comes before init_process_group, so a bad flag stops every rank alike and none waits for the rest."""
    if backend not in ("auto", "nccl", "gloo"):
        raise SeqganError(f"unknown --backend {backend}; use auto (NCCL on GPUs, gloo on CPU), nccl or gloo")
    device = pick_device(device_flag)
    if "RANK" not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if device.index is not None:
            raise SeqganError(f"--device {device_flag}: under torchrun each process takes the GPU cuda:LOCAL_RANK; "
                              "pass --device cuda (or auto)")
        n_local = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1)  # processes on this node
        n_gpus = torch.cuda.device_count()
        if n_local > n_gpus:
            raise SeqganError(f"torchrun started {n_local} processes on this node, which has {n_gpus} GPU(s); "
                              f"pass --nproc_per_node {n_gpus} or fewer (one process per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    elif backend == "nccl" and device.type != "cuda":
        raise SeqganError(f"--backend nccl runs on CUDA GPUs only, but the device is {device}; "
                          "use --backend gloo (or auto)")
    dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return True, rank, local_rank, world, device


def is_master():
    """True on rank 0, and in a run without torchrun."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    """Leave the process group (the scripts' last line; seqgan.cli also does it when a script fails)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n, rank, world):
    """The items of 0..n-1 that one rank handles: a contiguous range, sizes differing by at most one,
    so the shards of ranks 0, 1, .. in order are 0..n-1 again."""
    return range(rank * n // world, (rank + 1) * n // world)


def all_reduce_sum(t):
    """Sum a tensor over the ranks, in place; the tensor itself without torchrun."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def batch_text(batch_size, grad_accum, world):
    """The global batch (per optimizer step, over all ranks), spelled out: '256 (32 x 8 processes)'."""
    parts = [str(batch_size)] + [f"{grad_accum} accum"] * (grad_accum > 1) + [f"{world} processes"] * (world > 1)
    return f"{batch_size * grad_accum * world}" + (f" ({' x '.join(parts)})" if len(parts) > 1 else "")


def check_enough_data(n, what, train_cfg, world):
    """Refuse a data set smaller than one global batch (batch_size x grad_accum x processes); -> that batch."""
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * world
    if n < global_batch:
        raise SeqganError(f"{train_cfg.data} has {n} {what}, fewer than --batch-size {train_cfg.batch_size}"
                          + (f" x {train_cfg.grad_accum * world} (micro-steps x processes)"
                             if global_batch > train_cfg.batch_size else ""))
    return global_batch


def batch_change_warning(ckpt, batch_size, grad_accum, world):
    """One warning line when a resumed checkpoint was trained with another global batch, else None."""
    saved, saved_world = ckpt["train_config"], ckpt.get("world_size", 1)
    before = saved["batch_size"] * saved.get("grad_accum", 1) * saved_world
    if before != batch_size * grad_accum * world:
        return (f"warning: the checkpoint was trained with a global batch of {before} ({saved_world} process(es)); "
                f"continuing with a global batch of {batch_text(batch_size, grad_accum, world)}, learning rate unchanged")


def gather_rows(x):
    """Every rank's rows x (n_r, ...) concatenated in rank order, on every rank. all_gather needs one
    shape, so each rank pads to the largest n_r and the padding is cut off again."""
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
        raise SeqganError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTS)}); check the path")
    return paths


def load_image(path, size):
    """PIL -> RGB, shorter side resized to size, centre crop -> uint8 tensor (3, size, size)."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise SeqganError(f"cannot read image {path} ({e}); delete or replace it") from None
    s = size / min(img.size)
    if s != 1:
        img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class ImageFolder(torch.utils.data.Dataset):
    """Images found recursively under root. If every image sits in a subfolder, the first-level
    subfolder names (sorted) are the classes; otherwise the data is unlabelled (label 0, 0 classes)."""

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


def read_idx_gz(path):
    """An idx file (the MNIST format), gzipped -> numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_dataset(name, root, size, train=True):
    """'cifar10' | 'fashion-mnist' | an image folder -> (Dataset of (uint8 (3, S, S), label), n_classes).
    The two array datasets are 32 px; batches are resized on the device if size differs."""
    if name == "cifar10":
        # Under torchrun rank 0 alone downloads (concurrent downloads would write one archive at once);
        # the others wait, then read it. Every rank calls this, so the barrier meets.
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
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return torch.utils.data.TensorDataset(x, torch.tensor(ds.targets)), 10
    if name == "fashion-mnist":
        split = "train" if train else "t10k"
        for d in (os.path.join(root, "fashion-mnist"), FASHION_MNIST_DIR):
            if os.path.isfile(os.path.join(d, f"{split}-images-idx3-ubyte.gz")):
                x = torch.from_numpy(read_idx_gz(os.path.join(d, f"{split}-images-idx3-ubyte.gz")).copy())
                y = torch.from_numpy(read_idx_gz(os.path.join(d, f"{split}-labels-idx1-ubyte.gz")).astype(np.int64))
                x = F.pad(x, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1).contiguous()  # 28 -> 32 px, RGB
                return torch.utils.data.TensorDataset(x, y), 10
        raise SeqganError(f"Fashion-MNIST not found in {root}/fashion-mnist or {FASHION_MNIST_DIR}; "
                          "apt-get install dataset-fashion-mnist")
    ds = ImageFolder(name, size)
    return ds, len(ds.classes)


def export_test_images(name, out, n, root="data"):
    """The first n test images of 'cifar10' or 'fashion-mnist' as PNGs in class subfolders, out/CLASS/NNNNN.png:
    the real-image folder that fid.py (FID reference, --recon) and sample.py --visualize read.
      python -c "import seqgan; seqgan.export_test_images('fashion-mnist', 'data/fmnist_test', 1000)" """
    ds, _ = load_dataset(name, root, 32, train=False)
    for i in range(min(n, len(ds))):
        x, y = ds[i]
        os.makedirs(os.path.join(out, str(int(y))), exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(os.path.join(out, str(int(y)), f"{i:05d}.png"))


def to_input(x, device, size):
    """uint8 batch (B, 3, S, S) -> float on device in [-1, 1] at size x size."""
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(-1, 1)
    return x


# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, rebuilt from its config


def save_checkpoint(path, ckpt):
    """torch.save to a temp file, flushed and fsynced, renamed over path, then the folder fsynced: a kill
    or a power loss leaves the old checkpoint or the new one, whole, never a half-written one. (Without
    the fsyncs, a power loss can leave the rename on disk before the data it names.)"""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename is durable once the folder's entry is; a folder cannot be opened or fsynced everywhere
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, kind):
    """Load a checkpoint dict and check it is of the expected kind ('tokenizer' or 'prior')."""
    if not os.path.isfile(path):
        raise SeqganError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not ours or is damaged
        raise SeqganError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise SeqganError(f"{path} is a {found} checkpoint, expected a {kind} checkpoint")
    return ckpt


def clean_state_dict(sd):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') put in front of parameter names
    (only in front: a submodule of that name inside the model keeps its name)."""
    prefix = re.compile(r"^(?:_orig_mod\.|module\.)+")
    return {prefix.sub("", k): v for k, v in sd.items()}


def model_from_checkpoint(ckpt):
    """Rebuild a checkpoint's model, a Tokenizer or a Prior (by ckpt["kind"]), from its config and weights:
    the one rebuild path of sample.py, train_prior.py and fid.py."""
    model_cls, config_cls = dict(tokenizer=(seqgan.Tokenizer, seqgan.TokenizerConfig),
                             prior=(seqgan.Prior, seqgan.PriorConfig))[ckpt["kind"]]
    try:
        model = model_cls(config_cls(**ckpt["model_config"]))
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except (TypeError, KeyError, RuntimeError) as e:
        raise SeqganError(f"{ckpt['kind']} checkpoint does not match this code's {model_cls.__name__} "
                          f"({str(e).splitlines()[0]})") from None
    return model


def load_tokenizer(path, device="cpu", ckpt=None):
    """A trained tokenizer with a pixel decoder, frozen and in eval mode, for priors, sampling, evaluation.
    ckpt: the checkpoint dict at path if the caller has already loaded it (it is read only once)."""
    tok = model_from_checkpoint(ckpt if ckpt is not None else load_checkpoint(path, "tokenizer"))
    if tok.cfg.feature_dim:
        raise SeqganError(f"{path} is a VQ-KD phase-1 tokenizer: it has no pixel decoder yet; run "
                          f"train_tokenizer.py --phase 2 --init {path} first")
    return tok.to(device).eval().requires_grad_(False)


def load_prior(ckpt):
    """Rebuild a Prior from its checkpoint dict, frozen and in eval mode."""
    return model_from_checkpoint(ckpt).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# training runs: the log both trainers write, and the running means it reports

def run_log(out, master):
    """The trainers' log function: on rank 0 each line goes above the progress bar and into OUT/log.txt;
    the other ranks write nothing."""
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
    """The first lines of a run: what it trains, and warnings if a resumed run's global batch or --steps
    changed (get_lr(step, train_cfg): the trainer's schedule, a function of --steps)."""
    log(header)
    if ckpt is None:
        return
    warning = batch_change_warning(ckpt, train_cfg.batch_size, train_cfg.grad_accum, world)
    if warning:
        log(warning)
    before, step = ckpt["train_config"]["steps"], ckpt["step"]
    was, now = get_lr(step, replace(train_cfg, steps=before)), get_lr(step, train_cfg)
    if was != now:
        log(f"warning: --steps {train_cfg.steps}, the checkpoint's run had {before}: the lr schedule is a function "
            f"of --steps, so step {step} takes lr {now:.2e} where the {before}-step curve had {was:.2e}")


class RunningMeans:
    """Named running sums of detached scalars, kept on the device and read back, averaged over the steps
    and the ranks, once per log interval: the interval's one host sync. Every rank reads the same
    numbers, so a non-finite loss stops them all alike."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, terms, scale=1.0):
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * scale

    def read(self, world, step, lr, ckpt_path):
        means = (all_reduce_sum(torch.stack(list(self.sums.values()))) / (self.steps * world)).tolist()
        values = dict(zip(self.sums, means))
        self.sums, self.steps = {}, 0
        if not all(map(math.isfinite, means)):
            raise SeqganError(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                              + f"; lower --lr (now {lr}) or check the data. Last good checkpoint: {ckpt_path}")
        return values
