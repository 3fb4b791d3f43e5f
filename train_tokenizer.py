"""Train the SeQ-GAN tokenizer: phase 1 (semantic compression, alpha 1, Section 3.3), then phase 2
(details: encoder and codebook frozen, an attention decoder, alpha 0, Section 3.4); README.

  python train_tokenizer.py                                         # phase 1: CIFAR-10, 32 px
  python train_tokenizer.py --phase 2 --init out/tokenizer/ckpt.pt  # phase 2 -> out/tokenizer2
  torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset paper --data /data/imagenet \
      --batch-size 32 --steps 500000 --out out/imagenet     # Table 9, ImageNet: global batch 256
"""

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
    data: str = option("cifar10", "cifar10, fashion-mnist or an image folder (subfolders: classes)")
    data_root: str = option("data", "where CIFAR-10 is downloaded and fashion-mnist looked for")
    preset: str = option("classroom", "classroom (32 px, f=4), paper (256 px, f=16, Table 7), cpu")
    phase: int = option(1, "1 = semantic compression, 2 = details from --init (Table 9: lr 5e-5)")
    init: str = option("", "phase 2: the phase-1 ckpt.pt to start from")
    out: str = option("out/tokenizer", "folder for ckpt.pt, log.txt and the PNG grids")
    steps: int = option(50000, "training steps")
    batch_size: int = option(64, "images per micro-step and process; global (x accum x processes) "
                                 "in Table 9: ImageNet 256, FFHQ 64")
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
        if self.phase not in (1, 2) or self.phase == 1 and self.init:
            raise SeqganError("--phase is 1 or 2, and --init is for phase 2 (a phase-1 checkpoint)")
        plumbing.at_least_one(self, "steps", "batch_size", "grad_accum", "log_every",
                              "eval_every", "eval_images")

CONFIGS = (TrainConfig, seqgan.TokenizerConfig, seqgan.LossConfig)
FLAGS = [f.name for f in fields(TrainConfig) if f.name != "data_root"] + [
    "image_size", "channels", "n_codes", "code_dim", "entropy_weight", "objective", "dec_attn",
    "alpha", "perceptual_weight", "gan_weight", "gan_start", "disc_channels"]
PRESETS = {  # perceptual weight 0.1 at 32 px, where VGG16's relu5_3 is 2x2 (README)
    "classroom": dict(perceptual_weight=0.1),
    "paper": dict(image_size=256, channels=128, ch_mult=(1, 1, 2, 2, 4), attn_block=8,  # Table 7
                  perceptual_weight=1.0, r1_gamma=1.0, gan_start=50000, disc_channels=64),
    "cpu": dict(data="fashion-mnist", channels=32, code_dim=32, n_codes=256, batch_size=16,  # ours
                steps=600, lr=4e-4, perceptual_weight=0.1, gan_start=400, gan_warmup=100,
                disc_channels=32, log_every=50, eval_every=300, eval_images=500, num_workers=0),
}
OBJECTIVES = {  # changes to the preset (README, "Choices the paper leaves open")
    "seqgan": dict(), "vqkd": dict(cosine_codebook=True),  # VQ-KD's phase 1: VGG16's relu5_3
    "regvq": dict(alpha=0.0, mask_ratio=0.4, pcl_weight=0.1, entropy_temp=0.01)}
# Phase 2 (Section 3.4, Table 9): the phase-1 run's config with alpha 0, lr 5e-5 constant, the
# attention decoder, 200k steps at half the paper preset's batch (configure()); ours: the other
# presets' lengths, D on without a new warm-up gap, a deterministic quantizer.
PHASE2 = dict(out="out/tokenizer2", lr=5e-5, alpha=0.0, dec_attn=1, gan_start=0, mask_ratio=0.0,
              pcl_weight=0.0)
PHASE2_PRESETS = dict(classroom=dict(steps=20_000), paper=dict(steps=200_000),
                      cpu=dict(steps=300, lr=2e-4))
COMPILE_BACKEND = "inductor"  # the tests' aot_eager: the same R1 limit, compiled in seconds

def parse(argv):
    return plumbing.parser(__doc__, *CONFIGS, flags=FLAGS,
                           defaults=PRESETS["classroom"]).parse_args(argv)

