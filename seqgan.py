"""
SeQ-GAN in one file: a VQ tokenizer trained for *semantic* compression, and the generative
transformers that model its tokens.

Paper: Gu et al., "Rethinking the Objectives of Vector-Quantized Tokenizers for Image Synthesis"
(SeQ-GAN), arXiv:2212.03185. The claim: a tokenizer that reconstructs better does not give better
generations; a codebook that holds semantics does. Hence two training phases for the tokenizer:
  phase 1  conv-only VQGAN, L1 + L_vq + GAN + L_alpha with alpha = 1 (semantic, Section 3.3)
  phase 2  encoder and codebook frozen, decoder enhanced with block-regional and dilated
           attention, fine-tuned with alpha = 0 (details, Section 3.4)

Paper map (paper -> code; tests in test_seqgan.py):
  Eq. 1     nearest code -> VectorQuantizer.forward; test_quantizer_returns_nearest_code
  Eq. 2     L_vq, beta on the commitment term, straight-through -> VectorQuantizer.forward;
            test_beta_scales_commitment_not_codebook, test_straight_through_reaches_encoder
  entropy   codebook-usage term -> VectorQuantizer.forward; test_entropy_term_raises_codebook_usage
  Eq. 3     L_alpha = a L_sem + (1 - a) L_low -> PerceptualLoss; test_perceptual_alpha_mixes_as_eq3,
            test_perceptual_taps_are_the_named_vgg16_layers; per-layer error / target energy
            (ours): test_perceptual_balance_is_independent_of_vgg_scale
  Eq. 2, 3  the objective L1 + L_alpha + L_vq (phase 1) + w L_adv -> tokenizer_loss;
    test_generator_objective_adds_the_weighted_terms_phase2_drops_lvq_and_gan_weight_0_never_runs_d
  Tab. 7    encoder, decoder -> Encoder, Decoder; test_paper_preset_matches_table7_size
  3.4       phase-2 attention -> BlockAttention; test_block_attention_equals_masked_reference
  GAN       D, lazy R1 -> Discriminator, d_backward; test_d_step_leaves_generator_grads_untouched
  3.1, T. 8 AR / NAR prior -> Prior, ar_loss, maskgit_loss;
            test_ar_output_at_i_ignores_later_tokens_and_sees_earlier_ones
  Tab. 10   AR sampling -> generate_ar; test_cached_and_uncached_ar_sampling_give_identical_tokens
            MaskGIT decoding -> generate_maskgit;
            test_maskgit_decoding_follows_schedule_and_never_changes_fixed_tokens
  3.2       Fig. 4, teacher-forced top-1 -> teacher_forced_prediction;
            test_teacher_forced_prediction_is_next_token_argmax_given_the_true_prefix
Related objectives (--objective regvq | vqkd), in the last section:
  Reg-VQ    KL(P || uniform), SeQ-GAN's entropy term -> VectorQuantizer (kl_uniform);
            test_regvq_prior_kl_is_log_k_minus_entropy_and_the_same_gradient_as_seqgan
            stochastic mask, PCL -> RelatedQuantizer, stochastic_mask, pcl_loss;
            test_mask_ratio_one_samples_from_softmax_of_minus_distance,
            test_pcl_weights_each_positive_by_half_of_one_plus_its_relative_sampling_distance
  VQ-KD     feature distillation, cosine codebook -> FeatureDecoder, feature_kd_loss;
            test_vqkd_phase1_has_no_pixel_decoder_and_learns_a_toy_teacher

The sections below follow the order a reader needs them; the scripts' plumbing is in plumbing.py.
"""

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# -----------------------------------------------------------------------------
# configs: the tokenizer's shape, its objective's weights, the prior's shape

class SeqganError(Exception):
    """A user-facing problem (bad flag, missing file): printed as one line, no traceback."""

def option(default, help):
    """A config field with its default and --help text (each script picks which fields are flags).
    default None: the script resolves it (the --help says how)."""
    return field(default=default, metadata={"help": help})

@dataclass
class TokenizerConfig:
    """Shape of the VQ tokenizer; the defaults are the 32 px classroom model."""
    image_size: int = option(32, "training image size in pixels (square)")
    channels: int = option(64, "base channel count of encoder and decoder")
    ch_mult: tuple = option((1, 2, 2), "channel multiplier per level (downsampling 2**(levels-1))")
    n_res: int = option(2, "residual blocks per level")
    n_res_lowest: int = option(4, "residual blocks at the lowest resolution (Table 7: 4 at 16x16)")
    n_codes: int = option(1024, "codebook size K")
    code_dim: int = option(256, "codebook vector dimension")
    beta: float = option(0.25, "commitment weight beta of Eq. 2")
    entropy_weight: float = option(0.01, "weight gamma of the codebook-entropy term")
    # 0.01 as MaskGIT; at the paper's implicit 1 a young codebook's usage is uniform: no effect
    entropy_temp: float = option(0.01, "tau of softmax(-|z-e|^2/tau): entropy term, Reg-VQ's mask")
    objective: str = option("seqgan", "seqgan, regvq (Reg-VQ) or vqkd (VQ-KD); see README")
    mask_ratio: float = option(0.0, "Reg-VQ mask: fraction of positions sampled (regvq: 0.4, ours)")
    cosine_codebook: bool = option(False, "l2-normalised codebook, cosine lookup (vqkd default on)")
    # derived from --objective and --phase by train_tokenizer.py
    feature_dim: int = option(0, "VQ-KD phase 1: teacher channels decoded (0: pixels)")
    dec_attn: int = option(0, "attention layers after each decoder ResBlock: 0 conv-only "
                              "(phase 1), 1 phase 2, 2 Table 1's +Attention x2")
    attn_heads: int = option(8, "phase-2 attention heads (even: half regional, half dilated)")
    attn_block: int = option(4, "block size P of the phase-2 attention")

    def __post_init__(self):
        names = ("seqgan", "regvq", "vqkd")
        if self.objective not in names:
            raise SeqganError(f"unknown --objective {self.objective}; use {', '.join(names)}")
        if not 0 <= self.mask_ratio <= 1:
            raise SeqganError(f"--mask-ratio {self.mask_ratio} is outside [0, 1]")
        f = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % f:
            raise SeqganError(f"--image-size {self.image_size}: not divisible by the factor {f}")
        low = self.image_size // f  # resolution of the first decoder level
        if self.dec_attn < 0 or self.dec_attn and (self.attn_heads % 2 or low % self.attn_block):
            raise SeqganError(f"attention needs even attn_heads and an attn_block dividing {low}")

    @property
    def grid(self):
        """Tokens per side: image_size / f (PriorConfig.grid counts all h*w tokens)."""
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

