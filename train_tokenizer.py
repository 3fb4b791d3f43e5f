"""
Train the SeQ-GAN tokenizer: phase 1 (semantic compression, alpha 1, Section 3.3), then phase 2
(details: encoder and codebook frozen, an attention decoder, alpha 0, Section 3.4). Paper scale
per data set (Table 9): README. Defaults: the dataclasses' < the preset's < the flags; phase 2's
preset is the phase-1 run's config with PHASE2's changes, --resume's the checkpoint's config.

  python train_tokenizer.py                                         # phase 1: CIFAR-10, 32 px
  python train_tokenizer.py --phase 2 --init out/tokenizer/ckpt.pt  # phase 2 -> out/tokenizer2
  torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset paper --data /data/imagenet \
      --batch-size 32 --steps 500000 --out out/imagenet     # Table 9, ImageNet: global batch 256
  python train_tokenizer.py --preset cpu --vgg-weights random --steps 40 --gan-start 20 \
      --log-every 10 --eval-every 20 --out out/smoke        # CPU smoke run (random VGG16)
"""

import argparse
import math
import os
import textwrap
import time
from dataclasses import asdict, dataclass, replace

import torch
import torchvision
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import SeqganError, option

@dataclass
class TrainConfig:
    data: str = option("cifar10", "cifar10, fashion-mnist or an image folder (subfolders: classes)")
    data_root: str = option("data", "where CIFAR-10 is downloaded and fashion-mnist looked for")
    preset: str = option("classroom", "classroom (32 px, f=4), paper (256 px, f=16, Table 7), cpu")
    phase: int = option(1, "1 = semantic compression, 2 = details (frozen encoder and codebook)")
    init: str = option("", "phase 2: the phase-1 ckpt.pt to start from")
    out: str = option("out/tokenizer", "folder for ckpt.pt, log.txt and the PNG grids")
    steps: int = option(50000, "training steps")
    batch_size: int = option(64, "images per micro-step and process; the global batch (x accum x "
                                 "processes) of Table 9: ImageNet 256, FFHQ 64")
    grad_accum: int = option(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = option(1e-4, "learning rate; phase 1 decays it by a cosine to 5e-5 (Table 9)")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    compile: bool = option(False, "torch.compile the tokenizer and discriminator")
    resume: bool = option(False, "continue the run in --out from its ckpt.pt")
    vgg_weights: str = option("imagenet", "imagenet, a VGG16 state-dict PATH, or random (tests)")
    num_workers: int = option(4, "data-loading processes for an image folder")
    log_every: int = option(100, "steps between log lines")
    eval_every: int = option(2000, "steps between evaluations, PNG grids and checkpoints")
    eval_images: int = option(1000, "held-out images per evaluation (a folder: its first ones)")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        if self.phase not in (1, 2):
            raise SeqganError(f"--phase must be 1 or 2, not {self.phase}")
        plumbing.at_least_one(self, "steps", "batch_size", "grad_accum", "log_every",
                              "eval_every", "eval_images")

CONFIGS = (TrainConfig, seqgan.TokenizerConfig, seqgan.LossConfig)
FLAGS = ("data", "preset", "phase", "init", "out", "steps", "batch_size", "grad_accum", "lr",
         "device", "compile", "resume", "vgg_weights", "num_workers", "log_every", "eval_every",
         "eval_images", "seed", "image_size", "channels", "n_codes", "code_dim", "entropy_weight",
         "objective", "dec_attn", "alpha", "perceptual_weight", "gan_weight", "gan_start",
         "disc_channels")
# Presets: shape and run. Perceptual weight 0.1 at 32 px, where VGG16's relu5_3 is 2x2 and L_sem's
# image gradient ~30x L1's with almost no spatial information (README); 1 at 256 px.
PRESETS = {
    "classroom": dict(perceptual_weight=0.1),
    # Table 7: channels 128-128-256-256-512, f = 16 at 256 px, 16x16 tokens; batch 64 per process
    "paper": dict(image_size=256, channels=128, ch_mult=(1, 1, 2, 2, 4), attn_block=8,
                  perceptual_weight=1.0, r1_gamma=1.0, gan_start=50000, disc_channels=64),
    # 2 CPU cores, Fashion-MNIST: 1.1M parameters, K = 256 codes of 32-d, D from step 400 of 600,
    # lr 4e-4 (ours: 4x the paper's, cosine to 5e-5); about 11 images/s (README)
    "cpu": dict(data="fashion-mnist", channels=32, code_dim=32, n_codes=256, batch_size=16,
                steps=600, lr=4e-4, perceptual_weight=0.1, gan_start=400, gan_warmup=100,
                disc_channels=32, log_every=50, eval_every=300, eval_images=500, num_workers=0),
}
OBJECTIVES = {  # changes to the preset (README, "Choices the paper leaves open")
    "seqgan": dict(),  # this paper: alpha = 1, then a phase-2 decoder with alpha = 0
    # Reg-VQ on a VQGAN-like base (alpha = 0); mask 0.4 and PCL weight 0.1 are ours; tau 0.01,
    # measured: at tau 1 or 0.1 a young codebook's softmax(-D / tau) is uniform
    "regvq": dict(alpha=0.0, mask_ratio=0.4, pcl_weight=0.1, entropy_temp=0.01),
    "vqkd": dict(cosine_codebook=True),  # phase 1 reconstructs VGG16 relu5_3 (teacher_layer)
}
# Phase 2's changes to the phase-1 run's config. The paper's: alpha 0, lr 5e-5 constant, the
# attention decoder. Ours: D carries on without a new warm-up gap; a deterministic quantizer.
PHASE2 = dict(out="out/tokenizer2", lr=5e-5, alpha=0.0, dec_attn=1, gan_start=0,
              mask_ratio=0.0, pcl_weight=0.0)
# Phase 2's length by preset: Table 9's 200k for the paper, with the batch halved (ImageNet 256 ->
# 128, FFHQ 64 -> 32); ours for classroom and cpu (README's 2-core run)
PHASE2_PRESETS = {"classroom": dict(steps=20_000), "paper": dict(steps=200_000),
                  "cpu": dict(steps=300, lr=2e-4)}
PHASE1_END_LR = 5e-5  # Table 9: phase 1's cosine ends here
COMPILE_BACKEND = "inductor"  # the tests' aot_eager: the same R1 limit, compiled in seconds

def parse(argv):
    def kv(d):
        return ", ".join(f"{k} {v}" for k, v in d.items())
    classroom, paper, cpu = PHASE2_PRESETS.values()
    epilog = (f"Phase 2's preset: the phase-1 run's config with {kv(PHASE2)}; then classroom: "
              f"{kv(classroom)} (ours); paper: {kv(paper)}, the batch halved (Table 9); cpu: "
              f"{kv(cpu)} (ours).")
    p = argparse.ArgumentParser(description=__doc__, epilog=textwrap.fill(epilog, 100),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    plumbing.add_config_args(p, *CONFIGS, flags=FLAGS, defaults=PRESETS["classroom"])
    return p.parse_args(argv)

def configure(args):
    """(train, model, loss) configs, the checkpoint --resume continues and phase 2's --init, in
    three layers: dataclass < preset < command line. The preset layer: PRESETS + OBJECTIVES in
    phase 1, phase2_preset() in phase 2, the checkpoint's config with --resume."""
    given = vars(args)
    phase, preset = given.get("phase", 1), given.get("preset", "classroom")
    objective = given.get("objective", "seqgan")
    for name, value, table in (("preset", preset, PRESETS), ("objective", objective, OBJECTIVES)):
        if value not in table:
            raise SeqganError(f"unknown --{name} {value}; choose from {', '.join(table)}")
    out = given.get("out", PHASE2["out"] if phase == 2 else TrainConfig.out)
    ckpt, init = plumbing.run_checkpoint(out, given.get("resume"), "tokenizer"), None
    if ckpt is not None:
        if ckpt["phase"] != phase:
            raise SeqganError(f"{os.path.join(out, 'ckpt.pt')} is a phase-{ckpt['phase']} "
                              f"checkpoint; resume it with --phase {ckpt['phase']}")
        saved = {**ckpt["model_config"], **ckpt["loss_config"]}
        plumbing.refuse_changes(given, saved, saved, os.path.join(out, "ckpt.pt"))
        layer = {**ckpt["train_config"], **saved}
    elif phase == 2:
        init, layer = phase2_preset(given)
    else:
        layer = {**PRESETS[preset], **OBJECTIVES[objective]}
    train_cfg, model_cfg, loss_cfg = (plumbing.config_from_args(c, args, layer) for c in CONFIGS)
    if train_cfg.phase == 1 and train_cfg.init:
        raise SeqganError("--init is for phase 2 (a phase-1 checkpoint to fine-tune); drop it")
    if train_cfg.phase == 2 and loss_cfg.alpha != 0:
        raise SeqganError("phase 2 fine-tunes the decoder with alpha = 0 (Section 3.4); "
                          "drop --alpha")
    vqkd = model_cfg.objective == "vqkd" and train_cfg.phase == 1  # decodes the teacher's features
    feature_dim = seqgan.VGG_CHANNELS[loss_cfg.teacher_layer] if vqkd else 0
    return train_cfg, replace(model_cfg, feature_dim=feature_dim), loss_cfg, ckpt, init

def phase2_preset(given):
    """Phase 2's --init, a phase-1 checkpoint the flags must not contradict (phase 2 may add
    attention layers, not drop them), and its preset layer: the phase-1 run's config (data, shape,
    objective, D, loss weights; not device, compile, resume) with PHASE2's changes."""
    if not given.get("init"):
        raise SeqganError("phase 2 needs --init PHASE1_CKPT (the ckpt.pt of a phase-1 run)")
    init = plumbing.load_checkpoint(given["init"], "tokenizer")
    if init["phase"] != 1:
        raise SeqganError(f"--init {given['init']} is a phase-{init['phase']} checkpoint; phase 2 "
                          "starts from phase 1")
    for name, value in init["model_config"].items():
        more_attn = name == "dec_attn" and given.get(name, 0) > value
        if name in given and given[name] != value and not more_attn:
            raise SeqganError(f"--init {given['init']} has --{name.replace('_', '-')} {value}, not "
                              f"{given[name]}; phase 2 keeps the phase-1 encoder and codebook")
    saved = {**init["train_config"], **init["model_config"], **init["loss_config"]}
    layer = {k: v for k, v in saved.items() if k not in ("device", "compile", "resume")}
    layer.update(PHASE2, **PHASE2_PRESETS[saved["preset"]])
    layer["dec_attn"] = max(PHASE2["dec_attn"], saved["dec_attn"])  # a phase 1 with attention
    if saved["preset"] == "paper":  # Table 9 halves the batch
        layer["batch_size"] = max(1, saved["batch_size"] // 2)
    if saved["feature_dim"]:  # VQ-KD: D never trained in phase 1 (no pixels), so it warms up
        layer["gan_start"] = saved["gan_start"]
    return init, layer

def get_lr(step, train_cfg):
    """Phase 1: cosine decay from lr to 5e-5 (Table 9); phase 2: constant."""
    if train_cfg.phase == 2:
        return train_cfg.lr
    lr_min = min(train_cfg.lr, PHASE1_END_LR)
    return lr_min + 0.5 * (train_cfg.lr - lr_min) * (1 + math.cos(math.pi * step / train_cfg.steps))

def batches(ds, train_cfg, start_step, device, rank=0, world=1):
    """Endless batches of this rank, one per micro-step. Each epoch a permutation seeded by (seed,
    start step, epoch), so a resumed run does not replay, is cut into global batches; micro-step m
    of rank r takes slice m * world + r of each (DistributedSampler's idea, by batch): 2 ranks x b,
    or 1 rank x b x 2 micro-steps, see what 1 rank x 2b sees."""
    b, slices, epoch = train_cfg.batch_size, train_cfg.grad_accum * world, 0
    workers = 0 if isinstance(ds, torch.utils.data.TensorDataset) else train_cfg.num_workers
    while True:
        g = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + start_step + epoch)
        perm = torch.randperm(len(ds), generator=g).tolist()  # as shuffle=True draws it
        mine = [perm[k + (m * world + rank) * b: k + (m * world + rank + 1) * b]
                for k in range(0, len(perm) - slices * b + 1, slices * b)
                for m in range(train_cfg.grad_accum)]
        yield from torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=workers,
                                               pin_memory=device.type == "cuda")
        epoch += 1

def load_data(train_cfg, model_cfg, world):
    """The training images, and the held-out ones eval_and_save() scores (a folder: its first)."""
    ds, _ = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, model_cfg.image_size)
    plumbing.check_enough_data(len(ds), "images", train_cfg, world)
    val = ds  # an image folder has no split
    if train_cfg.data in ("cifar10", "fashion-mnist"):
        val, _ = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, model_cfg.image_size,
                                       train=False)
    return ds, torch.utils.data.Subset(val, range(min(train_cfg.eval_images, len(val))))

