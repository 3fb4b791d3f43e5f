"""
Train a generative prior over the tokens of a frozen SeQ-GAN tokenizer: AR (causal, next token in
raster order) or NAR (MaskGIT: bidirectional, masked tokens). The dataset is tokenized once and cached.

  python train_prior.py --tokenizer out/tokenizer2/ckpt.pt --model ar      # CIFAR-10, 8x8 tokens, one GPU
  python train_prior.py --tokenizer out/tokenizer2/ckpt.pt --model nar --token-cache out/tokens.pt
  python train_prior.py --tokenizer out/ffhq/ckpt.pt --preset base --batch-size 256 --steps 500000 \
      --out out/ffhq_ar                                        # Table 8; Table 10's lr decay from step 80k
  torchrun --standalone --nproc_per_node=8 train_prior.py --tokenizer out/ffhq/ckpt.pt --preset base \
      --batch-size 32 --out out/ffhq_ar                        # 8 GPUs (DDP): global batch 8 x 32 = 256

CPU smoke run on the tokenizer of train_tokenizer.py's smoke run (tokenizing Fashion-MNIST's 70k images
takes a minute or two, once):
  python train_prior.py --tokenizer out/smoke/ckpt.pt --n-layer 2 --n-head 4 --n-embd 64 \
      --steps 40 --batch-size 16 --log-every 10 --eval-every 20 --out out/smoke_ar
"""

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import option


@dataclass
class TrainConfig:
    tokenizer: str = option("", "the tokenizer's ckpt.pt (train_tokenizer.py); frozen, eval mode")
    model: str = option("ar", "ar (causal, next-token loss) or nar (bidirectional, MaskGIT loss)")
    preset: str = option("classroom", "prior shape: cpu (4 layers, d 128), classroom (8 layers, d 256), base (Table 8, 172M), "
                                     "large (305M)")
    uncond: bool = option(False, "ignore the data's labels: an unconditional prior")
    data: str = option("", "'cifar10', 'fashion-mnist' or an image folder; default: the tokenizer's training data")
    data_root: str = option("", "where CIFAR-10 / Fashion-MNIST live; default: the tokenizer's")
    token_cache: str = option("", "file caching the tokenized data; default OUT/tokens.pt (share one between "
                                "AR and NAR runs to tokenize once)")
    out: str = option("", "output folder for ckpt.pt, log.txt, tokens.pt and sample grids (default out/prior_MODEL)")
    steps: int = option(20000, "total training steps")
    batch_size: int = option(128, "token grids per micro-step and GPU; the global batch is batch_size x grad_accum "
                                "x processes")
    grad_accum: int = option(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = option(1e-4, "AdamW peak learning rate (Table 10: 1e-4), held until the decay starts")
    lr_decay_start: int = option(None, "step at which the lr starts to decay to --end-lr, reaching it at --steps: "
                                     "AR exponentially, NAR linearly (default: Table 10's, 80000 AR, 50000 NAR). "
                                   "If it is not below --steps (e.g. a short run), the decay starts at half "
                                   "of --steps instead")
    end_lr: float = option(None, "lr reached at --steps (default: Table 10's, 5e-6 AR, 0 NAR); equal to --lr: "
                               "constant")
    weight_decay: float = option(1e-2, "AdamW weight decay on matrices (paper: 1e-2); biases and norms get none")
    grad_clip: float = option(1.0, "clip the global gradient norm (0 = off)")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    backend: str = option("auto", "torch.distributed backend under torchrun: auto (nccl on GPUs, gloo on CPU), "
                                "nccl or gloo")
    compile: bool = option(False, "torch.compile the prior for training (slow start, faster steps)")
    resume: bool = option(False, "continue the run in --out from its ckpt.pt (same model flags)")
    num_workers: int = option(4, "data-loading processes while tokenizing an image folder")
    log_every: int = option(100, "steps between log lines")
    eval_every: int = option(2000, "steps between validation loss, a sample grid and a checkpoint")
    eval_batches: int = option(10, "validation batches averaged per evaluation")
    peak_flops: float = option(0.0, "peak FLOP/s of the accelerator for MFU; 0 = by GPU name (plumbing.PEAK_FLOPS)")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.grad_accum, self.log_every, self.eval_every, self.eval_batches) < 1:
            raise seqgan.SeqganError("--steps, --batch-size, --grad-accum, --log-every, --eval-every and --eval-batches "
                                     "must be at least 1")
        if self.lr_decay_start is not None and self.lr_decay_start < 0:
            raise seqgan.SeqganError(f"--lr-decay-start {self.lr_decay_start} is negative")
        ar = self.model == "ar"
        if self.end_lr is not None and (not (0 < self.end_lr if ar else 0 <= self.end_lr) or self.end_lr > self.lr):
            raise seqgan.SeqganError(f"--end-lr {self.end_lr} (Table 10's unless given) must lie in "
                                     f"{'(' if ar else '['}0, --lr {self.lr}]"
                                     + (": the AR prior's decay is exponential, so it cannot reach 0"
                                        if ar and self.end_lr <= 0 else "")
                                     + "; pass an --end-lr that fits")