# VGG16's taps (torchvision's vgg16().features indices); Eq. 3: L_low = relu1_2..relu5_3, L_sem =
# relu5_3 + logits. Here because LossConfig checks layer names against them.
VGG_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3", 29: "relu5_3"}
VGG_CHANNELS = {"relu1_2": 64, "relu2_2": 128, "relu3_3": 256, "relu4_3": 512, "relu5_3": 512}
LOW_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
SEM_LAYERS = ("relu5_3", "logits")

@dataclass
class LossConfig:
    """Weights of the tokenizer objective (Eq. 2, Eq. 3, GAN)."""
    alpha: float = option(1.0, "Eq. 3: 1 = semantic (relu5_3, logits), 0 = low-level (5 relu taps)")
    l1_weight: float = option(1.0, "weight of the pixel L1 term")
    perceptual_weight: float = option(1.0, "weight of L_alpha")
    perceptual_norm: str = option("energy", "per-layer error of Eq. 3: energy (MSE / target energy,"
                                            " ours: VGG-scale free) or none (the paper's MSE)")
    perceptual_size: int = option(0, "VGG16 input size (0 = the image's; VGG time grows as size^2)")
    gan_weight: float = option(0.1, "fixed weight of the generator's GAN term (MaskGIT's 0.1)")
    gan_start: int = option(5000, "step at which the discriminator starts training")
    gan_warmup: int = option(2000, "steps over which the GAN weight ramps from 0 while D warms up")
    r1_gamma: float = option(0.1, "R1 penalty weight (ours: between StyleGAN2-ADA's 0.01 at 32 px "
                                  "and 1 at 256 px, the paper preset's)")
    r1_every: int = option(16, "lazy R1: penalise every N discriminator steps")
    disc_channels: int = option(64, "discriminator base channels (doubling per block)")
    disc_max_channels: int = option(512, "discriminator channel cap")
    pcl_weight: float = option(0.0, "Reg-VQ's contrastive loss (PCL) weight (regvq: 0.1, ours)")
    pcl_temp: float = option(0.1, "PCL InfoNCE temperature (ours; Reg-VQ's is not reproduced here)")
    teacher_layer: str = option("relu5_3", "VQ-KD teacher, a VGG16 tap (ours; VQ-KD: e.g. CLIP)")

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise SeqganError(f"--alpha {self.alpha} is outside [0, 1]")
        if self.teacher_layer not in VGG_CHANNELS:
            raise SeqganError(f"--teacher-layer {self.teacher_layer}: choose from "
                              f"{', '.join(VGG_CHANNELS)}")
        if self.r1_every < 1:
            raise SeqganError(f"--r1-every {self.r1_every}: R1 runs every N >= 1 D steps")
        if self.perceptual_norm not in ("energy", "none"):
            raise SeqganError(f"unknown --perceptual-norm {self.perceptual_norm}; use energy "
                              "(default) or none (the paper's plain MSE)")

@dataclass
class PriorConfig:
    """Prior shape (Table 8); n_codes, grid, n_classes come from the data, causal from --model."""
    n_codes: int = option(1024, "K, the tokenizer's codebook size")
    grid: int = option(64, "h*w tokens per image (8x8 classroom, 16x16 paper)")  # not h alone
    n_classes: int = option(0, "classes for conditioning; 0 = unconditional")
    n_layer: int = option(8, "transformer layers")
    n_head: int = option(8, "attention heads")
    n_embd: int = option(256, "embedding width (MLP 4x)")
    dropout: float = option(0.1, "dropout in attention, MLP and embeddings")
    causal: bool = option(True, "True: AR prior, False: NAR (MaskGIT) prior")

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise SeqganError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")

# Table 8: 24 layers, 16 heads, d 768, MLP 3072, dropout 0.1 (~172M); large d 1024, MLP 4096
# (~305M), with 16 heads assumed (the paper gives none).
PRIOR_PRESETS = {"cpu": dict(n_layer=4, n_head=4, n_embd=128, dropout=0.1),
                 "classroom": dict(n_layer=8, n_head=8, n_embd=256, dropout=0.1),
                 "base": dict(n_layer=24, n_head=16, n_embd=768, dropout=0.1),
                 "large": dict(n_layer=24, n_head=16, n_embd=1024, dropout=0.1)}

def prior_preset(name, n_codes, grid, n_classes, causal):
    """A PriorConfig: a named preset's shape (Table 8) and the data's vocab, grid and classes."""
    return PriorConfig(n_codes=n_codes, grid=grid, n_classes=n_classes, causal=causal,
                       **PRIOR_PRESETS[name])

# -----------------------------------------------------------------------------
# building blocks of the encoder and decoder

def Normalize(c):
    """GroupNorm with 32 groups (fewer for the tiny test models)."""
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)

