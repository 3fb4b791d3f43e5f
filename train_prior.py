"""Train a generative prior over the tokens of a frozen SeQ-GAN tokenizer: AR (causal, next token in
raster order) or NAR (MaskGIT: bidirectional, masked tokens). The data is tokenized once, cached.

  python train_prior.py --tokenizer out/tokenizer2/ckpt.pt --model ar     # CIFAR-10, 8x8 tokens
  python train_prior.py --tokenizer out/tokenizer2/ckpt.pt --model nar --token-cache out/tokens.pt
  torchrun --standalone --nproc_per_node=8 train_prior.py --tokenizer out/ffhq2/ckpt.pt \
      --preset base --batch-size 32 --steps 500000 --out out/ffhq_ar   # Table 8's 172M prior
"""

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torchvision
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import SeqganError, option

@dataclass
class TrainConfig:
    tokenizer: str = option("", "the tokenizer's ckpt.pt (train_tokenizer.py); frozen, eval mode")
    model: str = option("ar", "ar (causal, next-token loss) or nar (bidirectional, MaskGIT loss)")
    preset: str = option("classroom", "prior shape: cpu (4 layers, d 128), classroom (8, d 256), "
                                      "base (Table 8: 24, d 768, 172M), large (24, d 1024, 305M)")
    uncond: bool = option(False, "ignore the data's labels: an unconditional prior")
    data: str = option("", "cifar10, fashion-mnist or an image folder (default: the tokenizer's)")
    data_root: str = option("", "where CIFAR-10 / Fashion-MNIST live (default: the tokenizer's)")
    token_cache: str = option("", "the tokenized data (default: OUT/tokens.pt; AR, NAR can share)")
    out: str = option("", "folder: ckpt.pt, log.txt, tokens.pt, grids (default: out/prior_MODEL)")
    steps: int = option(20000, "training steps")
    batch_size: int = option(128, "grids per micro-step and process (global: x accum x processes)")
    grad_accum: int = option(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = option(1e-4, "AdamW peak learning rate (Table 10), held until the decay starts")
    lr_decay_start: int = option(None, "step at which the lr starts to decay to end_lr")
    end_lr: float = option(None, "lr reached at --steps, exponentially (AR) or linearly (NAR)")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    compile: bool = option(False, "torch.compile the prior for training")
    resume: bool = option(False, "continue the run in --out from its ckpt.pt (same model flags)")
    num_workers: int = option(4, "data-loading processes while tokenizing an image folder")
    log_every: int = option(100, "steps between log lines")
    eval_every: int = option(2000, "steps between validation loss, a sample grid and a checkpoint")
    eval_batches: int = option(10, "validation batches averaged per evaluation")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        plumbing.at_least_one(self, "steps", "batch_size", "grad_accum", "log_every",
                              "eval_every", "eval_batches")
        if self.lr_decay_start is not None and self.lr_decay_start < 0:
            raise SeqganError(f"lr_decay_start {self.lr_decay_start} is negative")
        if self.end_lr is not None and not 0 <= self.end_lr <= self.lr:
            raise SeqganError(f"end_lr {self.end_lr} must lie in [0, --lr {self.lr}]")
        if self.end_lr == 0 and self.model == "ar":
            raise SeqganError("end_lr 0: the AR prior's decay is exponential, so it cannot reach 0")

# The PriorConfig flags; n_codes and grid come from the tokenizer, n_classes from the data (or
# --uncond), causal from --model: a flag for them could only disagree with those.
SHAPE = ("n_layer", "n_head", "n_embd", "dropout")
FLAGS = [f.name for f in fields(TrainConfig)  # the rest are preset values
         if f.name not in ("data_root", "lr_decay_start", "end_lr", "num_workers")] + list(SHAPE)
MODEL_FLAGS = ("model", "preset", "uncond") + SHAPE  # what the prior is: --resume keeps them
# Table 10's lr decay (start step, end lr): AR exponential to 5e-6 from iteration 80,000, NAR
# linear to 0 from 50,000 (of 1.5M iterations on ImageNet, 500k elsewhere).
LR_DECAY = dict(ar=(80_000, 5e-6), nar=(50_000, 0.0))

def parse(argv):
    return plumbing.parser(__doc__, TrainConfig, seqgan.PriorConfig, flags=FLAGS,
                           defaults=seqgan.PRIOR_PRESETS["classroom"]).parse_args(argv)

def configure(args):
    """(train config, prior shape, checkpoint to continue, tokenizer checkpoint) in three layers:
    dataclass < preset < command line. The preset: PRIOR_PRESETS' shape, LR_DECAY[model] and the
    tokenizer run's data; with --resume, the checkpoint's config."""
    given = vars(args)
    model, preset = given.get("model", "ar"), given.get("preset", "classroom")
    if model not in ("ar", "nar"):
        raise SeqganError(f"--model must be ar or nar, not {model!r}")
    if preset not in seqgan.PRIOR_PRESETS:
        raise SeqganError(f"unknown --preset {preset}; use {', '.join(seqgan.PRIOR_PRESETS)}")
    out = given.get("out") or f"out/prior_{model}"
    ckpt = plumbing.run_checkpoint(out, given.get("resume"), "prior")
    if ckpt is not None:
        saved = {**ckpt["train_config"], **ckpt["model_config"]}
        plumbing.refuse_changes(given, saved, MODEL_FLAGS, os.path.join(out, "ckpt.pt"))
        layer = {**ckpt["train_config"], **{k: saved[k] for k in SHAPE}}
    tokenizer = given.get("tokenizer") or (layer["tokenizer"] if ckpt else "")
    if not tokenizer:
        raise SeqganError("train_prior.py needs --tokenizer CKPT (a train_tokenizer.py ckpt.pt)")
    tok_ckpt = plumbing.load_checkpoint(tokenizer, "tokenizer")
    if ckpt is None:
        tok_run = {k: v for k, v in tok_ckpt["train_config"].items()
                   if k in ("data", "data_root", "num_workers")}
        decay = dict(zip(("lr_decay_start", "end_lr"), LR_DECAY[model]))
        layer = dict(seqgan.PRIOR_PRESETS[preset], out=out, **decay, **tok_run)
    train_cfg = plumbing.config_from_args(TrainConfig, args, layer)
    shape = plumbing.config_from_args(seqgan.PriorConfig, args, layer)  # the rest: set in main
    cache = train_cfg.token_cache or os.path.join(train_cfg.out, "tokens.pt")
    return replace(train_cfg, token_cache=cache), shape, ckpt, tok_ckpt

def decay_start(train_cfg):
    """The step at which the lr starts to decay: lr_decay_start if below --steps, else half of
    --steps (a classroom run of 20k steps would otherwise never reach Table 10's 50k / 80k)."""
    s, steps = train_cfg.lr_decay_start, train_cfg.steps
    return s if s < steps else steps // 2

def get_lr(step, train_cfg):
    """Table 10: lr until decay_start(), then to end_lr at --steps, AR exponentially, NAR linearly;
    a function of the step alone, so a resumed run stays on the curve."""
    s, T, lr, end = decay_start(train_cfg), train_cfg.steps, train_cfg.lr, train_cfg.end_lr
    frac = min(max(step - s, 0), T - s) / (T - s)
    return lr * (end / lr) ** frac if train_cfg.model == "ar" else lr + (end - lr) * frac

def tokenizer_hash(tok_ckpt):
    """sha1 of what the tokens depend on: the tokenizer config, encoder and codebook. The decoder
    is left out, so a phase-2 checkpoint (same encoder and codebook) shares the phase-1 tokens."""
    decoder = ("dec_attn", "attn_heads", "attn_block", "feature_dim")  # config of the decoder only
    config = {k: v for k, v in tok_ckpt["model_config"].items() if k not in decoder}
    h = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    for k, v in sorted(plumbing.clean_state_dict(tok_ckpt["model"]).items()):
        if k.startswith(("encoder.", "quantizer.")):
            h.update(k.encode() + v.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def split(train_cfg, size):
    """(train, val, class count, the data's identity). Val: the test split of CIFAR-10 or
    Fashion-MNIST; of a folder, every 20th image in sorted order (the same every run), and the
    folder's identity its file names, sizes and mtimes."""
    ds, n_classes = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, size)
    if not isinstance(ds, plumbing.ImageFolder):
        val = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, size, train=False)[0]
        return ds, val, n_classes, f"{train_cfg.data}: {len(ds)} train, {len(val)} val"
    h = hashlib.sha1(b"val = every 20th")
    for p in ds.paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, train_cfg.data)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    train, val = ([i for i in range(len(ds)) if (i % 20 == 0) == v] for v in (False, True))
    sub = torch.utils.data.Subset
    return sub(ds, train), sub(ds, val), n_classes, h.hexdigest()