# The PriorConfig fields that are flags. n_codes and grid come from the tokenizer, n_classes from the
# data (or --uncond), causal from --model: a flag for them could only disagree with those.
SHAPE = ("n_layer", "n_head", "n_embd", "dropout")
# Flags that change what the prior is: a resumed run must keep them. (Another --tokenizer path is
# fine if its encoder and codebook are the same: main() compares tokenizer_hash.)
MODEL_FLAGS = ("model", "preset", "uncond") + SHAPE
# TokenizerConfig fields that shape only the decoder (phase 2 changes them), so not the tokens.
DECODER_FIELDS = ("dec_attn", "attn_heads", "attn_block", "feature_dim")
# Table 10's learning-rate decay (start step, end lr): AR exponential to 5e-6 from iteration 80,000, NAR
# linear to 0 from iteration 50,000 (of 1.5M iterations on ImageNet, 500k elsewhere).
LR_DECAY = dict(ar=(80_000, 5e-6), nar=(50_000, 0.0))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plumbing.add_config_args(p, TrainConfig)
    group = p.add_argument_group("PriorConfig (defaults: the --preset)")
    for f in fields(seqgan.PriorConfig):
        if f.name in SHAPE:
            group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (classroom: {seqgan.PRIOR_PRESETS['classroom'][f.name]})")
    return p.parse_args(argv)


def configure(args):
    """Resolve (train config, prior shape, checkpoint to continue, tokenizer checkpoint). Each field comes
    from, in rising priority: the dataclass default, the preset or the checkpoint being continued, the flags."""
    given = vars(args)
    model, preset = given.get("model", "ar"), given.get("preset", "classroom")
    if model not in ("ar", "nar"):
        raise seqgan.SeqganError(f"--model must be ar or nar, not {model!r}")
    if preset not in seqgan.PRIOR_PRESETS:
        raise seqgan.SeqganError(f"unknown --preset {preset}; choose from {', '.join(seqgan.PRIOR_PRESETS)}")
    out = given.get("out") or f"out/prior_{model}"
    ckpt_path = os.path.join(out, "ckpt.pt")
    defaults, ckpt = dict(seqgan.PRIOR_PRESETS[preset], out=out), None
    if given.get("resume"):
        ckpt = plumbing.load_checkpoint(ckpt_path, "prior")
        saved = {**ckpt["train_config"], **ckpt["model_config"]}
        for name in MODEL_FLAGS:
            if name in given and given[name] != saved[name]:
                raise seqgan.SeqganError(f"{ckpt_path} was trained with --{name.replace('_', '-')} {saved[name]}, not "
                                    f"{given[name]}; drop the flag or start a new --out")
        defaults = {**ckpt["train_config"], **{k: ckpt["model_config"][k] for k in SHAPE}}
    elif os.path.exists(ckpt_path):
        raise seqgan.SeqganError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
    train_cfg = plumbing.config_from_args(TrainConfig, args, defaults)
    shape = plumbing.config_from_args(seqgan.PriorConfig, args, defaults)  # n_codes, grid, n_classes, causal: set in main
    if not train_cfg.tokenizer:
        raise seqgan.SeqganError("train_prior.py needs --tokenizer CKPT (the ckpt.pt of a train_tokenizer.py run)")
    start, end_lr = LR_DECAY[train_cfg.model]  # Table 10's, where the flags leave them out
    train_cfg = replace(train_cfg, lr_decay_start=start if train_cfg.lr_decay_start is None else train_cfg.lr_decay_start,
                        end_lr=end_lr if train_cfg.end_lr is None else train_cfg.end_lr)
    tok_ckpt = plumbing.load_checkpoint(train_cfg.tokenizer, "tokenizer")
    # the data defaults to what the tokenizer was trained on
    train_cfg = replace(train_cfg, data=train_cfg.data or tok_ckpt["train_config"]["data"],
                 data_root=train_cfg.data_root or tok_ckpt["train_config"]["data_root"],
                 token_cache=train_cfg.token_cache or os.path.join(train_cfg.out, "tokens.pt"))
    return train_cfg, shape, ckpt, tok_ckpt