def build(train_cfg, model_cfg, loss_cfg, ckpt, init, device):
    """The plain tokenizer and D with their optimizers, the step to start from (fresh, phase 1's
    weights or --resume's) and the frozen VGG16 loss of Eq. 3 (PCL's and VQ-KD's features too;
    None when no term uses it); it has nothing to synchronise, so it is never wrapped in DDP."""
    model = seqgan.Tokenizer(model_cfg)
    disc = seqgan.Discriminator(model_cfg.image_size, loss_cfg.disc_channels,
                                loss_cfg.disc_max_channels)
    if init is not None:  # phase 2: phase 1's weights; new attention layers (VQ-KD: decoder) fresh
        vqkd = init["model_config"]["feature_dim"]
        keep = ("encoder.", "quantizer.") if vqkd else ("encoder.", "quantizer.", "decoder.")
        weights = plumbing.clean_state_dict(init["model"])
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in weights.items() if k.startswith(keep)}, strict=False)
        assert not unexpected and all(k.startswith("decoder.") for k in missing), missing
        disc.load_state_dict(plumbing.clean_state_dict(init["disc"]))
    if train_cfg.phase == 2:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    model.to(device)
    disc.to(device)
    fused = dict(fused=True) if device.type == "cuda" else {}
    betas = (0.9, 0.99) if train_cfg.phase == 1 else (0.5, 0.9)  # Section 4.1: phase 1 / phase 2
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr,
                             betas=betas, **fused)
    # D's Adam: betas (0, 0.99) at G's lr, ours (MaskGIT's and StyleGAN2's betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=train_cfg.lr, betas=(0.0, 0.99), **fused)
    if ckpt is not None:  # --resume: all as the checkpoint left it
        model.load_state_dict(plumbing.clean_state_dict(ckpt["model"]))
        disc.load_state_dict(plumbing.clean_state_dict(ckpt["disc"]))
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
    perceptual = None
    if loss_cfg.perceptual_weight > 0 or loss_cfg.pcl_weight > 0 or model_cfg.feature_dim:
        perceptual = seqgan.PerceptualLoss(loss_cfg.alpha, seqgan.load_vgg16(train_cfg.vgg_weights),
                                           loss_cfg.perceptual_norm, loss_cfg.perceptual_size)
        perceptual.to(device)
    return model, disc, opt_g, opt_d, ckpt["step"] if ckpt else 0, perceptual