def token_set(tok, train_ds, val_ds, fingerprint, train_cfg, device, log):
    """The data as code grids (N, h*w) and labels on the device: (train, train labels, val, val
    labels). Rank 0 reuses the cache if its fingerprint matches, else builds it while the others
    wait; a file there that is not a token cache (a checkpoint?) is refused, never overwritten."""
    path, master, cache = train_cfg.token_cache, plumbing.is_master(), None
    if master and os.path.isfile(path):
        try:
            cache = plumbing.load_checkpoint(path, "tokens")
        except SeqganError as e:
            raise SeqganError(f"--token-cache: {e}; give another path (it would be "
                              "overwritten)") from None
        changed = [k for k in fingerprint if cache["fingerprint"].get(k) != fingerprint[k]]
        log(f"token cache {path} is stale ({', '.join(changed)} changed); rebuilding it" if changed
            else f"reusing token cache {path}")
        cache = None if changed else cache
    if master and cache is None:
        log(f"tokenizing the data into {path}")
        cache = dict(kind="tokens", fingerprint=fingerprint)
        dtype = torch.int16 if tok.cfg.n_codes <= 32768 else torch.int32  # half int32's memory
        for name, ds in (("train", train_ds), ("val", val_ds)):
            workers = 0 if isinstance(ds, torch.utils.data.TensorDataset) else train_cfg.num_workers
            loader = torch.utils.data.DataLoader(ds, train_cfg.batch_size, num_workers=workers)
            # fp32, no autocast: the codes are computed once, and bf16 could flip near-tie argmins
            codes, labels = [], []
            for x, y in tqdm(loader, desc=f"tokenizing {name}", leave=False, dynamic_ncols=True):
                x = plumbing.to_input(x, device, tok.cfg.image_size)
                codes.append(tok.tokenize(x).flatten(1).to("cpu", dtype))  # (B, h*w)
                labels.append(y.long())
            cache[name], cache[f"{name}_labels"] = torch.cat(codes), torch.cat(labels)
        plumbing.save_checkpoint(path, cache)
    plumbing.barrier()
    cache = cache if master else plumbing.load_checkpoint(path, "tokens")
    # on the device (CIFAR-10: 6 MB; ImageNet at 16x16: 0.7 GB): no DataLoader in the loop
    return tuple(cache[k].to(device) for k in ("train", "train_labels", "val", "val_labels"))