class ResBlock(nn.Module):
    """Table 7 residual block: GN-Swish-Conv-GN-Swish-Conv, 1x1 skip when channels change."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

# -----------------------------------------------------------------------------
# vector quantizer (Eq. 1, Eq. 2, the entropy term)

class VectorQuantizer(nn.Module):
    """SeQ-GAN's quantizer: nearest code (Eq. 1), L_vq (Eq. 2) and the entropy term.
    forward(z_e) -> z_q (straight-through), indices, terms: codebook_loss |sg[z_e] - z_q|^2,
    commitment_loss |z_e - sg[z_q]|^2, entropy H(P) of the batch's soft usage P, kl_uniform
    (log K - H(P)), loss (codebook + beta commitment + gamma kl_uniform); sample_*: Reg-VQ's, 0."""
    def __init__(self, cfg):
        super().__init__()
        self.n_codes, self.beta, self.tau = cfg.n_codes, cfg.beta, cfg.entropy_temp
        self.entropy_weight = cfg.entropy_weight
        self.codebook = nn.Embedding(cfg.n_codes, cfg.code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.n_codes, 1.0 / cfg.n_codes)

    def codes(self):
        """The codebook (K, D) in fp32."""
        return self.codebook.weight.float()

    def project(self, z):
        """Flat vectors (N, D) as the lookup compares them: unchanged here (VQ-KD normalises)."""
        return z

    def distances(self, z):
        """Squared Euclidean distances (N, D) x (K, D) -> (N, K)."""
        e, z = self.codes(), self.project(z)
        return z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)

    def lookup(self, idx):
        """Indices (B, h, w) -> code vectors (B, D, h, w)."""
        return F.embedding(idx, self.codes()).permute(0, 3, 1, 2)

    def nearest(self, z):
        """Eq. 1 for flat z (N, D) in fp32: k* = argmin_k |z - e_k|^2 (N,), and distances (N, K)."""
        d = self.distances(z)
        return d.argmin(1), d

    def straight_through(self, z, z_q, idx, logits, e):
        """z_q's value with z's gradient, nothing sampled (Reg-VQ's mask overrides this step)
        -> z_st (N, D), idx (N,), sample_dist (N,), sample_changed ()."""
        z_st = z + (z_q - z).detach()  # forward: z_q; backward: the gradient is copied to z_e
        return z_st, idx, torch.zeros_like(logits[:, 0]), torch.zeros((), device=z.device)

    def forward(self, z_e):
        B, D, h, w = z_e.shape
        # fp32 even under autocast: distances of 256-d vectors lose the argmin in bf16
        with torch.autocast(z_e.device.type, enabled=False):
            z = self.project(z_e.float().permute(0, 2, 3, 1).reshape(-1, D))  # (N, D), N = B*h*w
            e = self.codes()  # (K, D)
            # Eq. 1: z_q = e_k*, k* = argmin_k |z_e - e_k|
            idx, d = self.nearest(z)  # (N,), (N, K)
            z_q = e[idx]  # (N, D)
            # Eq. 2: |sg[E(x)] - z_q|^2 + beta |sg[z_q] - E(x)|^2. beta scales the *commitment*
            # term (the encoder's), not the codebook term as in taming's legacy quantizer.
            codebook_loss = F.mse_loss(z_q, z.detach())
            commitment_loss = F.mse_loss(z, z_q.detach())
            # Entropy term: the soft assignment averaged over the (rank's) batch, D_bar, and its
            # entropy H; softmax over -*squared* distances / tau (the paper says L2 distance). The
            # paper writes "+gamma H(D_bar)", but spread usage needs the loss to raise H: we add
            # gamma * KL(D_bar || uniform) = gamma * (log K - H), -gamma H's gradient, never < 0.
            logits = -d / self.tau  # (N, K)
            p_mean = F.softmax(logits, dim=1).mean(0)  # (K,)
            entropy = -(p_mean * torch.log(p_mean.clamp_min(1e-12))).sum()
            kl_uniform = math.log(self.n_codes) - entropy
            loss = codebook_loss + self.beta * commitment_loss + self.entropy_weight * kl_uniform
            z_st, idx, sample_dist, sample_changed = self.straight_through(z, z_q, idx, logits, e)
        z_q = z_st.reshape(B, h, w, D).permute(0, 3, 1, 2).to(z_e.dtype)
        terms = dict(loss=loss, codebook_loss=codebook_loss, commitment_loss=commitment_loss,
                     entropy=entropy, kl_uniform=kl_uniform,
                     sample_dist=sample_dist.reshape(B, h, w), sample_changed=sample_changed)
        return z_q, idx.reshape(B, h, w), terms

# -----------------------------------------------------------------------------
# encoder, decoder, tokenizer (Table 7; the phase-2 decoder's attention of section 3.4)

class Encoder(nn.Module):
    """Conv-only encoder: per level n_res ResBlocks then a 2x2 average pool; n_res_lowest at the
    bottom. (B, 3, H, W) -> (B, code_dim, H/f, W/f)."""
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        blocks, c = [], chs[0]
        for i, ch in enumerate(chs):
            lowest = i == len(chs) - 1
            for _ in range(cfg.n_res_lowest if lowest else cfg.n_res):
                blocks.append(ResBlock(c, ch))
                c = ch
            if not lowest:  # no parameters (MaskGIT's VQGAN): Table 7's 54.5M; strided convs: 55.9M
                blocks.append(nn.AvgPool2d(2))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.code_dim, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))

class BlockAttention(nn.Module):
    """Block-regional + dilated attention of the phase-2 decoder (section 3.4, HiT) on P x P blocks:
    half of the heads attend within each block (regional: detail), half across blocks among the
    positions at the same offset in their block (dilated: a sparse global view). The projection of
    the concatenated halves starts at zero: the enhanced decoder starts as the phase-1 decoder."""
    def __init__(self, c, n_heads, block):
        super().__init__()
        self.n_heads, self.block = n_heads, block
        self.norm = Normalize(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        nh, P, half = self.n_heads, self.block, self.n_heads // 2
        hs, Hb, Wb, nd = C // nh, H // P, W // P, self.n_heads - half  # nd: dilated heads
        # channels as (3, nh, hs), rows as (Hb, P), columns as (Wb, P): (B, 3, nh, hs, Hb, P, Wb, P)
        qkv = self.qkv(self.norm(x)).reshape(B, 3, nh, hs, Hb, P, Wb, P)
        # -> 3 x (B, nh, Hb, Wb, P, P, hs): block index, offset inside the block, head dim
        q, k, v = qkv.permute(1, 0, 2, 4, 6, 5, 7, 3).unbind(0)

        def regional(t):  # (B, half, Hb, Wb, P, P, hs) -> (B*half, Hb*Wb blocks, P*P positions, hs)
            return t[:, :half].reshape(B * half, Hb * Wb, P * P, hs)
        def dilated(t):  # -> (B, nd, P, P, Hb, Wb, hs) -> (B*nd, P*P offsets, Hb*Wb blocks, hs)
            return t[:, half:].permute(0, 1, 4, 5, 2, 3, 6).reshape(B * nd, P * P, Hb * Wb, hs)

        # attention over the second-to-last axis: a block's positions, an offset's blocks
        o_r = F.scaled_dot_product_attention(regional(q), regional(k), regional(v))
        o_d = F.scaled_dot_product_attention(dilated(q), dilated(k), dilated(v))
        o_r = o_r.reshape(B, half, Hb, Wb, P, P, hs)
        o_d = o_d.reshape(B, nd, P, P, Hb, Wb, hs).permute(0, 1, 4, 5, 2, 3, 6)  # as o_r
        o = torch.cat([o_r, o_d], dim=1)  # (B, nh, Hb, Wb, P, P, hs)
        # -> (B, nh, hs, Hb, P, Wb, P) -> (B, C, H, W), undoing the first reshape
        o = o.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, C, H, W)
        return x + self.proj(o)

