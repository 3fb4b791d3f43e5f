"""
Benchmark every stage on synthetic data that already sits on the device (it measures the
models, not the disk): tokenizer phase-1 and phase-2 training steps, AR and NAR prior training
steps, AR (KV cache) and MaskGIT sampling including decoding to pixels, FID features.

  python bench.py                                               # classroom shapes, every stage
  python bench.py --tokenizer-preset paper --batch-size 32 --compile --only tok1
  python bench.py --prior-preset base --only prior_ar,sample_ar --both   # eager and compiled
  python bench.py --device cpu --iters 2 --warmup 1 --sample-batch 8 --fid-batch 8   # CPU smoke

Prints one table and writes it as JSON (--json). Networks are randomly initialised: speed does
not depend on the weights.
"""

import json
import time
from dataclasses import asdict, dataclass, replace

import torch

import fid
import plumbing
import seqgan
from seqgan import SeqganError, option
from train_tokenizer import PRESETS

STAGES = ("tok1", "tok2", "prior_ar", "prior_nar", "sample_ar", "sample_nar", "fid")

@dataclass
class BenchConfig:
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    tokenizer_preset: str = option("classroom", "tokenizer shape: classroom (32 px), cpu (32 px, "
                                                "1.1M) or paper (256 px, Table 7)")
    prior_preset: str = option("classroom", "prior shape: cpu, classroom, base (24x768) or large "
                                            "(24x1024)")
    batch_size: int = option(256, "images per tokenizer training step")
    prior_batch_size: int = option(64, "token grids per prior training step")
    sample_batch: int = option(256, "images per sampling call")
    maskgit_steps: int = option(seqgan.NAR_STEPS, "MaskGIT decoding steps")
    fid_batch: int = option(500, "images per FID feature batch")
    warmup: int = option(5, "untimed iterations first (compilation, cudnn autotuning)")
    iters: int = option(20, "timed iterations (sampling stages: a quarter, at least 1)")
    compile: bool = option(False, "torch.compile the models")
    both: bool = option(False, "run every stage eager and compiled")
    only: str = option("", "comma-separated stages to run: " + ",".join(STAGES))
    peak_flops: float = option(0.0, "peak FLOP/s for MFU; 0 = by device name (H100/A100 bf16)")
    json: str = option("bench.json", "where the table is written as JSON")

    def __post_init__(self):
        if self.tokenizer_preset not in PRESETS or self.prior_preset not in seqgan.PRIOR_PRESETS:
            raise SeqganError(f"unknown preset: --tokenizer-preset is one of {', '.join(PRESETS)}, "
                              f"--prior-preset one of {', '.join(seqgan.PRIOR_PRESETS)}")
        if min(self.iters, self.batch_size, self.prior_batch_size, self.sample_batch,
               self.fid_batch, self.maskgit_steps) < 1 or self.warmup < 0:
            raise SeqganError("--iters, --maskgit-steps and the batch sizes must be at least 1, "
                              "--warmup >= 0")

def timed(fn, warmup, iters, device):
    """Seconds per call of fn after warmup, and peak GPU memory in GiB (None on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return dt, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)

def preset_config(cls, bench_cfg, **kw):
    """A config with the --tokenizer-preset's fields (train_tokenizer.PRESETS) and kw."""
    preset = PRESETS[bench_cfg.tokenizer_preset]
    return cls(**{k: v for k, v in preset.items() if k in cls.__dataclass_fields__}, **kw)

def tokenizer_stage(bench_cfg, phase, device, compiled):
    """One full training step of train_tokenizer.py: G (L1 + Eq. 3 + VQ + GAN), then D, lazy R1."""
    model_cfg = preset_config(seqgan.TokenizerConfig, bench_cfg, dec_attn=phase == 2)
    alpha = 1.0 if phase == 1 else 0.0
    loss_cfg = replace(preset_config(seqgan.LossConfig, bench_cfg), alpha=alpha, gan_start=0)
    model = seqgan.Tokenizer(model_cfg).to(device)
    disc = seqgan.Discriminator(model_cfg.image_size, loss_cfg.disc_channels,
                                loss_cfg.disc_max_channels).to(device)
    if phase == 2:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    perceptual = seqgan.PerceptualLoss(loss_cfg.alpha, VGG, loss_cfg.perceptual_norm,
                                       loss_cfg.perceptual_size).to(device)
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, **fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.0, 0.99), **fused)
    g, d = (torch.compile(model), torch.compile(disc)) if compiled else (model, disc)
    size = model_cfg.image_size
    x = torch.rand(bench_cfg.batch_size, 3, size, size, device=device) * 2 - 1
    ctx, step = seqgan.autocast(device), [0]

    def run():
        opt_g.zero_grad(set_to_none=True)
        with ctx:
            x_hat, _, q = g(x)
            loss, _ = seqgan.tokenizer_loss(x, x_hat, q, loss_cfg, phase, loss_cfg.gan_weight, d,
                                            perceptual)
        loss.backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        seqgan.d_backward(d, x, x_hat, loss_cfg, step[0])
        opt_d.step()
        step[0] += 1

    dt, mem = timed(run, bench_cfg.warmup, bench_cfg.iters, device)
    return dict(unit="images/s", rate=bench_cfg.batch_size / dt, ms=1e3 * dt, mem_gib=mem,
                shape=f"{bench_cfg.tokenizer_preset} {size}px b{bench_cfg.batch_size}")

def prior_config(bench_cfg, causal):
    model_cfg = preset_config(seqgan.TokenizerConfig, bench_cfg)
    return model_cfg, seqgan.prior_preset(bench_cfg.prior_preset, model_cfg.n_codes,
                                          model_cfg.grid ** 2, 10, causal)

