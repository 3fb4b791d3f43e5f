"""
SeQ-GAN in one file: a VQ tokenizer trained for *semantic* compression, and the
generative transformers that model its tokens.

Paper: Gu et al., "Rethinking the Objectives of Vector-Quantized Tokenizers for
Image Synthesis" (SeQ-GAN), arXiv:2212.03185. The claim: a tokenizer that
reconstructs better does not give better generations; a codebook that holds
semantics does. Hence two training phases for the tokenizer:
  phase 1  conv-only VQGAN, L1 + VQ + GAN + L_alpha with alpha = 1 (semantic)
  phase 2  encoder and codebook frozen, decoder enhanced with block-regional and
           dilated attention, fine-tuned with alpha = 0 (details)

Paper map (equation -> code -> test in test_seqgan.py):
  Eq. 1  nearest-code lookup       VectorQuantizer.forward   test_quantizer_returns_nearest_code
  Eq. 2  L_vq, beta on commitment  VectorQuantizer.forward   test_beta_scales_commitment_not_codebook
         straight-through          VectorQuantizer.forward   test_straight_through_reaches_encoder
  3.4    entropy of mean usage     VectorQuantizer.forward   test_entropy_term_raises_codebook_usage
  Eq. 3  L_alpha = a L_sem + (1-a) L_low   PerceptualLoss   test_perceptual_taps_are_the_named_vgg16_layers,
                                                             test_perceptual_alpha_mixes_as_eq3,
         per-layer error / target energy (ours)              test_perceptual_balance_is_independent_of_vgg_scale
  3.3    the whole objective: L1 + L_alpha + L_vq (phase 1) + w L_adv   tokenizer_loss
                                    test_generator_objective_adds_the_weighted_terms_phase2_drops_lvq_and_gan_weight_0_never_runs_d
  Tab. 7 encoder / decoder          Encoder, Decoder          test_paper_preset_matches_table7_size
  3.3    block-regional + dilated attention  BlockAttention  test_block_attention_equals_masked_reference
  GAN    StyleGAN2 D, softplus, lazy R1      Discriminator   test_d_step_leaves_generator_grads_untouched
  Tab. 8 AR / NAR prior             Prior, ar_loss, maskgit_loss   test_ar_output_at_i_ignores_later_tokens_and_sees_earlier_ones
         AR sampling, KV cache      generate_ar               test_cached_and_uncached_ar_sampling_give_identical_tokens
         MaskGIT decoding           generate_maskgit          test_maskgit_decoding_follows_schedule_and_never_changes_fixed_tokens
  Fig. 4 teacher-forced top-1       teacher_forced_prediction test_teacher_forced_prediction_is_next_token_argmax_given_the_true_prefix
Related objectives (--objective regvq | vqkd), the same code paths:
  Reg-VQ KL(P || uniform)           VectorQuantizer (kl_uniform)  test_regvq_prior_kl_is_log_k_minus_entropy_and_the_same_gradient_as_seqgan
  Reg-VQ stochastic mask, PCL       stochastic_mask, pcl_loss   test_mask_ratio_one_samples_from_softmax_of_minus_distance,
                                                              test_pcl_weights_each_positive_by_half_of_one_plus_its_relative_sampling_distance
  VQ-KD feature distillation        FeatureDecoder, feature_kd_loss          test_vqkd_phase1_has_no_pixel_decoder_and_learns_a_toy_teacher

Sections, in the order a reader needs them: configs, building blocks, quantizer, tokenizer, the
perceptual loss (Eq. 3), discriminator, related objectives, the whole objective (tokenizer_loss),
priors, samplers, metrics; then the scripts' plumbing (command line, devices, torchrun, data, checkpoints).
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
# errors and config fields: the two helpers the configs below need

class SeqganError(Exception):
    """A user-facing problem (bad flag, missing file): printed as one line, no traceback."""


def option(default, help, flag=True):
    """A config field with its default and its --help text; a command-line option unless flag=False (a
    field the scripts derive from others). default None: the script resolves it (the --help says how)."""
    return field(default=default, metadata={"help": help, "flag": flag})


# -----------------------------------------------------------------------------
# configs: the tokenizer's shape, its objective's weights, the prior's shape; presets as field overrides


# The three tokenizer objectives as default overrides (flags given on the command line win).
OBJECTIVES = {
    "seqgan": dict(),  # this paper: alpha = 1 then a phase-2 decoder with alpha = 0
    # Reg-VQ (Zhang et al., CVPR 2023) on a VQGAN-like base (alpha = 0): the prior regularisation is
    # the same KL(P || uniform) line as SeQ-GAN's entropy term; plus stochastic mask m = 0.4 and PCL.
    # tau = 0.01, measured (README, Choices): at tau 1 or 0.1 a young codebook's softmax(-D / tau) is
    # uniform, so a masked position gets a random code (sample_changed 0.996 = 1 - 1/256) and the KL is 0.
    "regvq": dict(alpha=0.0, mask_ratio=0.4, pcl_weight=0.1, entropy_temp=0.01),
    # VQ-KD (Wang et al., NeurIPS 2024): phase 1 reconstructs a frozen network's features (VGG16
    # relu5_3 here) with a cosine codebook; phase 2 trains a pixel decoder as SeQ-GAN's phase 2.
    "vqkd": dict(cosine_codebook=True),
}


@dataclass
class TokenizerConfig:
    """Shape of the VQ tokenizer; the defaults are the 32 px classroom model, see PRESETS."""
    image_size: int = option(32, "training image size in pixels (square)")
    channels: int = option(64, "base channel count of encoder and decoder")
    ch_mult: tuple = option((1, 2, 2), "channel multiplier per level; the downsampling factor is 2**(levels-1)")
    n_res: int = option(2, "residual blocks per level")
    n_res_lowest: int = option(4, "residual blocks at the lowest resolution (Table 7: 4 at 16x16)")
    n_codes: int = option(1024, "codebook size K")
    code_dim: int = option(256, "codebook vector dimension")
    beta: float = option(0.25, "commitment weight beta of Eq. 2")
    entropy_weight: float = option(0.01, "weight gamma of the codebook-entropy term (section 3.4)")
    # 0.01 as MaskGIT, not the paper's implicit 1: at 1 a young codebook's soft usage is already
    # uniform, so H(D_bar) is at its maximum and the term does nothing (README, Expected numbers)
    entropy_temp: float = option(0.01, "tau of the soft assignment softmax(-distance / tau): entropy term, "
                                     "Reg-VQ prior and stochastic mask")
    objective: str = option("seqgan", "seqgan, regvq (Zhang et al. 2023) or vqkd (Wang et al. 2024); see README")
    mask_ratio: float = option(0.0, "Reg-VQ stochastic mask: fraction m of positions quantized by sampling "
                                  "(regvq default 0.4)")
    cosine_codebook: bool = option(False, "l2-normalised codebook, cosine lookup (vqkd default on)")
    # derived, not flags: train_tokenizer.py sets these two from --objective and --phase
    feature_dim: int = option(0, "VQ-KD phase 1: decode to this many teacher channels instead of pixels (0 = pixels)",
                              flag=False)
    dec_attn: bool = option(False, "decoder with block-regional + dilated attention (phase 2 turns it on)", flag=False)

    attn_heads: int = option(8, "attention heads in the phase-2 decoder (even: half regional, half dilated)")
    attn_block: int = option(4, "block size P of the phase-2 attention")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise SeqganError(f"unknown --objective {self.objective}; choose from {', '.join(OBJECTIVES)}")
        if not 0 <= self.mask_ratio <= 1:
            raise SeqganError(f"--mask-ratio {self.mask_ratio} is outside [0, 1]")
        f = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % f:
            raise SeqganError(f"--image-size {self.image_size} is not divisible by the downsampling factor {f}")
        low = self.image_size // f  # resolution of the first decoder level
        if self.dec_attn and (self.attn_heads % 2 or low % self.attn_block):
            raise SeqganError(f"attention needs an even --attn-heads and an --attn-block dividing {low}")

    @property
    def grid(self):
        """Tokens per side: image_size / f (PriorConfig.grid counts all h*w tokens)."""
        return self.image_size // 2 ** (len(self.ch_mult) - 1)


# VGG16's taps (indices into torchvision's vgg16().features), named here because LossConfig checks
# layer names against them; Eq. 3's two sets: L_low = relu1_2..relu5_3, L_sem = relu5_3 + logits.
VGG_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3", 29: "relu5_3"}
VGG_CHANNELS = {"relu1_2": 64, "relu2_2": 128, "relu3_3": 256, "relu4_3": 512, "relu5_3": 512}
LOW_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
SEM_LAYERS = ("relu5_3", "logits")


@dataclass
class LossConfig:
    """Weights of the tokenizer objective (Eq. 2, Eq. 3, GAN)."""
    alpha: float = option(1.0, "Eq. 3 mix: 1 = semantic (relu5_3 + logits), 0 = low-level (five relu taps)")
    l1_weight: float = option(1.0, "weight of the pixel L1 term")
    perceptual_weight: float = option(1.0, "weight of L_alpha")
    perceptual_norm: str = option("energy", "per-layer error of Eq. 3: energy (MSE / target feature energy; "
                                          "ours, independent of the VGG checkpoint's scale) or none (paper's plain MSE)")
    perceptual_size: int = option(0, "resize the VGG16 input to this size (0 = the image size; costs (size/32)^2 "
                                   "more VGG time at 32 px)")
    gan_weight: float = option(0.1, "fixed weight of the generator's GAN term (MaskGIT's 0.1)")
    gan_start: int = option(5000, "step at which the discriminator starts training")
    gan_warmup: int = option(2000, "steps over which the GAN weight ramps from 0 while D warms up")
    r1_gamma: float = option(0.1, "R1 penalty weight (StyleGAN2-ADA: 0.01 at 32 px, 1 at 256 px)")
    r1_every: int = option(16, "lazy R1: penalise every N discriminator steps")
    disc_channels: int = option(64, "discriminator base channels (doubling per block)")
    disc_max_channels: int = option(512, "discriminator channel cap")
    pcl_weight: float = option(0.0, "Reg-VQ probabilistic contrastive loss weight (regvq default 0.1; ours)")
    pcl_temp: float = option(0.1, "temperature of the PCL InfoNCE (ours; the paper's is not reproduced here)")
    teacher_layer: str = option("relu5_3", "VQ-KD teacher: the VGG16 tap whose map phase 1 reconstructs")

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise SeqganError(f"--alpha {self.alpha} is outside [0, 1]")
        if self.teacher_layer not in VGG_CHANNELS:
            raise SeqganError(f"--teacher-layer {self.teacher_layer}: choose from {', '.join(VGG_CHANNELS)}")
        if self.r1_every < 1:
            raise SeqganError(f"--r1-every {self.r1_every}: R1 runs every N >= 1 discriminator steps")
        if self.perceptual_norm not in ("energy", "none"):
            raise SeqganError(f"unknown --perceptual-norm {self.perceptual_norm}; use energy (default) or none "
                              "(the paper's plain MSE)")


# Named presets are just field overrides; flags given on the command line win.
PRESETS = {
    # At 32 px VGG16's relu5_3 is 2x2 and L_sem's gradient on the image is ~30x L1's while carrying almost
    # no spatial information: weight 0.1 keeps alpha = 1 reconstructing (README, "Loss balance").
    "classroom": dict(perceptual_weight=0.1),
    # Table 7: channels 128-128-256-256-512, f = 16 at 256 px, 16x16 tokens.
    "paper": dict(image_size=256, channels=128, ch_mult=(1, 1, 2, 2, 4), attn_block=8,
                  r1_gamma=1.0, gan_start=50000, disc_channels=64),
    # 2 CPU cores, Fashion-MNIST: a 1.1M tokenizer (K = 256 codes of 32-d), 8x8 tokens, D from step 400
    # of 600, lr 4e-4 (4x the paper's 1e-4, cosine to 5e-5). Phase 1 with the ImageNet VGG16 logs about
    # 11 images/s on 2 cores (README, "A CPU classroom run"; expected losses in "Expected numbers").
    "cpu": dict(data="fashion-mnist", channels=32, code_dim=32, n_codes=256, batch_size=16, steps=600, lr=4e-4,
                perceptual_weight=0.1, gan_start=400, gan_warmup=100, disc_channels=32,
                log_every=50, eval_every=300, eval_images=500, num_workers=0),
}


@dataclass
class PriorConfig:
    """Shape of the prior transformer (Table 8). n_codes, grid and n_classes come from the tokenizer
    and the data, causal from --model ar|nar; the rest are flags of train_prior.py."""
    n_codes: int = option(1024, "K, the tokenizer's codebook size")
    grid: int = option(64, "h*w tokens per image (8x8 classroom, 16x16 paper)")  # TokenizerConfig.grid is h alone
    n_classes: int = option(0, "classes for conditioning; 0 = unconditional")
    n_layer: int = option(8, "transformer layers")
    n_head: int = option(8, "attention heads")
    n_embd: int = option(256, "embedding width (MLP 4x)")
    dropout: float = option(0.1, "dropout in attention, MLP and embeddings")
    causal: bool = option(True, "True: AR prior, False: NAR (MaskGIT) prior")

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise SeqganError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")


# Table 8: 24 layers, 16 heads, d 768, MLP 3072 (4x), dropout 0.1 -> ~172M params;
# large: d 1024, MLP 4096 -> ~305M. The paper gives no head count for large: 16 assumed.
PRIOR_PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, dropout=0.1),
    "classroom": dict(n_layer=8, n_head=8, n_embd=256, dropout=0.1),
    "base": dict(n_layer=24, n_head=16, n_embd=768, dropout=0.1),
    "large": dict(n_layer=24, n_head=16, n_embd=1024, dropout=0.1),
}


def prior_preset(name, n_codes, grid, n_classes, causal):
    """A PriorConfig with the shape of a named preset (Table 8) and the data's vocab/grid/classes."""
    return PriorConfig(n_codes=n_codes, grid=grid, n_classes=n_classes, causal=causal, **PRIOR_PRESETS[name])


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