class Decoder(nn.Module):
    """Mirror of the encoder. With cfg.dec_attn = n, n BlockAttentions follow each of the n_res
    ResBlocks of a level (not the extra lowest ones), in their own ModuleDict so phase-1 weights
    keep their names. Paper preset: 54.45M, n = 1 (phase 2) 57.87M, n = 2 61.29M (Section 6.1 and
    Table 1: 54.5M, 57.9M, 61.4M). -> (B, 3, H, W)."""
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.ch_mult]
        c = chs[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, c, 3, padding=1)
        blocks = [ResBlock(c, c) for _ in range(cfg.n_res_lowest - cfg.n_res)]
        attn = {}  # index of the block it follows -> BlockAttention
        for i in reversed(range(len(chs))):
            for _ in range(cfg.n_res):
                blocks.append(ResBlock(c, chs[i]))
                c = chs[i]
                layers = [BlockAttention(c, cfg.attn_heads, cfg.attn_block)
                          for _ in range(cfg.dec_attn)]
                if layers:  # a single layer bare, so phase-2 state-dict keys stay as they were
                    one = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
                    attn[str(len(blocks) - 1)] = one
            if i > 0:
                blocks.append(Upsample(c))
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleDict(attn)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z_q):
        h = self.conv_in(z_q)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return self.conv_out(F.silu(self.norm_out(h)))

class Tokenizer(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder on images in [-1, 1]. Reg-VQ and VQ-KD swap in their
    quantizer (make_quantizer) and, in VQ-KD phase 1 (feature_dim > 0), a FeatureDecoder."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = make_quantizer(cfg)
        self.decoder = FeatureDecoder(cfg) if cfg.feature_dim else Decoder(cfg)

    def forward(self, x):
        """x -> reconstruction (B, 3, H, W) (VQ-KD phase 1: features), indices (B, h, w), terms."""
        z_q, idx, terms = self.quantizer(self.encoder(x))
        return self.decoder(z_q), idx, terms

    @torch.no_grad()
    def tokenize(self, x):
        """Images -> code indices (B, h, w): the nearest codes, never sampled (priors, eval)."""
        z_e = self.encoder(x).float()
        B, D, h, w = z_e.shape
        idx, _ = self.quantizer.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, D))
        return idx.reshape(B, h, w)

    def decode_indices(self, idx):
        """Code indices (B, h, w) -> images (B, 3, H, W)."""
        return self.decoder(self.quantizer.lookup(idx))

# -----------------------------------------------------------------------------
# the perceptual loss L_alpha (Eq. 3): VGG16 features of the reconstruction against the input's

def load_vgg16(weights):
    """VGG16 with 'imagenet' weights (torchvision download or torch hub cache), a local state-dict
    PATH, or 'random' (tests only: announced loudly). Never a silent fallback."""
    with torch.random.fork_rng(devices=[]):  # off the global RNG: same VGG on every rank
        torch.manual_seed(0)
        vgg = torchvision.models.vgg16()
    if weights == "random":
        if os.environ.get("RANK", "0") == "0":  # rank 0 alone, under torchrun
            print("WARNING: VGG16 has RANDOM weights (--vgg-weights random): the perceptual loss "
                  "is meaningless except for testing", file=sys.stderr)
    elif weights == "imagenet":
        w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        try:
            vgg.load_state_dict(w.get_state_dict(progress=True))
        except OSError as e:  # URLError is an OSError: offline
            raise SeqganError(f"cannot download the VGG16 weights ({type(e).__name__}): put "
                              f"{w.url} at {target} or pass --vgg-weights PATH") from None
    elif not os.path.isfile(weights):
        raise SeqganError(f"--vgg-weights {weights}: no such file (use imagenet, random or a "
                          "state-dict path)")
    else:
        try:
            vgg.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, KeyError) as e:
            raise SeqganError(f"--vgg-weights {weights} is not a torchvision VGG16 state dict "
                              f"({str(e).splitlines()[0]})") from None
    return vgg.eval().requires_grad_(False)

class PerceptualLoss(nn.Module):
    """Eq. 3: L_alpha = alpha * L_sem + (1 - alpha) * L_low. L_low sums a per-layer error over
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; L_sem over relu5_3 and the 1000 logits, so relu5_3
    keeps weight 1 for every alpha; the classifier runs only when alpha > 0. norm 'none': the
    paper's plain MSE; 'energy' (default, ours): MSE / mean(phi(x)^2), the target's energy, so the
    balance is not set by the VGG checkpoint's scale. size: resize the VGG input (0 = as given)."""
    def __init__(self, alpha, vgg, norm="energy", size=0):
        super().__init__()
        if norm not in ("energy", "none"):
            raise SeqganError(f"unknown --perceptual-norm {norm}; use energy (default) or none "
                              "(the paper's plain MSE)")
        self.alpha, self.vgg, self.norm, self.size = alpha, vgg, norm, size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def features(self, x, logits):
        """Images in [-1, 1] -> {tap name: activation}, plus 'logits' if asked for."""
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = ((x + 1) / 2 - self.mean) / self.std  # ImageNet normalisation
        out = {}
        for i, layer in enumerate(self.vgg.features[:30]):
            h = layer(h)
            if i in VGG_TAPS:
                out[VGG_TAPS[i]] = h
        if logits:
            h = self.vgg.avgpool(self.vgg.features[30](h))
            out["logits"] = self.vgg.classifier(torch.flatten(h, 1))
        return out

    def layer_error(self, f_hat, f):
        """One layer's term: MSE ('none') or MSE / mean(f^2) ('energy'; per rank under DDP)."""
        mse = F.mse_loss(f_hat.float(), f.float())
        return mse if self.norm == "none" else mse / f.float().pow(2).mean().clamp_min(1e-12)

    def forward(self, x_hat, x):
        """-> (L_alpha, {'l_low', 'l_sem', 'features'}); the unused term is 0 at alpha = 0 or 1;
        'features' = (taps of x_hat, taps of x), reused by Reg-VQ's contrastive loss."""
        sem = self.alpha > 0
        f_hat = self.features(x_hat, logits=sem)
        with torch.no_grad():
            f = self.features(x, logits=sem)
        err = {k: self.layer_error(f_hat[k], f[k]) for k in f_hat}
        zero = x_hat.new_zeros((), dtype=torch.float32)
        l_low = sum(err[k] for k in LOW_LAYERS) if self.alpha < 1 else zero
        l_sem = sum(err[k] for k in SEM_LAYERS) if sem else zero
        l_alpha = self.alpha * l_sem + (1 - self.alpha) * l_low  # Eq. 3
        return l_alpha, dict(l_low=l_low, l_sem=l_sem, features=(f_hat, f))

# -----------------------------------------------------------------------------
# discriminator and GAN loss (StyleGAN2-style, non-saturating, lazy R1)

