"""
Train the SeQ-GAN tokenizer. Phase 1 (semantic compression) then phase 2 (details).

  python train_tokenizer.py --alpha 1.0                                   # phase 1, CIFAR-10, 32 px, one GPU
  python train_tokenizer.py --phase 2 --init out/tokenizer/ckpt.pt        # phase 2 -> out/tokenizer2
  python train_tokenizer.py --preset paper --data /data/ffhq --out out/ffhq   # 256 px, f=16 (Table 7)
  torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset paper --data /data/ffhq \
      --batch-size 32 --out out/ffhq                           # 8 GPUs (DDP): global batch 8 x 32 = 256

CPU smoke run (a minute; random VGG, so only the plumbing is meaningful; real Fashion-MNIST images):
  python train_tokenizer.py --data fashion-mnist --vgg-weights random --channels 16 --code-dim 16 --n-codes 64 \
      --steps 40 --batch-size 8 --gan-start 20 --log-every 10 --eval-every 20 --eval-images 64 --out out/smoke
"""

import argparse
import math
import os
import textwrap
import time
from dataclasses import asdict, dataclass, replace

import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import option


@dataclass
class TrainConfig:
    data: str = option("cifar10", "'cifar10' (torchvision download), 'fashion-mnist', or an image folder "
                                "(searched recursively; class subfolders give labels)")
    data_root: str = option("data", "where CIFAR-10 is downloaded to (and data/fashion-mnist looked for)")
    preset: str = option("classroom", "classroom (32 px, f=4, 8x8 tokens), paper (256 px, f=16, Table 7) or cpu "
                                     "(Fashion-MNIST, a 1.1M tokenizer, 600 steps: 2 CPU cores)")
    phase: int = option(1, "1 = semantic compression; 2 = encoder and codebook frozen, attention decoder, alpha 0")
    init: str = option("", "phase 2 only: the phase-1 checkpoint to start from")
    out: str = option("out/tokenizer", "output folder for ckpt.pt, log.txt and PNG grids (phase 2: out/tokenizer2)")
    steps: int = option(50000, "total training steps")
    batch_size: int = option(64, "images per micro-step and GPU; the global batch is batch_size x grad_accum x processes")
    grad_accum: int = option(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = option(None, "learning rate (default: the paper's, 1e-4 cosine to 5e-5 in phase 1, 5e-5 constant "
                             "in phase 2)")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    backend: str = option("auto", "torch.distributed backend under torchrun: auto (nccl on GPUs, gloo on CPU), "
                                "nccl or gloo")
    compile: bool = option(False, "torch.compile the tokenizer and discriminator (slow start, faster steps)")
    resume: bool = option(False, "continue the run in --out from its ckpt.pt (same phase and config)")
    vgg_weights: str = option("imagenet", "imagenet (torchvision download or torch hub cache), a state-dict PATH, "
                                        "or random (tests only)")
    num_workers: int = option(4, "data-loading processes for image folders")
    log_every: int = option(100, "steps between log lines")
    eval_every: int = option(2000, "steps between evaluation (PSNR, codebook usage), a PNG grid and a checkpoint")
    eval_images: int = option(1000, "held-out images per evaluation (the test split; for a folder, its first images)")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        if self.phase not in (1, 2):
            raise seqgan.SeqganError(f"--phase must be 1 or 2, not {self.phase}")
        if min(self.steps, self.batch_size, self.grad_accum, self.log_every, self.eval_every, self.eval_images) < 1:
            raise seqgan.SeqganError("--steps, --batch-size, --grad-accum, --log-every, --eval-every and --eval-images "
                                     "must be at least 1")


# torch.compile's backend for --compile. The tests set "aot_eager" (the same AOTAutograd graphs, so the
# same double-backward limit that R1 must avoid, compiled in seconds instead of minutes on a CPU).
COMPILE_BACKEND = "inductor"

# The paper's learning rates: phase 1 cosine from 1e-4 to 5e-5, phase 2 constant 5e-5.
PAPER_LR = {1: 1e-4, 2: 5e-5}
PHASE1_END_LR = 5e-5

# Phase 2 (section 3.3): alpha = 0, the discriminator carries on from phase 1 without a new warm-up gap.
PHASE2_DEFAULTS = dict(out="out/tokenizer2", alpha=0.0, gan_start=0, steps=20000)
# ... and a schedule that fits the phase-1 preset: the 2-core `cpu` run is 300 steps at 4x the paper's lr
# (README, "A CPU classroom run"), not 20,000 (the other presets keep the line above).
PHASE2_PRESET_DEFAULTS = {"cpu": dict(steps=300, lr=2e-4)}
# What phase 2 takes from the phase-1 checkpoint: its data and batch, the tokenizer's shape (the encoder
# and codebook are phase 1's), the loss weights and D. Every other field (out, steps, lr, device,
# compile, the Reg-VQ mask and PCL: a deterministic quantizer) takes its phase-2 or dataclass default.
PHASE2_INHERITS = (
    "data", "data_root", "preset", "batch_size", "grad_accum", "vgg_weights", "num_workers", "log_every",
    "eval_every", "eval_images", "seed",
    "image_size", "channels", "ch_mult", "n_res", "n_res_lowest", "n_codes", "code_dim", "beta", "entropy_weight",
    "entropy_temp", "objective", "cosine_codebook", "attn_heads", "attn_block",
    "l1_weight", "perceptual_weight", "perceptual_norm", "perceptual_size", "gan_weight", "gan_warmup", "r1_gamma",
    "r1_every", "disc_channels", "disc_max_channels", "pcl_temp", "teacher_layer")


def parse(argv):
    presets = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in kw.items())
                        for name, kw in seqgan.PRESETS.items())
    epilog = (f"The defaults shown are phase 1 with --preset classroom. Presets replace some of them ({presets}); "
              f"phase 2 takes the phase-1 checkpoint's shape, data and loss weights, then "
              f"{', '.join(f'{k} {v}' for k, v in PHASE2_DEFAULTS.items())} and lr 5e-5"
              + "".join(f" (after --preset {name}: " + ", ".join(f"{k} {v}" for k, v in kw.items()) + ")"
                        for name, kw in PHASE2_PRESET_DEFAULTS.items())
              + ". Flags win over both; the log's config line shows what a run used.")
    p = argparse.ArgumentParser(description=__doc__, epilog=textwrap.fill(epilog, 100),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    plumbing.add_config_args(p, TrainConfig, seqgan.TokenizerConfig, seqgan.LossConfig, defaults=seqgan.PRESETS["classroom"])
    return p.parse_args(argv)


def configure(args):
    """Resolve (train, model, loss) configs. Each field comes from, in rising priority: the dataclass
    default, the preset and the objective's overrides (phase 2: the fields it inherits from phase 1 and
    its own defaults; --resume: the checkpoint), the command line. Then the derived fields."""
    given = vars(args)
    phase, preset = given.get("phase", 1), given.get("preset", "classroom")
    if preset not in seqgan.PRESETS:
        raise seqgan.SeqganError(f"unknown --preset {preset}; choose from {', '.join(seqgan.PRESETS)}")
    objective = given.get("objective", "seqgan")
    if objective not in seqgan.OBJECTIVES:
        raise seqgan.SeqganError(f"unknown --objective {objective}; choose from {', '.join(seqgan.OBJECTIVES)}")
    defaults = dict(seqgan.PRESETS[preset], **seqgan.OBJECTIVES[objective], **(PHASE2_DEFAULTS if phase == 2 else {}))
    ckpt_path = os.path.join(given.get("out", defaults.get("out", TrainConfig.out)), "ckpt.pt")
    ckpt = init = None
    if given.get("resume"):
        ckpt = plumbing.load_checkpoint(ckpt_path, "tokenizer")
        if ckpt["phase"] != phase:
            raise seqgan.SeqganError(f"{ckpt_path} is a phase-{ckpt['phase']} checkpoint; resume it with --phase {ckpt['phase']}")
        for name, saved in {**ckpt["model_config"], **ckpt["loss_config"]}.items():
            if name in given and given[name] != saved:
                raise seqgan.SeqganError(f"{ckpt_path} was trained with --{name.replace('_', '-')} {saved}, not "
                                         f"{given[name]}; drop the flag or start a new --out")
        defaults = {**ckpt["train_config"], **ckpt["model_config"], **ckpt["loss_config"]}
    elif os.path.exists(ckpt_path):
        raise seqgan.SeqganError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
    elif phase == 2:
        init = load_phase1(given)
        saved = {**init["train_config"], **init["model_config"], **init["loss_config"]}
        defaults = {**{name: saved[name] for name in PHASE2_INHERITS}, **PHASE2_DEFAULTS,
                    **PHASE2_PRESET_DEFAULTS.get(saved["preset"], {})}
        if init["model_config"]["feature_dim"]:  # VQ-KD: the pixel decoder and D start from scratch, D warms up
            defaults["gan_start"] = saved["gan_start"]
    train_cfg, model_cfg, loss_cfg = (plumbing.config_from_args(c, args, defaults)
                                      for c in (TrainConfig, seqgan.TokenizerConfig, seqgan.LossConfig))
    if train_cfg.phase == 1 and train_cfg.init:
        raise seqgan.SeqganError("--init is for phase 2 (a phase-1 checkpoint to fine-tune); drop it")
    if train_cfg.phase == 2 and loss_cfg.alpha != 0:
        raise seqgan.SeqganError("phase 2 fine-tunes the decoder with alpha = 0 (section 3.3); drop --alpha")
    # derived: phase 2 has the attention decoder; VQ-KD's phase 1 decodes the teacher's features
    vqkd_features = model_cfg.objective == "vqkd" and train_cfg.phase == 1
    model_cfg = replace(model_cfg, dec_attn=train_cfg.phase == 2,
                        feature_dim=seqgan.VGG_CHANNELS[loss_cfg.teacher_layer] if vqkd_features else 0)
    if train_cfg.lr is None:
        train_cfg = replace(train_cfg, lr=PAPER_LR[train_cfg.phase])
    return train_cfg, model_cfg, loss_cfg, ckpt, init


def load_phase1(given):
    """Phase 2's --init: a phase-1 checkpoint whose encoder and codebook the flags do not contradict."""
    if not given.get("init"):
        raise seqgan.SeqganError("phase 2 needs --init PHASE1_CKPT (the ckpt.pt of a phase-1 run)")
    init = plumbing.load_checkpoint(given["init"], "tokenizer")
    if init["phase"] != 1:
        raise seqgan.SeqganError(f"--init {given['init']} is a phase-{init['phase']} checkpoint; phase 2 starts from phase 1")
    for name, saved in init["model_config"].items():
        if name in given and given[name] != saved and name not in ("attn_heads", "attn_block", "mask_ratio"):
            raise seqgan.SeqganError(f"--init {given['init']} has --{name.replace('_', '-')} {saved}, not {given[name]}; "
                                     "phase 2 keeps the phase-1 encoder and codebook")
    return init


def get_lr(step, train_cfg):
    """Phase 1: cosine decay from lr to 5e-5 (paper); phase 2: constant."""
    if train_cfg.phase == 2:
        return train_cfg.lr
    lr_min = min(train_cfg.lr, PHASE1_END_LR)
    return lr_min + 0.5 * (train_cfg.lr - lr_min) * (1 + math.cos(math.pi * step / train_cfg.steps))


def batches(ds, train_cfg, start_step, device, rank=0, world=1):
    """Endless batches of this rank, one per micro-step. Each epoch one permutation of the data, seeded
    from (seed, start step, epoch) so that a resumed run does not replay, is cut into global batches of
    batch_size x grad_accum x world images; micro-step m of rank r takes slice m * world + r of each
    (DistributedSampler's idea, by batch): 2 ranks x b, or 1 rank x b x 2 micro-steps, see what 1 rank x 2b sees."""
    in_memory = isinstance(ds, torch.utils.data.TensorDataset)
    b, slices = train_cfg.batch_size, train_cfg.grad_accum * world
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + start_step + epoch)
        perm = torch.randperm(len(ds), generator=g).tolist()  # the order shuffle=True draws from the same generator
        mine = [perm[k + (m * world + rank) * b: k + (m * world + rank + 1) * b]
                for k in range(0, len(perm) - slices * b + 1, slices * b) for m in range(train_cfg.grad_accum)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=0 if in_memory else train_cfg.num_workers,
                                             pin_memory=device.type == "cuda")
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate(model, val, train_cfg, model_cfg, device, ctx):
    """PSNR and codebook usage over the held-out images (usage = distinct codes over the whole pass)."""
    model.eval()
    counts = torch.zeros(model_cfg.n_codes, device=device, dtype=torch.long)
    total, n, first = 0.0, 0, None
    loader = torch.utils.data.DataLoader(val, train_cfg.batch_size, shuffle=False)
    for xb, _ in loader:
        x = plumbing.to_input(xb, device, model_cfg.image_size)[: train_cfg.eval_images - n]
        with ctx:
            x_hat, idx, _ = model(x)
        seqgan.count_codes(counts, idx)
        n += len(x)
        if not model_cfg.feature_dim:  # VQ-KD phase 1 outputs features: no pixels to compare or show
            x_hat = x_hat.float().clamp(-1, 1)
            total += seqgan.psnr(x_hat, x) * len(x)
            first = (x[:8], x_hat[:8]) if first is None else first
        if n >= train_cfg.eval_images:
            break
    model.train()
    usage, ppl = seqgan.codebook_usage(counts)
    return dict(psnr=float(total / n) if not model_cfg.feature_dim else float("nan"), usage=usage.item(), perplexity=ppl.item()), first


