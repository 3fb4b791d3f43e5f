"""FID, Inception Score and tokenizer reconstruction metrics, computed as pytorch-fid computes FID.

  python fid.py real/ samples/                         # FID of two image folders (recursive)
  python fid.py real/ --save-stats real.npz            # cache statistics: python fid.py real.npz s/
  python fid.py real.npz samples.npz                   # two statistics files (pytorch-fid's too)
  python fid.py samples/ --is                          # Inception Score, 10 splits
  python fid.py --recon out/tokenizer/ckpt.pt --images val/   # rFID, PSNR and codebook usage
  torchrun --standalone --nproc_per_node=8 fid.py real/ samples/  # 8 GPUs: shards, same numbers

FID (Heusel et al. 2017, arXiv:1706.08500): the Frechet distance between Gaussians fitted to the
2048-d pool3 features of the TF reference Inception-v3 (pytorch-fid's port). Numbers compare with
published ones only for that network and preprocessing (PIL RGB -> [0, 1] -> bilinear 299, no
antialias -> 2x - 1, fp32 without TF32, float64 statistics) and many samples (50k for reported
numbers; below 2048 sigma is singular). IS (Salimans et al. 2016): its 1008 logits, no fc bias.
"""

import argparse
import contextlib
import hashlib
import os
import sys
import time

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE
from tqdm import tqdm

import plumbing
import seqgan
from seqgan import SeqganError

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)
WEIGHTS_SHA256 = "6726825d"  # torch hub convention: the file name ends with its sha256's start
NUM_WORKERS = min(8, os.cpu_count() or 1)  # DataLoader processes decoding images
PREPROCESS = "pil-rgb/bilinear-299-no-antialias/2x-1/fp32"  # saved with the statistics, compared

# -----------------------------------------------------------------------------
# the FID Inception network, images -> features

def resize_299(x):
    """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299), as pytorch-fid (bilinear, no antialias)."""
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)

def tf_avg_pool(x):
    # TensorFlow's padded 3x3 average pool leaves the padding out of the mean; torchvision's counts
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class FIDInceptionA(InceptionA):
    """Mixed_5b/5c/5d: torchvision's InceptionA with TensorFlow's average pool."""
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)

class FIDInceptionC(InceptionC):
    """Mixed_6b..6e: torchvision's InceptionC with TensorFlow's average pool."""
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)

class FIDInceptionE(InceptionE):
    """Mixed_7b (TF average pool) and Mixed_7c (max pool): pytorch-fid's FIDInceptionE_1, _2."""
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # The TF graph's last block pools with max, not average (likely a slip); FID keeps it
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)

class InceptionFID(Inception3):
    """Inception-v3 of the TensorFlow FID/IS graph (inception-2015-12-05), named like torchvision's
    as pytorch-fid's fid_inception_v3(), so its weights load with strict keys. Unlike torchvision's:
    1008 classes, no aux classifier, pools as the TF graph (see FIDInceptionA, C, E).
    forward: images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048), IS logits (B, 1008)."""
    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
              "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
              "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x):
        x = 2 * resize_299(x) - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        feats = x.mean((2, 3))  # pool3, (B, 2048)
        # no bias: published IS numbers (openai/improved-gan) use the softmax weights only
        return feats, feats @ self.fc.weight.T

def load_inception(weights=None, device="cpu"):
    """The FID Inception, frozen, in eval mode. weights: None (pytorch-fid's file, downloaded once
    into the torch hub cache), a path to that file, or "random" (seeded, for tests only)."""
    if weights == "random":
        if plumbing.is_master():
            print("WARNING: the Inception network has RANDOM weights (--inception-weights random): "
                  "FID and IS numbers are MEANINGLESS", file=sys.stderr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same network every run, so saved statistics compare
            model = InceptionFID()
            for m in model.modules():  # the default init shrinks pool3 to ~1e-8; He init: O(1)
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        model.fingerprint = f"random-seed0 {PREPROCESS}"
        return model.to(device).eval().requires_grad_(False)
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if weights is None and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_SHA256)
        except (OSError, RuntimeError) as e:  # offline, proxy, or a damaged download
            raise SeqganError(f"cannot download the FID Inception weights ({type(e).__name__}): "
                              f"put {WEIGHTS_FILE} from {WEIGHTS_URL} at {path}, or pass "
                              "--inception-weights PATH") from None
    if not os.path.isfile(path):
        raise SeqganError(f"--inception-weights {path}: no such file (give {WEIGHTS_FILE})")
    model = InceptionFID()
    try:  # strict keys: unpickling, zip and key/shape errors alike
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise SeqganError(f"{path} is not pytorch-fid's {WEIGHTS_FILE} state dict "
                          f"({' '.join(str(e).split())[:200]})") from None
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith(WEIGHTS_SHA256):
        print(f"warning: {path} has sha256 {digest[:8]}, not {WEIGHTS_SHA256}: FID will not match "
              "published numbers", file=sys.stderr)
    model.fingerprint = f"sha256-{digest[:8]} {PREPROCESS}"
    return model.to(device).eval().requires_grad_(False)