class Blur(nn.Module):
    """[1, 3, 3, 1] low-pass before downsampling (StyleGAN2's anti-aliased resampling)."""
    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64).view(1, 1, 4, 4))

    def forward(self, x):  # depthwise: one kernel per channel
        kernel = self.kernel.expand(x.shape[1], 1, 4, 4).to(x.dtype)
        return F.conv2d(F.pad(x, (1, 2, 1, 2), mode="reflect"), kernel, groups=x.shape[1])

class DiscBlock(nn.Module):
    """Residual block halving the resolution: (conv-lrelu-conv-lrelu-blurpool) + blurpool-1x1."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.blur = Blur()

    def forward(self, x):
        down = lambda t: F.avg_pool2d(self.blur(t), 2)
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = down(F.leaky_relu(self.conv2(h), 0.2))
        return (h + self.skip(down(x))) / math.sqrt(2)

class Discriminator(nn.Module):
    """StyleGAN2 residual D to 4x4, minibatch-stddev, 2 linear layers, no equalised lr; -> (B,)."""
    def __init__(self, image_size, channels, max_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 1)
        blocks, c, res = [], channels, image_size
        while res > 4:
            blocks.append(DiscBlock(c, min(2 * c, max_channels)))
            c, res = min(2 * c, max_channels), res // 2
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * res * res, c)
        self.out = nn.Linear(c, 1)

    def forward(self, x):
        h = self.blocks(F.leaky_relu(self.conv_in(x), 0.2))
        # minibatch stddev: a channel with the feature spread in groups of g samples (per rank),
        # so D sees a generator that makes images alike; + 1e-8: sqrt twice differentiable (R1)
        B, C, H, W = h.shape
        g = max(d for d in (4, 3, 2, 1) if B % d == 0)
        s = h.float().reshape(g, -1, C, H, W).var(0, unbiased=False)  # (B/g, C, H, W)
        s = (s + 1e-8).sqrt().mean([1, 2, 3])  # (B/g,)
        s = s.reshape(1, -1, 1, 1, 1).expand(g, -1, 1, H, W).reshape(B, 1, H, W).to(h.dtype)
        h = F.leaky_relu(self.conv_out(torch.cat([h, s], 1)), 0.2)
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2)).squeeze(1)

def d_loss(logits_real, logits_fake):
    """Non-saturating logistic loss of D: softplus(-D(x)) + softplus(D(x_hat))."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()

def g_loss(logits_fake):
    """Non-saturating generator loss: softplus(-D(x_hat))."""
    return F.softplus(-logits_fake).mean()

def r1_penalty(disc, x):
    """R1 = E |grad_x D(x)|^2 on real images (computed in fp32)."""
    x = x.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x).sum(), x, create_graph=True)
    return grad.pow(2).sum([1, 2, 3]).mean()

def gan_weight_at(step, cfg):
    """G's GAN weight: 0 up to gan_start, then a linear ramp over gan_warmup steps. D's first step
    is at gan_start (after G's): G never feels an untrained D, and D warms up during the ramp."""
    if step <= cfg.gan_start:
        return 0.0
    return cfg.gan_weight * min(1.0, (step - cfg.gan_start) / max(1, cfg.gan_warmup))

def autocast(device):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (no fp16 + GradScaler path)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def d_backward(disc, x, x_hat, loss_cfg, step, scale=1.0):
    """D's loss on real x and *detached* reconstructions, lazy R1 every r1_every steps; backprops
    scale * loss. Returns the detached d_loss, r1, and D's mean logits d_real and d_fake (d_real > 0
    > d_fake: D tells them apart; both near 0 with d_loss near log 4: it cannot)."""
    # R1 is a double backward, which neither DDP nor torch.compile supports: run it on the plain D
    plain = getattr(disc, "module", disc)  # DistributedDataParallel wraps the (compiled) module
    plain = getattr(plain, "_orig_mod", plain)  # torch.compile's OptimizedModule wraps the plain D
    r1 = torch.zeros((), device=x.device)
    if step % loss_cfg.r1_every == 0:
        r1 = r1_penalty(plain, x)
        (scale * loss_cfg.r1_gamma / 2 * loss_cfg.r1_every * r1).backward()  # x interval: StyleGAN2
    with autocast(x.device):
        real, fake = disc(x), disc(x_hat.detach())
        loss = d_loss(real, fake)
    (scale * loss).backward()
    return dict(d_loss=(loss + loss_cfg.r1_gamma / 2 * loss_cfg.r1_every * r1).detach().float(),
                r1=r1.detach().float(), d_real=real.detach().float().mean(),
                d_fake=fake.detach().float().mean())

# -----------------------------------------------------------------------------
# the tokenizer's objective: L1, L_alpha, GAN and L_vq in one sum

def tokenizer_loss(x, x_hat, q, loss_cfg, phase=1, gan_w=0.0, disc=None, perceptual=None,
                   vqkd=False):
    """The generator's loss on one batch, from x_hat, _, q = tokenizer(x) -> (total, terms): total =
    l1_weight L1 + perceptual_weight L_alpha (Eq. 3) + gan_w L_adv + L_vq (phase 1 only). Eq. 2 puts
    L1 inside L_vq; the code keeps L1 outside, so phase 2 (encoder, codebook frozen) drops only the
    codebook, commitment and entropy terms (still logged). gan_w = 0: D never runs. Reg-VQ's PCL and
    VQ-KD's phase 1 are in the last section. disc may be DDP-wrapped."""
    zero = torch.zeros((), device=x.device)
    terms = dict(loss=zero, l1=zero, perceptual=zero, l_low=zero, l_sem=zero,
                 codebook=q["codebook_loss"], commitment=q["commitment_loss"], entropy=q["entropy"],
                 g_adv=zero, pcl=zero, kd=zero, sample_changed=q["sample_changed"])
    if vqkd:  # VQ-KD phase 1: x_hat holds the predicted teacher features
        return vqkd_loss(x, x_hat, q, loss_cfg, perceptual, terms)
    terms["l1"] = (x_hat.float() - x).abs().mean()
    loss = loss_cfg.l1_weight * terms["l1"]
    if perceptual is not None:
        terms["perceptual"], p_terms = perceptual(x_hat, x)
        terms["l_low"], terms["l_sem"] = p_terms["l_low"], p_terms["l_sem"]
        loss = loss + loss_cfg.perceptual_weight * terms["perceptual"]
    if gan_w > 0:
        disc = getattr(disc, "module", disc)  # inside DDP: G needs D's input gradient only, no sync
        disc.requires_grad_(False)  # the graph keeps D's input gradient, not its parameter grads
        terms["g_adv"] = g_loss(disc(x_hat))
        disc.requires_grad_(True)
        loss = loss + gan_w * terms["g_adv"]
    if phase == 1:
        loss = loss + q["loss"]
    if loss_cfg.pcl_weight > 0:  # Reg-VQ's contrastive loss
        terms["pcl"] = pcl_term(p_terms["features"], q["sample_dist"], loss_cfg.pcl_temp)
        loss = loss + loss_cfg.pcl_weight * terms["pcl"]
    terms["loss"] = loss
    return loss, terms