def decay_start(train_cfg):
    """The step s at which the lr starts to decay: --lr-decay-start if it is below --steps, else half of
    --steps (a classroom run of 20k steps would otherwise never reach Table 10's 50k / 80k)."""
    return train_cfg.lr_decay_start if train_cfg.lr_decay_start < train_cfg.steps else train_cfg.steps // 2


def get_lr(step, train_cfg):
    """The lr of the optimizer step taken at `step` (0-based): a pure function of the step and the config,
    so a resumed run carries on along the same curve. Table 10, with lr_0 = --lr, lr_end = --end-lr,
    s = decay_start(train_cfg), T = --steps:
      step < s   lr_0
      AR         lr_0 * (lr_end / lr_0) ** ((step - s) / (T - s)) = lr_0 * exp(-k (step - s)),
                 k = ln(lr_0 / lr_end) / (T - s)        (exponential; the rate k makes it lr_end at T)
      NAR        lr_0 + (lr_end - lr_0) * (step - s) / (T - s)    (linear)
    Both equal lr_0 at s and lr_end at T."""
    s, T = decay_start(train_cfg), train_cfg.steps
    if step < s:
        return train_cfg.lr
    frac = min(step - s, T - s) / (T - s)
    if train_cfg.model == "ar":
        return train_cfg.lr * (train_cfg.end_lr / train_cfg.lr) ** frac
    return train_cfg.lr + (train_cfg.end_lr - train_cfg.lr) * frac


def tokenizer_hash(tok_ckpt):
    """sha1 of what the tokens depend on: the tokenizer config, encoder and codebook. The decoder is left
    out, so a phase-2 checkpoint (same encoder and codebook) shares the phase-1 tokens."""
    config = {k: v for k, v in tok_ckpt["model_config"].items() if k not in DECODER_FIELDS}
    h = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    for k, v in sorted(plumbing.clean_state_dict(tok_ckpt["model"]).items()):
        if k.startswith(("encoder.", "quantizer.")):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split(train_cfg, image_size):
    """(train, val) datasets and the class count. Val is the test split of CIFAR-10 / Fashion-MNIST; for an
    image folder, every 20th image in sorted order (5%, the same on every run, spread over class folders)."""
    ds, n_classes = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, image_size, train=True)
    if train_cfg.data in ("cifar10", "fashion-mnist"):
        return ds, plumbing.load_dataset(train_cfg.data, train_cfg.data_root, image_size, train=False)[0], n_classes
    val = [i for i in range(len(ds)) if i % 20 == 0]
    train = [i for i in range(len(ds)) if i % 20 != 0]
    return torch.utils.data.Subset(ds, train), torch.utils.data.Subset(ds, val), n_classes


def data_fingerprint(train_ds, val_ds, train_cfg):
    """The data's identity: for a folder, every file's name, size and mtime; for the array datasets, name and sizes."""
    folder = getattr(train_ds, "dataset", train_ds)
    if not isinstance(folder, plumbing.ImageFolder):
        return f"{train_cfg.data}: {len(train_ds)} train, {len(val_ds)} val"
    h = hashlib.sha1(b"val = every 20th")
    for p in folder.paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, train_cfg.data)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tokenize(tok, ds, train_cfg, device, desc):
    """Frozen tokenizer over a dataset in order -> (tokens (N, h*w) int16, labels (N,) int64).
    fp32, no autocast: the codes are computed once, and bf16 could flip near-tie argmins."""
    in_memory = train_cfg.data in ("cifar10", "fashion-mnist")
    loader = torch.utils.data.DataLoader(ds, train_cfg.batch_size, shuffle=False,
                                         num_workers=0 if in_memory else train_cfg.num_workers)
    dtype = torch.int16 if tok.cfg.n_codes <= 32768 else torch.int32  # half the memory of int32
    tokens, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        tokens.append(tok.tokenize(plumbing.to_input(x, device, tok.cfg.image_size)).flatten(1).to("cpu", dtype))
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(tokens), torch.cat(labels)


