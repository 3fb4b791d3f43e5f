"""
Sample images from a trained prior (numbered PNGs for fid.py), or show what the AR prior predicts
from the true tokens of real images (paper Fig. 4: input | reconstruction | teacher-forced guess).

  python sample.py --prior out/prior_ar/ckpt.pt --n 10000  # then: fid.py real/ out/prior_ar/samples
  python sample.py --prior out/prior_nar/ckpt.pt --n 64 --class 3 --out out/class3
  python sample.py --prior out/prior_ar/ckpt.pt --visualize --images data/val_images --n 16
  torchrun --standalone --nproc_per_node=8 sample.py --prior out/prior_ar/ckpt.pt --n-images 50000

The defaults are Table 10's settings outside ImageNet (AR top-p 0.98, NAR temperature 0.65, 12
NAR steps). On ImageNet pass Table 10's own:  AR --top-p 0.92,  NAR --temperature 0.45
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision
from PIL import Image
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import SeqganError, option

@dataclass
class SampleConfig:
    prior: str = option("", "the prior's ckpt.pt (train_prior.py)")
    tokenizer: str = option("", "the tokenizer's ckpt.pt (default: the prior's)")
    out: str = option("", "output folder (default: samples/ or visualize/ beside the prior)")
    n: int = option(64, "images to generate (--visualize: input images to show, at most)")
    batch_size: int = option(64, "images per batch and process (image i: its own generator)")
    temperature: float = option(None, "token-logit temperature (default 1.0 AR, 0.65 NAR; "
                                      "ImageNet NAR: 0.45, Table 10)")
    top_k: int = option(0, "AR only: keep the k most likely tokens (0 = all)")
    top_p: float = option(None, "AR only: nucleus mass (default 0.98; ImageNet: 0.92, Table 10)")
    steps: int = option(seqgan.NAR_STEPS, "NAR only: MaskGIT decoding steps")
    choice_temperature: float = option(seqgan.CHOICE_TEMPERATURE, "NAR only: MaskGIT's choice "
                                       "temperature: Gumbel noise on confidences, annealed to 0")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    visualize: bool = option(False, "Fig. 4 triptychs of --images instead of samples (AR prior)")
    images: str = option("", "--visualize: folder of images; class subfolders give the labels")

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1:
            raise SeqganError("--n and --batch-size must be at least 1")

def parse(argv):
    p = plumbing.parser(__doc__, SampleConfig)
    # `class` is a Python keyword, so this one flag is not a SampleConfig field
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="class of every image (conditional priors); default: 0, 1, .. cycling")
    # torchrun reads `--n` after the script name as an abbreviation of its own --nnodes /
    # --nproc-per-node: the same setting under a name it leaves alone
    p.add_argument("--n-images", dest="n", type=int, default=argparse.SUPPRESS,
                   help="the same as --n; use it under torchrun")
    return p.parse_args(argv)

def check_settings(cfg, given, pcfg, label):
    """Refuse settings the prior cannot use; -> the sampling settings, Table 10's as defaults."""
    kind, other = (("AR", ("steps", "choice_temperature")) if pcfg.causal
                   else ("NAR (MaskGIT)", ("top_k", "top_p")))
    for name in other:
        if name in given and not cfg.visualize:
            raise SeqganError(f"--{name.replace('_', '-')} does not apply to {cfg.prior}, an "
                              f"{kind} prior")
    if label is not None and pcfg.n_classes == 0:
        raise SeqganError(f"--class {label} given, but {cfg.prior} is an unconditional prior; "
                          "drop --class")
    if label is not None and not 0 <= label < pcfg.n_classes:
        raise SeqganError(f"--class {label} is out of range: {cfg.prior} knows classes "
                          f"0..{pcfg.n_classes - 1}")
    default_t = seqgan.AR_TEMPERATURE if pcfg.causal else seqgan.NAR_TEMPERATURE
    temperature = cfg.temperature if cfg.temperature is not None else default_t
    top_p = cfg.top_p if cfg.top_p is not None else seqgan.AR_TOP_P
    if temperature <= 0 or not 0 < top_p <= 1:
        raise SeqganError(f"--temperature {temperature} / --top-p {top_p}: the temperature must be "
                          "> 0 and --top-p in (0, 1] (for greedy AR decoding use --top-k 1)")
    if cfg.choice_temperature < 0 or cfg.top_k < 0:
        raise SeqganError("--choice-temperature and --top-k must be >= 0")
    if not pcfg.causal and not 1 <= cfg.steps <= pcfg.grid:
        raise SeqganError(f"--steps {cfg.steps}: MaskGIT reveals at least one token per step, so "
                          f"it needs 1 to {pcfg.grid} steps (the number of tokens)")
    ar = pcfg.causal  # the other kind's settings are None
    return dict(temperature=temperature, top_k=cfg.top_k if ar else None,
                top_p=top_p if ar else None, steps=None if ar else cfg.steps,
                choice_temperature=None if ar else cfg.choice_temperature)