class Downsample(nn.Module):
    """2x2 average pooling, no parameters (MaskGIT's VQGAN of the same shape). With it the paper preset
    has Table 7's 54.5M parameters; taming's strided 3x3 convs would add 1.5M (55.9M)."""

    def forward(self, x):
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# -----------------------------------------------------------------------------
# vector quantizer (Eq. 1, Eq. 2, section 3.4)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with the VQ loss of Eq. 2 and the entropy term of section 3.4.

    forward(z_e) returns z_q (straight-through), the code indices and a dict of loss terms:
      codebook_loss   |sg[z_e] - z_q|^2       moves the codes toward the encoder outputs
      commitment_loss |z_e - sg[z_q]|^2       keeps the encoder close to its code; scaled by beta
      entropy         H(P), P = mean_n softmax(-D_n / tau), the soft usage of the batch
      kl_uniform      KL(P || uniform) = log K - H(P)
      loss            codebook + beta * commitment + gamma * kl_uniform
      sample_dist     |e_sampled - e_nearest|^2 per position (Reg-VQ's PCL weights; 0 without sampling)
      sample_changed  fraction of the stochastically masked positions whose sampled code is not the
                      nearest one (0 without sampling): how much the mask does at this tau
    The KL is taken as KL(P || uniform), predicted || prior, = sum_k p_k log(K p_k) = log K - H(P). This
    is Reg-VQ's prior distribution regularisation (the discrepancy between the predicted token
    distribution and a uniform prior) and SeQ-GAN's entropy term in one: its gradient is that of -H(P).
    The other direction, KL(uniform || P) = -log K - mean_k log p_k, is infinite as soon as one code's
    soft usage underflows to 0 and weighs the rarest codes most; this one stays finite and bounded by log K.
    Two switches for the related objectives (both off for SeQ-GAN):
      mask_ratio m    Reg-VQ's stochastic mask: in training, a random fraction m of positions takes a
                      code *sampled* from softmax(-D / tau) instead of the nearest one
      cosine          VQ-KD's l2-normalised codebook: nearest code by cosine similarity
    Runs in fp32 even under autocast: distances of 256-d vectors lose the argmin in bf16."""

    def __init__(self, cfg):
        super().__init__()
        self.n_codes, self.beta, self.tau = cfg.n_codes, cfg.beta, cfg.entropy_temp
        self.entropy_weight, self.mask_ratio, self.cosine = cfg.entropy_weight, cfg.mask_ratio, cfg.cosine_codebook
        self.codebook = nn.Embedding(cfg.n_codes, cfg.code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.n_codes, 1.0 / cfg.n_codes)

    def codes(self):
        """The codebook (K, D) in fp32, l2-normalised when cosine."""
        e = self.codebook.weight.float()
        return F.normalize(e, dim=1) if self.cosine else e

    def distances(self, z):
        """Squared Euclidean distances (N, D) x (K, D) -> (N, K); for unit vectors 2 - 2 cos."""
        e = self.codes()
        if self.cosine:
            z = F.normalize(z, dim=1)
        return z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)

    def lookup(self, idx):
        """Indices (B, h, w) -> code vectors (B, D, h, w)."""
        return F.embedding(idx, self.codes()).permute(0, 3, 1, 2)

    def nearest(self, z):
        """Eq. 1 for flat vectors z (N, D) in fp32: k* = argmin_k |z - e_k|^2 (N,), and the distances (N, K)."""
        d = self.distances(z)
        return d.argmin(1), d

    def forward(self, z_e):
        B, D, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):
            z = z_e.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
            z = F.normalize(z, dim=1) if self.cosine else z
            e = self.codes()  # (K, D)

            # Eq. 1: z_q = e_k*, k* = argmin_k |z_e - e_k|
            idx, d = self.nearest(z)  # (N,), (N, K)
            z_q = e[idx]  # (N, D)

            # Eq. 2: |sg[E(x)] - z_q|^2 + beta |sg[z_q] - E(x)|^2. beta scales the *commitment*
            # term (the encoder's), not the codebook term as in taming's legacy quantizer.
            codebook_loss = F.mse_loss(z_q, z.detach())
            commitment_loss = F.mse_loss(z, z_q.detach())

            # Section 3.4: soft assignment softmax(-D / tau) per position, averaged over the batch
            # (D_bar, Reg-VQ's P_post), and its entropy H. The paper writes "+gamma H(D_bar)", but the
            # goal is *spread* usage, so the loss must raise H. We add gamma * KL(D_bar || uniform)
            # = gamma * (log K - H): the same gradient as -gamma H, and never negative. This one line
            # is also Reg-VQ's prior distribution regularisation (a uniform prior).
            # Under DDP (train_tokenizer.py) the mean is over the rank's own batch, not the global one.
            logits = -d / self.tau  # (N, K)
            p_mean = F.softmax(logits, dim=1).mean(0)  # (K,)
            entropy = -(p_mean * torch.log(p_mean.clamp_min(1e-12))).sum()
            kl_uniform = math.log(self.n_codes) - entropy
            loss = codebook_loss + self.beta * commitment_loss + self.entropy_weight * kl_uniform

            # Straight-through: the forward value is z_q, the backward pass copies the gradient to z_e.
            z_st = z + (z_q - z).detach()
            sample_dist, sample_changed = torch.zeros_like(d[:, 0]), torch.zeros((), device=z.device)
            if self.training and self.mask_ratio > 0:  # Reg-VQ only (stochastic_mask, just below)
                z_st, idx, sample_dist, sample_changed = stochastic_mask(logits, e, z_q, z_st, idx, self.mask_ratio)
        z_q = z_st.reshape(B, h, w, D).permute(0, 3, 1, 2).to(z_e.dtype)
        terms = dict(loss=loss, codebook_loss=codebook_loss, commitment_loss=commitment_loss, entropy=entropy,
                     kl_uniform=kl_uniform, sample_dist=sample_dist.reshape(B, h, w), sample_changed=sample_changed)
        return z_q, idx.reshape(B, h, w), terms


def stochastic_mask(logits, e, z_q, z_st, idx, mask_ratio):
    """Reg-VQ's stochastic mask, applied to flat quantizer outputs: a random fraction mask_ratio of the
    positions takes a code *sampled* from softmax(logits) = softmax(-D / tau) by Gumbel-max instead of
    the nearest one; the gradient flows through the Gumbel-softmax relaxation (straight-through one-hot).
    logits (N, K), codebook e (K, D), nearest codes z_q (N, D), straight-through z_st (N, D), indices (N,)
    -> (z_st, idx) with the sampled positions replaced, sample_dist |e_sampled - e_nearest|^2 (N,) (0 where
    not sampled) and sample_changed, the fraction of sampled positions whose code is not the nearest one."""
    chosen = torch.rand(len(logits), device=logits.device) < mask_ratio  # (N,)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))  # rand < 1: finite
    soft = F.softmax(logits + gumbel, dim=1)  # (N, K)
    k = (logits + gumbel).argmax(1)
    one_hot = F.one_hot(k, len(e)).float() - soft.detach() + soft
    z_st = torch.where(chosen[:, None], one_hot @ e, z_st)
    sample_dist = torch.where(chosen, (e[k] - z_q).pow(2).sum(1).detach(), torch.zeros_like(k, dtype=e.dtype))
    sample_changed = (chosen & (k != idx)).sum() / chosen.sum().clamp_min(1)  # no host sync
    return z_st, torch.where(chosen, k, idx), sample_dist, sample_changed


def count_codes(counts, idx):
    """counts (K,) += occurrences of each code in idx. index_add_, unlike bincount, never syncs with the host."""
    flat = idx.flatten()
    counts.index_add_(0, flat, torch.ones_like(flat))


def codebook_usage(counts):
    """Code counts (K,) over a batch or a whole eval pass -> (fraction of codes used, perplexity)."""
    p = counts.float() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return (counts > 0).float().mean(), perplexity


# -----------------------------------------------------------------------------
# encoder, decoder, tokenizer (Table 7; the phase-2 decoder's attention of section 3.3)


class Encoder(nn.Module):
    """Conv-only encoder: per level n_res ResBlocks then a 2x2 average pool (Downsample); n_res_lowest at the bottom."""

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
            if not lowest:
                blocks.append(Downsample())
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.code_dim, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, code_dim, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class BlockAttention(nn.Module):
    """Interleaved block-regional + dilated attention for the phase-2 decoder (section 3.3, HiT).

    The map is cut into non-overlapping P x P blocks. Half of the heads attend within each
    block (regional: local detail); the other half attend across blocks among the positions
    that share an offset inside their block (dilated: a sparse global view). The two halves
    are concatenated along channels and projected. The projection starts at zero, so the
    enhanced decoder initially computes exactly what the phase-1 decoder did."""

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
        hs, Hb, Wb = C // nh, H // P, W // P
        # (B, 3C, H, W) -> 3 x (B, nh, Hb, Wb, P, P, hs): block index, offset in block, head dim
        qkv = self.qkv(self.norm(x)).reshape(B, 3, nh, hs, Hb, P, Wb, P)
        q, k, v = qkv.permute(1, 0, 2, 4, 6, 5, 7, 3).unbind(0)

        def regional(t):  # (B, half, Hb, Wb, P, P, hs) -> (B*half, blocks, P*P, hs)
            return t[:, :half].reshape(B * half, Hb * Wb, P * P, hs)

        def dilated(t):  # -> (B*half, P*P offsets, blocks, hs)
            return t[:, half:].permute(0, 1, 4, 5, 2, 3, 6).reshape(B * (nh - half), P * P, Hb * Wb, hs)

        o_r = F.scaled_dot_product_attention(regional(q), regional(k), regional(v))
        o_d = F.scaled_dot_product_attention(dilated(q), dilated(k), dilated(v))
        o_r = o_r.reshape(B, half, Hb, Wb, P, P, hs)
        o_d = o_d.reshape(B, nh - half, P, P, Hb, Wb, hs).permute(0, 1, 4, 5, 2, 3, 6)
        o = torch.cat([o_r, o_d], dim=1)  # (B, nh, Hb, Wb, P, P, hs)
        o = o.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, C, H, W)
        return x + self.proj(o)


class Decoder(nn.Module):
    """Mirror of the encoder. With cfg.dec_attn (phase 2) each of the n_res ResBlocks of every
    level is followed by a BlockAttention (the extra lowest-level blocks stay plain); at the
    paper preset this adds 3.42M parameters: 54.45M -> 57.87M (section 4: 54.5M -> 57.9M). The attention
    layers live in their own ModuleDict so phase-1 weights keep their names."""

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
                if cfg.dec_attn:
                    attn[str(len(blocks) - 1)] = BlockAttention(c, cfg.attn_heads, cfg.attn_block)
            if i > 0:
                blocks.append(Upsample(c))
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleDict(attn)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z_q):  # (B, code_dim, h, w) -> (B, 3, H, W)
        h = self.conv_in(z_q)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FeatureDecoder(nn.Module):
    """VQ-KD phase 1: code vectors (B, D, h, w) -> teacher features (B, feature_dim, h, w) on the token
    grid. A few ResBlocks at the lowest width; it is dropped when phase 2 builds the pixel decoder."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.channels * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(c, c) for _ in range(cfg.n_res)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.feature_dim, 1)

    def forward(self, z_q):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z_q)))))