def check_resume(ckpt, cfg, train_cfg, tok_hash):
    """A resumed prior must keep its tokenizer's codes and its data's classes."""
    saved = seqgan.PriorConfig(**ckpt["model_config"])
    if (saved.n_codes, saved.grid) != (cfg.n_codes, cfg.grid):
        raise SeqganError(f"tokenizer {train_cfg.tokenizer} has {cfg.n_codes} codes and {cfg.grid} "
                          f"tokens per image, but the prior was trained on {saved.n_codes} codes "
                          f"and {saved.grid} tokens")
    if saved.n_classes != cfg.n_classes:
        raise SeqganError(f"--data {train_cfg.data} gives {cfg.n_classes} classes, but the prior "
                          f"was trained with {saved.n_classes}; resume it on the same data")
    if ckpt["tokenizer_hash"] != tok_hash:
        raise SeqganError(f"tokenizer {train_cfg.tokenizer} changed since the prior was trained "
                          "(other encoder or codebook weights); start a new --out")

def build(cfg, train_cfg, ckpt, device):
    """The plain prior, AdamW (Table 10: weight decay 1e-2 on matrices, none on biases and norms)
    and the best validation loss so far: fresh, or as the checkpoint left them."""
    raw_model = seqgan.Prior(cfg).to(device)
    groups = [[p for p in raw_model.parameters() if (p.dim() >= 2) == d] for d in (True, False)]
    opt = torch.optim.AdamW([dict(params=g, weight_decay=wd) for g, wd in zip(groups, (1e-2, 0.0))],
                            lr=train_cfg.lr, betas=(0.9, 0.96), fused=device.type == "cuda")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # (the lr: get_lr(step) before every step)
    return raw_model, opt, ckpt["best_val_loss"] if ckpt else float("inf")