@contextlib.contextmanager
def fp32(device):
    """Full fp32 for features: no autocast, no TF32 (cuDNN's default TF32 is enough to move FID)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

def collate(paths):
    """Decode image files in a DataLoader worker as pytorch-fid (PIL RGB, uint8) and stack them;
    mixed sizes are resized to 299 here (else on the device), with the network's own op."""
    batch = [plumbing.load_image(p) for p in paths]
    if len({x.shape for x in batch}) == 1:
        return torch.stack(batch)
    return torch.cat([resize_299(x[None].float() / 255) for x in batch])

def loader(dataset, batch_size, num_workers, device, collate_fn=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_fn, pin_memory=device.type == "cuda")

def report_speed(what, n, t0):
    dt = time.time() - t0  # decoding included: the number a user waits for
    if plumbing.is_master():
        print(f"{what}: {n} images in {dt:.1f}s ({n / dt:.1f} images/s)")

def my_shard(items):
    """This rank's contiguous share of a list under torchrun; every rank needs an item to gather."""
    if not dist.is_initialized():
        return items
    if len(items) < (world := dist.get_world_size()):
        raise SeqganError(f"{len(items)} images for {world} processes: run at most {len(items)}")
    return [items[i] for i in plumbing.shard(len(items), dist.get_rank(), world)]

@torch.no_grad()
def compute_features(model, images, device, batch_size=50, num_workers=NUM_WORKERS):
    """pool3 features (N, 2048), IS logits (N, 1008), float64 numpy, of image paths (a shard per
    rank under torchrun, all N rows back in order) or of batches, uint8 or float in [0, 1]."""
    device = torch.device(device)
    paths = isinstance(images, (list, tuple)) and all(isinstance(p, str) for p in images)
    if paths:
        images = loader(my_shard(images), batch_size, num_workers, device, collate)
    outs, t0 = [], time.time()
    with fp32(device):
        for x in tqdm(images, unit="batch", desc="inception", leave=False,
                      disable=not plumbing.is_master()):
            x = (x[0] if isinstance(x, (list, tuple)) else x).to(device, non_blocking=True)
            outs.append(model(x.float() / 255 if x.dtype == torch.uint8 else x.float()))
    if not outs:  # (features, logits) of each batch, kept on the device: no host sync per batch
        raise SeqganError("no images to compute Inception features of")
    feats, logits = (torch.cat(t) for t in zip(*outs))
    if paths:  # the ranks' rows in rank order: the N images in the order of the list
        feats, logits = plumbing.gather_rows(feats), plumbing.gather_rows(logits)
    report_speed("inception", len(feats), t0)
    return feats.double().cpu().numpy(), logits.double().cpu().numpy()

# -----------------------------------------------------------------------------
# statistics, Frechet distance, Inception Score