def prior_stage(bench_cfg, causal, device, compiled):
    """One AdamW step of the prior: tokens/s and MFU (FLOPs per token as nanoGPT estimates them)."""
    _, pc = prior_config(bench_cfg, causal)
    model = seqgan.Prior(pc).to(device)
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-2,
                            **fused)
    m = torch.compile(model) if compiled else model
    idx = torch.randint(0, pc.n_codes, (bench_cfg.prior_batch_size, pc.grid), device=device)
    y = torch.randint(0, pc.n_classes, (bench_cfg.prior_batch_size,), device=device)
    ctx = seqgan.autocast(device)

    def run():
        with ctx:
            loss, _ = seqgan.prior_loss(m, pc, idx, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt, mem = timed(run, bench_cfg.warmup, bench_cfg.iters, device)
    tps = bench_cfg.prior_batch_size * pc.grid / dt
    peak = plumbing.peak_flops(device, bench_cfg.peak_flops)
    mfu = seqgan.estimate_flops_per_token(pc) * tps / peak if peak else None
    return dict(unit="tokens/s", rate=tps, ms=1e3 * dt, mem_gib=mem, mfu=mfu,
                shape=f"{bench_cfg.prior_preset} {pc.n_layer}x{pc.n_embd} T={pc.grid} "
                      f"b{bench_cfg.prior_batch_size}")

def sample_stage(bench_cfg, causal, device, compiled):
    """Sample a batch of token grids and decode them to pixels with the tokenizer."""
    model_cfg, pc = prior_config(bench_cfg, causal)
    model, tok = seqgan.Prior(pc).to(device).eval(), seqgan.Tokenizer(model_cfg).to(device).eval()
    decode = torch.compile(tok.decode_indices) if compiled else tok.decode_indices
    if compiled:  # the per-token body repeats: compile it (dynamic: the cache position moves)
        model.body = torch.compile(model.body, dynamic=True)
    y = torch.arange(bench_cfg.sample_batch, device=device) % pc.n_classes
    ctx = seqgan.autocast(device)
    side = model_cfg.grid

    @torch.no_grad()
    def run():
        with ctx:
            if causal:
                idx = seqgan.generate_ar(model, bench_cfg.sample_batch, y, top_p=seqgan.AR_TOP_P)
            else:
                idx = seqgan.generate_maskgit(model, bench_cfg.sample_batch, y,
                                              steps=bench_cfg.maskgit_steps,
                                              temperature=seqgan.NAR_TEMPERATURE)
            decode(idx.view(-1, side, side))

    dt, mem = timed(run, min(bench_cfg.warmup, 2), max(1, bench_cfg.iters // 4), device)
    what = "KV cache" if causal else f"{bench_cfg.maskgit_steps} steps"
    return dict(unit="images/s", rate=bench_cfg.sample_batch / dt, ms=1e3 * dt, mem_gib=mem,
                shape=f"{bench_cfg.prior_preset} {pc.n_layer}x{pc.n_embd} T={pc.grid} "
                      f"b{bench_cfg.sample_batch}, {what}, with decode")

def fid_stage(bench_cfg, device, compiled):
    """FID Inception features of 32 px images (resized to 299 on the device), fp32 with TF32 off."""
    net = fid.load_inception("random", device)
    f = torch.compile(net) if compiled else net
    x = torch.rand(bench_cfg.fid_batch, 3, 32, 32, device=device)

    @torch.no_grad()
    def run():
        f(x)

    dt, mem = timed(run, min(bench_cfg.warmup, 2), max(1, bench_cfg.iters // 4), device)
    return dict(unit="images/s", rate=bench_cfg.fid_batch / dt, ms=1e3 * dt, mem_gib=mem,
                shape=f"fp32 b{bench_cfg.fid_batch}")

VGG = None  # built once: every tokenizer stage shares one VGG16

def main(argv=None):
    global VGG
    bench_cfg = plumbing.config_from_args(BenchConfig, plumbing.parser(__doc__, BenchConfig)
                                          .parse_args(argv))
    device = plumbing.pick_device(bench_cfg.device)
    stages = [s for s in bench_cfg.only.split(",") if s] or list(STAGES)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SeqganError(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from "
                          f"{', '.join(STAGES)}")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # training
    VGG = seqgan.load_vgg16("random") if {"tok1", "tok2"} & set(stages) else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    rows = []
    for compiled in ([False, True] if bench_cfg.both else [bench_cfg.compile]):
        for stage in stages:
            if stage in ("tok1", "tok2"):
                r = tokenizer_stage(bench_cfg, int(stage[-1]), device, compiled)
            elif stage in ("prior_ar", "prior_nar"):
                r = prior_stage(bench_cfg, stage == "prior_ar", device, compiled)
            elif stage in ("sample_ar", "sample_nar"):
                r = sample_stage(bench_cfg, stage == "sample_ar", device, compiled)
            else:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                r = fid_stage(bench_cfg, device, compiled)
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            r = dict(stage=stage, compiled=compiled, **r)
            rows.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            mem = f"{r['mem_gib']:.1f}" if r["mem_gib"] is not None else "n/a"
            mode = "compiled" if compiled else "eager"
            print(f"{stage:<11} {mode:<9} {r['rate']:>12,.1f} {r['unit']:<9} {r['ms']:>9.1f} ms  "
                  f"mem {mem:>5} GiB  MFU {mfu:>6}  {r['shape']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(bench_cfg.json, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                       config=asdict(bench_cfg), rows=rows), f, indent=1)
    print(f"wrote {bench_cfg.json}")

if __name__ == "__main__":
    plumbing.cli(main)