# -----------------------------------------------------------------------------
# priors over the token grid (section 3.1, Table 8), one transformer: causal=True the AR prior
# (next token in raster order), causal=False the NAR prior (MaskGIT: bidirectional, [MASK] = id K)

class SelfAttention(nn.Module):
    """Multi-head self-attention, causal (AR) or bidirectional (NAR), with an optional KV cache."""
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.causal, self.dropout = cfg.n_head, cfg.causal, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, kv=None, pos=0):
        B, T, C = x.shape
        nh = self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:
            # cached decoding, one position at a time: store k, v at pos, attend to 0..pos (no mask)
            assert T == 1 and self.causal
            kv[0][:, :, pos:pos + 1], kv[1][:, :, pos:pos + 1] = k, v
            k, v = kv[0][:, :, :pos + 1], kv[1][:, :, :pos + 1]  # (B, nh, pos+1, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and kv is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh * hs): the heads side by side
        return self.resid_drop(self.proj(y))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))

class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), SelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x, kv=None, pos=0):
        x = x + self.attn(self.ln_1(x), kv, pos)
        return x + self.mlp(self.ln_2(x))

class Prior(nn.Module):
    """Transformer prior over the h*w token grid (section 3.1, Table 8). Its input is [c, s_0, s_1,
    ...]: the class token (a start token when unconditional), then the image tokens in raster order.
    forward's row j scores image token j: AR from tokens < j only, NAR from the masked grid."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.n_codes + 1, C)    # +1: id K is [MASK] (NAR only), not a code
        self.wce = nn.Embedding(cfg.n_classes + 1, C)  # +1: row n_classes is the start token
        self.wpe = nn.Embedding(cfg.grid + 1, C)       # +1: position 0 holds the class/start token
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.n_codes)          # K logits: [MASK], start never predicted
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def embed(self, idx, y=None):
        """(B, t) token ids -> (B, t+1, C) inputs [class/start, tokens] plus positions."""
        B, t = idx.shape
        assert (y is None) == (self.cfg.n_classes == 0), "pass y exactly when class-conditional"
        if y is None:
            y = idx.new_full((B,), self.cfg.n_classes)
        x = torch.cat([self.wce(y)[:, None], self.wte(idx)], dim=1)  # (B, t+1, C)
        return self.drop(x + self.wpe.weight[:t + 1])

    def body(self, x, kv_cache=None, pos=0):
        """Embedded inputs (B, T, C) -> logits (B, T, K); kv_cache: one (k, v) per layer."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i], pos)
        return self.head(self.ln_f(x))

    def forward(self, idx, y=None):
        """idx (B, t), y (B,) or None -> logits; NAR: t = grid, (B, grid, K). AR also takes a prefix
        t < grid: (B, min(t + 1, grid), K), the last row scoring the next token s_t."""
        N = self.cfg.grid
        assert idx.size(1) <= N
        x = self.embed(idx, y)
        if self.cfg.causal:
            # output j (input s_{j-1}, or c at j=0) predicts s_j; s_{N-1} predicts nothing: dropped
            return self.body(x[:, :N])
        return self.body(x)[:, 1:]  # NAR: drop the class/start position's output

def num_params(cfg, embeddings=True):
    """Parameter count of Prior(cfg) in closed form (checked against the module in the tests)."""
    C, L, K = cfg.n_embd, cfg.n_layer, cfg.n_codes
    per_layer = 12 * C * C + 13 * C  # qkv 3C^2+3C, proj C^2+C, fc 4C^2+4C, proj 4C^2+C, 2 LNs 4C
    n = L * per_layer + 2 * C + C * K + K  # + ln_f + head
    if embeddings:
        n += (K + 1 + cfg.n_classes + 1 + cfg.grid + 1) * C  # wte, wce, wpe
    return n

def estimate_flops_per_token(cfg):
    """Training FLOPs (fwd+bwd) per token, nanoGPT/PaLM appendix B: 6N + 12*L*H*Q*T. N leaves out
    the embedding tables (lookups); T is the sequence the model sees (grid; NAR: + class token)."""
    L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    T = cfg.grid + (0 if cfg.causal else 1)
    return 6 * num_params(cfg, embeddings=False) + 12 * L * H * Q * T

def ar_loss(model, idx, y=None):
    """Next-token cross-entropy over the raster-order grid; idx (B, N) -> (loss, accuracy)."""
    logits = model(idx, y).float()  # (B, N, K), row j predicts idx[:, j] from idx[:, :j]
    acc = (logits.argmax(-1) == idx).float().mean()
    return F.cross_entropy(logits.flatten(0, 1), idx.flatten()), acc

def _lowest(scores, n):
    """Bool mask of the n lowest scores in each row; n is an int or a (B, 1) tensor."""
    return scores.argsort(dim=1).argsort(dim=1) < n  # rank of each entry within its row < n

def maskgit_loss(model, idx, mask_id, y=None, generator=None):
    """MaskGIT's loss (Chang et al. 2022, their Sec. 3.2): idx (B, N) -> (loss, accuracy) on masked
    tokens. Per sample u ~ U(0, 1), r = cos(pi/2 * u): ceil(r * N) >= 1 random tokens become [MASK]
    = mask_id (id K). generator must live on idx's device; u is its first draw."""
    B, N = idx.shape
    u = torch.rand(B, 1, device=idx.device, generator=generator)
    n_mask = torch.ceil(torch.cos(math.pi / 2 * u) * N).clamp(min=1)  # (B, 1)
    mask = _lowest(torch.rand(B, N, device=idx.device, generator=generator), n_mask)  # (B, N)
    logits = model(idx.masked_fill(mask, mask_id), y).float()  # (B, N, K)
    # mask-weighted (logits[mask] would sync); label smoothing 0.1: MaskGIT's, not in the paper
    ce = F.cross_entropy(logits.transpose(1, 2), idx, label_smoothing=0.1, reduction="none")
    m = mask.float()  # ce, m: (B, N)
    acc = ((logits.argmax(-1) == idx).float() * m).sum() / m.sum()
    return (ce * m).sum() / m.sum(), acc

def prior_loss(model, cfg, idx, y=None, generator=None):
    """The prior's loss, AR or MaskGIT -> (loss, accuracy); cfg: the unwrapped model's config."""
    if cfg.causal:
        return ar_loss(model, idx, y)
    return maskgit_loss(model, idx, cfg.n_codes, y, generator)