def compute_stats(feats, fingerprint=""):
    """Gaussian fit of features (N, D), float64, as pytorch-fid: dict(mu, sigma, n, fingerprint)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise SeqganError(f"FID needs at least 2 images for a covariance, got {len(feats)}")
    return dict(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(feats),
                fingerprint=fingerprint)

def load_stats(path):
    """Statistics saved by --save-stats, or by pytorch-fid (mu, sigma; n and fingerprint None)."""
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise SeqganError(f"cannot read statistics {path} ({e})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise SeqganError(f"{path} has no 'mu' and 'sigma' arrays (found: "
                          f"{', '.join(sorted(stats)) or 'nothing'})")
    mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise SeqganError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return dict(mu=mu, sigma=sigma, n=int(stats["n"]) if "n" in stats else None,
                fingerprint=str(stats.get("fingerprint", "")))

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as pytorch-fid."""
    mu1, mu2 = (np.atleast_1d(m).astype(np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(s).astype(np.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SeqganError(f"statistics of different dimension ({len(mu1)} vs {len(mu2)}): were "
                          "both made with the 2048-d FID Inception features?")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: shift both a little, as pytorch-fid
        print(f"warning: sqrtm(sigma1 sigma2) is not finite; adding {eps} * I to both "
              "covariances", file=sys.stderr)
        offset = eps * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # the exact root is real (PSD product): round-off, unless large
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise SeqganError(f"sqrtm(sigma1 sigma2) has imaginary diagonal {imag:.3g} > 1e-3: "
                              f"too few samples (>= 2048; 50k to report), SciPy {scipy.__version__}"
                              " (1.11.2-1.12: sqrtm regression; use >= 1.13), or collapsed samples")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def fid_from_stats(stats1, stats2):
    """FID of two statistics dicts, refusing ones made with other weights or preprocessing."""
    f1, f2 = stats1.get("fingerprint", ""), stats2.get("fingerprint", "")
    if f1 and f2 and f1 != f2:
        raise SeqganError(f"statistics made with different Inception weights or preprocessing "
                          f"({f1!r} vs {f2!r})")
    for n in sorted({stats1["n"], stats2["n"]} - {None}):
        if n < (dim := len(stats1["mu"])):
            print(f"warning: FID from {n} images, fewer than the {dim} feature dimensions: sigma "
                  "is singular and FID biased upward; use 50k to report", file=sys.stderr)
    return frechet_distance(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"])

def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts, p(y) the part's mean -> (mean,
    std) over parts. Softmax over all 1008 logits, split boundaries as openai/improved-gan."""
    logp = scipy.special.log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # (N, C)
    n = len(logp)
    if n < splits:
        raise SeqganError(f"IS with {splits} splits needs at least {splits} images, got {n}")
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]  # log p(y|x)
        log_py = np.log(np.exp(part).mean(0))  # log p(y), (C,)
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))  # exp(mean KL)
    return float(np.mean(scores)), float(np.std(scores))

# -----------------------------------------------------------------------------
# folders and statistics files, tokenizer reconstructions, the command line

def stats_for(path, model, device, batch_size=50, num_workers=NUM_WORKERS):
    """Statistics of an image folder, or loaded from a .npz file."""
    if path.endswith(".npz"):
        return load_stats(path)
    feats, _ = compute_features(model, plumbing.list_images(path), device, batch_size, num_workers)
    return compute_stats(feats, model.fingerprint)

@torch.no_grad()
def recon_metrics(tok, folder, model, device, batch_size=50, num_workers=NUM_WORKERS):
    """rFID (originals vs reconstructions at the tokenizer's size), PSNR and codebook usage of a
    tokenizer on an image folder, loaded as in training; the result on rank 0 (else None)."""
    device, K = torch.device(device), tok.cfg.n_codes
    images = plumbing.ImageFolder(folder, tok.cfg.image_size)
    images = torch.utils.data.Subset(images, my_shard(list(range(len(images)))))
    real, fake, psnr_sum, t0 = [], [], 0.0, time.time()
    counts = torch.zeros(K, dtype=torch.long, device=device)
    with fp32(device):
        for x, _ in tqdm(loader(images, batch_size, num_workers, device), unit="batch",
                         desc="reconstruct", leave=False, disable=not plumbing.is_master()):
            x = plumbing.to_input(x, device, tok.cfg.image_size)  # (B, 3, S, S) in [-1, 1]
            x_hat, idx, _ = tok(x)
            x_hat = x_hat.float().clamp(-1, 1)
            real.append(model((x + 1) / 2)[0])
            fake.append(model((x_hat + 1) / 2)[0])
            psnr_sum = psnr_sum + seqgan.psnr(x_hat, x) * len(x)  # a tensor: no host sync
            seqgan.count_codes(counts, idx)
    psnr_sum = plumbing.all_reduce_sum(torch.as_tensor(psnr_sum, device=device).float())
    plumbing.all_reduce_sum(counts)
    real, fake = (plumbing.gather_rows(torch.cat(f)) for f in (real, fake))
    n = len(real)
    report_speed("reconstruct + inception", n, t0)
    if not plumbing.is_master():
        return None  # rank 0 alone fits the statistics and reports
    real, fake = (compute_stats(f.double().cpu().numpy(), model.fingerprint) for f in (real, fake))
    usage, perplexity = seqgan.codebook_usage(counts)
    used = int((counts > 0).sum())
    if used < 0.1 * K:
        print(f"warning: only {used}/{K} codes used; raise the entropy weight", file=sys.stderr)
    return dict(rfid=fid_from_stats(real, fake), psnr=float(psnr_sum / n), usage=usage.item(),
                codes_used=used, n_codes=K, perplexity=perplexity.item(), n=n)

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="FID: two image folders or .npz statistics files")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the one folder's mu, sigma, n "
                   "(and a fingerprint of weights and preprocessing) to use in its place")
    p.add_argument("--is", dest="inception_score", action="store_true", help="IS over 10 splits")
    p.add_argument("--recon", metavar="CKPT", help="tokenizer: rFID, PSNR, code usage on --images")
    p.add_argument("--images", metavar="FOLDER", help="validation image folder for --recon")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward (default: 50)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--num-workers", type=int, default=NUM_WORKERS, help="image-decoding "
                   "processes; 0: the main process (default: %(default)s)")
    p.add_argument("--inception-weights", metavar="PATH", help=f"{WEIGHTS_FILE} to use (default: "
                   "download it into the torch hub cache); 'random' for tests: meaningless numbers")
    args = p.parse_args(argv)
    n_paths = 0 if args.recon else 1 if (args.save_stats or args.inception_score) else 2
    if len(args.paths) != n_paths or bool(args.images) != bool(args.recon):
        raise SeqganError("use: fid.py A B | fid.py FOLDER --save-stats OUT.npz and/or --is | "
                          "fid.py --recon CKPT --images FOLDER (see --help)")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        raise SeqganError(f"--save-stats {args.save_stats}: end the name in .npz")
    if len(args.paths) == 1 and args.paths[0].endswith(".npz"):
        raise SeqganError(f"--save-stats and --is need an image folder, not {args.paths[0]}")
    for path in args.paths or [args.images]:  # fail before the network loads
        load_stats(path) if path.endswith(".npz") else plumbing.list_images(path)
    return args

def main(argv=None):
    """-> the numbers it printed (rank 0; {} on the other ranks under torchrun)."""
    args = parse(argv)
    *_, device = plumbing.setup_distributed(args.device)  # each rank a shard; rank 0 reports
    kw, result = dict(batch_size=args.batch_size, num_workers=args.num_workers), {}
    tok = plumbing.load_tokenizer(args.recon, device) if args.recon else None
    need_net = args.recon or not all(p.endswith(".npz") for p in args.paths)  # 2 Gaussians: none
    model = load_inception(args.inception_weights, device) if need_net else None
    if args.recon:
        result = r = recon_metrics(tok, args.images, model, device, **kw) or {}
        if r:
            print(f"rFID {r['rfid']:.4f}  PSNR {r['psnr']:.2f} dB  codebook usage "
                  f"{r['codes_used']}/{r['n_codes']} ({r['usage']:.1%}), perplexity "
                  f"{r['perplexity']:.1f}  (N={r['n']} {args.images})")
    elif len(args.paths) == 2:
        s1, s2 = (stats_for(p, model, device, **kw) for p in args.paths)  # every rank
        if plumbing.is_master():
            score, n1, n2 = fid_from_stats(s1, s2), s1["n"], s2["n"]
            print(f"FID {score:.4f}  (N={n1 or '?'} {args.paths[0]}, N={n2 or '?'} "
                  f"{args.paths[1]})")
            result = dict(fid=score, n=(n1, n2))
    else:  # --save-stats and / or --is of the one folder
        folder = args.paths[0]
        feats, logits = compute_features(model, plumbing.list_images(folder), device, **kw)
        if plumbing.is_master() and args.save_stats:
            stats = compute_stats(feats, model.fingerprint)
            os.makedirs(os.path.dirname(args.save_stats) or ".", exist_ok=True)
            with open(args.save_stats + ".tmp", "wb") as f:  # atomic: no half-written statistics
                np.savez(f, **stats)
            os.replace(args.save_stats + ".tmp", args.save_stats)
            print(f"saved statistics of N={stats['n']} images in {folder} to {args.save_stats}")
            result["n"] = stats["n"]
        if plumbing.is_master() and args.inception_score:
            result["is"] = inception_score(logits)
            print(f"IS {result['is'][0]:.3f} +- {result['is'][1]:.3f}  (N={len(logits)} {folder}, "
                  "10 splits)")
    plumbing.teardown()
    return result

if __name__ == "__main__":
    plumbing.cli(main)