def load_data(train_cfg, model_cfg, world):
    """The training images and the held-out images evaluate() scores (an image folder: its first images)."""
    ds, _ = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, model_cfg.image_size, train=True)
    plumbing.check_enough_data(len(ds), "images", train_cfg, world)
    if train_cfg.data in ("cifar10", "fashion-mnist"):
        val, _ = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, model_cfg.image_size, train=False)
    else:
        val = ds  # an image folder has no split: evaluate on its first images
    return ds, torch.utils.data.Subset(val, range(min(train_cfg.eval_images, len(val))))


def build(train_cfg, model_cfg, loss_cfg, ckpt, init, device):
    """The plain tokenizer and discriminator with their optimizers, and the step to start from: fresh,
    from phase 1's weights (phase 2) or as the checkpoint left them (--resume)."""
    raw_model = seqgan.Tokenizer(model_cfg)
    raw_disc = seqgan.Discriminator(model_cfg.image_size, loss_cfg.disc_channels, loss_cfg.disc_max_channels)
    if init is not None:  # phase 2: phase-1 weights; the new attention layers (VQ-KD: the decoder) start fresh
        keep = ("encoder.", "quantizer.") if init["model_config"]["feature_dim"] else ("encoder.", "quantizer.", "decoder.")
        weights = {k: v for k, v in plumbing.clean_state_dict(init["model"]).items() if k.startswith(keep)}
        missing, unexpected = raw_model.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith("decoder.") for k in missing), (missing, unexpected)
        raw_disc.load_state_dict(plumbing.clean_state_dict(init["disc"]))
    if train_cfg.phase == 2:
        raw_model.encoder.requires_grad_(False)
        raw_model.quantizer.requires_grad_(False)
    raw_model.to(device)
    raw_disc.to(device)
    fused = dict(fused=True) if device.type == "cuda" else {}
    betas = (0.9, 0.99) if train_cfg.phase == 1 else (0.5, 0.9)  # paper: phase 1 / phase 2
    opt_g = torch.optim.Adam([p for p in raw_model.parameters() if p.requires_grad], lr=train_cfg.lr, betas=betas, **fused)
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=train_cfg.lr, betas=(0.0, 0.99), **fused)
    step = 0
    if ckpt is not None:
        raw_model.load_state_dict(plumbing.clean_state_dict(ckpt["model"]))
        raw_disc.load_state_dict(plumbing.clean_state_dict(ckpt["disc"]))
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
    return raw_model, raw_disc, opt_g, opt_d, step