class Tokenizer(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder. Images are (B, 3, H, W) in [-1, 1]. In VQ-KD phase 1
    (cfg.feature_dim > 0) the decoder is a FeatureDecoder and there is no pixel decoder at all."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = FeatureDecoder(cfg) if cfg.feature_dim else Decoder(cfg)

    def forward(self, x):
        """x (B, 3, H, W) -> reconstruction (B, 3, H, W) (VQ-KD phase 1: features), indices (B, h, w),
        quantizer loss terms."""
        z_q, idx, terms = self.quantizer(self.encoder(x))
        return self.decoder(z_q), idx, terms

    @torch.no_grad()
    def tokenize(self, x):
        """Images -> code indices (B, h, w); deterministic (used for priors and evaluation)."""
        z_e = self.encoder(x).float()
        B, D, h, w = z_e.shape
        idx, _ = self.quantizer.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, D))  # never sampled: deterministic
        return idx.reshape(B, h, w)

    def decode_indices(self, idx):
        """Code indices (B, h, w) -> images (B, 3, H, W)."""
        return self.decoder(self.quantizer.lookup(idx))


# -----------------------------------------------------------------------------
# mixed precision

def autocast(device):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (no fp16 + GradScaler path)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# the perceptual loss L_alpha (Eq. 3): VGG16 features of the reconstruction against the input's