def load_tokens(path, fingerprint, build, log):
    """The token cache at path if its fingerprint matches, else build() it and write it atomically. A file
    there that is not a token cache (a checkpoint given by mistake) is refused, never overwritten."""
    if os.path.isfile(path):
        try:
            cache = plumbing.load_checkpoint(path, "tokens")
        except seqgan.SeqganError as e:
            raise seqgan.SeqganError(f"--token-cache: {e}; give another path (it would be overwritten)") from None
        if cache["fingerprint"] == fingerprint:
            log(f"reusing token cache {path}")
            return cache
        changed = [k for k in fingerprint if cache["fingerprint"].get(k) != fingerprint[k]]
        log(f"token cache {path} is stale ({', '.join(changed)} changed); rebuilding it")
    log(f"tokenizing the data into {path}")
    cache = dict(kind="tokens", fingerprint=fingerprint, **build())
    plumbing.save_checkpoint(path, cache)
    return cache


@torch.no_grad()
def evaluate(model, val, val_y, train_cfg, ctx):
    """Mean loss and accuracy over the first eval_batches validation batches. The NAR masks come from a
    fixed generator, so every evaluation scores the same masked inputs and the curve is comparable."""
    model.eval()
    g = torch.Generator(device=val.device).manual_seed(0)
    total, n = torch.zeros(2, device=val.device), 0
    for i in range(0, min(len(val), train_cfg.eval_batches * train_cfg.batch_size), train_cfg.batch_size):
        idx = val[i:i + train_cfg.batch_size].long()
        y = val_y[i:i + train_cfg.batch_size] if model.cfg.n_classes else None
        with ctx:
            loss, acc = seqgan.prior_loss(model, model.cfg, idx, y, g)
        total += torch.stack([loss, acc]) * len(idx)
        n += len(idx)
    model.train()
    return (total / n).tolist()


@torch.no_grad()
def save_samples(model, tok, train_cfg, path, ctx):
    """A grid of samples with the paper's sampling settings; conditional: one class per column."""
    cfg, device = model.cfg, model.head.weight.device
    nrow = cfg.n_classes * max(1, 8 // cfg.n_classes) if 0 < cfg.n_classes <= 16 else 8  # whole class cycles per row
    n = 4 * nrow
    y = torch.arange(n, device=device) % cfg.n_classes if cfg.n_classes else None
    g = torch.Generator(device=device).manual_seed(train_cfg.seed)  # the same draws every time: grids compare across steps
    model.eval()
    with ctx:
        if cfg.causal:
            idx = seqgan.generate_ar(model, n, y, top_p=seqgan.AR_TOP_P, generator=g)
        else:
            idx = seqgan.generate_maskgit(model, n, y, steps=min(seqgan.NAR_STEPS, cfg.grid), temperature=seqgan.NAR_TEMPERATURE, generator=g)
        x = tok.decode_indices(idx.view(n, tok.cfg.grid, tok.cfg.grid)).float()
    model.train()
    torchvision.utils.save_image(x, path, nrow=nrow, normalize=True, value_range=(-1, 1))


def check_resume(ckpt, cfg, train_cfg, tok_hash):
    """A resumed prior must keep its tokenizer's codes and its data's classes."""
    saved = seqgan.PriorConfig(**ckpt["model_config"])
    if (saved.n_codes, saved.grid) != (cfg.n_codes, cfg.grid):
        raise seqgan.SeqganError(f"tokenizer {train_cfg.tokenizer} has {cfg.n_codes} codes and {cfg.grid} tokens per image, "
                                 f"but the prior was trained on {saved.n_codes} codes and {saved.grid} tokens")
    if saved.n_classes != cfg.n_classes:
        raise seqgan.SeqganError(f"--data {train_cfg.data} gives {cfg.n_classes} classes, but the prior was trained with "
                                 f"{saved.n_classes}; resume it on the same data")
    if ckpt["tokenizer_hash"] != tok_hash:
        raise seqgan.SeqganError(f"tokenizer {train_cfg.tokenizer} changed since the prior was trained (other encoder or "
                                 "codebook weights); start a new --out")


def token_set(tok, train_ds, val_ds, tok_hash, train_cfg, device, master, log):
    """The data as code grids, on the device: (train, train labels, val, val labels). The cache is built
    once, by rank 0; the others wait at the barrier, then read what it wrote."""
    def build():
        train, train_y = tokenize(tok, train_ds, train_cfg, device, "tokenizing train")
        val, val_y = tokenize(tok, val_ds, train_cfg, device, "tokenizing val")
        return dict(train=train, train_labels=train_y, val=val, val_labels=val_y)

    fingerprint = dict(tokenizer=tok_hash, data=data_fingerprint(train_ds, val_ds, train_cfg))
    tokens = load_tokens(train_cfg.token_cache, fingerprint, build, log) if master else None
    plumbing.barrier()
    if not master:
        tokens = plumbing.load_checkpoint(train_cfg.token_cache, "tokens")
    # The whole token set lives on the device (CIFAR-10: 6 MB; ImageNet at 16x16: 0.7 GB) and each step
    # indexes a random batch out of it, as nanoGPT's get_batch does: no DataLoader in the loop.
    return tuple(tokens[k].to(device) for k in ("train", "train_labels", "val", "val_labels"))


def build(cfg, train_cfg, ckpt, device):
    """The plain prior, AdamW and the best validation loss so far: fresh, or as the checkpoint left them."""
    raw_model = seqgan.Prior(cfg).to(device)
    # Weight decay on matrices (linear weights and embeddings) only, not on biases and LayerNorms (nanoGPT).
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=train_cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=train_cfg.lr, betas=(0.9, 0.96), **fused)
    best_val = float("inf")
    if ckpt is not None:
        raw_model.load_state_dict(plumbing.clean_state_dict(ckpt["model"]))
        opt.load_state_dict(ckpt["optimizer"])
        best_val = ckpt["best_val_loss"]
    for group, wd in zip(opt.param_groups, (train_cfg.weight_decay, 0.0)):  # flags win over the resumed optimizer's
        group["lr"], group["weight_decay"] = train_cfg.lr, wd
    return raw_model, opt, best_val