def perceptual_loss(train_cfg, model_cfg, loss_cfg, device):
    """The frozen VGG16 loss (Eq. 3; also PCL's and VQ-KD's features), never wrapped in DDP: it has nothing
    to synchronise. None when no term uses it (--perceptual-weight 0 without PCL or VQ-KD): quick CPU
    ablations need no VGG16 at all."""
    if not (loss_cfg.perceptual_weight > 0 or loss_cfg.pcl_weight > 0 or model_cfg.feature_dim):
        return None
    vgg = seqgan.load_vgg16(train_cfg.vgg_weights)
    return seqgan.PerceptualLoss(loss_cfg.alpha, vgg, loss_cfg.perceptual_norm, loss_cfg.perceptual_size).to(device)


def header(raw_model, raw_disc, n_images, train_cfg, model_cfg, loss_cfg, device, world, step):
    """The run's first log line."""
    return (f"phase {train_cfg.phase} | {train_cfg.data} ({n_images} images) | device {device}"
            f"{f' x {world} processes' if world > 1 else ''} | tokenizer {plumbing.count_params(raw_model) / 1e6:.2f}M "
            f"({plumbing.count_params(raw_model, trainable=True) / 1e6:.2f}M trained), D "
            f"{plumbing.count_params(raw_disc) / 1e6:.2f}M | {model_cfg.grid}x{model_cfg.grid} tokens, "
            f"K={model_cfg.n_codes} | alpha {loss_cfg.alpha} | global batch "
            f"{plumbing.batch_text(train_cfg.batch_size, train_cfg.grad_accum, world)} | start step {step}")