def train_step(model, raw_model, opt, idx, y, cfg, ddp):
    """One AdamW step over this rank's micro-batches idx (accum, B, h*w) and labels y (accum, B) or
    None, then the gradient clip. -> loss and accuracy averaged over the micro-steps, grad norm."""
    opt.zero_grad(set_to_none=True)
    terms, n = torch.zeros(2, device=idx.device), len(idx)
    for micro in range(n):
        if ddp:  # all-reduce in the last backward only
            model.require_backward_grad_sync = micro == n - 1
        with seqgan.autocast(idx.device):
            loss, acc = seqgan.prior_loss(model, cfg, idx[micro].long(),
                                          None if y is None else y[micro])
        (loss / n).backward()  # the mean over the micro-steps; DDP then averages over the ranks
        terms += torch.stack([loss.detach().float(), acc.detach().float()]) / n
    # clip the global gradient norm at 1: not in the paper (nanoGPT's); the same on every rank
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
    opt.step()
    return dict(loss=terms[0], acc=terms[1], grad_norm=grad_norm)

@torch.no_grad()
def evaluate(model, tok, val, val_y, step, train_cfg):
    """Rank 0 alone: validation loss and accuracy over eval_batches (NAR masks from a fixed seed:
    the curve compares), a grid of samples at Table 10's settings (one class per column)."""
    cfg, device, b = model.cfg, val.device, train_cfg.batch_size
    ctx, g = seqgan.autocast(device), torch.Generator(device=device).manual_seed(0)
    model.eval()
    total, n = torch.zeros(2, device=device), min(len(val), train_cfg.eval_batches * b)
    for i in range(0, n, b):
        y = val_y[i:i + b] if cfg.n_classes else None
        with ctx:
            loss, acc = seqgan.prior_loss(model, cfg, val[i:i + b].long(), y, g)
        total += torch.stack([loss, acc]) * len(val[i:i + b])
    nrow = cfg.n_classes * max(1, 8 // cfg.n_classes) if 0 < cfg.n_classes <= 16 else 8
    y = torch.arange(4 * nrow, device=device) % cfg.n_classes if cfg.n_classes else None
    g = torch.Generator(device=device).manual_seed(train_cfg.seed)  # the same draws each time
    with ctx:
        if cfg.causal:
            idx = seqgan.generate_ar(model, 4 * nrow, y, top_p=seqgan.AR_TOP_P, generator=g)
        else:
            idx = seqgan.generate_maskgit(model, 4 * nrow, y, steps=min(seqgan.NAR_STEPS, cfg.grid),
                                          temperature=seqgan.NAR_TEMPERATURE, generator=g)
        x = tok.decode_indices(idx.view(-1, tok.cfg.grid, tok.cfg.grid)).float()
    model.train()
    torchvision.utils.save_image(x, os.path.join(train_cfg.out, f"samples_{step:07d}.png"),
                                 nrow=nrow, normalize=True, value_range=(-1, 1))
    return (total / n).tolist()

def header(raw_model, cfg, n_train, n_val, train_cfg, device, world, step, peak):
    """The run's first log lines: what it trains, and against which peak MFU is measured."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mfu = (f"MFU against a peak of {peak / 1e12:.0f} TFLOP/s (dense bf16, {gpu})" if peak else
           f"MFU n/a: no peak FLOP/s known for {gpu} (plumbing.PEAK_FLOPS)")
    return (f"{train_cfg.model.upper()} prior {plumbing.count_params(raw_model) / 1e6:.2f}M "
            f"({cfg.n_layer} layers, d {cfg.n_embd}, {cfg.n_head} heads) | {train_cfg.data}: "
            f"{n_train} train / {n_val} val grids of {cfg.grid} tokens, K={cfg.n_codes}, "
            f"{cfg.n_classes or 'no'} classes | {plumbing.run_text(train_cfg, device, world, step)}"
            f" | chance loss ln K = {math.log(cfg.n_codes):.3f}\n{mfu}")

def main(argv=None):
    train_cfg, shape, ckpt, tok_ckpt = configure(parse(argv))  # every rank: checks, checkpoints
    ddp, rank, _, world, device = plumbing.setup_distributed(train_cfg.device)
    step = ckpt["step"] if ckpt is not None else 0
    # Dropout and NAR masks differ across ranks and resumes; DDP copies rank 0's weights to all
    torch.manual_seed(train_cfg.seed * 1_000_003 + step + rank)
    tok = plumbing.load_tokenizer(train_cfg.tokenizer, device, ckpt=tok_ckpt)  # frozen, eval
    train_ds, val_ds, n_classes, data_id = split(train_cfg, tok.cfg.image_size)
    cfg = replace(shape, n_codes=tok.cfg.n_codes, grid=tok.cfg.grid ** 2,
                  n_classes=0 if train_cfg.uncond else n_classes, causal=train_cfg.model == "ar")
    tok_hash = tokenizer_hash(tok_ckpt)
    if ckpt is not None:
        check_resume(ckpt, cfg, train_cfg, tok_hash)
    global_batch = plumbing.check_enough_data(len(train_ds), "training images", train_cfg, world)
    path, log = os.path.join(train_cfg.out, "ckpt.pt"), plumbing.run_log(train_cfg.out, rank == 0)
    train, train_y, val, val_y = token_set(tok, train_ds, val_ds, dict(
        tokenizer=tok_hash, data=data_id), train_cfg, device, log)
    raw_model, opt, best_val = build(cfg, train_cfg, ckpt, device)
    model = plumbing.wrap(raw_model, train_cfg.compile, ddp, device)
    peak = plumbing.peak_flops(device)
    plumbing.log_start(log, header(raw_model, cfg, len(train), len(val), train_cfg, device, world,
                                   step, peak), ckpt, train_cfg, world, get_lr)
    log(f"config: {asdict(train_cfg)} {asdict(cfg)} | tokenizer phase {tok_ckpt['phase']}")
    # Batches seeded by (seed, start step): a resumed run does not replay; on the device: no copy
    data_g = torch.Generator(device=device).manual_seed(train_cfg.seed * 1_000_003 + step)
    means, flops = plumbing.RunningMeans(), seqgan.estimate_flops_per_token(cfg)
    for it in tqdm(range(step, train_cfg.steps), initial=step, total=train_cfg.steps,
                   disable=rank != 0):  # it: the step being taken, step: steps done
        lr = get_lr(it, train_cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(train), (global_batch,), device=device, generator=data_g)
        ix = ix.view(train_cfg.grad_accum, world, train_cfg.batch_size)[:, rank]  # this rank's
        means.add(train_step(model, raw_model, opt, train[ix], train_y[ix] if cfg.n_classes else
                             None, cfg, ddp))
        step = it + 1
        last, eval_step = step == train_cfg.steps, step % train_cfg.eval_every == 0
        if step % train_cfg.log_every == 0 or eval_step or last:  # means checked before a save
            m, steps_per_s = means.read(world, step, train_cfg.lr, path)
            tps = steps_per_s * global_batch * cfg.grid
            mfu = f"{flops * tps / (peak * world):.1%}" if peak else "n/a"
            log(f"step {step} | loss {m['loss']:.4f} acc {m['acc']:.3f} | grad norm "
                f"{m['grad_norm']:.3f} | lr {lr:.3e} | {tps:,.0f} tok/s | MFU {mfu}")
        if rank == 0 and (eval_step or last):  # the others wait in the next all-reduce
            vl, va = evaluate(raw_model, tok, val, val_y, step, train_cfg)
            best_val = min(best_val, vl)
            log(f"eval step {step} | val loss {vl:.4f} acc {va:.3f} | best {best_val:.4f}")
            plumbing.save_checkpoint(path, dict(
                kind="prior", step=step, best_val_loss=best_val, model_config=asdict(cfg),
                train_config=asdict(train_cfg), world_size=world, tokenizer_hash=tok_hash,
                tokenizer=os.path.abspath(train_cfg.tokenizer), model=raw_model.state_dict(),
                optimizer=opt.state_dict()))
            means = plumbing.RunningMeans()  # a new window: without the evaluation's time
    log(f"done: {path}")

if __name__ == "__main__":
    plumbing.cli(main)