# -----------------------------------------------------------------------------
# samplers: AR with a KV cache, MaskGIT iterative decoding, the Fig. 4 visualization

# Table 10 outside ImageNet (for sample.py, train_prior.py's grids, bench.py): AR top-p 0.98 at
# temperature 1; NAR temperature 0.65 (the logits', see generate_maskgit), 12 steps, MaskGIT's
# choice temperature 4.5. On ImageNet pass sample.py --top-p 0.92 (AR) or --temperature 0.45 (NAR).
AR_TOP_P, AR_TEMPERATURE = 0.98, 1.0
NAR_TEMPERATURE, NAR_STEPS, CHOICE_TEMPERATURE = 0.65, 12, 4.5

def top_k_filter(logits, k):
    """Keep each row's k largest logits (and ties with the k-th), -inf elsewhere; k=0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))

def top_p_filter(logits, p):
    """Nucleus filter (Holtzman et al. 2020): keep the fewest most likely tokens with mass >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass ranked above it already reaches p; for p > 0 the top one stays.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))

def uniforms(n, m, generator, device):
    """(n, m) uniforms in [0, 1). generator: one (None: global) or a list, one per row; a row
    then depends on its generator alone, whatever batch or GPU draws it (sample.py: per image)."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == n, "one generator per row"
        return torch.stack([torch.rand(m, device=device, generator=g) for g in generator])
    return torch.rand(n, m, device=device, generator=generator)

def sample_probs(probs, u):
    """Inverse-CDF sampling: probs (..., K), u (...) in [0, 1) -> ids (...) with P(k) = probs_k /
    sum(probs), as torch.multinomial, but the randomness is exactly one number u per draw."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1).contiguous()  # u * total < total
    first = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first cdf > target
    return first.clamp_max(probs.size(-1) - 1)