def d_step(disc, opt_d, xs, x_hats, loss_cfg, step, ddp):
    """One discriminator step over the G step's micro-batches and their detached reconstructions;
    -> the detached terms of seqgan.d_backward (d_loss, r1, d_real, d_fake), averaged over the micro-steps."""
    accum, terms = len(xs), {}
    opt_d.zero_grad(set_to_none=True)
    for micro in range(accum):
        if ddp:
            disc.require_backward_grad_sync = micro == accum - 1
        for name, value in seqgan.d_backward(disc, xs[micro], x_hats[micro], loss_cfg, step, 1 / accum).items():
            terms[name] = terms.get(name, 0) + value / accum
    opt_d.step()
    return terms


def log_step(log, bar, vals, counts, step, gan_w, lr, ips):
    """The interval's log line: every named term, the entropy as a fraction of log K, code usage (the
    counts are summed over the ranks, then reset), the GAN weight, lr and speed. Under DDP the entropy
    term is of each rank's batch, averaged over the ranks: the quantizer's soft usage is a mean over the
    rank's own positions, not over the global batch."""
    usage, ppl = seqgan.codebook_usage(plumbing.all_reduce_sum(counts))
    log(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
        + f" | H/logK {vals['entropy'] / math.log(len(counts)):.3f}"
        + f" | usage {usage.item():.3f} ppl {ppl.item():.1f} | gan_w {gan_w:.3f} lr {lr:.2e} | {ips:.1f} img/s")
    bar.set_postfix(l1=f"{vals['l1']:.3f}", usage=f"{usage.item():.2f}", ips=f"{ips:.0f}")
    counts.zero_()