def eval_and_save(raw_model, tok, val, val_y, best_val, step, train_cfg, ctx, log, save):
    """Rank 0 alone: validation loss, a grid of samples, a checkpoint; -> the best validation loss so far."""
    vl, va = evaluate(raw_model, val, val_y, train_cfg, ctx)
    best_val = min(best_val, vl)
    log(f"eval step {step} | val loss {vl:.4f} acc {va:.3f} | best {best_val:.4f}")
    save_samples(raw_model, tok, train_cfg, os.path.join(train_cfg.out, f"samples_{step:07d}.png"), ctx)
    save(best_val)
    return best_val


def header(raw_model, cfg, n_train, n_val, train_cfg, device, world, step):
    """The run's first log line."""
    return (f"{train_cfg.model.upper()} prior {plumbing.count_params(raw_model) / 1e6:.2f}M ({cfg.n_layer} layers, "
            f"d {cfg.n_embd}, {cfg.n_head} heads) | {train_cfg.data}: {n_train} train / {n_val} val grids of "
            f"{cfg.grid} tokens, K={cfg.n_codes}, {cfg.n_classes or 'no'} classes | device {device}"
            f"{f' x {world} processes' if world > 1 else ''} | global batch "
            f"{plumbing.batch_text(train_cfg.batch_size, train_cfg.grad_accum, world)} | start step {step} | "
            f"chance loss ln K = {math.log(cfg.n_codes):.3f}")