def load_vgg16(weights):
    """VGG16 with 'imagenet' weights (torchvision download or torch hub cache), a local
    state-dict PATH, or 'random' (tests only: announced loudly). Never a silent fallback."""
    # A fixed seed, off the global RNG: every DDP rank builds the same random VGG, and loading it
    # leaves the draws of the models built after it unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vgg = torchvision.models.vgg16()
    if weights == "random":
        if os.environ.get("RANK", "0") == "0":  # rank 0 alone, under torchrun
            print("WARNING: VGG16 has RANDOM weights (--vgg-weights random): the perceptual loss is "
                  "meaningless except for testing", file=sys.stderr)
    elif weights == "imagenet":
        w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        try:
            vgg.load_state_dict(w.get_state_dict(progress=True))
        except OSError as e:  # URLError is an OSError: offline
            raise SeqganError(f"cannot download the VGG16 weights ({type(e).__name__}): put {w.url} "
                              f"at {target} or pass --vgg-weights PATH") from None
    else:
        if not os.path.isfile(weights):
            raise SeqganError(f"--vgg-weights {weights}: no such file (use imagenet, random or a state-dict path)")
        try:
            vgg.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, KeyError) as e:
            raise SeqganError(f"--vgg-weights {weights} is not a torchvision VGG16 state dict "
                              f"({str(e).splitlines()[0]})") from None
    return vgg.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Eq. 3: L_alpha = alpha * L_sem + (1 - alpha) * L_low.

    L_low sums a per-layer feature error over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; L_sem over
    relu5_3 and the 1000 logits (classifier output before softmax). relu5_3 is in both, so it keeps
    weight 1 for every alpha. The classifier runs only when alpha > 0.

    The per-layer error (norm):
      'none'    the paper's plain mean squared error 1/(HWC) |phi(x_hat) - phi(x)|^2.
      'energy'  (default, ours) the same MSE divided by the target's mean feature energy
                mean(phi(x)^2) over the batch (no gradient): a relative squared error, 1 for an empty
                reconstruction and 0 for a perfect one, whatever the layer. Under DDP the energy is that
                of each rank's own batch.
    Why 'energy' is the default: raw VGG16 activations span five orders of magnitude across layers
    and depend on the checkpoint (the Oxford/Caffe ImageNet weights give relu3_3 MSEs near 10^6,
    relu5_3 near 60, logits near 10, against a pixel L1 below 1), so with 'none' the balance of Eq. 3
    against L1 and L_vq is set by the checkpoint, not by the method (README, "Loss balance"). Dividing
    by the target's energy leaves each layer's gradient direction as in Eq. 3 and makes every term
    invariant to a rescaling of the network (test_perceptual_balance_is_independent_of_vgg_scale).
    size: resize the VGG input to size x size first (0 = as given; at 32 px relu5_3 is 2x2)."""

    def __init__(self, alpha, vgg, norm="energy", size=0):
        super().__init__()
        if norm not in ("energy", "none"):
            raise SeqganError(f"unknown --perceptual-norm {norm}; use energy (default) or none (the paper's plain MSE)")
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
        """One layer's term: plain MSE ('none') or MSE / mean(f^2) ('energy')."""
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
        # Eq. 3: L_alpha = alpha * L_sem + (1 - alpha) * L_low
        return self.alpha * l_sem + (1 - self.alpha) * l_low, dict(l_low=l_low, l_sem=l_sem, features=(f_hat, f))