def header(model, disc, n_images, cfgs, device, world, step):
    """The run's first log line."""
    train_cfg, model_cfg, loss_cfg = cfgs
    millions = [plumbing.count_params(model) / 1e6, plumbing.count_params(model, True) / 1e6,
                plumbing.count_params(disc) / 1e6]
    batch = plumbing.batch_text(train_cfg.batch_size, train_cfg.grad_accum, world)
    return (f"phase {train_cfg.phase} | {train_cfg.data} ({n_images} images) | device {device}"
            f"{f' x {world} processes' if world > 1 else ''} | tokenizer {millions[0]:.2f}M "
            f"({millions[1]:.2f}M trained), D {millions[2]:.2f}M | {model_cfg.grid}x"
            f"{model_cfg.grid} tokens, K={model_cfg.n_codes} | alpha {loss_cfg.alpha} | "
            f"global batch {batch} | start step {step}")

def train_step(model, disc, opt_g, opt_d, xs, step, cfgs, perceptual, ddp):
    """One step of G, then of D on the detached reconstructions (from gan_start on), over this
    rank's micro-batches xs: each loss divided by their number, DDP's all-reduce in the last
    backward only. -> the terms averaged over the micro-steps, the code indices, the GAN weight."""
    train_cfg, model_cfg, loss_cfg = cfgs
    vqkd, n = bool(model_cfg.feature_dim), len(xs)  # VQ-KD's phase 1: features, no pixels for D
    gan_w = 0.0 if vqkd else seqgan.gan_weight_at(step, loss_cfg)
    terms, x_hats, idxs = {}, [], []
    opt_g.zero_grad(set_to_none=True)
    for micro, x in enumerate(xs):
        if ddp:
            model.require_backward_grad_sync = micro == n - 1
        with seqgan.autocast(x.device):
            x_hat, idx, q = model(x)
            loss, t = seqgan.tokenizer_loss(x, x_hat, q, loss_cfg, train_cfg.phase, gan_w, disc,
                                            perceptual, vqkd=vqkd)
        (loss / n).backward()
        terms = {k: terms.get(k, 0) + v.detach().float() / n for k, v in t.items()}
        x_hats.append(x_hat.detach())
        idxs.append(idx)
    opt_g.step()
    zero = torch.zeros((), device=xs[0].device)
    d_terms = dict(d_loss=zero, r1=zero, d_real=zero, d_fake=zero)
    if step >= loss_cfg.gan_start and not vqkd:
        opt_d.zero_grad(set_to_none=True)
        for micro, (x, x_hat) in enumerate(zip(xs, x_hats)):
            if ddp:
                disc.require_backward_grad_sync = micro == n - 1
            t = seqgan.d_backward(disc, x, x_hat, loss_cfg, step, 1 / n)
            d_terms = {k: d_terms[k] + v / n for k, v in t.items()}
        opt_d.step()
    return {**terms, **d_terms}, idxs, gan_w