def eval_and_save(raw_model, val, step, train_cfg, model_cfg, device, ctx, log, save):
    """Rank 0 alone, on the plain model (no collective inside): PSNR and codebook usage, a PNG of inputs
    over reconstructions, a checkpoint. The other ranks wait for it in the next gradient all-reduce."""
    metrics, first = evaluate(raw_model, val, train_cfg, model_cfg, device, ctx)
    used = round(metrics["usage"] * model_cfg.n_codes)
    log(f"eval step {step} | PSNR {metrics['psnr']:.2f} dB | usage {metrics['usage']:.3f} "
        f"({used}/{model_cfg.n_codes} codes) | perplexity {metrics['perplexity']:.1f}")
    if metrics["usage"] < 0.1:
        log(f"warning: only {used}/{model_cfg.n_codes} codes used; raise --entropy-weight or lower --entropy-temp")
    if first is not None:  # top row inputs, bottom row reconstructions
        torchvision.utils.save_image(torch.cat(first), os.path.join(train_cfg.out, f"recon_{step:07d}.png"),
                                     nrow=len(first[0]), normalize=True, value_range=(-1, 1))
    save()


def main(argv=None):
    train_cfg, model_cfg, loss_cfg, ckpt, init = configure(parse(argv))  # every rank: the checks, the checkpoint
    ddp, rank, _, world, device = plumbing.setup_distributed(train_cfg.device, train_cfg.backend)
    master = rank == 0  # logs, evaluates, writes grids and checkpoints; the others only train
    # A seed offset per rank: Reg-VQ's stochastic masks differ across ranks. The ranks' different initial
    # weights do not matter: DDP copies rank 0's to all at the wrap (the random VGG has its own seed).
    torch.manual_seed(train_cfg.seed + rank)
    torch.backends.cudnn.benchmark = True
    ctx = seqgan.autocast(device)
    ds, val = load_data(train_cfg, model_cfg, world)
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * world  # images per optimizer step, all ranks
    perceptual = perceptual_loss(train_cfg, model_cfg, loss_cfg, device)
    raw_model, raw_disc, opt_g, opt_d, step = build(train_cfg, model_cfg, loss_cfg, ckpt, init, device)
    if step:  # a resumed run draws new Reg-VQ masks, not a replay of the first steps' (train_prior.py's seeding)
        torch.manual_seed(train_cfg.seed * 1_000_003 + step + rank)
    # model and disc are what the steps run: compiled, then wrapped in DDP (nanoGPT). raw_model and raw_disc
    # are the plain modules, for checkpoints and evaluation. DDP keeps only parameters that require grad in
    # sync: in phase 2 the decoder's (encoder and codebook are frozen); in phase 1 every parameter gets a
    # gradient, as DDP needs without find_unused_parameters. G's adversarial term runs the module inside
    # disc's DDP wrapper (seqgan.tokenizer_loss).
    model = torch.compile(raw_model, backend=COMPILE_BACKEND) if train_cfg.compile else raw_model
    disc = torch.compile(raw_disc, backend=COMPILE_BACKEND) if train_cfg.compile else raw_disc
    if ddp:
        model, disc = DDP(model, device_ids=plumbing.ddp_ids(device)), DDP(disc, device_ids=plumbing.ddp_ids(device))

    ckpt_path, log = os.path.join(train_cfg.out, "ckpt.pt"), plumbing.run_log(train_cfg.out, master)
    plumbing.log_start(log, header(raw_model, raw_disc, len(ds), train_cfg, model_cfg, loss_cfg, device, world, step),
                     ckpt, train_cfg, world, get_lr)
    log(f"config: {asdict(train_cfg)} {asdict(model_cfg)} {asdict(loss_cfg)}")
    if loss_cfg.gan_weight > 0 and loss_cfg.gan_start >= train_cfg.steps and not model_cfg.feature_dim:
        log(f"warning: --gan-start {loss_cfg.gan_start} >= --steps {train_cfg.steps}: the discriminator never trains "
            "in this run; pass more --steps (or a smaller --gan-start) for the GAN term")

    def save():
        plumbing.save_checkpoint(ckpt_path, dict(kind="tokenizer", phase=train_cfg.phase, step=step, world_size=world,
                                               model_config=asdict(model_cfg), loss_config=asdict(loss_cfg),
                                               train_config=asdict(train_cfg), model=raw_model.state_dict(),
                                               disc=raw_disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict()))

    data = batches(ds, train_cfg, step, device, rank, world)
    means = plumbing.RunningMeans()  # the named terms, read back once per log interval
    counts = torch.zeros(model_cfg.n_codes, device=device, dtype=torch.long)  # code usage, likewise
    t0, zero, accum = time.time(), torch.zeros((), device=device), train_cfg.grad_accum
    # the with-block closes the bar on an error too, so the error line stands on its own
    with tqdm(total=train_cfg.steps, initial=step, desc=f"phase {train_cfg.phase}", dynamic_ncols=True, disable=not master) as bar:
        while step < train_cfg.steps:
            lr = get_lr(step, train_cfg)
            for group in opt_g.param_groups + opt_d.param_groups:
                group["lr"] = lr

            # G: the micro-steps add up the gradient of the global batch, each loss divided by their
            # number; DDP all-reduces in the last one's backward only (seqgan, "distributed").
            gan_w = seqgan.gan_weight_at(step, loss_cfg) if not model_cfg.feature_dim else 0.0
            opt_g.zero_grad(set_to_none=True)
            xs, x_hats = [], []
            for micro in range(accum):
                x = plumbing.to_input(next(data)[0], device, model_cfg.image_size)
                if ddp:
                    model.require_backward_grad_sync = micro == accum - 1
                with ctx:
                    x_hat, idx, q = model(x)
                    loss, terms = seqgan.tokenizer_loss(x, x_hat, q, loss_cfg, train_cfg.phase, gan_w, disc, perceptual,
                                                        vqkd=bool(model_cfg.feature_dim))
                (loss / accum).backward()
                means.add(terms, 1 / accum)
                seqgan.count_codes(counts, idx)
                xs.append(x)
                x_hats.append(x_hat.detach())
            opt_g.step()

            # D, on the same micro-batches and the detached reconstructions
            if step >= loss_cfg.gan_start and not model_cfg.feature_dim:
                means.add(d_step(disc, opt_d, xs, x_hats, loss_cfg, step, ddp))
            else:
                means.add(dict(d_loss=zero, r1=zero, d_real=zero, d_fake=zero))
            means.steps += 1
            step += 1
            bar.update(1)

            # an eval step is a log step too: its checkpoint is written only after the means were found finite
            if step % train_cfg.log_every == 0 or step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                ips = means.steps * global_batch / (time.time() - t0)
                log_step(log, bar, means.read(world, step, train_cfg.lr, ckpt_path), counts, step, gan_w, lr, ips)
                t0 = time.time()
            if master and (step % train_cfg.eval_every == 0 or step == train_cfg.steps):
                eval_and_save(raw_model, val, step, train_cfg, model_cfg, device, ctx, log, save)
                t0 = time.time()
    log(f"done: {ckpt_path}")
    plumbing.teardown()


if __name__ == "__main__":
    plumbing.cli(main)