# -----------------------------------------------------------------------------
# discriminator and GAN loss (StyleGAN2-style, non-saturating, lazy R1)


class Blur(nn.Module):
    """[1, 3, 3, 1] low-pass before downsampling (StyleGAN2's anti-aliased resampling)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64).view(1, 1, 4, 4))

    def forward(self, x):
        C = x.shape[1]
        return F.conv2d(F.pad(x, (1, 2, 1, 2), mode="reflect"), self.kernel.expand(C, 1, 4, 4).to(x.dtype), groups=C)


class DiscBlock(nn.Module):
    """Residual block halving the resolution: (conv-lrelu-conv-lrelu-blurpool) + blurpool-1x1, / sqrt 2."""

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
    """StyleGAN2 residual discriminator down to 4x4, minibatch-stddev, two linear layers.
    No equalised learning rate (Adam with a small lr does the job here)."""

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

    def forward(self, x):  # (B, 3, H, W) -> (B,) logits
        h = self.blocks(F.leaky_relu(self.conv_in(x), 0.2))
        # minibatch stddev: one extra channel with the spread of features across groups of 4 samples,
        # so D can notice a generator that makes every image alike. Under DDP the groups are within
        # each rank's batch. The 1e-8 (StyleGAN2's) keeps sqrt differentiable twice (R1) where two
        # samples of a small group share a feature value exactly.
        B, C, H, W = h.shape
        g = max(d for d in (4, 3, 2, 1) if B % d == 0)
        s = (h.float().reshape(g, -1, C, H, W).var(0, unbiased=False) + 1e-8).sqrt().mean([1, 2, 3])  # (B/g,)
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
    """GAN weight of the generator: 0 up to gan_start, then a linear ramp over gan_warmup steps.
    D takes its first step at gan_start (after G's), so G never feels an untrained D, and D has
    warmed up by the time its gradient reaches G in full."""
    if step <= cfg.gan_start:
        return 0.0
    return cfg.gan_weight * min(1.0, (step - cfg.gan_start) / max(1, cfg.gan_warmup))


def d_backward(disc, x, x_hat, loss_cfg, step, scale=1.0):
    """The discriminator's loss on real x and *detached* reconstructions, with lazy R1 every r1_every
    steps; scale * loss backpropagated. Returns the detached terms the log reports: d_loss, r1, and D's
    mean logits on the real images and on the reconstructions (d_real > 0 > d_fake: D tells them apart;
    both near 0 with d_loss near log 4: it cannot).

    R1 runs on the plain module, unwrapped from DDP and from torch.compile, *before* the DDP forward: R1
    differentiates D's output w.r.t. its input with create_graph (a double backward), which neither DDP's
    reducer nor a compiled module (AOTAutograd) supports. Under DDP the R1 gradients land in .grad
    unsynchronised, and the DDP backward that follows averages everything .grad then holds over the ranks
    (as it does for the no-sync micro-steps), R1 included. D's minibatch-stddev layer sees each rank's
    own batch, so D's loss is not that of the global batch."""
    plain = getattr(disc, "module", disc)  # DistributedDataParallel wraps the (compiled) module
    plain = getattr(plain, "_orig_mod", plain)  # torch.compile's OptimizedModule wraps the plain module
    r1 = torch.zeros((), device=x.device)
    if step % loss_cfg.r1_every == 0:
        r1 = r1_penalty(plain, x)
        # scaled by the interval, as in StyleGAN2
        (scale * loss_cfg.r1_gamma / 2 * loss_cfg.r1_every * r1).backward()
    with autocast(x.device):
        real, fake = disc(x), disc(x_hat.detach())
        loss = d_loss(real, fake)
    (scale * loss).backward()
    return dict(d_loss=(loss + loss_cfg.r1_gamma / 2 * loss_cfg.r1_every * r1).detach().float(),
                r1=r1.detach().float(), d_real=real.detach().float().mean(), d_fake=fake.detach().float().mean())


# -----------------------------------------------------------------------------
# related objectives (off for SeQ-GAN): Reg-VQ's contrastive loss, VQ-KD's distillation (their
# quantizer and decoder switches, stochastic_mask and FeatureDecoder, sit with the quantizer and tokenizer)


def pcl_loss(f_hat, f, sample_dist, temp):
    """Reg-VQ's probabilistic contrastive loss, patch-wise InfoNCE between features of the reconstruction
    (queries) and of the input (keys), pooled to the token grid: position i of x_hat should match
    position i of x (positive) rather than any other position j of the same image (negatives).
    Each positive term is weighted by w = (1 + |e_sampled - e_nearest|^2 / mean) / 2 (mean weight 1), so
    positions whose code was sampled far from the nearest one are pulled harder; without sampling
    every weight is 1 and this is the plain contrastive loss (CL) of the ablation.
    The negative term (log-sum-exp over positions) is averaged over positions."""
    B, h, w = sample_dist.shape
    q = F.normalize(F.adaptive_avg_pool2d(f_hat.float(), (h, w)).flatten(2), dim=1)  # (B, C, n)
    k = F.normalize(F.adaptive_avg_pool2d(f.float(), (h, w)).flatten(2), dim=1)  # (B, C, n)
    logits = q.transpose(1, 2) @ k / temp  # (B, n, n): query i against key j
    d = sample_dist.flatten(1).float()  # (B, n)
    weight = torch.where(d.mean() > 0, (1 + d / d.mean().clamp_min(1e-12)) / 2, torch.ones_like(d))
    positive = logits.diagonal(dim1=1, dim2=2)  # (B, n)
    return (torch.logsumexp(logits, dim=2) - weight * positive).mean()


def feature_kd_loss(f_pred, teacher):
    """VQ-KD phase 1: 1 - cos(predicted, teacher feature) per token position, averaged. The teacher map
    (B, C, H, W) is resized to the token grid of f_pred (B, C, h, w)."""
    t = F.interpolate(teacher.float(), size=f_pred.shape[-2:], mode="bilinear", align_corners=False,
                      antialias=teacher.shape[-1] > f_pred.shape[-1])
    return (1 - F.cosine_similarity(f_pred.float(), t, dim=1)).mean()


# -----------------------------------------------------------------------------
# the tokenizer's whole generator objective: the parts above (L1, VQ, L_alpha, GAN, PCL, VQ-KD) in one sum


def tokenizer_loss(x, x_hat, q, loss_cfg, phase=1, gan_w=0.0, disc=None, perceptual=None, vqkd=False):
    """The generator's loss on one batch, from the tokenizer's output (x_hat, _, q = tokenizer(x)).
    Returns (total, terms): terms names every logged quantity, total among them as "loss".

      SeQ-GAN, Reg-VQ  total = l1_weight * L1 + perceptual_weight * L_alpha (Eq. 3) + gan_w * L_adv
                               + L_vq (Eq. 2 and the entropy term; phase 1 only: phase 2 freezes the
                                 encoder and codebook, their terms are only logged)
                               + pcl_weight * PCL (Reg-VQ)
      VQ-KD phase 1    total = KD (1 - cos to the teacher's features; x_hat holds features) + L_vq

    disc may be wrapped in DDP: G's term runs the module inside, since G needs D's input gradient only
    (D's parameters are left out of the graph, so there is nothing to synchronise). With gan_w = 0, D
    is not run at all."""
    zero = torch.zeros((), device=x.device)
    terms = dict(loss=zero, l1=zero, perceptual=zero, l_low=zero, l_sem=zero, codebook=q["codebook_loss"],
                 commitment=q["commitment_loss"], entropy=q["entropy"], g_adv=zero, pcl=zero, kd=zero,
                 sample_changed=q["sample_changed"])
    if vqkd:
        with torch.no_grad():
            teacher = perceptual.features(x, logits=False)[loss_cfg.teacher_layer]
        terms["kd"] = feature_kd_loss(x_hat, teacher)
        terms["loss"] = terms["kd"] + q["loss"]
        return terms["loss"], terms
    terms["l1"] = (x_hat.float() - x).abs().mean()
    loss = loss_cfg.l1_weight * terms["l1"]
    if perceptual is not None:
        terms["perceptual"], p_terms = perceptual(x_hat, x)
        terms["l_low"], terms["l_sem"] = p_terms["l_low"], p_terms["l_sem"]
        loss = loss + loss_cfg.perceptual_weight * terms["perceptual"]
    if gan_w > 0:
        disc = getattr(disc, "module", disc)  # DistributedDataParallel wraps the (compiled) module
        disc.requires_grad_(False)  # the graph keeps D's input gradient, not its parameter gradients
        terms["g_adv"] = g_loss(disc(x_hat))
        disc.requires_grad_(True)
        loss = loss + gan_w * terms["g_adv"]
    if phase == 1:
        loss = loss + q["loss"]
    if loss_cfg.pcl_weight > 0:  # Reg-VQ: contrastive loss on relu3_3 features, pooled to the token grid
        f_hat, f = p_terms["features"]
        terms["pcl"] = pcl_loss(f_hat["relu3_3"], f["relu3_3"], q["sample_dist"], loss_cfg.pcl_temp)
        loss = loss + loss_cfg.pcl_weight * terms["pcl"]
    terms["loss"] = loss
    return loss, terms


# -----------------------------------------------------------------------------
# generative priors over the token grid (section 3.2, Table 8): one transformer, two uses.
# causal=True is the AR prior (VQGAN-style next-token prediction in raster order);
# causal=False is the NAR prior (MaskGIT: bidirectional, [MASK] = id K). Their losses follow the model.


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal (AR) or bidirectional (NAR), with an optional KV cache."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.causal, self.dropout = cfg.n_head, cfg.causal, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, kv=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:
            # Cached decoding feeds one position at a time: store its key/value at `pos`,
            # then attend to positions 0..pos. The cache holds only the past, so no mask.
            assert T == 1 and self.causal
            kv[0][:, :, pos:pos + 1], kv[1][:, :, pos:pos + 1] = k, v
            k, v = kv[0][:, :, :pos + 1], kv[1][:, :, :pos + 1]  # (B, nh, pos+1, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal and kv is None)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
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
    """Transformer prior over the h*w token grid (paper Sec. 3.2, Table 8).

    The input sequence is [c, s_0, s_1, ...]: position 0 holds the class token
    (or a dedicated start token when unconditional), then the image tokens in raster
    order. forward(idx, y) returns logits whose row j scores image token j: AR from
    tokens < j only, NAR from the whole (partly masked) grid.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.n_codes + 1, C)    # +1: id K is [MASK] (NAR only), never a real code
        self.wce = nn.Embedding(cfg.n_classes + 1, C)  # +1: row n_classes is the start token used when y is None
        self.wpe = nn.Embedding(cfg.grid + 1, C)       # +1: position 0 holds the class/start token
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.n_codes)          # K logits: [MASK] and start are never predicted
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
        assert (y is None) == (self.cfg.n_classes == 0), "pass y exactly when the prior is class-conditional"
        if y is None:
            y = idx.new_full((B,), self.cfg.n_classes)
        x = torch.cat([self.wce(y)[:, None], self.wte(idx)], dim=1)  # (B, t+1, C)
        return self.drop(x + self.wpe.weight[:t + 1])

    def body(self, x, kv_cache=None, pos=0):
        """Transformer on embedded inputs (B, T, C) -> logits (B, T, K); kv_cache: one (k, v) per layer."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i], pos)
        return self.head(self.ln_f(x))

    def forward(self, idx, y=None):
        """idx (B, t) ids, y (B,) classes or None -> logits. NAR: t = grid, (B, grid, K). AR also
        accepts a prefix t < grid: (B, min(t + 1, grid), K), whose last row scores the next token s_t."""
        N = self.cfg.grid
        assert idx.size(1) <= N
        x = self.embed(idx, y)
        if self.cfg.causal:
            # The output at position j (input s_{j-1}, or c at j=0) predicts s_j; the
            # last token s_{N-1} predicts nothing, so drop it: row j of the result scores s_j.
            return self.body(x[:, :N])
        return self.body(x)[:, 1:]  # NAR: drop the class/start position's output


def num_params(cfg, embeddings=True):
    """Parameter count of Prior(cfg) in closed form (checked against the module in the tests)."""
    C, L, K = cfg.n_embd, cfg.n_layer, cfg.n_codes
    per_layer = 12 * C * C + 13 * C  # qkv 3C^2+3C, proj C^2+C, fc 4C^2+4C, proj 4C^2+C, two LayerNorms 4C
    n = L * per_layer + 2 * C + C * K + K  # + ln_f + head
    if embeddings:
        n += (K + 1 + cfg.n_classes + 1 + cfg.grid + 1) * C  # wte, wce, wpe
    return n


def estimate_flops_per_token(cfg):
    """Training FLOPs (fwd+bwd) per token, nanoGPT/PaLM appendix B: 6N + 12*L*H*Q*T.

    N excludes the embedding tables (lookups, not matmuls); T is the sequence length
    the model sees (grid for AR, grid + 1 for NAR, which keeps the class token).
    """
    L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    T = cfg.grid + (0 if cfg.causal else 1)
    return 6 * num_params(cfg, embeddings=False) + 12 * L * H * Q * T


def ar_loss(model, idx, y=None):
    """Next-token cross-entropy over the raster-order grid; idx (B, N) -> (loss, accuracy)."""
    logits = model(idx, y).float()  # (B, N, K), row j predicts idx[:, j] from idx[:, :j]
    loss = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    acc = (logits.argmax(-1) == idx).float().mean()
    return loss, acc


def _lowest(scores, n):
    """Bool mask of the n lowest scores in each row; n is an int or a (B, 1) tensor."""
    return scores.argsort(dim=1).argsort(dim=1) < n  # rank of each entry within its row < n


def maskgit_loss(model, idx, mask_id, y=None, generator=None):
    """MaskGIT training loss (Chang et al. 2022, Sec. 3.2); idx (B, N) -> (loss, accuracy) on masked tokens.

    Per sample u ~ U(0, 1), mask ratio r = cos(pi/2 * u), ceil(r * N) >= 1 random tokens
    are replaced by [MASK] = mask_id (the prior's extra id K); cross-entropy with label smoothing 0.1 on
    those only.
    generator must live on idx's device; u is its first draw.
    """
    B, N = idx.shape
    u = torch.rand(B, 1, device=idx.device, generator=generator)
    n_mask = torch.ceil(torch.cos(math.pi / 2 * u) * N).clamp(min=1)  # (B, 1)
    mask = _lowest(torch.rand(B, N, device=idx.device, generator=generator), n_mask)  # (B, N), random positions
    logits = model(idx.masked_fill(mask, mask_id), y).float()  # (B, N, K)
    # Weight per-token losses by the mask instead of indexing logits[mask]: the boolean
    # index would need a host sync to learn its size.
    ce = F.cross_entropy(logits.transpose(1, 2), idx, label_smoothing=0.1, reduction="none")  # (B, N)
    m = mask.float()
    loss = (ce * m).sum() / m.sum()
    acc = ((logits.argmax(-1) == idx).float() * m).sum() / m.sum()
    return loss, acc


def prior_loss(model, cfg, idx, y=None, generator=None):
    """The prior's training loss for its config cfg: next-token (AR) or masked-token (MaskGIT) -> (loss, accuracy).
    model may be wrapped (DDP, torch.compile); cfg is the plain model's PriorConfig."""
    if cfg.causal:
        return ar_loss(model, idx, y)
    return maskgit_loss(model, idx, cfg.n_codes, y, generator)


# -----------------------------------------------------------------------------
# samplers: AR with a KV cache, MaskGIT iterative decoding, the Fig. 4 visualization


# The paper's sampling settings (Table 10), defined once for sample.py, train_prior.py's sample grids and
# bench.py: AR nucleus top-p 0.98 (0.92 on ImageNet) at temperature 1; NAR (MaskGIT) temperature 0.65
# (0.45 on ImageNet; read as the logits' temperature, see generate_maskgit), 12 decoding steps, and
# MaskGIT's choice temperature 4.5.
AR_TOP_P, AR_TOP_P_IMAGENET, AR_TEMPERATURE = 0.98, 0.92, 1.0
NAR_TEMPERATURE, NAR_TEMPERATURE_IMAGENET, NAR_STEPS, CHOICE_TEMPERATURE = 0.65, 0.45, 12, 4.5


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th are kept too), -inf elsewhere; k=0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filter (Holtzman et al. 2020): keep the fewest most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass ranked above it already reaches p; for p > 0 the top token always stays.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def uniforms(n, m, generator, device):
    """(n, m) uniform draws in [0, 1). generator: one torch.Generator for the batch (None: the global
    one), or a list of n generators, one per row. With a list, row i depends on its own generator
    alone, so a sample is the same whatever batch or GPU draws it (sample.py seeds one per image)."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == n, "one generator per row"
        return torch.stack([torch.rand(m, device=device, generator=g) for g in generator])
    return torch.rand(n, m, device=device, generator=generator)


def sample_probs(probs, u):
    """Inverse-CDF sampling: probs (..., K), u (...) in [0, 1) -> ids (...), id k with probability
    probs_k / sum(probs), as torch.multinomial, but the randomness is exactly the one number u per draw."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1).contiguous()  # u * total < total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.size(-1) - 1)  # first cdf > target