def log_step(log, bar, vals, counts, step, gan_w, lr, ips):
    """The interval's log line: every term, the entropy as a fraction of log K, code usage (counts
    summed over the ranks, then reset), GAN weight, lr, speed. Under DDP the entropy is of each
    rank's batch, averaged over the ranks (the soft usage is a mean over the rank's positions)."""
    usage, ppl = seqgan.codebook_usage(plumbing.all_reduce_sum(counts))
    log(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
        + f" | H/logK {vals['entropy'] / math.log(len(counts)):.3f} | usage {usage.item():.3f} "
        f"ppl {ppl.item():.1f} | gan_w {gan_w:.3f} lr {lr:.2e} | {ips:.1f} img/s")
    bar.set_postfix(l1=f"{vals['l1']:.3f}", usage=f"{usage.item():.2f}", ips=f"{ips:.0f}")
    counts.zero_()

@torch.no_grad()
def eval_and_save(model, val, step, cfgs, log, save):
    """Rank 0 alone, on the plain model (no collective inside): PSNR and code usage (distinct codes
    over the pass) of the held-out images, a PNG of inputs over reconstructions, a checkpoint."""
    train_cfg, model_cfg, _ = cfgs
    device, K = next(model.parameters()).device, model_cfg.n_codes
    counts, total, grid = torch.zeros(K, device=device, dtype=torch.long), 0.0, None
    model.eval()
    for xb, _ in torch.utils.data.DataLoader(val, train_cfg.batch_size):
        x = plumbing.to_input(xb, device, model_cfg.image_size)
        with seqgan.autocast(device):
            x_hat, idx, _ = model(x)
        seqgan.count_codes(counts, idx)
        if not model_cfg.feature_dim:  # VQ-KD's phase 1 decodes features: no pixels
            x_hat = x_hat.float().clamp(-1, 1)
            total += seqgan.psnr(x_hat, x) * len(x)
            grid = torch.cat([x[:8], x_hat[:8]]) if grid is None else grid
    model.train()
    usage, ppl = (v.item() for v in seqgan.codebook_usage(counts))
    psnr, used = float(total / len(val)) if grid is not None else float("nan"), round(usage * K)
    log(f"eval step {step} | PSNR {psnr:.2f} dB | usage {usage:.3f} ({used}/{K} codes) | "
        f"perplexity {ppl:.1f}")
    if usage < 0.1:
        log(f"warning: only {used}/{K} codes used; raise --entropy-weight")
    if grid is not None:  # top row inputs, bottom row reconstructions
        torchvision.utils.save_image(grid, os.path.join(train_cfg.out, f"recon_{step:07d}.png"),
                                     nrow=len(grid) // 2, normalize=True, value_range=(-1, 1))
    save()

def main(argv=None):
    train_cfg, model_cfg, loss_cfg, ckpt, init = configure(parse(argv))  # every rank: the checks
    cfgs = train_cfg, model_cfg, loss_cfg
    ddp, rank, _, world, device = plumbing.setup_distributed(train_cfg.device)
    # A seed per rank: Reg-VQ's masks differ across ranks; DDP copies rank 0's weights to all
    torch.manual_seed(train_cfg.seed + rank)
    torch.backends.cudnn.benchmark = True
    ds, val = load_data(train_cfg, model_cfg, world)
    raw_model, raw_disc, opt_g, opt_d, step, perceptual = build(*cfgs, ckpt, init, device)
    if step:  # a resumed run draws new Reg-VQ masks, not a replay of the first steps'
        torch.manual_seed(train_cfg.seed * 1_000_003 + step + rank)
    model, disc = (plumbing.wrap(m, train_cfg.compile, ddp, device, COMPILE_BACKEND)
                   for m in (raw_model, raw_disc))
    path, log = os.path.join(train_cfg.out, "ckpt.pt"), plumbing.run_log(train_cfg.out, rank == 0)
    plumbing.log_start(log, header(raw_model, raw_disc, len(ds), cfgs, device, world, step), ckpt,
                       train_cfg, world, get_lr)
    log(f"config: {asdict(train_cfg)} {asdict(model_cfg)} {asdict(loss_cfg)}")
    d_never = loss_cfg.gan_weight > 0 and loss_cfg.gan_start >= train_cfg.steps
    if d_never and not model_cfg.feature_dim:  # (VQ-KD's phase 1 has no D)
        log(f"warning: --gan-start {loss_cfg.gan_start} >= --steps {train_cfg.steps}: the "
            "discriminator never trains in this run; pass more --steps or a smaller --gan-start")

    def save():
        plumbing.save_checkpoint(path, dict(
            kind="tokenizer", phase=train_cfg.phase, step=step, world_size=world,
            model_config=asdict(model_cfg), loss_config=asdict(loss_cfg),
            train_config=asdict(train_cfg), model=raw_model.state_dict(),
            disc=raw_disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict()))

    data, means = batches(ds, train_cfg, step, device, rank, world), plumbing.RunningMeans()
    counts, t0 = torch.zeros(model_cfg.n_codes, device=device, dtype=torch.long), time.time()
    with tqdm(total=train_cfg.steps, initial=step, desc=f"phase {train_cfg.phase}",
              dynamic_ncols=True, disable=rank != 0) as bar:  # closed on an error too
        while step < train_cfg.steps:
            lr = get_lr(step, train_cfg)
            for group in opt_g.param_groups + opt_d.param_groups:
                group["lr"] = lr
            xs = [plumbing.to_input(next(data)[0], device, model_cfg.image_size)
                  for _ in range(train_cfg.grad_accum)]
            terms, idxs, gan_w = train_step(model, disc, opt_g, opt_d, xs, step, cfgs, perceptual,
                                            ddp)
            for idx in idxs:
                seqgan.count_codes(counts, idx)
            means.add(terms)
            means.steps += 1
            step += 1
            bar.update(1)
            last, eval_step = step == train_cfg.steps, step % train_cfg.eval_every == 0
            if step % train_cfg.log_every == 0 or eval_step or last:  # means checked before a save
                ips = means.steps * len(xs) * train_cfg.batch_size * world / (time.time() - t0)
                vals = means.read(world, step, train_cfg.lr, path)
                log_step(log, bar, vals, counts, step, gan_w, lr, ips)
                t0 = time.time()
            if rank == 0 and (eval_step or last):  # the others wait in the next all-reduce
                eval_and_save(raw_model, val, step, cfgs, log, save)
                t0 = time.time()
    log(f"done: {path}")
    plumbing.teardown()

if __name__ == "__main__":
    plumbing.cli(main)