def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as save_image rounds."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def grid_path(out):
    """samples -> samples_grid.png beside the folder: it holds exactly the samples fid.py scores."""
    return os.path.abspath(out) + "_grid.png"

@torch.no_grad()
def sample(model, tok, cfg, settings, labels, nrow, out, device, rank=0, world=1):
    """Write cfg.n samples as out/000000.png, .. and the first (up to 64, whole rows) as
    grid_path(out). Image i draws from its own generator, seeded by (seed, i); under torchrun each
    rank makes a contiguous run of whole batches, so the PNGs are those of one process."""
    ctx, pcfg, side = seqgan.autocast(device), model.cfg, tok.cfg.grid
    starts = range(0, cfg.n, cfg.batch_size)
    for start in tqdm([starts[k] for k in plumbing.shard(len(starts), rank, world)],
                      desc="sampling", dynamic_ncols=True, disable=rank != 0):
        b = min(cfg.batch_size, cfg.n - start)
        y = labels[start:start + b].to(device) if pcfg.n_classes else None
        gens = [torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + i)
                for i in range(start, start + b)]
        with ctx:
            if pcfg.causal:
                idx = seqgan.generate_ar(model, b, y, settings["temperature"], settings["top_k"],
                                         settings["top_p"], generator=gens)
            else:
                idx = seqgan.generate_maskgit(model, b, y, settings["steps"],
                                              settings["temperature"],
                                              settings["choice_temperature"], generator=gens)
            x = tok.decode_indices(idx.view(b, side, side)).float()
        for i, img in enumerate(to_uint8(x)):
            Image.fromarray(img).save(os.path.join(out, f"{start + i:06d}.png"))
    plumbing.barrier()  # every rank's PNGs are on disk before rank 0 reads the first back
    if rank == 0:
        n_grid = min(cfg.n, nrow * max(1, 64 // nrow))
        paths = [os.path.join(out, f"{i:06d}.png") for i in range(n_grid)]
        grid = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in paths])  # uint8
        torchvision.utils.save_image(grid.permute(0, 3, 1, 2) / 255, grid_path(out),
                                     nrow=min(nrow, n_grid))

@torch.no_grad()
def visualize(model, tok, cfg, folder, pick, labels, out, device):
    """Fig. 4: true indices s -> one teacher-forced pass -> s' = argmax; decode s and s' side by
    side; -> the top-1 token accuracy of s' against s."""
    ctx, side, size = seqgan.autocast(device), tok.cfg.grid, tok.cfg.image_size
    rows, correct = [], 0
    for start in range(0, len(pick), cfg.batch_size):
        batch = pick[start:start + cfg.batch_size]
        x = plumbing.to_input(torch.stack([folder[i][0] for i in batch]), device, size)
        s = tok.tokenize(x).flatten(1)  # (B, h*w) true indices, fp32 as in train_prior.py
        y = labels[start:start + len(batch)].to(device) if labels is not None else None
        with ctx:
            s_pred = seqgan.teacher_forced_prediction(model, s, y)  # (B, h*w): s'_j from s_<j
            recon, pred = (tok.decode_indices(t.view(-1, side, side)).float() for t in (s, s_pred))
        correct += (s_pred == s).sum().item()
        for i, triple in enumerate(zip(x, recon, pred)):
            row = torch.cat(triple, dim=2)  # (3, S, 3S): input | reconstruction | AR prediction
            path = os.path.join(out, f"triptych_{start + i:06d}.png")
            Image.fromarray(to_uint8(row[None])[0]).save(path)
            rows.extend(triple)
    torchvision.utils.save_image(torch.stack(rows), os.path.join(out, "visualize.png"), nrow=3,
                                 normalize=True, value_range=(-1, 1))
    return correct / (len(pick) * side * side)