def sample_logits(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """(B, K) logits, (B,) uniforms -> (B, 1) ids: temperature (> 0), top-k, then top-p (> 0)."""
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return sample_probs(logits.softmax(-1), u)[:, None]

@torch.no_grad()
def generate_ar(model, n, y=None, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                use_cache=True):
    """Sample n token grids (n, grid) from the AR prior in raster order; call model.eval() first.
    use_cache: keep keys/values, feed one token per step; else recompute the prefix (reference).
    Both draw one uniform per token up front from `generator` (see uniforms): the same tokens."""
    cfg = model.cfg
    assert cfg.causal
    N, device, dtype = cfg.grid, model.head.weight.device, model.head.weight.dtype
    u = uniforms(n, N, generator, device)  # (n, N): u[:, i] draws token i
    idx = torch.empty(n, 0, dtype=torch.long, device=device)
    if use_cache:
        shape = (n, cfg.n_head, N, cfg.n_embd // cfg.n_head)  # (B, nh, T, hs)
        kv_cache = [(torch.zeros(shape, device=device, dtype=dtype),
                     torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]
        x = model.embed(idx, y)  # (n, 1, C): just the class/start token at position 0
    for i in range(N):
        if use_cache:
            logits = model.body(x, kv_cache, pos=i)[:, -1]
        else:
            logits = model(idx, y)[:, -1]  # (n, K), scores token i
        tok = sample_logits(logits, u[:, i], temperature, top_k, top_p)  # (n, 1)
        idx = torch.cat([idx, tok], dim=1)
        if use_cache and i + 1 < N:
            x = model.wte(tok) + model.wpe.weight[i + 1]  # token i sits at sequence position i + 1
    return idx

def maskgit_schedule(n_tokens, steps):
    """Tokens still masked after each step (MaskGIT's cosine schedule): after step t of T,
    floor(N cos(pi/2 (t+1)/T)), at least 1 and at most (masked before - 1) until the last step,
    then 0. It counts *masked* tokens; a popular port keeps that many instead (MaskGIT reversed)."""
    assert 1 <= steps <= n_tokens, "each step must reveal at least one token"
    schedule, masked = [], n_tokens
    for t in range(steps):
        target = math.floor(n_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        masked = 0 if t == steps - 1 else max(1, min(masked - 1, target))
        schedule.append(masked)
    return schedule

@torch.no_grad()
def generate_maskgit(model, n, y=None, steps=NAR_STEPS, temperature=1.0,
                     choice_temperature=CHOICE_TEMPERATURE, generator=None, on_step=None):
    """Sample n token grids (n, grid) by MaskGIT decoding; call model.eval() first. Each step draws
    every masked token at `temperature`, scores it by log p + choice_temperature (1-(t+1)/T) Gumbel,
    keeps the least confident masked (maskgit_schedule); fixed tokens never change. Table 10's NAR
    temperature (0.45 ImageNet, 0.65) is read as the logits'; the other reading is temperature=1,
    choice_temperature=0.45 / 0.65. generator: see uniforms; on_step(t, idx) sees every step."""
    cfg = model.cfg
    assert not cfg.causal
    K, N, device = cfg.n_codes, cfg.grid, model.head.weight.device
    # (n, steps, 2, N): per step the token draws and the Gumbel noise, all drawn up front
    u = uniforms(n, steps * 2 * N, generator, device).view(n, steps, 2, N)
    idx = torch.full((n, N), K, dtype=torch.long, device=device)  # all [MASK]
    for t, n_masked in enumerate(maskgit_schedule(N, steps)):
        masked = idx == K  # (n, N)
        logp = F.log_softmax(model(idx, y).float() / temperature, dim=-1)  # (n, N, K)
        sampled = sample_probs(logp.exp(), u[:, t, 0])  # (n, N)
        sampled = torch.where(masked, sampled, idx)  # fixed tokens stay as they are
        # Annealed Gumbel noise: random choice early, pure confidence at the end (clamp: finite log)
        gumbel = -torch.log(-torch.log(u[:, t, 1].clamp_min(1e-20)))
        noise = choice_temperature * (1 - (t + 1) / steps) * gumbel
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1) + noise
        conf = conf.masked_fill(~masked, float("inf"))
        idx = sampled.masked_fill(_lowest(conf, n_masked), K)
        if on_step is not None:
            on_step(t, idx)
    return idx

@torch.no_grad()
def teacher_forced_prediction(model, idx, y=None):
    """Fig. 4 (section 3.2): s' = argmax of one teacher-forced pass of the AR prior over true s."""
    assert model.cfg.causal
    return model(idx, y).argmax(-1)  # s'_j sees the true s_<j, never its own earlier guesses

# -----------------------------------------------------------------------------
# metrics: codebook usage and reconstruction PSNR (FID's math is in fid.py)

def count_codes(counts, idx):
    """counts (K,) += occurrences of each code in idx; index_add_, unlike bincount, never syncs."""
    counts.index_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))

def codebook_usage(counts):
    """Code counts (K,) over a batch or an eval pass -> (fraction of codes used, perplexity)."""
    p = counts.float() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return (counts > 0).float().mean(), perplexity

def psnr(x_hat, x):
    """Mean PSNR in dB of images in [-1, 1] (compared in [0, 1])."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()

# -----------------------------------------------------------------------------
# related objectives, off for SeQ-GAN. Reg-VQ (Zhang et al., CVPR 2023): prior regularisation
# KL(P || uniform), i.e. SeQ-GAN's entropy term, a stochastic mask and a contrastive loss (PCL).
# VQ-KD (Wang et al., NeurIPS 2024): phase 1 distils a frozen network's features into a cosine
# codebook; phase 2 trains a pixel decoder as SeQ-GAN's phase 2.

class RelatedQuantizer(VectorQuantizer):
    """VectorQuantizer plus Reg-VQ's stochastic mask (mask_ratio > 0, training only) and VQ-KD's
    l2-normalised codebook, cosine lookup (cosine_codebook; the squared distance is 2 - 2 cos)."""
    def __init__(self, cfg):
        super().__init__(cfg)
        self.mask_ratio, self.cosine = cfg.mask_ratio, cfg.cosine_codebook

    def codes(self):
        e = super().codes()
        return F.normalize(e, dim=1) if self.cosine else e

    def project(self, z):
        return F.normalize(z, dim=1) if self.cosine else z

    def straight_through(self, z, z_q, idx, logits, e):
        out = super().straight_through(z, z_q, idx, logits, e)
        if self.training and self.mask_ratio > 0:
            return stochastic_mask(logits, e, z_q, out[0], idx, self.mask_ratio)
        return out

def make_quantizer(cfg):
    """SeQ-GAN's VectorQuantizer, or RelatedQuantizer when Reg-VQ's mask or VQ-KD's cosine is on."""
    return (RelatedQuantizer if cfg.mask_ratio > 0 or cfg.cosine_codebook else VectorQuantizer)(cfg)

def stochastic_mask(logits, e, z_q, z_st, idx, mask_ratio):
    """Reg-VQ's stochastic mask: a random fraction mask_ratio of positions takes a code sampled from
    softmax(logits) = softmax(-D / tau) by Gumbel-max, the Gumbel-softmax straight-through gradient.
    logits (N, K), codes e (K, D), z_q, z_st (N, D), idx (N,) -> z_st, idx replaced there,
    sample_dist |e_k - z_q|^2 there (N,; else 0), sample_changed: the fraction not the nearest."""
    chosen = torch.rand(len(logits), device=logits.device) < mask_ratio  # (N,)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))  # rand < 1: finite
    soft = F.softmax(logits + gumbel, dim=1)  # (N, K)
    k = (logits + gumbel).argmax(1)
    one_hot = F.one_hot(k, len(e)).float() - soft.detach() + soft
    z_st = torch.where(chosen[:, None], one_hot @ e, z_st)
    zeros = torch.zeros_like(k, dtype=e.dtype)
    sample_dist = torch.where(chosen, (e[k] - z_q).pow(2).sum(1).detach(), zeros)
    sample_changed = (chosen & (k != idx)).sum() / chosen.sum().clamp_min(1)  # no host sync
    return z_st, torch.where(chosen, k, idx), sample_dist, sample_changed

def pcl_loss(f_hat, f, sample_dist, temp):
    """Reg-VQ's probabilistic contrastive loss: patch InfoNCE, features of x_hat (queries) against
    x's (keys) pooled to the token grid; position i should match position i, not another position of
    the image. Positive i weighs w_i = (1 + d_i / mean d) / 2 (ours; mean 1), d = sample_dist: codes
    sampled far pull harder; without sampling w = 1 (plain contrastive loss, CL)."""
    B, h, w = sample_dist.shape
    q = F.normalize(F.adaptive_avg_pool2d(f_hat.float(), (h, w)).flatten(2), dim=1)  # (B, C, n)
    k = F.normalize(F.adaptive_avg_pool2d(f.float(), (h, w)).flatten(2), dim=1)  # (B, C, n)
    logits = q.transpose(1, 2) @ k / temp  # (B, n, n): query i against key j
    d = sample_dist.flatten(1).float()  # (B, n)
    weight = torch.where(d.mean() > 0, (1 + d / d.mean().clamp_min(1e-12)) / 2, torch.ones_like(d))
    positive = logits.diagonal(dim1=1, dim2=2)  # (B, n)
    return (torch.logsumexp(logits, dim=2) - weight * positive).mean()  # negatives: mean over i

def pcl_term(features, sample_dist, temp):
    """--objective regvq's PCL on relu3_3 (ours), features = (taps of x_hat, taps of x)."""
    return pcl_loss(features[0]["relu3_3"], features[1]["relu3_3"], sample_dist, temp)

class FeatureDecoder(nn.Module):
    """VQ-KD phase 1: code vectors (B, D, h, w) -> teacher features (B, feature_dim, h, w) on the
    token grid: a few ResBlocks at the lowest width; phase 2 replaces it by the pixel decoder."""
    def __init__(self, cfg):
        super().__init__()
        c = cfg.channels * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(c, c) for _ in range(cfg.n_res)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.feature_dim, 1)

    def forward(self, z_q):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z_q)))))

def feature_kd_loss(f_pred, teacher):
    """VQ-KD phase 1: mean 1 - cos(f_pred, teacher) per position; the teacher resized to h, w."""
    t = F.interpolate(teacher.float(), size=f_pred.shape[-2:], mode="bilinear", align_corners=False,
                      antialias=teacher.shape[-1] > f_pred.shape[-1])
    return (1 - F.cosine_similarity(f_pred.float(), t, dim=1)).mean()

def vqkd_loss(x, f_pred, q, loss_cfg, perceptual, terms):
    """VQ-KD phase 1: KD + L_vq (with SeQ-GAN's entropy term: ours) into tokenizer_loss's terms. The
    teacher is a VGG16 tap (ours: VQ-KD distils encoders such as CLIP; VGG16 is torchvision's)."""
    with torch.no_grad():
        teacher = perceptual.features(x, logits=False)[loss_cfg.teacher_layer]
    terms["kd"] = feature_kd_loss(f_pred, teacher)
    terms["loss"] = terms["kd"] + q["loss"]
    return terms["loss"], terms