def configure(args):
    """(train, model, loss) configs, the checkpoint --resume continues and phase 2's --init, in
    three layers: dataclass < preset < command line. The preset: PRESETS + OBJECTIVES in phase 1,
    the checkpoint's config with --resume; in phase 2, the --init run's with PHASE2's changes."""
    given, init = vars(args), None
    phase, preset = given.get("phase", 1), given.get("preset", "classroom")
    if preset not in PRESETS:
        raise SeqganError(f"unknown --preset {preset}; choose from {', '.join(PRESETS)}")
    out = given.get("out", PHASE2["out"] if phase == 2 else TrainConfig.out)
    ckpt = plumbing.run_checkpoint(out, given.get("resume"), "tokenizer")
    if ckpt is not None:
        path = os.path.join(out, "ckpt.pt")
        if ckpt["phase"] != phase:
            raise SeqganError(f"{path} is a phase-{ckpt['phase']} checkpoint; resume it with "
                              f"--phase {ckpt['phase']}")
        saved = {**ckpt["model_config"], **ckpt["loss_config"]}
        plumbing.refuse_changes(given, saved, saved, path)
        layer = {**ckpt["train_config"], **saved}
    elif phase != 2:  # an unknown --objective: TokenizerConfig refuses it
        layer = {**PRESETS[preset], **OBJECTIVES.get(given.get("objective"), {})}
    elif not given.get("init"):
        raise SeqganError("phase 2 needs --init PHASE1_CKPT (the ckpt.pt of a phase-1 run)")
    else:  # phase 2 may add attention layers, not change the encoder or codebook
        init = plumbing.load_checkpoint(given["init"], "tokenizer")
        for name, value in init["model_config"].items():
            more_attn = name == "dec_attn" and given.get(name, 0) > value
            if name in given and given[name] != value and not more_attn:
                raise SeqganError(f"--init {given['init']} has --{name.replace('_', '-')} "
                                  f"{value}, not {given[name]}; phase 2 keeps the phase-1 encoder "
                                  "and codebook")
        saved = {**init["train_config"], **init["model_config"], **init["loss_config"]}
        layer = {k: v for k, v in saved.items() if k not in ("device", "compile", "resume")}
        layer.update(PHASE2, **PHASE2_PRESETS[saved["preset"]], dec_attn=max(1, saved["dec_attn"]))
        if saved["preset"] == "paper":  # Table 9 halves the batch
            layer["batch_size"] = max(1, saved["batch_size"] // 2)
        if saved["feature_dim"]:  # VQ-KD: D never trained in phase 1 (no pixels), so it warms up
            layer["gan_start"] = saved["gan_start"]
    train_cfg, model_cfg, loss_cfg = (plumbing.config_from_args(c, args, layer) for c in CONFIGS)
    vqkd = model_cfg.objective == "vqkd" and train_cfg.phase == 1  # decodes the teacher's features
    feature_dim = seqgan.VGG_CHANNELS[loss_cfg.teacher_layer] if vqkd else 0
    return train_cfg, replace(model_cfg, feature_dim=feature_dim), loss_cfg, ckpt, init

def get_lr(step, train_cfg):
    """Phase 1: cosine decay from lr to 5e-5 (Table 9); phase 2: constant."""
    if train_cfg.phase == 2:
        return train_cfg.lr
    lr_min = min(train_cfg.lr, 5e-5)
    return lr_min + 0.5 * (train_cfg.lr - lr_min) * (1 + math.cos(math.pi * step / train_cfg.steps))

def batches(ds, train_cfg, start_step, device, rank=0, world=1):
    """Endless batches, one per micro-step: each epoch a permutation seeded by (seed, start step,
    epoch) in slices of b; rank r takes slices r, r + world, ... of whole global batches, so 2 ranks
    x b see what 1 rank x 2b sees, and a resumed run does not replay."""
    b, epoch, n = train_cfg.batch_size, 0, train_cfg.batch_size * train_cfg.grad_accum * world
    workers = 0 if isinstance(ds, torch.utils.data.TensorDataset) else train_cfg.num_workers
    while True:
        g = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + start_step + epoch)
        perm = torch.randperm(len(ds), generator=g).tolist()  # as shuffle=True draws it
        mine = [perm[k:k + b] for k in range(rank * b, len(perm) // n * n, world * b)]
        yield from torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=workers,
                                               pin_memory=device.type == "cuda")
        epoch += 1

def build(train_cfg, model_cfg, loss_cfg, ckpt, init, device):
    """The plain tokenizer and D, their optimizers, the step to start from (fresh, phase 1's weights
    or --resume's), and the frozen VGG16 loss of Eq. 3 if a term uses it (never DDP-wrapped)."""
    model = seqgan.Tokenizer(model_cfg).to(device)
    disc = seqgan.Discriminator(model_cfg.image_size, loss_cfg.disc_channels,
                                loss_cfg.disc_max_channels).to(device)
    if init is not None:  # phase 2: phase 1's weights; new attention layers (VQ-KD: decoder) fresh
        vqkd = init["model_config"]["feature_dim"]  # VQ-KD's phase 1 decoder: features
        keep = ("encoder.", "quantizer.") if vqkd else ("encoder.", "quantizer.", "decoder.")
        model.load_state_dict({k: v for k, v in init["model"].items() if k.startswith(keep)},
                              strict=False)
        disc.load_state_dict(init["disc"])
    if train_cfg.phase == 2:  # Section 3.4: the decoder alone trains
        model.requires_grad_(False).decoder.requires_grad_(True)
    betas = (0.9, 0.99) if train_cfg.phase == 1 else (0.5, 0.9)  # Section 4.1: phase 1 / phase 2
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr,
                             betas=betas, fused=device.type == "cuda")
    # D's Adam: betas (0, 0.99) at G's lr, ours (MaskGIT's and StyleGAN2's betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=train_cfg.lr, betas=(0.0, 0.99),
                             fused=device.type == "cuda")
    if ckpt is not None:  # --resume: all as the checkpoint left it
        for obj, key in ((model, "model"), (disc, "disc"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            obj.load_state_dict(ckpt[key])
    perceptual = None
    if loss_cfg.perceptual_weight > 0 or loss_cfg.pcl_weight > 0 or model_cfg.feature_dim:
        perceptual = seqgan.PerceptualLoss(loss_cfg.alpha, seqgan.load_vgg16(train_cfg.vgg_weights),
                                           loss_cfg.perceptual_norm, loss_cfg.perceptual_size)
        perceptual.to(device)
    return model, disc, opt_g, opt_d, ckpt["step"] if ckpt else 0, perceptual

def train_step(model, disc, opt_g, opt_d, xs, step, cfgs, perceptual, ddp):
    """One step of G, then of D on the detached reconstructions (from gan_start on), over this
    rank's micro-batches xs -> the terms averaged over them, the code indices, the GAN weight."""
    train_cfg, model_cfg, loss_cfg = cfgs
    vqkd, n = bool(model_cfg.feature_dim), len(xs)  # VQ-KD's phase 1: features, no pixels for D
    gan_w = 0.0 if vqkd else seqgan.gan_weight_at(step, loss_cfg)
    terms, x_hats, idxs = {}, [], []
    opt_g.zero_grad(set_to_none=True)
    for micro, x in enumerate(xs):
        if ddp:  # all-reduce in the last backward only
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

@torch.no_grad()
def evaluate(model, val, step, cfgs, log):
    """Rank 0 alone, on the plain model: PSNR and code usage (distinct codes over the pass) of the
    held-out images, a PNG of 8 inputs above their reconstructions (VQ-KD's phase 1: no pixels)."""
    train_cfg, model_cfg, _ = cfgs
    device, K = next(model.parameters()).device, model_cfg.n_codes
    pixels = not model_cfg.feature_dim  # VQ-KD's phase 1 decodes features
    counts, total = torch.zeros(K, device=device, dtype=torch.long), 0.0
    model.eval()
    for i, (xb, _) in enumerate(torch.utils.data.DataLoader(val, train_cfg.batch_size)):
        x = plumbing.to_input(xb, device, model_cfg.image_size)
        with seqgan.autocast(device):
            x_hat, idx, _ = model(x)
        seqgan.count_codes(counts, idx)
        if pixels:
            x_hat = x_hat.float().clamp(-1, 1)
            total += seqgan.psnr(x_hat, x) * len(x)
        if pixels and i == 0:  # top row inputs, bottom row reconstructions
            png = os.path.join(train_cfg.out, f"recon_{step:07d}.png")
            torchvision.utils.save_image(torch.cat([x[:8], x_hat[:8]]), png, nrow=len(x[:8]),
                                         normalize=True, value_range=(-1, 1))
    model.train()
    usage, ppl = (v.item() for v in seqgan.codebook_usage(counts))
    psnr, used = float(total / len(val)) if pixels else float("nan"), round(usage * K)
    log(f"eval step {step} | PSNR {psnr:.2f} dB | usage {usage:.3f} ({used}/{K} codes) | "
        f"perplexity {ppl:.1f}")
    if usage < 0.1:
        log(f"warning: only {used}/{K} codes used; raise --entropy-weight")

def header(model, disc, n_images, cfgs, device, world, step):
    """The run's first log lines: what it trains, its config, a warning if D never trains."""
    train_cfg, model_cfg, loss_cfg = cfgs
    millions = [plumbing.count_params(model) / 1e6, plumbing.count_params(model, True) / 1e6,
                plumbing.count_params(disc) / 1e6]
    lines = [f"phase {train_cfg.phase} | {train_cfg.data} ({n_images} images) | tokenizer "
             f"{millions[0]:.2f}M ({millions[1]:.2f}M trained), D {millions[2]:.2f}M | "
             f"{model_cfg.grid}x{model_cfg.grid} tokens, K={model_cfg.n_codes} | alpha "
             f"{loss_cfg.alpha} | {plumbing.run_text(train_cfg, device, world, step)}",
             f"config: {asdict(train_cfg)} {asdict(model_cfg)} {asdict(loss_cfg)}"]
    d_never = loss_cfg.gan_weight > 0 and loss_cfg.gan_start >= train_cfg.steps
    if d_never and not model_cfg.feature_dim:  # (VQ-KD's phase 1 has no D)
        lines.append(f"warning: --gan-start {loss_cfg.gan_start} >= --steps {train_cfg.steps}: the "
                     "discriminator never trains in this run (raise --steps, lower --gan-start)")
    return "\n".join(lines)

def main(argv=None):
    train_cfg, model_cfg, loss_cfg, ckpt, init = configure(parse(argv))  # every rank: the checks
    cfgs = train_cfg, model_cfg, loss_cfg
    ddp, rank, _, world, device = plumbing.setup_distributed(train_cfg.device)
    torch.manual_seed(train_cfg.seed + rank)  # a seed per rank: Reg-VQ's masks differ across ranks
    torch.backends.cudnn.benchmark = True
    ds, _ = plumbing.load_dataset(train_cfg.data, train_cfg.data_root, model_cfg.image_size)
    plumbing.check_enough_data(len(ds), "images", train_cfg, world)
    val = ds if isinstance(ds, plumbing.ImageFolder) else plumbing.load_dataset(  # folder: no split
        train_cfg.data, train_cfg.data_root, model_cfg.image_size, train=False)[0]
    val = torch.utils.data.Subset(val, range(min(train_cfg.eval_images, len(val))))
    raw_model, raw_disc, opt_g, opt_d, step, perceptual = build(*cfgs, ckpt, init, device)
    if step:  # a resumed run draws new Reg-VQ masks, not a replay of the first steps'
        torch.manual_seed(train_cfg.seed * 1_000_003 + step + rank)
    model, disc = (plumbing.wrap(m, train_cfg.compile, ddp, device, COMPILE_BACKEND)
                   for m in (raw_model, raw_disc))
    path, log = os.path.join(train_cfg.out, "ckpt.pt"), plumbing.run_log(train_cfg.out, rank == 0)
    plumbing.log_start(log, header(raw_model, raw_disc, len(ds), cfgs, device, world, step), ckpt,
                       train_cfg, world, get_lr)
    data, means = batches(ds, train_cfg, step, device, rank, world), plumbing.RunningMeans()
    counts = torch.zeros(model_cfg.n_codes, device=device, dtype=torch.long)
    for it in tqdm(range(step, train_cfg.steps), initial=step, total=train_cfg.steps,
                   disable=rank != 0):  # it: the step being taken, step: steps done
        lr = get_lr(it, train_cfg)
        for group in opt_g.param_groups + opt_d.param_groups:
            group["lr"] = lr
        xs = [plumbing.to_input(next(data)[0], device, model_cfg.image_size)
              for _ in range(train_cfg.grad_accum)]
        terms, idxs, gan_w = train_step(model, disc, opt_g, opt_d, xs, it, cfgs, perceptual, ddp)
        for idx in idxs:
            seqgan.count_codes(counts, idx)
        means.add(terms)
        step = it + 1
        last, eval_step = step == train_cfg.steps, step % train_cfg.eval_every == 0
        if step % train_cfg.log_every == 0 or eval_step or last:  # means checked before a save
            vals, steps_per_s = means.read(world, step, train_cfg.lr, path)
            ips = steps_per_s * len(xs) * train_cfg.batch_size * world
            usage, ppl = seqgan.codebook_usage(plumbing.all_reduce_sum(counts))  # over the ranks
            log(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
                + f" | H/logK {vals['entropy'] / math.log(len(counts)):.3f} | usage "
                f"{usage.item():.3f} ppl {ppl.item():.1f} | gan_w {gan_w:.3f} lr {lr:.2e} | "
                f"{ips:.1f} img/s")
            counts.zero_()
        if rank == 0 and (eval_step or last):  # the others wait in the next all-reduce
            evaluate(raw_model, val, step, cfgs, log)
            plumbing.save_checkpoint(path, dict(
                kind="tokenizer", phase=train_cfg.phase, step=step, world_size=world,
                model_config=asdict(model_cfg), loss_config=asdict(loss_cfg),
                train_config=asdict(train_cfg), model=raw_model.state_dict(),
                disc=raw_disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict()))
            means = plumbing.RunningMeans()  # a new window: without the evaluation's time
    log(f"done: {path}")

if __name__ == "__main__":
    plumbing.cli(main)