def visualize_inputs(cfg, pcfg, label, size):
    """(folder, indices of the images to show, labels or None) for --visualize. Labels: --class if
    given, else the folder's class subfolders (sorted names = class ids, as in training)."""
    if not pcfg.causal:
        raise SeqganError(f"--visualize needs an AR prior (teacher forcing); {cfg.prior} is an "
                          "NAR (MaskGIT) prior")
    if not cfg.images:
        raise SeqganError("--visualize needs --images FOLDER")
    folder = plumbing.ImageFolder(cfg.images, size)  # an error if missing or empty
    n = min(cfg.n, len(folder))
    pick = [i * len(folder) // n for i in range(n)]  # spread over the sorted files and classes
    if not pcfg.n_classes:
        return folder, pick, None
    if label is not None:
        return folder, pick, torch.full((n,), label)
    if not folder.classes:
        raise SeqganError(f"the prior is class-conditional: pass --class C, or put the images of "
                          f"{cfg.images} into class subfolders (sorted names = class ids)")
    if len(folder.classes) > pcfg.n_classes:
        raise SeqganError(f"{cfg.images} has {len(folder.classes)} class folders, but the prior "
                          f"knows {pcfg.n_classes} classes; pass --class")
    print(f"labels from class folders: {dict(enumerate(folder.classes))}")
    return folder, pick, torch.tensor([folder.labels[i] for i in pick])

def load_models(cfg):
    """The prior and its tokenizer (frozen, eval mode), with the checkpoints, checked to match."""
    if not cfg.prior:
        raise SeqganError("sample.py needs --prior CKPT (the ckpt.pt of a train_prior.py run)")
    ckpt = plumbing.load_checkpoint(cfg.prior, "prior")
    model, tok_path = plumbing.model_from_checkpoint(ckpt), cfg.tokenizer or ckpt["tokenizer"]
    if not cfg.tokenizer and not os.path.isfile(tok_path):
        raise SeqganError(f"the prior's tokenizer {tok_path} is gone; pass --tokenizer CKPT")
    tok_ckpt = plumbing.load_checkpoint(tok_path, "tokenizer")
    tok = plumbing.load_tokenizer(tok_path, ckpt=tok_ckpt)  # refuses one without pixel decoder
    t, p = tok.cfg, model.cfg
    if (t.n_codes, t.grid ** 2) != (p.n_codes, p.grid):
        raise SeqganError(f"tokenizer {tok_path} has {t.n_codes} codes and {t.grid}x{t.grid} = "
                          f"{t.grid ** 2} tokens per image, but prior {cfg.prior} was trained on "
                          f"{p.n_codes} codes and {p.grid} tokens; pass its own tokenizer")
    return model, tok, ckpt, tok_ckpt, tok_path

def main(argv=None):
    args = parse(argv)
    cfg, given, label = plumbing.config_from_args(SampleConfig, args), vars(args), args.label
    model, tok, ckpt, tok_ckpt, tok_path = load_models(cfg)
    pcfg, settings = model.cfg, check_settings(cfg, given, model.cfg, label)
    if cfg.visualize:
        folder, pick, labels = visualize_inputs(cfg, pcfg, label, tok.cfg.image_size)
    else:  # without --class, classes cycle over the samples
        labels = torch.full((cfg.n,), label) if label is not None else (
            torch.arange(cfg.n) % max(1, pcfg.n_classes))
    out = cfg.out or os.path.join(os.path.dirname(cfg.prior),
                                  "visualize" if cfg.visualize else "samples")
    if os.path.isdir(out) and any(f.endswith(".png") for f in os.listdir(out)):  # fid.py: all
        raise SeqganError(f"{out} already holds PNG files; empty it or choose another --out")
    # Every check above runs on every rank before any joins the process group (a rendezvous), so
    # no rank writes into `out` before all have checked it.
    ddp, rank, _, world, device = plumbing.setup_distributed(cfg.device)
    model, tok, phase = model.to(device), tok.to(device), tok_ckpt["phase"]
    if rank == 0:
        print(f"prior {cfg.prior} ({'AR' if pcfg.causal else 'NAR'}, step {ckpt['step']}) | "
              f"tokenizer {tok_path} | phase-{phase} decoder"
              f"{' (block attention)' if tok.cfg.dec_attn else ''} | device {device}"
              + (f" x {world} processes" if ddp else ""))
    os.makedirs(out, exist_ok=True)
    if cfg.visualize:  # a few images: rank 0 alone
        if rank == 0:
            acc = visualize(model, tok, cfg, folder, pick, labels, out, device)
            print(f"top-1 token accuracy of s' vs s: {acc:.4f} over {len(pick)} images x "
                  f"{pcfg.grid} tokens\nwrote {len(pick)} triptychs and visualize.png to {out}")
        plumbing.teardown()
        return
    # cycling classes: a whole number of class cycles per row, so every column holds one class
    cycles = label is None and 0 < pcfg.n_classes <= 16
    nrow = pcfg.n_classes * max(1, 8 // pcfg.n_classes) if cycles else 8
    sample(model, tok, cfg, settings, labels, nrow, out, device, rank, world)
    if rank == 0:  # written last: its presence marks a complete set; FID depends on its settings
        classes = "unconditional" if not pcfg.n_classes else "cycle" if label is None else "fixed"
        record = {**asdict(cfg), **settings, "temperature_on": "token logits",
                  "grid": grid_path(out), "class": label, "classes": classes,
                  "model": "ar" if pcfg.causal else "nar", "prior": os.path.abspath(cfg.prior),
                  "prior_step": ckpt["step"], "tokenizer": os.path.abspath(tok_path),
                  "decoder_phase": phase, "out": out}
        with open(os.path.join(out, "sampling.json"), "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {cfg.n} PNGs and sampling.json to {out}, the grid of the first ones to "
              f"{grid_path(out)}")
    plumbing.teardown()

if __name__ == "__main__":
    plumbing.cli(main)