def main(argv=None):
    train_cfg, shape, ckpt, tok_ckpt = configure(parse(argv))  # every rank: the checks, and the checkpoint it resumes
    ddp, rank, _, world, device = plumbing.setup_distributed(train_cfg.device, train_cfg.backend)
    master = rank == 0  # logs, evaluates, writes samples and checkpoints; the others only train
    step = ckpt["step"] if ckpt is not None else 0
    # Dropout and NAR masks differ after a resume and across ranks (each rank masks its own rows);
    # the ranks' different initial weights do not matter: DDP copies rank 0's to all at the wrap.
    torch.manual_seed(train_cfg.seed * 1_000_003 + step + rank)
    ctx = seqgan.autocast(device)

    tok = plumbing.load_tokenizer(train_cfg.tokenizer, device, ckpt=tok_ckpt)  # frozen, eval mode; needs a pixel decoder
    train_ds, val_ds, n_classes = split(train_cfg, tok.cfg.image_size)
    cfg = replace(shape, n_codes=tok.cfg.n_codes, grid=tok.cfg.grid ** 2, n_classes=0 if train_cfg.uncond else n_classes,
                  causal=train_cfg.model == "ar")
    tok_hash = tokenizer_hash(tok_ckpt)
    if ckpt is not None:
        check_resume(ckpt, cfg, train_cfg, tok_hash)
    global_batch = plumbing.check_enough_data(len(train_ds), "training images", train_cfg, world)  # grids per step
    ckpt_path, log = os.path.join(train_cfg.out, "ckpt.pt"), plumbing.run_log(train_cfg.out, master)
    train, train_y, val, val_y = token_set(tok, train_ds, val_ds, tok_hash, train_cfg, device, master, log)

    raw_model, opt, best_val = build(cfg, train_cfg, ckpt, device)
    # model is what the steps run (compiled, then wrapped in DDP, as nanoGPT); raw_model is the plain module,
    # for checkpoints, evaluation and sampling.
    model = torch.compile(raw_model) if train_cfg.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=plumbing.ddp_ids(device))

    flops_per_token = seqgan.estimate_flops_per_token(cfg)
    peak = plumbing.peak_flops(device, train_cfg.peak_flops)
    plumbing.log_start(log, header(raw_model, cfg, len(train), len(val), train_cfg, device, world, step), ckpt, train_cfg, world, get_lr)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"MFU against a peak of {peak / 1e12:.0f} TFLOP/s ({'--peak-flops' if train_cfg.peak_flops else 'dense bf16, ' + gpu})"
        if peak else f"MFU n/a: no peak FLOP/s known for {gpu}; pass --peak-flops")
    log(f"config: {asdict(train_cfg)} {asdict(cfg)} | tokenizer phase {tok_ckpt['phase']}")

    def save(best_val):
        plumbing.save_checkpoint(ckpt_path, dict(kind="prior", step=step, best_val_loss=best_val, model_config=asdict(cfg),
                                               train_config=asdict(train_cfg), world_size=world,
                                               tokenizer=os.path.abspath(train_cfg.tokenizer), tokenizer_hash=tok_hash,
                                               model=raw_model.state_dict(), optimizer=opt.state_dict()))

    # The batch order is seeded from (seed, start step), so a resumed run does not replay the first batches.
    # The generator lives on the device: drawing the indices there needs no host-to-device copy per step.
    data_g = torch.Generator(device=device).manual_seed(train_cfg.seed * 1_000_003 + step)
    means = plumbing.RunningMeans()  # loss, accuracy, grad norm: read back once per log interval
    t0, zero, accum = time.time(), torch.zeros((), device=device), train_cfg.grad_accum
    # the with-block closes the bar on an error too, so the error line stands on its own
    with tqdm(total=train_cfg.steps, initial=step, desc=f"{train_cfg.model} prior", dynamic_ncols=True, disable=not master) as bar:
        while step < train_cfg.steps:
            lr = get_lr(step, train_cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            ix = torch.randint(len(train), (global_batch,), device=device, generator=data_g)
            ix = ix.view(accum, world, train_cfg.batch_size)[:, rank]  # (micro-steps, batch): this rank's slices
            opt.zero_grad(set_to_none=True)
            for micro in range(accum):
                idx, y = train[ix[micro]].long(), train_y[ix[micro]] if cfg.n_classes else None
                if ddp:  # all-reduce in the last micro-step's backward only (seqgan, "distributed")
                    model.require_backward_grad_sync = micro == accum - 1
                with ctx:
                    loss, acc = seqgan.prior_loss(model, cfg, idx, y)
                (loss / accum).backward()  # the mean over the micro-steps' grids; DDP then averages over the ranks
                means.add(dict(loss=loss, acc=acc), 1 / accum)
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), train_cfg.grad_clip) if train_cfg.grad_clip > 0 else zero
            opt.step()
            means.add(dict(grad_norm=gnorm))  # the same on every rank: the gradients are already averaged
            means.steps += 1
            step += 1
            bar.update(1)

            # an eval step is a log step too: its checkpoint is written only after the means were found finite
            if step % train_cfg.log_every == 0 or step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                tps = means.steps * global_batch * cfg.grid / (time.time() - t0)
                m = means.read(world, step, train_cfg.lr, ckpt_path)
                mfu = f"{flops_per_token * tps / (peak * world):.1%}" if peak else "n/a"
                log(f"step {step} | loss {m['loss']:.4f} acc {m['acc']:.3f} | grad norm {m['grad_norm']:.3f} | "
                    f"lr {lr:.3e} | {tps:,.0f} tok/s | MFU {mfu}")
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}")
                t0 = time.time()
            if master and (step % train_cfg.eval_every == 0 or step == train_cfg.steps):
                best_val = eval_and_save(raw_model, tok, val, val_y, best_val, step, train_cfg, ctx, log, save)
                t0 = time.time()
    log(f"done: {ckpt_path}")
    plumbing.teardown()


if __name__ == "__main__":
    plumbing.cli(main)