def sample_logits(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """(B, K) logits and (B,) uniforms -> (B, 1) sampled ids: temperature (> 0), then top-k, then top-p (> 0)."""
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return sample_probs(logits.softmax(-1), u)[:, None]


@torch.no_grad()
def generate_ar(model, n, y=None, temperature=1.0, top_k=0, top_p=1.0, generator=None, use_cache=True):
    """Sample n token grids (n, grid) from the AR prior in raster order; call model.eval() first.

    use_cache=True keeps per-layer keys/values (B, nh, T, hs) and feeds one new token per
    step; use_cache=False recomputes the whole prefix each step (the reference path).
    Both use the same uniforms, one per token drawn up front from `generator` (one generator,
    or a list of one per row: see uniforms), so they return the same tokens.
    Paper sampling: top-p 0.92 on ImageNet, 0.98 elsewhere.
    """
    cfg = model.cfg
    assert cfg.causal
    N, device = cfg.grid, model.head.weight.device
    u = uniforms(n, N, generator, device)  # (n, N): u[:, i] draws token i
    idx = torch.empty(n, 0, dtype=torch.long, device=device)
    if use_cache:
        shape = (n, cfg.n_head, N, cfg.n_embd // cfg.n_head)  # (B, nh, T, hs)
        dtype = model.head.weight.dtype
        kv_cache = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                    for _ in range(cfg.n_layer)]
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
    """Number of tokens still masked after each decoding step (MaskGIT cosine schedule).

    After step t (0-based) of T: floor(N * cos(pi/2 * (t+1)/T)), at least 1 and at most
    (masked before the step - 1) until the last step, 0 after it. This counts *masked*
    tokens; a popular port inverts it (uses it as the count to keep), which reveals
    few tokens early and most at the end, the opposite of MaskGIT.
    """
    assert 1 <= steps <= n_tokens, "each step must reveal at least one token"
    schedule, masked = [], n_tokens
    for t in range(steps):
        target = math.floor(n_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        masked = 0 if t == steps - 1 else max(1, min(masked - 1, target))
        schedule.append(masked)
    return schedule


@torch.no_grad()
def generate_maskgit(model, n, y=None, steps=NAR_STEPS, temperature=1.0, choice_temperature=CHOICE_TEMPERATURE,
                     generator=None, on_step=None):
    """Sample n token grids (n, grid) with MaskGIT iterative decoding; call model.eval() first.

    Each step samples every masked position (at `temperature`), scores the choice by
    log p(chosen) (under that tempered p) + choice_temperature * (1 - (t+1)/T) * Gumbel
    noise, and keeps masked the least confident, as many as maskgit_schedule says. Fixed
    tokens get confidence +inf, so they are never re-masked or changed. Paper: 12 steps,
    temperature 0.45 (ImageNet) / 0.65. on_step(t, idx), if given, sees the grid after each step.

    Table 10's NAR "sampling temperature" has two readings: the temperature of the token logits, or
    MaskGIT's choice temperature (MaskGIT's own decoder samples tokens at temperature 1 and anneals
    Gumbel noise of scale 4.5 on the confidences). The defaults (sample.py, train_prior.py) take the
    first: temperature 0.45 / 0.65 on the logits, choice_temperature 4.5 as MaskGIT. Why: "sampling
    temperature" commonly means the temperature of the distribution tokens are drawn from; the table
    lists it among the sampling settings as it lists the AR prior's top-p; and 0.45 / 0.65 are far from
    MaskGIT's choice temperature 4.5, which the paper would then have cut seven- to tenfold without a word.
    The other reading is temperature=1.0 with choice_temperature=0.45 / 0.65.
    generator: one, or a list of one per row (see uniforms); all draws are made up front.
    """
    cfg = model.cfg
    assert not cfg.causal
    K, N = cfg.n_codes, cfg.grid
    device = model.head.weight.device
    u = uniforms(n, steps * 2 * N, generator, device).view(n, steps, 2, N)  # per step: token draws, Gumbel noise
    idx = torch.full((n, N), K, dtype=torch.long, device=device)  # all [MASK]
    for t, n_masked in enumerate(maskgit_schedule(N, steps)):
        masked = idx == K  # (n, N)
        logp = F.log_softmax(model(idx, y).float() / temperature, dim=-1)  # (n, N, K)
        sampled = sample_probs(logp.exp(), u[:, t, 0])  # (n, N)
        sampled = torch.where(masked, sampled, idx)  # fixed tokens stay as they are
        # Annealed Gumbel noise: random choice early, pure confidence at the end. The clamp keeps log finite.
        gumbel = -torch.log(-torch.log(u[:, t, 1].clamp_min(1e-20)))
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1) + choice_temperature * (1 - (t + 1) / steps) * gumbel
        conf = conf.masked_fill(~masked, float("inf"))
        idx = sampled.masked_fill(_lowest(conf, n_masked), K)
        if on_step is not None:
            on_step(t, idx)
    return idx


@torch.no_grad()
def teacher_forced_prediction(model, idx, y=None):
    """Fig. 4: s' = argmax of one teacher-forced pass of the AR prior over true indices s; (B, grid)."""
    assert model.cfg.causal
    return model(idx, y).argmax(-1)  # s'_j sees the true s_<j, never its own earlier guesses


# -----------------------------------------------------------------------------
# metrics: reconstruction PSNR (codebook usage is above, with the quantizer; FID's math is in fid.py)


def psnr(x_hat, x):
    """Mean PSNR in dB of images in [-1, 1] (compared in [0, 1])."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()
