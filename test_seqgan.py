"""
The specification of seqgan.py and its scripts, as tests. CPU only, tiny models, no network:
VGG16 and Inception are randomly initialised *on purpose* (--vgg-weights random). Ordered as the
paper (and seqgan.py): quantizer, perceptual loss, tokenizer and discriminator, related objectives,
priors and samplers, metrics; then the scripts end to end, bad input, torchrun, the project's size.

  python -m pytest -q test_seqgan.py                  # everything (minutes)
  python -m pytest -q -m "not slow" test_seqgan.py    # the method's specification (seconds): no
                                                      # torchrun, no end-to-end script runs
"""

import argparse
import ast
import contextlib
import gzip
import math
import os
import json
import re
import shutil
import subprocess
import sys
import urllib.error
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import bench
import plumbing as P
import fid
import observations
import sample
import seqgan as S
import train_prior
import train_tokenizer
from seqgan import SeqganError

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny models are op-overhead bound: a second thread only waits on a busy or shared CPU.
torch.set_num_threads(1)
TINY = ["--vgg-weights", "random", "--channels", "16", "--n-codes", "32", "--code-dim", "8",
        "--disc-channels", "8", "--batch-size", "4", "--log-every", "2", "--eval-every", "4",
        "--eval-images", "8", "--num-workers", "0"]


@pytest.fixture(scope="session")
def random_vgg():
    """One random VGG16 for the whole session, frozen as S.load_vgg16 returns it: torchvision's
    layout, uniform weights of its init's scales (a second quicker than its normal draws)."""
    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    vgg, g = vgg.to_empty(device="cpu"), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in vgg.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):  # He (fan out) / N(0, 0.01)
                std = 0.01 if isinstance(m, torch.nn.Linear) else (2 / m.weight[0, 0].numel()
                                                                   / m.out_channels) ** 0.5
                m.weight.uniform_(-std * 3 ** 0.5, std * 3 ** 0.5, generator=g)
                m.bias.zero_()
    return vgg.eval().requires_grad_(False)


@contextlib.contextmanager
def vgg_reused(vgg):
    """S.load_vgg16("random") returns vgg meanwhile (session fixtures run before the autouse
    patch)."""
    load = S.load_vgg16
    S.load_vgg16 = lambda w: vgg if w == "random" else load(w)
    try:
        yield
    finally:
        S.load_vgg16 = load


LOAD_VGG16 = S.load_vgg16  # the real loader, for tests whose torchrun processes build their own


@pytest.fixture(autouse=True)
def reuse_random_vgg(monkeypatch, random_vgg):
    load = S.load_vgg16
    monkeypatch.setattr(S, "load_vgg16", lambda w: random_vgg if w == "random" else load(w))


def write_class_folder(root, n, shape, classes, name="{}.png"):
    """n random RGB PNGs of shape (H, W); image i goes into the subfolder classes[i % 2]."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % 2]
        d.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / name.format(i))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """12 real-size PNGs (36x40, not square) in two class subfolders."""
    return write_class_folder(tmp_path_factory.mktemp("images"), 12, (36, 40), ("dogs", "cats"))


@pytest.fixture(scope="session")
def phase1_ckpt(tmp_path_factory, image_folder, random_vgg):
    """A tiny phase-1 run through the real script: 4 steps, the GAN switching on at step 2."""
    out = tmp_path_factory.mktemp("phase1")
    with vgg_reused(random_vgg):
        train_tokenizer.main(TINY + ["--data", image_folder, "--steps", "4", "--gan-start", "2",
                                     "--out", str(out)])
    return str(out / "ckpt.pt")


def tokenizer_configs(out, *argv):
    """train_tokenizer.py's resolved configs for a command line, nothing trained or written:
    (train, model, loss, checkpoint to resume or None, phase-1 checkpoint or None)."""
    return train_tokenizer.configure(train_tokenizer.parse(["--out", str(out), *argv]))


def built_quantizer(**kw):
    """The quantizer a Tokenizer builds for TokenizerConfig(**kw) (SeQ-GAN's, or the related
    objectives'), with a tiny encoder and decoder around it."""
    return S.Tokenizer(S.TokenizerConfig(channels=8, n_res=1, n_res_lowest=1, **kw)).quantizer


def quantizer(**kw):
    """A small quantizer, K = 16 codes of 4-d; the entropy term off unless asked for."""
    return built_quantizer(**{**dict(n_codes=16, code_dim=4, entropy_weight=0.0), **kw})


# -----------------------------------------------------------------------------
# quantizer (Eq. 1, Eq. 2, section 3.4)


def test_quantizer_returns_nearest_code():
    """Eq. 1: each position takes the code at the smallest Euclidean distance (brute force)."""
    torch.manual_seed(0)
    q = quantizer()
    q.codebook.weight.data.normal_()
    z_e = torch.randn(3, 4, 5, 6)
    z_q, idx, _ = q(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, q.codebook.weight).argmin(1).reshape(3, 5, 6)
    assert torch.equal(idx, expected)
    assert torch.allclose(z_q, q.codebook.weight[expected].permute(0, 3, 1, 2))


def test_straight_through_reaches_encoder():
    """The forward value is z_q, and d(z_q)/d(z_e) is the identity (straight-through estimator)."""
    q = quantizer()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = q(z_e)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z_e.grad, g)


def test_beta_scales_commitment_not_codebook():
    """Eq. 2: beta multiplies |sg[z_q] - z_e|^2 (the encoder's term). With beta = 0 the encoder gets
    no gradient from the VQ loss while the codebook still does; with beta = b it gets
    b * 2(z_e - z_q)/n."""
    torch.manual_seed(0)
    for beta in (0.0, 0.25):
        q = quantizer(beta=beta)
        z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
        z_q, _, terms = q(z_e)
        terms["loss"].backward()
        assert q.codebook.weight.grad.abs().sum() > 0
        expected = beta * 2 * (z_e - z_q).detach() / z_e.numel()
        assert torch.allclose(z_e.grad, expected, atol=1e-7)
        # the same value, a different gradient
        assert torch.allclose(terms["codebook_loss"], terms["commitment_loss"])


def test_entropy_term_raises_codebook_usage():
    """Section 3.4 at the defaults (gamma 0.01, tau 0.01): a young codebook (codes within 1/K of 0)
    and data off to one side. Plain VQ moves the one nearest code onto the data and uses it alone;
    the -gamma H(mean softmax(-D / tau)) term pulls the unused codes in. At tau = 1 the young
    codebook's soft usage is already uniform (H at its maximum log K): in the same 100 steps the
    term does nothing, which is why tau is 0.01."""
    def usage_after_training(**kw):
        torch.manual_seed(0)
        direction = torch.tensor([0.6, 0.8]).view(1, 2, 1, 1)
        z_e = 0.7 * direction + 0.03 * torch.randn(256, 2, 1, 1)
        q = built_quantizer(n_codes=16, code_dim=2, **kw)
        opt = torch.optim.Adam(q.parameters(), lr=0.01)
        for _ in range(100):
            _, _, terms = q(z_e)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        _, idx, terms = q(z_e)
        usage = S.codebook_usage(torch.bincount(idx.flatten(), minlength=16))[0].item()
        return usage, terms["entropy"].item()

    plain, h_plain = usage_after_training(entropy_weight=0.0)
    regularised, h_reg = usage_after_training()
    at_tau_1, h_tau_1 = usage_after_training(entropy_temp=1.0)
    assert plain == 1 / 16
    assert regularised >= 4 / 16
    assert h_reg > h_plain  # the term raises H(D_bar); a sign error would lower it
    assert at_tau_1 <= 2 / 16 and h_tau_1 > 0.99 * math.log(16)


def test_codebook_usage_and_perplexity():
    counts = torch.tensor([5, 5, 0, 0])
    usage, ppl = S.codebook_usage(counts)
    assert usage.item() == 0.5 and abs(ppl.item() - 2.0) < 1e-5


def test_cosine_codebook_takes_the_code_of_largest_cosine_not_the_nearest():
    """VQ-KD's l2-normalised codebook: each position takes the code of largest cosine similarity
    (brute force on normalised vectors) and z_q is that unit code. On a constructed example this
    differs from the Euclidean argmin: z = (1, 0) is nearest to (0.5, 0.1), parallel to (10, 0)."""
    torch.manual_seed(0)
    q = quantizer(cosine_codebook=True)
    q.codebook.weight.data.normal_()
    z_e = torch.randn(3, 4, 5, 6)
    z_q, idx, _ = q(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    e = F.normalize(q.codebook.weight, dim=1)
    expected = (F.normalize(flat, dim=1) @ e.t()).argmax(1)
    assert torch.equal(idx.flatten(), expected)
    assert torch.equal(q.nearest(flat)[0], expected)  # the tokenize() path
    assert torch.allclose(z_q, e[expected].reshape(3, 5, 6, 4).permute(0, 3, 1, 2), atol=1e-6)
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    for cosine, k in ((True, 1), (False, 0)):
        q = quantizer(n_codes=2, code_dim=2, cosine_codebook=cosine)
        q.codebook.weight.data = torch.tensor([[0.5, 0.1], [10.0, 0.0]])
        assert q(z)[1].item() == k, cosine


# -----------------------------------------------------------------------------
# perceptual loss (Eq. 3)


def test_perceptual_taps_are_the_named_vgg16_layers(random_vgg):
    """The five taps are the outputs of torchvision's vgg16 ReLUs relu1_2 ... relu5_3 (indices
    3, 8, 15, 22, 29 of .features) and 'logits' is the full classifier output before softmax."""
    feats = random_vgg.features
    convs_before = {3: 64, 8: 128, 15: 256, 22: 512, 29: 512}
    for i, c in convs_before.items():
        assert isinstance(feats[i], torch.nn.ReLU) and feats[i - 1].out_channels == c
    loss = S.PerceptualLoss(0.5, random_vgg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = loss.features(x, logits=True)
    h = ((x + 1) / 2 - loss.mean) / loss.std
    for i, name in S.VGG_TAPS.items():
        assert torch.allclose(out[name], feats[: i + 1](h), atol=1e-5), name
    assert torch.allclose(out["logits"], random_vgg(h), atol=1e-4)
    assert set(out) == set(S.LOW_LAYERS) | set(S.SEM_LAYERS)


def test_perceptual_alpha_mixes_as_eq3(random_vgg):
    """L_alpha = alpha * (mse5_3 + mse_logits) + (1 - alpha) * (mse1_2 + ... + mse5_3); at alpha = 0
    the classifier never runs."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    ref = S.PerceptualLoss(1.0, random_vgg)
    fx, fy = ref.features(x, logits=True), ref.features(y, logits=True)
    mse = {k: F.mse_loss(fx[k], fy[k]) for k in fx}
    low = sum(mse[k] for k in ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"))
    sem = mse["relu5_3"] + mse["logits"]
    calls = []
    hook = random_vgg.classifier.register_forward_hook(lambda *a: calls.append(1))
    try:
        for alpha in (0.0, 0.3, 1.0):
            calls.clear()
            value, terms = S.PerceptualLoss(alpha, random_vgg, norm="none")(x, y)
            assert torch.allclose(value, alpha * sem + (1 - alpha) * low, rtol=1e-5)
            assert len(calls) == (0 if alpha == 0 else 2)
    finally:
        hook.remove()


def test_energy_norm_divides_each_layer_by_the_target_energy(random_vgg):
    """Default per-layer error: MSE(phi(x_hat), phi(x)) / mean(phi(x)^2); 1 for an all-zero map."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss = S.PerceptualLoss(1.0, random_vgg)
    fx, fy = loss.features(x, logits=True), loss.features(y, logits=True)
    rel = {k: F.mse_loss(fx[k], fy[k]) / fy[k].pow(2).mean() for k in fx}
    value, terms = loss(x, y)
    assert torch.allclose(value, rel["relu5_3"] + rel["logits"], rtol=1e-5)
    zero = torch.zeros_like(fy["relu3_3"])
    assert torch.allclose(loss.layer_error(zero, fy["relu3_3"]), torch.tensor(1.0))
    with pytest.raises(S.SeqganError, match="unknown --perceptual-norm"):
        S.PerceptualLoss(1.0, random_vgg, norm="lpips")


@contextlib.contextmanager
def scaled(vgg, s):
    """vgg, for the block, with every activation (taps and logits) s times larger: conv1_1's weight
    and every bias times s (ReLU, max-pool and the linear layers commute with a positive scale).
    In place, restored exactly afterwards: a copy of VGG16 costs seconds."""
    layers = [m for m in [*vgg.features, *vgg.classifier]
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    saved = [layers[0].weight.clone()] + [m.bias.clone() for m in layers]
    with torch.no_grad():
        layers[0].weight.mul_(s)
        for m in layers:
            m.bias.mul_(s)
    try:
        yield vgg
    finally:
        with torch.no_grad():
            layers[0].weight.copy_(saved[0])
            for m, b in zip(layers, saved[1:]):
                m.bias.copy_(b)


def test_perceptual_balance_is_independent_of_vgg_scale(random_vgg):
    """The balance of L_alpha against the pixel L1 must not depend on the VGG checkpoint's
    activation scale. With every activation 0.1x or 10x larger, the default terms (LossConfig's
    perceptual_norm, energy) stay the same and neither L_sem nor L_low exceeds 10 x the L1 term;
    the paper's plain MSE moves by s^2."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    l1 = (x_hat - x).abs().mean()
    default = S.LossConfig().perceptual_norm
    f = S.PerceptualLoss(1.0, random_vgg).features(x, logits=True)
    with scaled(random_vgg, 10.0) as vgg:
        f10 = S.PerceptualLoss(1.0, vgg).features(x, logits=True)
    assert torch.allclose(f10["logits"], 10 * f["logits"], rtol=1e-4, atol=1e-5)
    # alpha 0.5: one pass gives both terms, L_low (alpha 0's loss) and L_sem (alpha 1's)
    _, ref = S.PerceptualLoss(0.5, random_vgg, default)(x_hat, x)
    _, plain = S.PerceptualLoss(0.5, random_vgg, norm="none")(x_hat, x)
    for s in (0.1, 10.0):
        with scaled(random_vgg, s) as vgg:
            _, value = S.PerceptualLoss(0.5, vgg, default)(x_hat, x)
            _, value_plain = S.PerceptualLoss(0.5, vgg, norm="none")(x_hat, x)
        for term in ("l_low", "l_sem"):
            assert torch.allclose(value[term], ref[term], rtol=1e-3), (term, s)
            assert value[term] < 10 * l1
            assert torch.allclose(value_plain[term], s * s * plain[term], rtol=1e-3)


def test_perceptual_size_resizes_what_the_vgg_sees(random_vgg, tmp_path):
    """perceptual_size 64 (a preset value) on 32 px images: the perceptual loss train_tokenizer.py
    builds feeds VGG16 64x64 bilinear resizes of both images (the loss of the resized pair); at the
    default 0 VGG16 sees the images at their own size."""
    torch.manual_seed(0)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    up = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)
    # alpha 0: no classifier, a quicker test
    train_cfg, model_cfg, loss_cfg = tokenizer_configs(tmp_path, *TINY, "--alpha", "0")[:3]
    seen, values = [], {}
    hook = random_vgg.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        for size, seen_size in ((64, 64), (0, 32)):
            cfgs = train_cfg, model_cfg, replace(loss_cfg, perceptual_size=size)
            loss = train_tokenizer.build(*cfgs, None, None, torch.device("cpu"))[-1]
            seen.clear()
            values[size], _ = loss(x, y)
            assert seen == [(1, 3, seen_size, seen_size)] * 2, size
    finally:
        hook.remove()
    ref, _ = S.PerceptualLoss(loss_cfg.alpha, random_vgg, loss_cfg.perceptual_norm)(up(x), up(y))
    assert torch.allclose(values[64], ref, rtol=1e-5)


@pytest.mark.slow
def test_vgg_weights_offline_is_one_clear_error(monkeypatch, tmp_path):
    """No network: the error names the file and where to put it (no silent random fallback)."""
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(S.SeqganError, match=r"vgg16-397923af\.pth.*--vgg-weights PATH"):
        S.load_vgg16("imagenet")


@pytest.mark.slow
def test_vgg_weights_from_local_path(tmp_path, random_vgg):
    path = tmp_path / "vgg.pth"
    torch.save(random_vgg.state_dict(), path)
    vgg = S.load_vgg16(str(path))
    assert torch.equal(vgg.features[0].weight, random_vgg.features[0].weight)
    torch.save({"nope": torch.zeros(1)}, path)
    with pytest.raises(S.SeqganError, match="not a torchvision VGG16 state dict"):
        S.load_vgg16(str(path))


# -----------------------------------------------------------------------------
# model shape, attention, discriminator, the whole generator objective


def test_paper_preset_matches_table7_size(tmp_path):
    """Section 6.1 / Table 7: --preset paper's phase-1 tokenizer has 54.5M parameters, the phase-2
    one (an attention layer after each of the n_res ResBlocks of every level) 57.9M, and Table 1's
    "+Attention x2" (two per slot) 61.4M: each as the code builds it (dec_attn 0, 1, 2), on the
    meta device (counted, never allocated)."""
    cfg = tokenizer_configs(tmp_path, "--preset", "paper")[1]
    assert cfg.grid == 16 and not cfg.dec_attn
    for n, paper in ((0, 54.5e6), (1, 57.9e6), (2, 61.4e6)):
        with torch.device("meta"):
            tok = S.Tokenizer(replace(cfg, dec_attn=n))
        attn = [m for m in tok.decoder.modules() if isinstance(m, S.BlockAttention)]
        assert len(attn) == n * cfg.n_res * len(cfg.ch_mult)
        assert abs(P.count_params(tok) - paper) < 0.2e6, (n, P.count_params(tok), paper)


def naive_block_attention(attn, x):
    """Reference: full attention over all H*W positions per head, masked to the allowed pairs."""
    B, C, H, W = x.shape
    nh, P = attn.n_heads, attn.block
    qkv = attn.qkv(attn.norm(x)).reshape(B, 3, nh, C // nh, H * W)
    q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, nh, HW, hs) each
    r, c = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    same_block = ((r[:, None] // P == r[None] // P) & (c[:, None] // P == c[None] // P))
    same_offset = ((r[:, None] % P == r[None] % P) & (c[:, None] % P == c[None] % P))
    mask = torch.stack([same_block] * (nh // 2) + [same_offset] * (nh - nh // 2))  # (nh, HW, HW)
    att = (q @ k.transpose(-1, -2)) / (C // nh) ** 0.5
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(att.sum(-1), torch.ones(()))  # rows are distributions over the keys
    o = (att @ v).transpose(-1, -2).reshape(B, C, H, W)
    return x + attn.proj(o)


def test_block_attention_equals_masked_reference():
    """Section 3.4: half the heads attend within P x P blocks, half across blocks at one offset."""
    torch.manual_seed(0)
    attn = S.BlockAttention(32, n_heads=4, block=2)
    torch.nn.init.normal_(attn.proj.weight)  # the real init is zero, which would hide errors
    x = torch.randn(2, 32, 8, 4)
    assert torch.allclose(attn(x), naive_block_attention(attn, x), atol=1e-4)


def test_phase2_decoder_starts_as_phase1_decoder():
    """Zero-initialised projections: phase-1 weights in the enhanced decoder change nothing."""
    torch.manual_seed(0)
    cfg = S.TokenizerConfig(channels=16, n_codes=32, code_dim=8, attn_heads=2)
    t1 = S.Tokenizer(cfg)
    t2 = S.Tokenizer(S.TokenizerConfig(**{**cfg.__dict__, "dec_attn": True}))
    missing, unexpected = t2.load_state_dict(t1.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.attn.") for k in missing)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(t1(x)[0], t2(x)[0], atol=1e-5)


def test_d_step_leaves_generator_grads_untouched():
    """The discriminator trains on *detached* reconstructions: no gradient reaches the tokenizer."""
    torch.manual_seed(0)
    tok = S.Tokenizer(S.TokenizerConfig(channels=16, n_codes=32, code_dim=8))
    disc = S.Discriminator(32, 8, 32)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x_hat, _, _ = tok(x)
    before = [p.detach().clone() for p in disc.parameters()]
    opt_d.zero_grad(set_to_none=True)
    terms = S.d_backward(disc, x, x_hat, S.LossConfig(r1_every=1), step=0)
    loss, r1 = terms["d_loss"], terms["r1"]
    opt_d.step()
    assert all(p.grad is None for p in tok.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    assert r1.item() > 0 and torch.isfinite(loss)


def test_d_logs_its_logits_and_learns_to_tell_real_from_fake():
    """d_backward reports D's mean logits on real and fake images: a D trained for a few steps on
    images against flat grey reconstructions scores the real ones higher, and its loss falls below
    log 4."""
    torch.manual_seed(0)
    disc = S.Discriminator(16, 8, 32)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.0, 0.99))
    x, x_hat = torch.rand(8, 3, 16, 16) * 2 - 1, torch.zeros(8, 3, 16, 16)
    for step in range(1, 13):  # no step a multiple of 100: no R1, d_loss is the logistic loss alone
        opt_d.zero_grad(set_to_none=True)
        terms = S.d_backward(disc, x, x_hat, S.LossConfig(r1_every=100), step)
        opt_d.step()
    assert set(terms) == {"d_loss", "r1", "d_real", "d_fake"} and terms["r1"] == 0
    assert terms["d_real"] > terms["d_fake"] and terms["d_loss"] < math.log(4) - 0.1


@pytest.mark.slow
def test_compiled_phase1_steps_with_gan_and_r1(image_folder, tmp_path, monkeypatch):
    """--compile with D and lazy R1 from the first step. R1 is a double backward (create_graph),
    which a compiled module cannot take, so it runs on the plain D. aot_eager builds the same
    AOTAutograd graphs as inductor (and fails the same way on R1 through a compiled D) in seconds
    instead of minutes."""
    monkeypatch.setattr(train_tokenizer, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setitem(train_tokenizer.PRESETS["classroom"], "r1_every", 1)  # a preset value
    seen, r1_penalty = [], S.r1_penalty
    monkeypatch.setattr(S, "r1_penalty", lambda disc, x: seen.append(disc) or r1_penalty(disc, x))
    out = tmp_path / "run"
    train_tokenizer.main(TINY + ["--data", image_folder, "--compile", "--gan-start", "0",
                                 "--steps", "2", "--out", str(out)])
    assert P.load_checkpoint(str(out / "ckpt.pt"), "tokenizer")["step"] == 2
    assert len(seen) == 2 and all(type(d) is S.Discriminator for d in seen)


def test_d_and_g_losses_are_the_non_saturating_logistic_losses():
    """StyleGAN2's losses against the closed form: D minimises E log(1 + e^-D(x)) + E log(1 +
    e^D(x_hat)), G minimises E log(1 + e^-D(x_hat)): non-saturating, so a D sure of a fake
    (D(x_hat) = -10) still gives G a gradient of about -1 per sample, not about 0."""
    softplus = lambda t: torch.log1p(torch.exp(t))
    real = torch.tensor([-3.0, 0.0, 2.0, 30.0], dtype=torch.float64)
    fake = torch.tensor([-1.0, 0.5, 4.0], dtype=torch.float64)
    assert torch.allclose(S.d_loss(real, fake), softplus(-real).mean() + softplus(fake).mean())
    assert torch.allclose(S.g_loss(fake), softplus(-fake).mean())
    assert S.d_loss(torch.zeros(3), torch.zeros(2)).item() == pytest.approx(math.log(4))
    sure = torch.tensor([-10.0], requires_grad=True)
    S.g_loss(sure).backward()
    assert sure.grad.item() == pytest.approx(-1.0, abs=1e-4)


def test_r1_is_gamma_half_times_the_interval_times_the_gradient_norm_on_its_steps_only():
    """Lazy R1 (StyleGAN2): on the steps that are multiples of r1_every, d_backward adds the
    gradient of gamma / 2 * r1_every * E |grad_x D(x)|^2 over the real images x (computed here by
    autograd) and logs R1 and the penalised loss; on every other step it adds nothing. scale
    scales both."""
    torch.manual_seed(0)
    disc = S.Discriminator(16, 8, 16)
    with torch.no_grad():  # 3x the init's weights: an input gradient of norm about 1, not 1e-4
        for p in disc.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    x, x_hat = torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4, 3, 16, 16)
    cfg = S.LossConfig(r1_gamma=0.3, r1_every=4)
    params = list(disc.parameters())

    def d_backward(step, scale=1.0):
        disc.zero_grad(set_to_none=True)
        terms = S.d_backward(disc, x, x_hat, cfg, step, scale)
        return terms, [p.grad.clone() for p in params]

    x_req = x.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(disc(x_req).sum(), x_req, create_graph=True)
    r1 = grad_x.pow(2).sum([1, 2, 3]).mean()
    r1_grads = torch.autograd.grad(0.3 / 2 * 4 * r1, params, allow_unused=True)
    r1_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, r1_grads)]
    logistic = S.d_loss(disc(x), disc(x_hat)).detach()
    plain_terms, plain = d_backward(1)
    assert plain_terms["r1"] == 0 and torch.allclose(plain_terms["d_loss"], logistic)
    for step in (2, 3, 5, 7):
        terms, grads = d_backward(step)
        assert terms["r1"] == 0 and all(torch.equal(a, b) for a, b in zip(grads, plain)), step
    for step in (0, 4, 8):
        terms, grads = d_backward(step)
        assert torch.allclose(terms["r1"], r1, rtol=1e-4), step
        assert torch.allclose(terms["d_loss"], logistic + 0.3 / 2 * 4 * r1, rtol=1e-4)
        for g, g_plain, g_r1 in zip(grads, plain, r1_grads):
            assert torch.allclose(g, g_plain + g_r1, rtol=1e-3, atol=1e-6), step
    _, half = d_backward(4, scale=0.5)
    assert all(torch.allclose(h, g / 2, rtol=1e-5, atol=1e-8) for h, g in zip(half, grads))


def test_blur_is_the_normalised_1331_outer_product_per_channel():
    """StyleGAN2's low-pass: a unit impulse becomes the 4x4 kernel [1, 3, 3, 1]^T [1, 3, 3, 1] / 64
    (sum 1) in its own channel only, and a constant image stays constant (reflect padding)."""
    x = torch.zeros(1, 2, 10, 10)
    x[0, 1, 4, 5] = 1.0
    y = S.Blur()(x)
    assert y.shape == x.shape and y[0, 0].abs().max() == 0
    rows, cols = y[0, 1].nonzero().unbind(1)
    block = y[0, 1, rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(block, k[:, None] * k[None] / 64) and torch.allclose(y.sum(), x.sum())
    flat = torch.full((2, 3, 8, 8), 0.7)
    assert torch.allclose(S.Blur()(flat), flat)


@pytest.mark.parametrize("batch", [8, 6, 5])
def test_minibatch_stddev_channel_is_the_group_std_computed_by_hand(batch):
    """D's extra channel before its last conv: for each sample, the std over its group (the largest
    of 4, 3, 2, 1 dividing the batch; sample b with b + B/g, b + 2B/g, .., StyleGAN2's grouping) of
    every feature, averaged over the features; constant over the map."""
    torch.manual_seed(0)
    disc = S.Discriminator(16, 8, 16)
    seen = []
    disc.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    disc(torch.rand(batch, 3, 16, 16))
    h, extra = seen[0][:, :-1], seen[0][:, -1]  # (B, C, 4, 4), (B, 4, 4)
    g = max(d for d in (4, 3, 2, 1) if batch % d == 0)
    for b in range(batch):
        group = h[b % (batch // g):: batch // g]  # (g, C, 4, 4)
        std = (group.var(0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(extra[b], std.expand(4, 4), atol=1e-6), b


def test_gan_weight_warms_up():
    cfg = S.LossConfig(gan_weight=0.1, gan_start=10, gan_warmup=4)
    weights = [S.gan_weight_at(s, cfg) for s in (9, 10, 11, 12, 14, 20)]
    assert weights == pytest.approx([0, 0, 0.025, 0.05, 0.1, 0.1])


def test_generator_objective_adds_the_weighted_terms_phase2_drops_lvq_and_gan_weight_0_never_runs_d(
        random_vgg):
    """seqgan.tokenizer_loss: total = l1_weight L1 + perceptual_weight L_alpha (Eq. 3) + gan_w L_adv
    + L_vq (Eq. 2 and the entropy term, phase 1 only); every term is returned under its name."""
    torch.manual_seed(0)
    tok = S.Tokenizer(S.TokenizerConfig(channels=16, n_codes=32, code_dim=8))
    disc = S.Discriminator(32, 8, 32)
    perceptual = S.PerceptualLoss(0.0, random_vgg, "energy", 0)  # no classifier: quicker
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, _, q = tok(x)
    lc = S.LossConfig(l1_weight=2.0, perceptual_weight=0.5)
    gan = dict(gan_w=0.3, disc=disc, perceptual=perceptual)
    loss, t = S.tokenizer_loss(x, x_hat, q, lc, phase=1, **gan)
    names = {"loss", "l1", "perceptual", "l_low", "l_sem", "codebook", "commitment", "entropy",
             "g_adv"}
    assert names <= set(t)
    assert t["g_adv"] > 0 and t["perceptual"] > 0 and t["loss"] is loss
    expected = 2.0 * t["l1"] + 0.5 * t["perceptual"] + 0.3 * t["g_adv"] + q["loss"]
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # G's term needs D's input gradient only
    x_hat, _, q = tok(x)
    loss2, t2 = S.tokenizer_loss(x, x_hat, q, lc, phase=2, **gan)
    # no L_vq
    assert torch.allclose(loss2, 2.0 * t2["l1"] + 0.5 * t2["perceptual"] + 0.3 * t2["g_adv"])
    assert t2["codebook"] > 0  # still logged

    class NeverCalled(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("D ran although the GAN weight is 0")

    x_hat, _, q = tok(x)
    loss0, t0 = S.tokenizer_loss(x, x_hat, q, lc, phase=1, gan_w=0.0, disc=NeverCalled(),
                                 perceptual=perceptual)
    assert t0["g_adv"] == 0
    assert torch.allclose(loss0, 2.0 * t0["l1"] + 0.5 * t0["perceptual"] + q["loss"])


def test_phase2_trains_the_decoder_alone_at_alpha_0_without_lvq(tokenizer_ckpt, tmp_path):
    """Phase 2 as train_tokenizer.py configures, builds and steps it from a phase-1 checkpoint:
    alpha 0, the attention decoder, an optimizer over the decoder alone; after steps with the GAN
    on, encoder and codebook are bit-identical and the decoder moved; the total is l1_weight L1 +
    perceptual_weight L_alpha + gan_w L_adv, without L_vq (Section 3.4)."""
    before = P.load_checkpoint(tokenizer_ckpt, "tokenizer")["model"]
    train_cfg, model_cfg, loss_cfg, ckpt, init = tokenizer_configs(
        tmp_path, "--phase", "2", "--init", tokenizer_ckpt)
    assert train_cfg.phase == 2 and loss_cfg.alpha == 0 and model_cfg.dec_attn
    cfgs = train_cfg, model_cfg, loss_cfg
    model, disc, opt_g, opt_d, _, perceptual = train_tokenizer.build(*cfgs, ckpt, init,
                                                                     torch.device("cpu"))
    trained = {id(p) for group in opt_g.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.decoder.parameters()}
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for step in (1, 2):  # the GAN weight is 0 at step 0; no R1 (a double backward) at 1 and 2
        t, _, gan_w = train_tokenizer.train_step(model, disc, opt_g, opt_d, [x], step, cfgs,
                                                 perceptual, False)
        weighted = loss_cfg.l1_weight * t["l1"] + loss_cfg.perceptual_weight * t["perceptual"]
        assert t["codebook"] > 0 and torch.allclose(t["loss"], weighted + gan_w * t["g_adv"])
        assert torch.allclose(t["perceptual"], t["l_low"])  # alpha 0: L_low alone
    assert gan_w > 0 and t["d_loss"] > 0
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("encoder.", "quantizer.")):
            assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith("decoder."))


# -----------------------------------------------------------------------------
# related objectives as switches (off for SeQ-GAN): Reg-VQ and VQ-KD


def test_regvq_prior_kl_is_log_k_minus_entropy_and_the_same_gradient_as_seqgan():
    """Reg-VQ's KL(P_post || uniform) = sum_k p_k log(K p_k), P_post = mean_n softmax(-D_n / tau),
    is the term the quantizer adds with weight gamma, as SeQ-GAN's entropy term (section 3.4): its
    value and its gradient (to the encoder output and to the codebook) equal those of log K - H
    computed here from cdist, by autograd."""
    torch.manual_seed(0)
    tau = 0.5
    q = quantizer(n_codes=16, entropy_weight=1.0, beta=0.0, entropy_temp=tau)
    q.codebook.weight.data.normal_()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, _, terms = q(z_e)
    d = torch.cdist(z_e.permute(0, 2, 3, 1).reshape(-1, 4), q.codebook.weight) ** 2
    p = torch.softmax(-d / tau, 1).mean(0)
    kl = (p * torch.log(16 * p)).sum()
    assert abs(terms["kl_uniform"].item() - kl.item()) < 1e-6
    assert abs(terms["kl_uniform"].item() - (math.log(16) - terms["entropy"].item())) < 1e-6
    wrt = [z_e, q.codebook.weight]
    expected = torch.autograd.grad((p * torch.log(p)).sum(), wrt)  # -H
    got = torch.autograd.grad(terms["loss"] - terms["codebook_loss"], wrt)  # gamma 1, beta 0
    for g, e in zip(got, expected):
        assert e.abs().max() > 1e-3 and torch.allclose(g, e, rtol=1e-4, atol=1e-7)


def test_mask_ratio_zero_is_bit_identical_to_plain_vq(tmp_path):
    """The tokenizer of train_tokenizer.py's --objective regvq with mask ratio 0 draws no random
    numbers in training and returns exactly what the SeQ-GAN tokenizer of the same weights returns;
    at the objective's own mask ratio it samples (the RNG moves, the codes change)."""
    def tokenizer(model_cfg):
        torch.manual_seed(0)
        return S.Tokenizer(model_cfg).train()

    seqgan_cfg = tokenizer_configs(tmp_path, *TINY)[1]
    regvq_cfg = tokenizer_configs(tmp_path, *TINY, "--objective", "regvq")[1]
    plain, sampling = tokenizer(seqgan_cfg), tokenizer(regvq_cfg)
    # the same tau as SeQ-GAN's, so that the two KL terms are alike too
    masked = tokenizer(replace(regvq_cfg, mask_ratio=0.0, entropy_temp=seqgan_cfg.entropy_temp))
    masked.load_state_dict(plain.state_dict())
    sampling.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    state = torch.get_rng_state()
    a, b = plain(x), masked(x)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    c = sampling(x)
    assert not torch.equal(state, torch.get_rng_state()) and not torch.equal(a[1], c[1])


def test_mask_ratio_one_samples_from_softmax_of_minus_distance():
    """With m = 1 every position draws k ~ softmax(-D / tau): a chi-square test on a toy problem."""
    torch.manual_seed(0)
    q = quantizer(n_codes=4, code_dim=2, mask_ratio=1.0, entropy_temp=2.0)
    q.codebook.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [2.0, 2.0]])
    # 10^4 draws
    z_e = torch.tensor([0.5, 0.3]).view(1, 2, 1, 1).expand(1, 2, 100, 100).contiguous()
    _, idx, _ = q(z_e)
    d = ((q.codebook.weight.detach() - torch.tensor([0.5, 0.3])) ** 2).sum(1)
    expected = (torch.softmax(-d / 2.0, 0) * idx.numel()).double()
    observed = torch.bincount(idx.flatten(), minlength=4).double()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27  # the 0.999 quantile of chi-square with 3 degrees of freedom: p > 1e-3
    assert observed[0] < 0.9 * idx.numel()  # really sampled, not the nearest code everywhere


def test_sample_changed_is_the_fraction_of_masked_positions_not_given_the_nearest_code():
    """sample_changed: of the stochastically masked positions, the fraction whose sampled code is
    not the nearest one. 0 without the mask; at tau 1 on a young codebook (codes within 1/K of each
    other, so softmax(-D) is nearly uniform) almost every sample is another code."""
    torch.manual_seed(0)
    z_e = torch.randn(4, 4, 8, 8)
    assert quantizer(entropy_temp=1.0)(z_e)[2]["sample_changed"].item() == 0
    q = quantizer(mask_ratio=1.0, entropy_temp=1.0)
    nearest = q.eval()(z_e)[1]
    assert q(z_e)[2]["sample_changed"].item() == 0  # eval: no sampling
    _, idx, terms = q.train()(z_e)
    changed = terms["sample_changed"].item()
    assert changed == pytest.approx((idx != nearest).float().mean().item()) and changed > 0.8
    half = quantizer(mask_ratio=0.5, entropy_temp=1.0)
    half.load_state_dict(q.state_dict())
    _, idx, terms = half(z_e)
    # m = 0.5: the fraction is of the masked positions (about half), not of all of them
    assert terms["sample_changed"].item() > 1.5 * (idx != nearest).float().mean().item() > 0


def test_regvq_objective_runs_at_the_measured_temperature(tmp_path):
    """README (Choices the paper leaves open): Reg-VQ's tau is 0.01, measured. The objective sets
    it for the prior KL and the stochastic mask alike: the tokenizer it builds takes its KL at
    tau 0.01 (recomputed here) and samples codes far less at random than at tau 1."""
    def model_config(*argv):
        return tokenizer_configs(tmp_path, *TINY, "--objective", "regvq", *argv)[1]

    mc = model_config()
    assert (mc.entropy_temp, mc.mask_ratio) == (0.01, 0.4)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    tok = S.Tokenizer(mc)
    _, _, q = tok(x)
    z = tok.encoder(x).permute(0, 2, 3, 1).reshape(-1, mc.code_dim)
    p = torch.softmax(-torch.cdist(z, tok.quantizer.codebook.weight) ** 2 / 0.01, 1).mean(0)
    assert torch.allclose(q["kl_uniform"], (p * torch.log(mc.n_codes * p)).sum(), atol=1e-4)
    changed = {}
    for tau in (1.0, mc.entropy_temp):  # every position masked: how often it gets another code
        torch.manual_seed(0)
        tok = S.Tokenizer(replace(mc, mask_ratio=1.0, entropy_temp=tau))
        changed[tau] = tok(x)[2]["sample_changed"].item()
    assert changed[1.0] > 0.9 and changed[0.01] < 0.7 * changed[1.0]


def test_sampled_positions_pass_gradients_to_encoder_and_codebook():
    """The Gumbel-softmax straight-through path: gradients reach z_e through D and the codes."""
    torch.manual_seed(0)
    q = quantizer(mask_ratio=1.0, beta=0.0, entropy_temp=1.0)
    q.codebook.weight.data.normal_()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = q(z_e)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    # not the plain copy of the nearest path
    assert z_e.grad.abs().sum() > 0 and not torch.equal(z_e.grad, g)
    assert q.codebook.weight.grad.abs().sum() > 0


def test_eval_mode_tokenizing_is_deterministic():
    """Sampling is for training only: eval forward passes and tokenize() agree with the nearest
    codes."""
    torch.manual_seed(0)
    cfg = S.TokenizerConfig(channels=16, n_codes=32, code_dim=8, mask_ratio=1.0, objective="regvq")
    tok = S.Tokenizer(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tok.eval()
    _, a, _ = tok(x)
    _, b, _ = tok(x)
    assert torch.equal(a, b) and torch.equal(a, tok.tokenize(x))
    tok.train()
    _, c, _ = tok(x)
    assert not torch.equal(a, c)


def test_pcl_is_lower_for_a_perfect_reconstruction_than_for_shuffled_positions():
    """A perfect reconstruction scores below a shuffled one, and plain InfoNCE is >= 0. The sampling
    distances d change the loss exactly as the weights w_i = (1 + d_i / mean d) / 2 of the positives
    say: by -mean_i (w_i - 1) s_ii, s_ii = cos(f_hat_i, f_i) / temp; only d / mean d counts."""
    torch.manual_seed(0)
    f = torch.randn(2, 16, 4, 4)
    shuffled = f.flatten(2)[:, :, torch.randperm(16)].reshape(2, 16, 4, 4)
    d = torch.rand(1, 4, 4)
    d = torch.cat([d, d.flip(1, 2)])  # both images the same mean: per image or per batch alike
    assert S.pcl_loss(f, f, d, 0.1) < S.pcl_loss(shuffled, f, d, 0.1)
    no_sampling = S.pcl_loss(f, f, torch.zeros(2, 4, 4), 0.1)  # plain InfoNCE: >= 0
    assert no_sampling >= 0
    f_hat = f + torch.randn_like(f)
    s_ii = F.cosine_similarity(f_hat, f, dim=1).flatten(1) / 0.1  # (B, n)
    w = (1 + d.flatten(1) / d.mean()) / 2
    plain, weighted = (S.pcl_loss(f_hat, f, dist, 0.1) for dist in (torch.zeros_like(d), d))
    assert torch.allclose(weighted - plain, -((w - 1) * s_ii).mean(), atol=1e-5)
    assert abs(weighted - plain) > 0.01
    assert torch.allclose(S.pcl_loss(f_hat, f, 3 * d, 0.1), weighted, atol=1e-5)


def test_pcl_weights_each_positive_by_half_of_one_plus_its_relative_sampling_distance():
    """Reg-VQ's PCL, pinned: w_i = (1 + d_i / mean(d)) / 2, loss = mean_i(logsumexp_j s_ij -
    w_i s_ii), s_ij = cos(q_i, k_j) / temp over the token-grid positions of one image."""
    torch.manual_seed(0)
    f_hat, f = torch.randn(1, 8, 1, 2), torch.randn(1, 8, 1, 2)
    d = torch.tensor([[[0.0, 2.0]]])  # mean 1 -> weights 0.5 and 1.5
    q = F.normalize(f_hat.flatten(2), dim=1)[0]  # (C, 2)
    k = F.normalize(f.flatten(2), dim=1)[0]  # (C, 2)
    s = q.t() @ k / 0.1  # (2, 2)
    w = torch.tensor([0.5, 1.5])
    expected = (torch.logsumexp(s, dim=1) - w * s.diagonal()).mean()
    assert torch.allclose(S.pcl_loss(f_hat, f, d, 0.1), expected, atol=1e-6)


def vgg_tap(vgg, x, layer):
    """VGG16's map at a named tap of images x in [-1, 1], computed here (ImageNet statistics)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    index = {name: i for i, name in S.VGG_TAPS.items()}[layer]
    return vgg.features[: index + 1](((x + 1) / 2 - mean) / std)


def test_regvq_objective_adds_the_weighted_pcl_on_relu3_3(random_vgg):
    """Reg-VQ's total: l1_weight L1 + perceptual_weight L_alpha + L_vq + pcl_weight PCL, PCL taken
    on VGG16's relu3_3 maps of reconstruction and input with the quantizer's sampling distances,
    at pcl_temp; phase 2 keeps PCL and drops L_vq."""
    torch.manual_seed(0)
    cfg = S.TokenizerConfig(channels=16, n_codes=32, code_dim=8, objective="regvq", mask_ratio=0.5)
    tok = S.Tokenizer(cfg)
    perceptual = S.PerceptualLoss(0.0, random_vgg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, _, q = tok(x)
    assert q["sample_dist"].sum() > 0
    lc = S.LossConfig(alpha=0.0, l1_weight=2.0, perceptual_weight=0.5, pcl_weight=0.3, pcl_temp=0.2)
    with torch.no_grad():
        f_hat, f = vgg_tap(random_vgg, x_hat, "relu3_3"), vgg_tap(random_vgg, x, "relu3_3")
    pcl = S.pcl_loss(f_hat, f, q["sample_dist"], 0.2)
    for phase, lvq in ((1, q["loss"]), (2, 0)):
        loss, t = S.tokenizer_loss(x, x_hat, q, lc, phase=phase, perceptual=perceptual)
        assert torch.allclose(t["pcl"], pcl, atol=1e-5) and t["pcl"] > 0
        assert torch.allclose(loss, 2.0 * t["l1"] + 0.5 * t["perceptual"] + lvq + 0.3 * t["pcl"])


def test_vqkd_objective_is_the_feature_loss_to_the_teacher_plus_lvq(random_vgg):
    """VQ-KD phase 1: total = KD + L_vq, KD the mean over token positions of 1 - cos(predicted
    feature, teacher feature), the teacher VGG16's teacher_layer map of the input resized to the
    token grid (computed here); no pixel, perceptual or GAN term."""
    torch.manual_seed(0)
    cfg = S.TokenizerConfig(channels=16, n_codes=32, code_dim=8, objective="vqkd",
                            cosine_codebook=True, feature_dim=512)
    tok = S.Tokenizer(cfg)
    perceptual = S.PerceptualLoss(1.0, random_vgg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f_pred, _, q = tok(x)  # (B, 512, 8, 8)
    for layer in ("relu5_3", "relu4_3"):  # 2x2 and 4x4 at 32 px
        with torch.no_grad():
            teacher = F.interpolate(vgg_tap(random_vgg, x, layer), size=(8, 8), mode="bilinear",
                                    align_corners=False)
        kd = (1 - F.cosine_similarity(f_pred, teacher, dim=1)).mean()
        lc = S.LossConfig(teacher_layer=layer)
        loss, t = S.tokenizer_loss(x, f_pred, q, lc, phase=1, perceptual=perceptual, vqkd=True)
        assert torch.allclose(t["kd"], kd, atol=1e-5), layer
        assert torch.allclose(loss, t["kd"] + q["loss"])
        assert t["l1"] == 0 and t["perceptual"] == 0 and t["g_adv"] == 0


def test_vqkd_phase1_has_no_pixel_decoder_and_learns_a_toy_teacher():
    """VQ-KD phase 1: only encoder, codebook and a feature decoder exist and get gradients, and the
    cosine feature loss falls when fitting a fixed teacher."""
    torch.manual_seed(0)
    cfg = S.TokenizerConfig(image_size=16, channels=16, n_codes=32, code_dim=8, objective="vqkd",
                            cosine_codebook=True, feature_dim=6)
    tok = S.Tokenizer(cfg)
    assert not any(isinstance(m, S.Decoder) for m in tok.modules())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    teacher = torch.nn.Conv2d(3, 6, 4, stride=4)  # a fixed "network": 16 px -> 4x4 features
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        f_pred, _, q = tok(x)
        loss = S.feature_kd_loss(f_pred, teacher(x).detach()) + q["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    trained = {n.split(".")[0] for n, p in tok.named_parameters() if p.grad is not None}
    assert trained == {"encoder", "quantizer", "decoder"}
    assert isinstance(tok.decoder, S.FeatureDecoder)


def test_unknown_objective_and_bad_mask_ratio_are_one_clear_error():
    with pytest.raises(S.SeqganError, match="unknown --objective vq2"):
        S.TokenizerConfig(objective="vq2")
    with pytest.raises(S.SeqganError, match=r"--mask-ratio 1.5 is outside \[0, 1\]"):
        S.TokenizerConfig(mask_ratio=1.5)


# -----------------------------------------------------------------------------
# priors (section 3.1, Table 8)

K, N = 16, 12  # vocabulary and grid of the tiny priors


def tiny(causal, n_classes=0, sharp=True, seed=0):
    """A tiny prior in eval mode. sharp=True re-draws weights large, so outputs depend strongly
    on the context and a wrong cache / mask / position changes the sampled tokens."""
    torch.manual_seed(seed)
    cfg = S.PriorConfig(n_codes=K, grid=N, n_classes=n_classes, n_layer=2, n_head=2, n_embd=32,
                        dropout=0.0, causal=causal)
    model = S.Prior(cfg).eval()
    if sharp:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 3.0 if name.startswith("head") else 0.3)
    return model


def rand_idx(B, seed=1):
    return torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ attention

@torch.no_grad()
def test_ar_output_at_i_ignores_later_tokens_and_sees_earlier_ones():
    """AR: row i scores s_i from s_<i, so changing s_j moves rows > j only."""
    model, idx = tiny(causal=True), rand_idx(2)
    base = model(idx)
    for j in range(N):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % K
        out = model(changed)
        assert torch.allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-5), f"row <= {j} saw {j}"
        if j + 1 < N:
            same = torch.allclose(out[:, j + 1:], base[:, j + 1:], atol=1e-3)
            assert not same, f"rows > {j} ignore token {j}"


@torch.no_grad()
def test_nar_output_at_i_sees_future_tokens():
    """NAR is bidirectional: changing s_j (j > 0) changes the output at position 0."""
    model, idx = tiny(causal=False), rand_idx(2)
    base = model(idx)
    for j in range(1, N):
        changed = idx.clone()
        changed[:, j] = K  # mask a later token
        assert not torch.allclose(model(changed)[:, 0], base[:, 0], atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_attention_equals_explicit_softmax_over_keys_with_rows_summing_to_one(causal):
    """The model's own attention weights A, read off its output: with the output projection taken
    out, head h returns A_h v_h, and v_h (T x hs, T = 13 <= hs = 16) has full row rank, so
    A_h = out_h v_h^+. Each row is a distribution over the *keys* (not the queries), A is
    softmax(q k^T / sqrt(hs)) over the key axis, causal for AR, and the output is A v projected."""
    model = tiny(causal).double()
    attn = model.blocks[0].attn
    x = torch.randn(3, N + 1, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(32, dim=2)
    q, k, v = (t.view(3, N + 1, 2, 16).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    proj, attn.proj = attn.proj, torch.nn.Identity()
    try:
        out = attn(x).view(3, N + 1, 2, 16).transpose(1, 2)  # (B, nh, T, hs)
    finally:
        attn.proj = proj
    weights = out @ torch.linalg.pinv(v)  # (B, nh, T, T): the model's attention
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, N + 1, dtype=torch.float64), atol=1e-6)
    assert (weights.triu(1).abs() < 1e-6).all() == causal  # causal: no weight on the future
    assert (weights > -1e-6).all()
    scores = q @ k.transpose(-2, -1) / math.sqrt(16)
    if causal:
        scores = scores.masked_fill(torch.ones(N + 1, N + 1).triu(1).bool(), float("-inf"))
    assert torch.allclose(weights, scores.softmax(dim=-1), atol=1e-6)
    ref = attn.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(3, N + 1, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


# ---------------------------------------------------------------------- AR sampling

@pytest.mark.parametrize("n_classes", [0, 5])
def test_cached_and_uncached_ar_sampling_give_identical_tokens(n_classes):
    model = tiny(causal=True, n_classes=n_classes)
    y = torch.tensor([0, 1, 2, 3, 4, 0]) if n_classes else None
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.9), (5, 0.9)]:
        a, b = (S.generate_ar(model, 6, y, top_k=top_k, top_p=top_p, use_cache=cache,
                              generator=torch.Generator().manual_seed(7))
                for cache in (True, False))
        assert a.shape == (6, N) and a.dtype == torch.long
        assert torch.equal(a, b)
        assert ((a >= 0) & (a < K)).all()  # never the special id K


def test_cached_ar_sampling_feeds_one_token_per_step():
    """With the KV cache the body never sees more than the newest position."""
    model, lengths = tiny(causal=True), []
    model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].size(1)))
    S.generate_ar(model, 2, generator=torch.Generator().manual_seed(0))
    assert lengths == [1] * N
    lengths.clear()
    S.generate_ar(model, 2, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert lengths == list(range(1, N + 1))  # the reference path recomputes the prefix


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, -2.0, 2.5]])
    kept = S.top_k_filter(logits, 3).isfinite()
    assert kept.tolist() == [[False, True, True, False, True]]
    assert S.top_k_filter(logits, 0).isfinite().all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    assert S.top_p_filter(logits, 0.4).isfinite().tolist() == [[False, True, False, False]]
    assert S.top_p_filter(logits, 0.75).isfinite().tolist() == [[False, True, False, True]]
    assert S.top_p_filter(logits, 0.85).isfinite().tolist() == [[True, True, False, True]]
    assert S.top_p_filter(logits, 1.0).isfinite().all()
    kept = S.top_p_filter(logits, 0.75)
    # the kept logits untouched
    assert torch.equal(kept[kept.isfinite()], logits[logits > math.log(0.2)])


def tempered(causal):
    """A tiny unconditional prior whose token distributions are neither flat nor one-hot."""
    model = tiny(causal)
    model.head.weight.data.mul_(0.2 / 3.0)  # logits of a few units
    return model


def sample_entropy(idx):
    """Mean over grid positions of the entropy of the sampled tokens' empirical distribution."""
    counts = F.one_hot(idx, K).sum(0).float()  # (N, K)
    p = counts / len(idx)
    return -(p * p.clamp_min(1e-12).log()).sum(1).mean().item()


@pytest.mark.parametrize("causal", [True, False])
def test_lower_temperature_samples_tokens_of_lower_entropy(causal):
    """Sampling temperature (AR: generate_ar, NAR: generate_maskgit's token logits): over 500
    samples of a tiny prior, the measured entropy of the tokens falls with the temperature."""
    model = tempered(causal)

    def entropy_at(temperature):
        g = torch.Generator().manual_seed(0)
        if causal:
            idx = S.generate_ar(model, 500, temperature=temperature, generator=g)
        else:
            idx = S.generate_maskgit(model, 500, temperature=temperature, steps=4, generator=g)
        return sample_entropy(idx)

    h = [entropy_at(t) for t in (0.5, 1.0, 2.0)]
    assert h[0] < h[1] - 0.1 and h[1] < h[2] - 0.1, h


# ------------------------------------------------------------------------ NAR / MaskGIT

def test_maskgit_schedule_counts_masked_tokens_is_monotone_and_ends_at_zero():
    s = S.maskgit_schedule(256, 12)
    assert s[-1] == 0 and len(s) == 12
    assert all(a > b for a, b in zip([256] + s, s))  # strictly fewer masked after every step
    # 253 still masked: 3 revealed first, not 253
    assert s[0] == math.floor(256 * math.cos(math.pi / 24))
    assert s == [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]
    assert S.maskgit_schedule(5, 5) == [4, 3, 2, 1, 0]  # steps == tokens: one per step


def test_maskgit_decoding_follows_schedule_and_never_changes_fixed_tokens():
    model, steps = tiny(causal=False, n_classes=3), 5
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    history = []
    out = S.generate_maskgit(model, 8, y, steps=steps, generator=torch.Generator().manual_seed(0),
                             on_step=lambda t, idx: history.append(idx.clone()))
    assert len(history) == steps and torch.equal(history[-1], out)
    for t, (grid, n_masked) in enumerate(zip(history, S.maskgit_schedule(N, steps))):
        assert ((grid == K).sum(1) == n_masked).all(), f"step {t}"
        for later in history[t + 1:]:
            fixed = grid != K
            assert torch.equal(later[fixed], grid[fixed]), f"a token fixed at step {t} changed"
    assert ((out >= 0) & (out < K)).all()  # fully decoded, mask id K never in the output


def test_maskgit_loss_masks_ceil_cos_fraction_and_at_least_one_token():
    """n_masked = ceil(cos(pi/2 u) N) >= 1, u being the generator's first draw."""
    model, seen = tiny(causal=False, sharp=False), []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    B = 512
    S.maskgit_loss(model, rand_idx(B), K, generator=torch.Generator().manual_seed(3))
    u = torch.rand(B, generator=torch.Generator().manual_seed(3))
    expected = torch.ceil(torch.cos(math.pi / 2 * u) * N).clamp(min=1).long()
    counts = (seen[0] == K).sum(1)
    assert torch.equal(counts, expected) and counts.min() >= 1
    assert counts.min() == 1 and counts.max() == N  # the sampled ratios span the whole range


def test_maskgit_loss_ignores_predictions_at_unmasked_positions():
    class GarbageWhereVisible(torch.nn.Module):
        """Wraps a prior and adds huge noise to the logits of every visible (unmasked) token."""
        def __init__(self, model):
            super().__init__()
            self.model, self.cfg = model, model.cfg

        def forward(self, idx, y=None):
            noise = 1e3 * torch.randn(*idx.shape, K)
            return self.model(idx, y) + noise * (idx != K)[..., None]

    model, idx = tiny(causal=False, sharp=False), rand_idx(8)
    loss, acc = S.maskgit_loss(model, idx, K, generator=torch.Generator().manual_seed(0))
    loss2, acc2 = S.maskgit_loss(GarbageWhereVisible(model), idx, K,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss, loss2) and torch.allclose(acc, acc2)
    assert loss.dim() == 0 and acc.dim() == 0 and loss.requires_grad


# ---------------------------------------------------------------------- visualization

@torch.no_grad()
def test_teacher_forced_prediction_is_next_token_argmax_given_the_true_prefix():
    """Fig. 4: s'_j = argmax p(s_j | true s_<j), for every j, from one pass."""
    model, idx = tiny(causal=True, n_classes=3), rand_idx(4)
    y = torch.tensor([0, 1, 2, 1])
    pred = S.teacher_forced_prediction(model, idx, y)
    assert pred.shape == (4, N)
    for j in range(N):
        assert torch.equal(pred[:, j], model(idx[:, :j], y)[:, -1].argmax(-1))


# ------------------------------------------------------------------ size and training

def test_param_count_formula_matches_module_and_table8():
    for causal, n_classes in [(True, 0), (False, 7)]:
        model = tiny(causal, n_classes)
        assert S.num_params(model.cfg) == sum(p.numel() for p in model.parameters())
    table8 = dict(n_codes=1024, grid=256, n_classes=1000)
    base = S.num_params(S.prior_preset("base", **table8, causal=True))
    large = S.num_params(S.prior_preset("large", **table8, causal=False))
    assert abs(base / 1e6 - 172) < 2 and abs(large / 1e6 - 305) < 3  # Table 8: 172M, 305M
    cfg = model.cfg
    flops = 6 * S.num_params(cfg, embeddings=False) + 12 * 2 * 32 * (N + 1)
    assert S.estimate_flops_per_token(cfg) == flops


def test_prior_presets_build_with_the_documented_shapes_and_sizes():
    """--preset cpu (4 layers x 128; 0.87M parameters on the CPU run's 8x8 tokens of K = 256 with
    10 classes), classroom (8 x 256), base (Table 8: 24 x 768, 172M on 16x16 tokens of K = 1024
    with 1000 classes) and large (24 x 1024, 305M): each builds, on the meta device (counted,
    never allocated), with that shape and size (AR; large as Table 8's NAR), and the closed-form
    count agrees."""
    documented = {"cpu": (4, 128, (256, 64, 10), 0.87e6, 0.01e6),
                  "classroom": (8, 256, (1024, 64, 10), None, None),
                  "base": (24, 768, (1024, 256, 1000), 172e6, 2e6),
                  "large": (24, 1024, (1024, 256, 1000), 305e6, 3e6)}
    for name, (layers, width, (n_codes, grid, n_classes), size, tol) in documented.items():
        cfg = S.prior_preset(name, n_codes=n_codes, grid=grid, n_classes=n_classes,
                             causal=name != "large")
        with torch.device("meta"):
            count = P.count_params(S.Prior(cfg))
        assert (cfg.n_layer, cfg.n_embd) == (layers, width) and count == S.num_params(cfg)
        assert size is None or abs(count - size) < tol, (name, count)


@pytest.mark.parametrize("causal", [True, False])
def test_tiny_prior_overfits_a_fixed_batch(causal):
    """One sample per class, so even a fully masked NAR input is determined by its class."""
    torch.manual_seed(0)
    cfg = S.PriorConfig(n_codes=K, grid=N, n_classes=4, n_layer=2, n_head=2, n_embd=32,
                        dropout=0.0, causal=causal)
    model, idx, y = S.Prior(cfg), rand_idx(4), torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40 if causal else 60):
        if causal:
            loss, acc = S.ar_loss(model, idx, y)
        else:
            loss, acc = S.maskgit_loss(model, idx, model.cfg.n_codes, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(K)) < 0.1  # starts near uniform
    end = sum(losses[-10:]) / 10
    # NAR's floor is ~0.48, the entropy of the 0.1-smoothed target, and its masks vary per step
    assert end < (0.1 if causal else 0.5 * math.log(K)), losses


@pytest.mark.slow
def test_compiled_and_eager_paths_agree():
    """--compile changes speed, not the maths: torch.compile'd prior and tokenizer give the eager
    outputs (the same code indices; values to float tolerance). Slow on CPU (compilation), tiny."""
    torch.manual_seed(0)
    cfg = S.PriorConfig(n_codes=16, grid=12, n_classes=3, n_layer=1, n_head=2, n_embd=32,
                        dropout=0.0)
    prior = S.Prior(cfg).eval()
    idx, y = torch.randint(0, 16, (2, 12)), torch.tensor([0, 2])
    tok = S.Tokenizer(S.TokenizerConfig(channels=16, n_codes=32, code_dim=8)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(prior(idx, y), torch.compile(prior)(idx, y), atol=1e-5)
        eager, compiled = tok(x), torch.compile(tok)(x)
    assert torch.equal(eager[1], compiled[1])
    assert torch.allclose(eager[0], compiled[0], atol=1e-3)



# -----------------------------------------------------------------------------
# fid.py: FID, Inception Score, reconstruction metrics

# Every BasicConv2d of pytorch-fid's FID Inception (torchvision Inception3 names with
# FIDInceptionA/C/E_1/E_2 at Mixed_5b-d, 6b-e, 7b, 7c; no AuxLogits) and its conv weight shape
# (out, in, kh, kw). Each entry stands for five keys of pt_inception-2015-12-05-6726825d.pth:
# NAME.conv.weight (shape) and NAME.bn.{weight,bias,running_mean,running_var} (out,). Plus
# fc.weight (1008, 2048), fc.bias (1008,).
# Checked against pytorch-fid's inception.py and torch-fidelity's TF->PyTorch name map.
PT_INCEPTION_CONVS = {
    "Conv2d_1a_3x3": (32, 3, 3, 3),
    "Conv2d_2a_3x3": (32, 32, 3, 3),
    "Conv2d_2b_3x3": (64, 32, 3, 3),
    "Conv2d_3b_1x1": (80, 64, 1, 1),
    "Conv2d_4a_3x3": (192, 80, 3, 3),
    # Mixed_5b
    "Mixed_5b.branch1x1": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_1": (64, 192, 1, 1),
    "Mixed_5b.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_5b.branch3x3dbl_3": (96, 96, 3, 3),
    "Mixed_5b.branch_pool": (32, 192, 1, 1),
    # Mixed_5c
    "Mixed_5c.branch1x1": (64, 256, 1, 1),
    "Mixed_5c.branch5x5_1": (48, 256, 1, 1),
    "Mixed_5c.branch5x5_2": (64, 48, 5, 5),
    "Mixed_5c.branch3x3dbl_1": (64, 256, 1, 1),
    "Mixed_5c.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_5c.branch3x3dbl_3": (96, 96, 3, 3),
    "Mixed_5c.branch_pool": (64, 256, 1, 1),
    # Mixed_5d
    "Mixed_5d.branch1x1": (64, 288, 1, 1),
    "Mixed_5d.branch5x5_1": (48, 288, 1, 1),
    "Mixed_5d.branch5x5_2": (64, 48, 5, 5),
    "Mixed_5d.branch3x3dbl_1": (64, 288, 1, 1),
    "Mixed_5d.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_5d.branch3x3dbl_3": (96, 96, 3, 3),
    "Mixed_5d.branch_pool": (64, 288, 1, 1),
    # Mixed_6a
    "Mixed_6a.branch3x3": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
    "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    # Mixed_6b
    "Mixed_6b.branch1x1": (192, 768, 1, 1),
    "Mixed_6b.branch7x7_1": (128, 768, 1, 1),
    "Mixed_6b.branch7x7_2": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_1": (128, 768, 1, 1),
    "Mixed_6b.branch7x7dbl_2": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_3": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_4": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5": (192, 128, 1, 7),
    "Mixed_6b.branch_pool": (192, 768, 1, 1),
    # Mixed_6c
    "Mixed_6c.branch1x1": (192, 768, 1, 1),
    "Mixed_6c.branch7x7_1": (160, 768, 1, 1),
    "Mixed_6c.branch7x7_2": (160, 160, 1, 7),
    "Mixed_6c.branch7x7_3": (192, 160, 7, 1),
    "Mixed_6c.branch7x7dbl_1": (160, 768, 1, 1),
    "Mixed_6c.branch7x7dbl_2": (160, 160, 7, 1),
    "Mixed_6c.branch7x7dbl_3": (160, 160, 1, 7),
    "Mixed_6c.branch7x7dbl_4": (160, 160, 7, 1),
    "Mixed_6c.branch7x7dbl_5": (192, 160, 1, 7),
    "Mixed_6c.branch_pool": (192, 768, 1, 1),
    # Mixed_6d
    "Mixed_6d.branch1x1": (192, 768, 1, 1),
    "Mixed_6d.branch7x7_1": (160, 768, 1, 1),
    "Mixed_6d.branch7x7_2": (160, 160, 1, 7),
    "Mixed_6d.branch7x7_3": (192, 160, 7, 1),
    "Mixed_6d.branch7x7dbl_1": (160, 768, 1, 1),
    "Mixed_6d.branch7x7dbl_2": (160, 160, 7, 1),
    "Mixed_6d.branch7x7dbl_3": (160, 160, 1, 7),
    "Mixed_6d.branch7x7dbl_4": (160, 160, 7, 1),
    "Mixed_6d.branch7x7dbl_5": (192, 160, 1, 7),
    "Mixed_6d.branch_pool": (192, 768, 1, 1),
    # Mixed_6e
    "Mixed_6e.branch1x1": (192, 768, 1, 1),
    "Mixed_6e.branch7x7_1": (192, 768, 1, 1),
    "Mixed_6e.branch7x7_2": (192, 192, 1, 7),
    "Mixed_6e.branch7x7_3": (192, 192, 7, 1),
    "Mixed_6e.branch7x7dbl_1": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_2": (192, 192, 7, 1),
    "Mixed_6e.branch7x7dbl_3": (192, 192, 1, 7),
    "Mixed_6e.branch7x7dbl_4": (192, 192, 7, 1),
    "Mixed_6e.branch7x7dbl_5": (192, 192, 1, 7),
    "Mixed_6e.branch_pool": (192, 768, 1, 1),
    # Mixed_7a
    "Mixed_7a.branch3x3_1": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1),
    "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    # Mixed_7b
    "Mixed_7b.branch1x1": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_1": (384, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2": (384, 448, 3, 3),
    "Mixed_7b.branch3x3dbl_3a": (384, 384, 1, 3),
    "Mixed_7b.branch3x3dbl_3b": (384, 384, 3, 1),
    "Mixed_7b.branch_pool": (192, 1280, 1, 1),
    # Mixed_7c
    "Mixed_7c.branch1x1": (320, 2048, 1, 1),
    "Mixed_7c.branch3x3_1": (384, 2048, 1, 1),
    "Mixed_7c.branch3x3_2a": (384, 384, 1, 3),
    "Mixed_7c.branch3x3_2b": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1": (448, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_2": (384, 448, 3, 3),
    "Mixed_7c.branch3x3dbl_3a": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b": (384, 384, 3, 1),
    "Mixed_7c.branch_pool": (192, 2048, 1, 1),
}


class TinyFeatures(torch.nn.Module):
    """Stand-in for the Inception: same input handling (resize to 299), 12-d features, 1008
    logits."""

    fingerprint = "tiny_features"

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(12, 1008, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        f = F.adaptive_avg_pool2d(fid.resize_299(x), 2).flatten(1)  # (B, 12)
        return f, 10 * f @ self.proj


@pytest.fixture
def tiny_features(monkeypatch):
    """Make main() use TinyFeatures instead of loading the Inception weights."""
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: TinyFeatures())


def write_images(folder, n, size=32, seed=0, lo=0, hi=256):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(lo, hi, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


CPU = ["--device", "cpu", "--num-workers", "0"]

# -----------------------------------------------------------------------------
# Frechet distance


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_distance_with_equal_covariance_is_squared_mean_distance():
    """Equal sigma: sigma1 + sigma2 - 2 sqrt(sigma^2) = 0, so d^2 = |mu1 - mu2|^2."""
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.standard_normal(8), rng.standard_normal(8), random_spd(8, rng)
    expected = ((mu1 - mu2) ** 2).sum()
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_diagonal_covariances_matches_closed_form():
    """Diagonal s1, s2: d^2 = sum (mu1 - mu2)^2 + sum (s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    d = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert d == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(2).standard_normal((200, 16))
    stats = fid.compute_stats(feats)
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    assert np.allclose(stats["sigma"], np.cov(feats, rowvar=False))
    assert abs(fid.fid_from_stats(stats, stats)) < 1e-8


def test_singular_product_is_retried_with_an_eps_offset(monkeypatch, capsys):
    """pytorch-fid: a non-finite sqrtm -> add eps * I to both covariances and take sqrtm again."""
    rng = np.random.default_rng(3)
    s1, s2, real_sqrtm, calls = random_spd(5, rng), random_spd(5, rng), scipy.linalg.sqrtm, []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    d = fid.frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
    shifted = (s1 + 1e-6 * np.eye(5)) @ (s2 + 1e-6 * np.eye(5))
    assert len(calls) == 2 and np.allclose(calls[1], shifted, rtol=0, atol=1e-12)
    assert d == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(shifted).real))
    assert "1e-06 * I" in capsys.readouterr().err


def test_complex_sqrtm_is_refused_naming_the_likely_causes(monkeypatch):
    rng = np.random.default_rng(4)
    s1, s2, real_sqrtm = random_spd(4, rng), random_spd(4, rng), scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-5j * np.eye(4))
    # round-off level: real part is kept
    small = fid.frechet_distance(np.zeros(4), s1, np.zeros(4), s2)
    assert small == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(s1 @ s2)))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-2j * np.eye(4))
    with pytest.raises(SeqganError, match="imaginary") as e:
        fid.frechet_distance(np.zeros(4), s1, np.zeros(4), s2)
    assert "too few samples" in str(e.value)
    assert "1.11.2-1.12" in str(e.value)
    assert "collapsed" in str(e.value)


def test_fewer_samples_than_dimensions_warns(capsys):
    stats = fid.compute_stats(np.random.default_rng(5).standard_normal((16, 20)))
    fid.fid_from_stats(stats, stats)
    assert "16 images, fewer than the 20 feature dimensions" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_logits_is_one():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_inception_score_of_confident_evenly_spread_logits_is_the_number_of_classes():
    """Each split holds 20 images, one per class, each image sure of its class: IS = 20."""
    logits = 100.0 * np.eye(1008)[np.arange(200) % 20]
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(20, rel=1e-6) and std == pytest.approx(0, abs=1e-6)


def test_inception_score_needs_as_many_images_as_splits():
    with pytest.raises(SeqganError, match="at least 10 images"):
        fid.inception_score(np.zeros((9, 1008)))

# -----------------------------------------------------------------------------
# the network


@pytest.fixture(scope="session")
def inception():
    """One FID Inception (random weights) for the tests that read its layout or one block."""
    return fid.InceptionFID()


def test_state_dict_matches_the_pt_inception_layout(inception):
    expected = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, shape in PT_INCEPTION_CONVS.items():
        expected[f"{name}.conv.weight"] = shape
        bn = ("weight", "bias", "running_mean", "running_var")
        expected.update({f"{name}.bn.{p}": shape[:1] for p in bn})
    model = inception
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert got == expected
    # TF's epsilon
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_pt_inception_state_dict_loads_strictly(tmp_path, inception):
    """A plain dict with exactly the pt_inception keys (no num_batches_tracked) loads; a missing key
    does not."""
    sd = {k: torch.zeros(v.shape) for k, v in inception.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    sd["Mixed_7c.branch_pool.conv.weight"] = torch.rand(192, 2048, 1, 1)
    torch.save(sd, tmp_path / "w.pth")
    model = fid.load_inception(str(tmp_path / "w.pth"), "cpu")
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight,
                       sd["Mixed_7c.branch_pool.conv.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "w.pth")
    with pytest.raises(SeqganError, match="not pytorch-fid's .*Missing key"):
        fid.load_inception(str(tmp_path / "w.pth"), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SeqganError, match="junk.pth is not pytorch-fid's"):
        fid.load_inception(str(tmp_path / "junk.pth"), "cpu")


def test_failed_download_says_which_file_to_put_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SeqganError) as e:
        fid.load_inception(None, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(str(tmp_path), "checkpoints", fid.WEIGHTS_FILE) in msg
    assert "--inception-weights PATH" in msg and fid.WEIGHTS_URL in msg


def test_preprocessing_is_bilinear_without_antialias_and_tf_average_pool():
    """2x downscale with bilinear, align_corners=False and no antialias averages each 2x2 block;
    TF's average pool leaves the zero padding out, so a constant image stays constant at the
    border."""
    x = torch.rand(1, 3, 598, 598)
    assert torch.allclose(fid.resize_299(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(fid.tf_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


@pytest.mark.parametrize("block, channels, pool", [
    ("Mixed_5b", 192, "tf_avg"), ("Mixed_5d", 288, "tf_avg"), ("Mixed_6e", 768, "tf_avg"),
    ("Mixed_7b", 1280, "tf_avg"), ("Mixed_7c", 2048, "max")])
def test_pool_branches_pool_as_the_tf_graph(block, channels, pool, inception):
    """The pool branch (last in the concatenation) averages without the padding, except Mixed_7c's:
    max."""
    blk = getattr(inception, block).eval()
    x = torch.randn(1, channels, 5, 5)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if pool == "max" else fid.tf_avg_pool(x)
    with torch.no_grad():
        out, ref = blk(x), blk.branch_pool(pooled)
    assert torch.allclose(out[:, -ref.shape[1]:], ref, atol=1e-6)


def test_network_scales_input_to_plus_minus_one_and_drops_the_fc_bias_for_is_logits():
    """[0, 1] -> 299 px -> 2x - 1 before the first conv; IS logits = pool3 @ fc.weight.T, as
    openai/improved-gan."""
    model, seen = fid.load_inception("random", "cpu"), []
    model.fc.bias.fill_(5.0)
    model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        feats, logits = model(torch.full((1, 3, 32, 32), 0.25))
    assert seen[0].shape == (1, 3, 299, 299) and torch.allclose(seen[0], torch.tensor(-0.5))
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.allclose(logits, feats @ model.fc.weight.T)


@pytest.mark.slow
def test_random_inception_via_cli_gives_2048_d_stats_and_a_loud_warning(tmp_path, capsys):
    folder = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "s.npz"
    assert fid.main([folder, "--save-stats", str(out), "--inception-weights", "random",
                     *CPU])["n"] == 2
    with np.load(out) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 2
        # random features still vary, so tests with them can detect something
        assert f["mu"].std() > 1e-3
        assert str(f["fingerprint"]).startswith("random-seed0")
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "MEANINGLESS" in err


def test_features_are_computed_in_fp32_without_tf32():
    seen = []

    class Spy(TinyFeatures):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         torch.is_autocast_enabled("cpu"), x.dtype))
            return super().forward(x)

    before = torch.backends.cudnn.allow_tf32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fid.compute_features(Spy(), [torch.rand(2, 3, 8, 8)], "cpu")
    assert seen == [(False, False, False, torch.float32)]
    assert torch.backends.cudnn.allow_tf32 == before  # restored afterwards

# -----------------------------------------------------------------------------
# folders, statistics files and the command line


def test_mixed_sizes_and_grey_images_match_one_at_a_time(tmp_path):
    """A batch of mixed sizes is resized in the worker with the same op; grey images become RGB."""
    folder = write_images(tmp_path / "imgs", 2, size=32)
    grey = np.random.default_rng(6).integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "imgs" / "grey.png")
    paths, model = P.list_images(folder), TinyFeatures()
    together, _ = fid.compute_features(model, paths, "cpu", batch_size=3, num_workers=0)
    alone, _ = fid.compute_features(model, paths, "cpu", batch_size=1, num_workers=0)
    assert together.shape == (3, 12) and np.allclose(together, alone, atol=1e-6)


@pytest.mark.slow
def test_cli_fid_folder_vs_stats_file_equals_folder_vs_folder(tmp_path, tiny_features, capsys):
    a = write_images(tmp_path / "a", 16, seed=0)
    b = write_images(tmp_path / "b", 16, seed=1, hi=128)
    direct = fid.main([a, b, *CPU])
    assert fid.main([a, "--save-stats", str(tmp_path / "a.npz"), *CPU])["n"] == 16
    via_stats = fid.main([str(tmp_path / "a.npz"), b, *CPU])
    assert direct["fid"] > 1e-3 and via_stats == direct
    assert fid.main([a, a, *CPU])["fid"] == pytest.approx(0, abs=1e-8)
    assert f"FID {direct['fid']:.4f}  (N=16 {a}, N=16 {b})" in capsys.readouterr().out


@pytest.mark.slow
def test_fid_of_two_statistics_files_needs_no_inception_weights(tmp_path, capsys):
    """Two saved statistics (pytorch-fid's, with mu and sigma only, and ours) are two Gaussians: no
    network is loaded, so a missing weights file (offline, nothing in the hub cache) does not
    matter."""
    rng = np.random.default_rng(0)
    s1, s2 = random_spd(12, rng), random_spd(12, rng)
    np.savez(tmp_path / "theirs.npz", mu=np.zeros(12), sigma=s1)
    np.savez(tmp_path / "ours.npz", mu=np.ones(12), sigma=s2, n=100,
             fingerprint="sha256-6726825d x")
    paths = [str(tmp_path / "theirs.npz"), str(tmp_path / "ours.npz")]
    r = fid.main(paths + ["--inception-weights", str(tmp_path / "missing.pth"), *CPU])
    assert r["fid"] == pytest.approx(fid.frechet_distance(np.zeros(12), s1, np.ones(12), s2))
    assert r["n"] == (None, 100)
    assert f"(N=? {paths[0]}, N=100 {paths[1]})" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_inception_score_matches_the_function(tmp_path, tiny_features):
    folder = write_images(tmp_path / "imgs", 20)
    _, logits = fid.compute_features(TinyFeatures(), P.list_images(folder), "cpu", num_workers=0)
    assert fid.main([folder, "--is", *CPU])["is"] == fid.inception_score(logits)


@pytest.mark.slow
def test_non_image_files_are_skipped(tmp_path, tiny_features):
    folder = write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert fid.main([folder, "--save-stats", str(tmp_path / "s.npz"), *CPU])["n"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("argv, match", [
    (["MISSING", "OTHER"], "MISSING does not exist"),
    (["EMPTY", "OTHER"], "holds no images"),
    (["ONE", "OTHER"], "at least 2 images"),
    (["NOMU.npz", "OTHER"], "no 'mu' and 'sigma'"),
    (["DIM5.npz", "OTHER"], "different dimension"),
    (["BADSHAPE.npz", "OTHER"], r"are not \(D,\) and \(D, D\)"),
    (["FOREIGN.npz", "OTHER"], "different Inception weights"),
    (["OTHER"], "use: fid.py"),
    (["OTHER.npz", "--is"], "need an image folder"),
    (["OTHER", "--save-stats", "stats"], "end the name in .npz"),
    (["--recon", "CKPT"], "use: fid.py"),
])
def test_bad_inputs_raise_one_line_errors(tmp_path, tiny_features, argv, match):
    write_images(tmp_path / "OTHER", 4)
    os.makedirs(tmp_path / "EMPTY")
    (tmp_path / "EMPTY" / "readme.txt").write_text("no images here")
    write_images(tmp_path / "ONE", 1)
    np.savez(tmp_path / "NOMU.npz", mean=np.zeros(12))
    np.savez(tmp_path / "DIM5.npz", mu=np.zeros(5), sigma=np.eye(5), n=10)
    np.savez(tmp_path / "BADSHAPE.npz", mu=np.zeros(12), sigma=np.eye(5), n=10)
    np.savez(tmp_path / "FOREIGN.npz", mu=np.zeros(12), sigma=np.eye(12), n=10,
             fingerprint="random-seed0 x")
    with pytest.raises(SeqganError, match=match) as e:
        fid.main([str(tmp_path / a) if a.isupper() or a.endswith(".npz") else a
                  for a in argv] + CPU)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_corrupt_image_names_the_file_in_one_line_even_from_a_worker(tmp_path, tiny_features,
                                                                     monkeypatch, capsys):
    folder = write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(SeqganError, match="cannot read image .*bad.png"):
        fid.main([folder, "--save-stats", str(tmp_path / "s.npz"), *CPU])
    monkeypatch.setattr(sys, "argv",
                        ["fid.py", folder, "--is", "--device", "cpu", "--num-workers", "2"])
    with pytest.raises(SystemExit) as e:
        P.cli(fid.main)
    err = capsys.readouterr().err  # besides the progress bar: one error line, no worker traceback
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("error: cannot read image") and "bad.png" in errors[0]


@pytest.mark.slow
def test_cli_missing_folder_prints_one_line_and_fails(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), str(tmp_path / "missing_dir"),
                        str(tmp_path / "other_dir")], capture_output=True, text=True, cwd=HERE)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "missing_dir does not exist" in r.stderr

# -----------------------------------------------------------------------------
# reconstruction metrics


class ShiftTokenizer:
    """Fake tokenizer: reconstruction = input + 0.1 (in [-1, 1]); codes = the first `used` of 16 in
    turn."""

    def __init__(self, used):
        self.cfg, self.used = SimpleNamespace(n_codes=16, image_size=16), used

    def __call__(self, x):
        idx = (torch.arange(len(x) * 4) % self.used).reshape(len(x), 2, 2)
        return x + 0.1, idx, {}


def test_recon_metrics_psnr_and_codebook_usage(tmp_path, capsys):
    """+0.1 in [-1, 1] is +0.05 in [0, 1]: mse 0.0025, PSNR 10 log10(400) = 26.02 dB. 4 of 16 codes,
    equally often: usage 0.25, perplexity 4."""
    folder = write_images(tmp_path / "imgs", 8, size=16, hi=200)  # +0.05 never clips at 1
    r = fid.recon_metrics(ShiftTokenizer(used=4), folder, TinyFeatures(), "cpu", num_workers=0)
    assert r["psnr"] == pytest.approx(10 * np.log10(400), abs=1e-3)
    assert (r["codes_used"], r["usage"], r["n"]) == (4, 0.25, 8)
    assert r["perplexity"] == pytest.approx(4, rel=1e-5)
    assert r["rfid"] > 1e-4  # brighter reconstructions: a different distribution
    assert "codes used" not in capsys.readouterr().err
    fid.recon_metrics(ShiftTokenizer(used=1), folder, TinyFeatures(), "cpu", num_workers=0)
    assert "only 1/16 codes used; raise the entropy weight" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_recon_runs_a_real_tokenizer_checkpoint(tmp_path, tiny_features, capsys):
    cfg = S.TokenizerConfig(image_size=16, channels=32, ch_mult=(1, 2), n_res=1, n_res_lowest=1,
                            n_codes=16, code_dim=8)
    ckpt = dict(kind="tokenizer", model_config=asdict(cfg), model=S.Tokenizer(cfg).state_dict())
    P.save_checkpoint(str(tmp_path / "tok.pt"), ckpt)
    folder = write_images(tmp_path / "val", 6, size=24)
    r = fid.main(["--recon", str(tmp_path / "tok.pt"), "--images", folder, *CPU])
    assert r["n"] == 6
    assert 1 <= r["codes_used"] <= 16
    assert np.isfinite([r["rfid"], r["psnr"], r["perplexity"]]).all()
    assert "rFID" in capsys.readouterr().out
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SeqganError, match="not a readable checkpoint"):
        fid.main(["--recon", str(tmp_path / "bad.pt"), "--images", folder, *CPU])


# -----------------------------------------------------------------------------
# the training script end to end


@pytest.mark.slow
def test_phase1_then_phase2_end_to_end(phase1_ckpt, image_folder, tmp_path):
    """Phase 1 writes a checkpoint and grids; phase 2 trains only the decoder (and its attention):
    encoder and codebook tensors are bit-identical before and after, the decoder changed."""
    ck1 = P.load_checkpoint(phase1_ckpt, "tokenizer")
    assert ck1["phase"] == 1 and ck1["step"] == 4
    # D from step 2
    assert "never trains" not in open(os.path.join(os.path.dirname(phase1_ckpt), "log.txt")).read()
    assert os.path.isfile(os.path.join(os.path.dirname(phase1_ckpt), "recon_0000004.png"))
    out = tmp_path / "phase2"
    train_tokenizer.main(["--phase", "2", "--init", phase1_ckpt, "--steps", "4", "--out", str(out),
                          "--log-every", "2", "--eval-every", "4"])
    ck2 = P.load_checkpoint(str(out / "ckpt.pt"), "tokenizer")
    assert ck2["phase"] == 2
    assert ck2["model_config"]["dec_attn"]
    assert ck2["loss_config"]["alpha"] == 0
    assert ck2["train_config"]["data"] == image_folder  # inherited from phase 1
    for k, v in ck1["model"].items():
        if k.startswith(("encoder.", "quantizer.")):
            assert torch.equal(v, ck2["model"][k]), k
    assert any(not torch.equal(v, ck2["model"][k]) for k, v in ck1["model"].items()
               if k.startswith("decoder."))
    tok = P.load_tokenizer(str(out / "ckpt.pt"))
    assert tok.decode_indices(torch.zeros(1, 8, 8, dtype=torch.long)).shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_perceptual_weight_zero_never_builds_vgg(image_folder, tmp_path, monkeypatch):
    """--perceptual-weight 0 (no PCL, no VQ-KD) trains L1 + VQ (+ GAN) without loading VGG16 at
    all."""
    def no_vgg(weights):
        raise AssertionError("VGG16 was loaded")
    monkeypatch.setattr(S, "load_vgg16", no_vgg)
    out = tmp_path / "run"
    train_tokenizer.main(TINY + ["--data", image_folder, "--perceptual-weight", "0",
                                 "--steps", "2", "--out", str(out)])
    assert P.load_checkpoint(str(out / "ckpt.pt"), "tokenizer")["step"] == 2
    # the default --gan-start is far beyond 2 steps: the log says that D never trains
    warning = (f"warning: --gan-start {S.LossConfig.gan_start} >= --steps 2: the discriminator "
               "never trains")
    assert warning in open(out / "log.txt").read()


@pytest.mark.slow
def test_collapse_warning_fires_when_few_codes_are_used(image_folder, tmp_path):
    """8 eval images of a 4x4 token grid can use at most 128 of 1024 codes (12.5%); at 16 px with
    2 images, at most 32 (3%): the eval line is followed by the collapse warning naming the
    flags."""
    out = tmp_path / "run"
    train_tokenizer.main(TINY + ["--data", image_folder, "--perceptual-weight", "0", "--steps", "2",
                                 "--n-codes", "1024", "--image-size", "16", "--eval-images", "2",
                                 "--out", str(out)])
    log = open(out / "log.txt").read()
    assert re.search(r"warning: only \d+/1024 codes used; raise --entropy-weight", log)


@pytest.mark.slow
def test_non_finite_loss_stops_with_every_term_and_the_last_checkpoint(image_folder, tmp_path):
    """An absurd learning rate blows the weights up after one Adam step; the next log line stops
    the run with one SeqganError naming the step, the terms and the last good checkpoint."""
    out = tmp_path / "run"
    match = r"non-finite loss at step 2: .*l1=.*Last good checkpoint: .*ckpt\.pt"
    with pytest.raises(S.SeqganError, match=match):
        train_tokenizer.main(TINY + ["--data", image_folder, "--perceptual-weight", "0",
                                     "--steps", "4", "--lr", "1e30", "--log-every", "2",
                                     "--eval-every", "4", "--out", str(out)])


@pytest.mark.slow
def test_resume_continues_step_count(image_folder, tmp_path):
    """2 steps, then --resume to 4: the step count, the optimizers and the model carry on."""
    out = str(tmp_path / "run")
    args = TINY + ["--data", image_folder, "--out", out, "--gan-start", "0"]
    train_tokenizer.main(args + ["--steps", "2"])
    first = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "tokenizer")
    train_tokenizer.main(args + ["--steps", "4", "--resume"])
    ck = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "tokenizer")
    assert ck["step"] == 4
    assert all(s["step"].item() == 4 for s in ck["opt_g"]["state"].values())
    assert all(s["step"].item() == 4 for s in ck["opt_d"]["state"].values())
    assert not torch.equal(first["model"]["decoder.conv_out.weight"],
                           ck["model"]["decoder.conv_out.weight"])
    assert "start step 2" in open(os.path.join(out, "log.txt")).read()


def test_phase1_lr_is_cosine_from_the_paper_lr_to_5e_5_and_phase2_is_constant(tmp_path):
    """Paper: phase 1 cosine decay 1e-4 -> 5e-5 over the run; phase 2 constant 5e-5. Without --lr
    each phase gets its paper lr."""
    def cfg(*argv):
        return tokenizer_configs(tmp_path / "x", *argv)[0]

    p1 = cfg("--steps", "100")
    assert p1.lr == 1e-4
    lrs = [train_tokenizer.get_lr(s, p1) for s in (0, 50, 100)]
    assert lrs == pytest.approx([1e-4, 7.5e-5, 5e-5])
    cosine = 5e-5 + 0.5 * 5e-5 * (1 + math.cos(math.pi / 4))
    assert train_tokenizer.get_lr(25, p1) == pytest.approx(cosine)
    p1_lr = cfg("--steps", "100", "--lr", "4e-4")  # a chosen lr decays to 5e-5 as well
    assert train_tokenizer.get_lr(100, p1_lr) == pytest.approx(5e-5)
    p2 = replace(p1, phase=2, lr=5e-5)
    assert {train_tokenizer.get_lr(s, p2) for s in range(0, 101, 10)} == {5e-5}


@pytest.mark.slow
def test_phase2_schedule_follows_the_phase1_preset(phase1_ckpt, tmp_path):
    """Phase 2 after --preset cpu runs the README's 300 steps at 2e-4, not the classroom
    preset's 20,000 at 5e-5; flags still win, and other presets keep their own schedule."""
    def cfg(init, *argv):
        return tokenizer_configs(tmp_path / "p2", "--phase", "2", "--init", init, *argv)[0]

    cpu = edited_tokenizer(phase1_ckpt, tmp_path / "cpu.pt",
                           lambda ck: ck["train_config"].update(preset="cpu"))
    assert (cfg(cpu).steps, cfg(cpu).lr) == (300, 2e-4)
    chosen = cfg(cpu, "--steps", "50", "--lr", "1e-4")
    assert (chosen.steps, cfg(cpu, "--lr", "1e-4").lr) == (50, 1e-4)
    assert (cfg(phase1_ckpt).steps, cfg(phase1_ckpt).lr) == (20000, 5e-5)


@pytest.mark.slow
def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path):
    """N steps == N/2 steps + --resume + N/2 steps. One batch holds the whole folder (so the resumed
    run's reshuffle cannot change what a step sees), the lr is constant (lr = the cosine's floor),
    and neither D nor VGG takes part: what must carry over is the weights, Adam's moments and the
    step."""
    (tmp_path / "four").mkdir()
    folder = write_class_folder(tmp_path / "four", 4, (32, 32), ("a", "b"))
    args = TINY + ["--data", folder, "--perceptual-weight", "0", "--gan-start", "100",
                   "--lr", "5e-5", "--eval-every", "100"]
    train_tokenizer.main(args + ["--steps", "4", "--out", str(tmp_path / "whole")])
    train_tokenizer.main(args + ["--steps", "2", "--out", str(tmp_path / "halves")])
    train_tokenizer.main(args + ["--steps", "4", "--out", str(tmp_path / "halves"), "--resume"])
    whole = P.load_checkpoint(str(tmp_path / "whole" / "ckpt.pt"), "tokenizer")
    halves = P.load_checkpoint(str(tmp_path / "halves" / "ckpt.pt"), "tokenizer")
    assert whole["step"] == halves["step"] == 4
    for name, p in whole["model"].items():
        assert torch.allclose(p, halves["model"][name], rtol=1e-4, atol=1e-7), name


# -----------------------------------------------------------------------------
# train_prior.py and sample.py end to end

# (data loading: the tokenizer run's --num-workers 0)
TINY_PRIOR = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batch-size", "4",
              "--log-every", "2", "--eval-every", "2", "--eval-batches", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def prior_images(tmp_path_factory):
    """24 random 32x32 PNGs in two class folders, a (label 0) and b (label 1)."""
    return write_class_folder(tmp_path_factory.mktemp("prior_images"), 24, (32, 32), ("b", "a"))


@pytest.fixture(scope="session")
def tokenizer_ckpt(tmp_path_factory, prior_images, random_vgg):
    """A 2-step tokenizer through the real script: K = 32 codes, 8x8 tokens (alpha 0: the
    perceptual loss without VGG16's classifier, whose 400 MB of weights make every pass slow)."""
    out = tmp_path_factory.mktemp("tokenizer")
    with vgg_reused(random_vgg):
        train_tokenizer.main(["--vgg-weights", "random", "--channels", "16", "--n-codes", "32",
                              "--code-dim", "8", "--disc-channels", "8", "--batch-size", "4",
                              "--log-every", "2", "--eval-every", "4", "--eval-images", "8",
                              "--num-workers", "0", "--data", prior_images, "--steps", "2",
                              "--gan-start", "100", "--alpha", "0", "--out", str(out)])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="session")
def ar_run(tmp_path_factory, tokenizer_ckpt):
    """A class-conditional AR prior, 4 steps; the data is inherited from the tokenizer."""
    out = str(tmp_path_factory.mktemp("prior_ar"))
    train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--model", "ar", "--steps", "4",
                                   "--out", out])
    return out


@pytest.fixture(scope="session")
def nar_run(tmp_path_factory, tokenizer_ckpt):
    """An unconditional NAR (MaskGIT) prior, 4 steps."""
    out = str(tmp_path_factory.mktemp("prior_nar"))
    train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--model", "nar", "--uncond",
                                   "--steps", "4", "--out", out])
    return out


def edited_tokenizer(src, dst, edit):
    """Copy a tokenizer checkpoint with edit(ckpt) applied."""
    ck = torch.load(src, weights_only=True)
    edit(ck)
    torch.save(ck, dst)
    return str(dst)


def reverse_codebook(ck):
    ck["model"]["quantizer.codebook.weight"] = ck["model"]["quantizer.codebook.weight"].flip(0)


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


# -----------------------------------------------------------------------------
# train_prior.py


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ar", "nar"])
def test_train_prior_writes_checkpoint_sample_grids_and_log(model, ar_run, nar_run, tokenizer_ckpt):
    out = ar_run if model == "ar" else nar_run
    ck = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "prior")
    mc = ck["model_config"]
    assert ck["step"] == 4 and np.isfinite(ck["best_val_loss"])
    assert mc == dict(n_codes=32, grid=64, n_classes=2 if model == "ar" else 0, n_layer=1,
                      n_head=2, n_embd=32, dropout=0.1, causal=model == "ar")
    assert ck["tokenizer"] == os.path.abspath(tokenizer_ckpt)
    prior = S.Prior(S.PriorConfig(**mc))
    prior.load_state_dict(ck["model"])  # strict: the uncompiled module's names
    # weight decay 1e-2 on matrices only (Table 10), betas (0.9, 0.96)
    groups, state = ck["optimizer"]["param_groups"], ck["optimizer"]["state"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["betas"] == (0.9, 0.96)
    assert all(state[i]["exp_avg"].dim() >= 2 for i in groups[0]["params"])
    assert all(state[i]["exp_avg"].dim() < 2 for i in groups[1]["params"])
    assert len(state) == len(list(prior.parameters()))
    # sample grids every --eval-every 2 steps, 8 columns x 4 rows (AR: classes 0, 1, 0, 1, .. by
    # column)
    for step in (2, 4):
        assert Image.open(os.path.join(out, f"samples_{step:07d}.png")).size == (8 * 34 + 2,
                                                                                 4 * 34 + 2)
    log = open(os.path.join(out, "log.txt")).read()
    assert "eval step 4 | val loss" in log
    assert "MFU n/a" in log
    assert "tok/s" in log
    assert "step 4 | loss" in log


@pytest.mark.slow
def test_token_cache_holds_the_tokenizers_codes_and_a_5_percent_val_split(ar_run, tokenizer_ckpt,
                                                                          prior_images):
    """Every 20th image (sorted) is val; tokens are int16 and equal a fresh tokenization."""
    cache = P.load_checkpoint(os.path.join(ar_run, "tokens.pt"), "tokens")
    assert cache["train"].dtype == torch.int16
    assert cache["train"].shape == (22, 64)
    assert cache["val"].shape == (2, 64)
    folder = P.ImageFolder(prior_images, 32)
    tok = P.load_tokenizer(tokenizer_ckpt)
    x = P.to_input(torch.stack([folder[i][0] for i in range(24)]), "cpu", 32)
    idx = tok.tokenize(x).flatten(1)
    val = [0, 20]
    train = [i for i in range(24) if i not in val]
    assert torch.equal(cache["train"].long(), idx[train])
    assert torch.equal(cache["val"].long(), idx[val])
    labels = torch.tensor(folder.labels)
    assert torch.equal(cache["train_labels"], labels[train])
    assert torch.equal(cache["val_labels"], labels[val])


@pytest.mark.slow
def test_token_cache_is_reused_and_rebuilt_when_tokenizer_or_data_change(tokenizer_ckpt,
                                                                         prior_images, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(prior_images, data)
    cache = str(tmp_path / "tokens.pt")
    runs = iter(range(100))

    def run(tokenizer):
        out = str(tmp_path / f"run{next(runs)}")
        train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer, "--data", data,
                                       "--token-cache", cache, "--steps", "1", "--out", out])
        return open(os.path.join(out, "log.txt")).read()

    assert "tokenizing the data into" in run(tokenizer_ckpt)
    first, mtime = torch.load(cache, weights_only=True), os.stat(cache).st_mtime_ns
    # a second run, and a byte-identical copy elsewhere (the fingerprint is the content, not the
    # path)
    assert "reusing token cache" in run(tokenizer_ckpt)
    assert "reusing token cache" in run(shutil.copy(tokenizer_ckpt, str(tmp_path / "copy.pt")))
    assert os.stat(cache).st_mtime_ns == mtime
    # the codebook reversed: code k becomes code K-1-k, so every cached token must change
    # accordingly
    reversed_ckpt = edited_tokenizer(tokenizer_ckpt, tmp_path / "reversed.pt", reverse_codebook)
    assert "is stale (tokenizer changed)" in run(reversed_ckpt)
    assert torch.equal(torch.load(cache, weights_only=True)["train"], 31 - first["train"])
    # an image rewritten in the data folder (same pixels, new mtime)
    os.utime(os.path.join(data, "a", "1.png"), ns=(0, 0))
    assert "is stale (data changed)" in run(reversed_ckpt)
    assert torch.equal(torch.load(cache, weights_only=True)["train"], 31 - first["train"])


@pytest.mark.slow
def test_tokenizer_hash_covers_encoder_codebook_and_config_but_not_the_decoder(tokenizer_ckpt):
    """Phase 2 (new decoder, attention on) keeps the phase-1 tokens; any encoder or codebook change
    does not."""
    ck = torch.load(tokenizer_ckpt, weights_only=True)
    base = train_prior.tokenizer_hash(ck)

    def changed(edit):
        c = torch.load(tokenizer_ckpt, weights_only=True)
        edit(c)
        return train_prior.tokenizer_hash(c) != base

    def phase2(c):
        c["model_config"].update(dec_attn=True, attn_heads=2, attn_block=4)
        c["model"]["decoder.conv_out.weight"] += 1
        c["model"]["decoder.attn.0.proj.weight"] = torch.ones(4)

    assert not changed(phase2)
    assert changed(reverse_codebook)
    assert changed(lambda c: c["model"]["encoder.conv_in.weight"].mul_(1.001))
    assert changed(lambda c: c["model_config"].update(image_size=64))


@pytest.mark.slow
def test_prior_resume_continues_step_count(tokenizer_ckpt, tmp_path):
    out = str(tmp_path / "run")
    args = TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--out", out]
    train_prior.main(args + ["--steps", "2"])
    first = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "prior")
    # everything else from the checkpoint
    train_prior.main(["--resume", "--steps", "4", "--out", out])
    ck = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "prior")
    assert ck["step"] == 4 and ck["model_config"] == first["model_config"]
    assert all(s["step"].item() == 4 for s in ck["optimizer"]["state"].values())
    assert not torch.equal(first["model"]["head.weight"], ck["model"]["head.weight"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "start step 2" in log and "reusing token cache" in log


def test_prior_lr_schedule_is_table10s_closed_form(tokenizer_ckpt):
    """Table 10: AR 1e-4, exponential decay to 5e-6 from iteration 80k; NAR linear decay to 0 from
    50k. Both reach the end lr at --steps; a run shorter than the decay start decays over its second
    half."""
    def tc(model, **kw):
        argv = ["--tokenizer", tokenizer_ckpt, "--model", model, "--out", "unused"]
        argv += [a for k, v in kw.items() for a in (k, str(v))]
        return train_prior.configure(train_prior.parse(argv))[0]

    ar, nar = tc("ar", **{"--steps": 500_000}), tc("nar", **{"--steps": 500_000})
    assert (ar.lr, ar.lr_decay_start, ar.end_lr) == (1e-4, 80_000, 5e-6)
    assert (nar.lr, nar.lr_decay_start, nar.end_lr) == (1e-4, 50_000, 0.0)
    # the exponential's rate: 5e-6 exactly at --steps
    k = math.log(1e-4 / 5e-6) / (500_000 - 80_000)
    for step in (0, 79_999, 80_000, 100_000, 290_000, 499_999, 500_000):
        expected = 1e-4 * math.exp(-k * max(0, step - 80_000))
        assert train_prior.get_lr(step, ar) == pytest.approx(expected, rel=1e-9), step
    # halfway: geometric mean
    assert train_prior.get_lr(290_000, ar) == pytest.approx(math.sqrt(1e-4 * 5e-6))
    for step, expected in ((0, 1e-4), (50_000, 1e-4), (275_000, 5e-5), (387_500, 2.5e-5),
                           (500_000, 0.0)):
        assert train_prior.get_lr(step, nar) == pytest.approx(expected, abs=1e-15), step
    # a short run (--steps 20000 < 50000): the decay starts at step 10000, still ends at 0 at
    # --steps
    short = tc("nar", **{"--steps": 20_000})
    assert train_prior.decay_start(short) == 10_000 and train_prior.get_lr(9_999, short) == 1e-4
    assert train_prior.get_lr(15_000, short) == pytest.approx(5e-5)
    const = replace(tc("ar", **{"--steps": 100}), end_lr=1e-4)  # end_lr = lr: constant
    assert {train_prior.get_lr(s, const) for s in range(101)} == {1e-4}
    for kw, match in ((dict(end_lr=0), "cannot reach 0"), (dict(end_lr=1e-3), "must lie in"),
                      (dict(lr_decay_start=-5), "negative")):
        with pytest.raises(SeqganError, match=match):
            replace(ar, **kw)


@pytest.mark.slow
def test_prior_lr_is_logged_and_a_run_resumed_mid_decay_stays_on_the_curve(tokenizer_ckpt,
                                                                           tmp_path, monkeypatch):
    """NAR, 6 steps, linear decay from step 2: stopped after its step-4 checkpoint (mid-decay) and
    resumed, every step uses get_lr(step): the log's lr and the saved optimizer's lr are the closed
    form's."""
    out = str(tmp_path / "run")
    save = P.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(path, ck):
        save(path, ck)
        if ck["kind"] == "prior" and ck["step"] == 4:
            raise Stop

    monkeypatch.setattr(P, "save_checkpoint", save_then_stop)
    monkeypatch.setitem(train_prior.LR_DECAY, "nar", (2, 0.0))  # the decay from step 2
    with pytest.raises(Stop):
        train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--model", "nar",
                                       "--uncond", "--steps", "6", "--out", out])
    assert P.load_checkpoint(os.path.join(out, "ckpt.pt"),
                             "prior")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(7.5e-5)
    monkeypatch.setattr(P, "save_checkpoint", save)
    train_prior.main(["--resume", "--out", out])
    ck = P.load_checkpoint(os.path.join(out, "ckpt.pt"), "prior")
    assert ck["step"] == 6
    assert ck["train_config"]["lr_decay_start"] == 2
    assert ck["train_config"]["end_lr"] == 0
    # get_lr(5): 1e-4 * 1/4
    assert [g["lr"] for g in ck["optimizer"]["param_groups"]] == [pytest.approx(2.5e-5)] * 2
    lrs = re.findall(r"^step (\d+) \| .*\| lr (\S+) \|", open(os.path.join(out, "log.txt")).read(),
                     re.M)
    # the lr of the interval's last step: steps 1, 3, 5 (0-based) = 1e-4, 1e-4 * 3/4, 1e-4 * 1/4
    assert [(int(s), float(v)) for s, v in lrs] == [(2, 1e-4), (4, 7.5e-5), (6, 2.5e-5)]


@pytest.mark.slow
def test_train_prior_bad_input_is_one_clear_error_and_writes_nothing(ar_run, tokenizer_ckpt,
                                                                     tmp_path):
    new = str(tmp_path / "new")
    for argv, match in [
        (["--tokenizer", tokenizer_ckpt, "--model", "gpt"], "--model must be ar or nar, not 'gpt'"),
        ([], "needs --tokenizer CKPT"),
        (["--tokenizer", os.path.join(ar_run, "ckpt.pt")],
         "is a prior checkpoint, expected a tokenizer checkpoint"),
        (["--tokenizer", tokenizer_ckpt, "--resume"], "checkpoint .*ckpt.pt not found"),
        (["--tokenizer", tokenizer_ckpt, "--preset", "huge"], "unknown --preset huge"),
        (["--tokenizer", tokenizer_ckpt, "--batch-size", "64"], "fewer than --batch-size 64"),
        (["--tokenizer", tokenizer_ckpt, "--log-every", "0"],
         "--log-every, --eval-every and --eval-batches must be"),
        (["--tokenizer", tokenizer_ckpt, "--eval-every", "0"],
         "--log-every, --eval-every and --eval-batches must be"),
    ]:
        with pytest.raises(S.SeqganError, match=match):
            train_prior.main(TINY_PRIOR + argv + ["--out", new])
    assert not os.path.exists(new)
    # --token-cache naming a checkpoint by mistake: refused, the file kept
    before = open(tokenizer_ckpt, "rb").read()
    match = "--token-cache: .* is a tokenizer checkpoint, expected a tokens checkpoint"
    with pytest.raises(S.SeqganError, match=match):
        train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--token-cache",
                                       tokenizer_ckpt, "--out", new])
    assert open(tokenizer_ckpt, "rb").read() == before

    # an existing run: never overwritten, and resumed only with the same model flags and tokenizer
    before = {f: open(os.path.join(ar_run, f), "rb").read() for f in os.listdir(ar_run)}
    with pytest.raises(S.SeqganError, match="exists; pass --resume"):
        train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--out", ar_run])
    with pytest.raises(S.SeqganError, match="trained with --n-embd 32, not 64"):
        train_prior.main(["--resume", "--n-embd", "64", "--out", ar_run])
    with pytest.raises(S.SeqganError, match="trained with --model ar, not nar"):
        train_prior.main(["--resume", "--model", "nar", "--out", ar_run])
    assert {f: open(os.path.join(ar_run, f), "rb").read() for f in os.listdir(ar_run)} == before

    # another tokenizer file on resume: fine with the same encoder and codebook (here a copy) ...
    tok = str(tmp_path / "tok.pt")
    out = str(tmp_path / "run")
    train_prior.main(TINY_PRIOR + ["--tokenizer", tokenizer_ckpt, "--steps", "1", "--out", out])
    train_prior.main(["--resume", "--tokenizer", shutil.copy(tokenizer_ckpt, tok), "--steps", "2",
                      "--out", out])
    assert P.load_checkpoint(os.path.join(out, "ckpt.pt"),
                             "prior")["tokenizer"] == os.path.abspath(tok)
    # ... refused with another codebook size or other weights
    edited_tokenizer(tokenizer_ckpt, tok, shrink_codebook)
    match = "has 16 codes and 64 tokens per image, but the prior was trained on 32 codes"
    with pytest.raises(S.SeqganError, match=match):
        train_prior.main(["--resume", "--steps", "3", "--out", out])
    edited_tokenizer(tokenizer_ckpt, tok, reverse_codebook)
    with pytest.raises(S.SeqganError, match="changed since the prior was trained"):
        train_prior.main(["--resume", "--steps", "3", "--out", out])
    assert P.load_checkpoint(os.path.join(out, "ckpt.pt"), "prior")["step"] == 2


def shrink_codebook(ck):
    ck["model_config"]["n_codes"] = 16
    ck["model"]["quantizer.codebook.weight"] = ck["model"]["quantizer.codebook.weight"][:16]


def double_image_size(ck):
    ck["model_config"]["image_size"] = 64  # the same conv weights, but a 16x16 grid


# -----------------------------------------------------------------------------
# sample.py


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ar", "nar"])
def test_sample_writes_n_decodable_pngs_and_the_settings(model, ar_run, nar_run, tokenizer_ckpt,
                                                         tmp_path, capsys):
    prior = os.path.join(ar_run if model == "ar" else nar_run, "ckpt.pt")
    out = str(tmp_path / "samples")
    sample.main(["--prior", prior, "--n", "5", "--batch-size", "2", "--device", "cpu", "--out",
                 out])
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(5)] + ["sampling.json"]
    for i in range(5):
        img = Image.open(os.path.join(out, f"{i:06d}.png"))
        assert img.mode == "RGB" and img.size == (32, 32)
        img.load()  # decodes the whole file
    # beside the folder, not in it
    assert Image.open(out + "_grid.png").size == (5 * 34 + 2, 34 + 2)
    rec = json.load(open(os.path.join(out, "sampling.json")))
    assert rec["grid"] == out + "_grid.png" and rec["temperature_on"] == "token logits"
    assert rec["tokenizer"] == os.path.abspath(tokenizer_ckpt)
    assert rec["prior"] == os.path.abspath(prior)
    assert rec["n"] == 5
    assert rec["seed"] == 0
    assert rec["decoder_phase"] == 1
    assert rec["prior_step"] == 4
    if model == "ar":  # paper defaults
        assert (rec["temperature"], rec["top_p"], rec["top_k"], rec["steps"]) == (1.0, 0.98, 0,
                                                                                  None)
        assert rec["classes"] == "cycle"
    else:
        assert (rec["temperature"], rec["steps"], rec["choice_temperature"],
                rec["top_p"]) == (0.65, 12, 4.5, None)
        assert rec["classes"] == "unconditional"
    assert "phase-1 decoder" in capsys.readouterr().out


@pytest.mark.slow
def test_same_seed_and_batch_size_give_identical_pngs(ar_run, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--n", "3", "--batch-size", "2",
                     "--device", "cpu", "--out", str(out), *extra])
        return [(out / f"{i:06d}.png").read_bytes() for i in range(3)]

    a = run("a")
    assert run("b") == a
    assert run("c", "--seed", "1") != a


@pytest.mark.slow
def test_grid_png_shows_the_first_64_samples_in_rows_of_8(ar_run, tmp_path):
    """--batch-size 24 does not divide 64: the grid is filled across a batch boundary."""
    out = tmp_path / "s"
    sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--n", "96", "--batch-size", "24",
                 "--device", "cpu", "--out", str(out)])
    grid = read_png(tmp_path / "s_grid.png").astype(int)
    assert grid.shape == (8 * 34 + 2, 8 * 34 + 2, 3)
    # sample i at row i // 8, column i % 8 (its class is i % 2, the column's)
    for i in (0, 9, 33, 63):
        r, c = divmod(i, 8)
        cell = grid[2 + 34 * r: 34 + 34 * r, 2 + 34 * c: 34 + 34 * c]
        assert np.abs(cell - read_png(out / f"{i:06d}.png")).max() <= 1


@pytest.mark.slow
def test_fid_of_the_samples_folder_scores_exactly_n_images(ar_run, tmp_path, tiny_features, capsys):
    """The grid goes beside the samples folder, not into it: fid.py on the folder (the README's next
    command) sees the --n samples and nothing else."""
    out = str(tmp_path / "samples")
    sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--n", "6", "--batch-size", "3",
                 "--device", "cpu", "--out", out])
    assert len(P.list_images(out)) == 6 and os.path.isfile(out + "_grid.png")
    assert fid.main([out, out, *CPU])["n"] == (6, 6)
    assert f"(N=6 {out}, N=6 {out})" in capsys.readouterr().out


@pytest.mark.slow
def test_classes_cycle_without_class_and_are_fixed_with_it(ar_run, tmp_path, monkeypatch):
    seen = []
    generate = S.generate_ar

    def spy(model, n, y=None, *args, **kw):
        seen.append(y.tolist())
        return generate(model, n, y, *args, **kw)

    monkeypatch.setattr(S, "generate_ar", spy)
    prior = os.path.join(ar_run, "ckpt.pt")
    sample.main(["--prior", prior, "--n", "5", "--batch-size", "2", "--device", "cpu", "--out",
                 str(tmp_path / "a")])
    assert seen == [[0, 1], [0, 1], [0]]
    seen.clear()
    sample.main(["--prior", prior, "--n", "3", "--class", "1", "--device", "cpu", "--out",
                 str(tmp_path / "b")])
    assert seen == [[1, 1, 1]]
    assert json.load(open(tmp_path / "b" / "sampling.json"))["class"] == 1


@pytest.mark.slow
def test_visualize_writes_input_reconstruction_and_teacher_forced_prediction(
        ar_run, tokenizer_ckpt, prior_images, tmp_path, capsys):
    """Fig. 4, recomputed independently: [input | decode(s) | decode(argmax of one teacher-forced
    pass)]."""
    out = tmp_path / "vis"
    sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--visualize", "--images",
                 prior_images, "--n", "4", "--batch-size", "3", "--device", "cpu",
                 "--out", str(out)])
    # 3 columns, 4 rows of 32 px + padding
    assert Image.open(out / "visualize.png").size == (3 * 34 + 2, 4 * 34 + 2)
    paths = P.list_images(prior_images)
    # spread over the sorted files, so over both class folders
    picked = [paths[i * 24 // 4] for i in range(4)]
    labels = torch.tensor([0 if os.sep + "a" + os.sep in p else 1 for p in picked])
    assert labels.tolist() == [0, 0, 1, 1]
    tok = P.load_tokenizer(tokenizer_ckpt)
    ck = P.load_checkpoint(os.path.join(ar_run, "ckpt.pt"), "prior")
    prior = S.Prior(S.PriorConfig(**ck["model_config"]))
    prior.load_state_dict(ck["model"])
    prior.eval()
    x = P.to_input(torch.stack([P.load_image(p, 32) for p in picked]), "cpu", 32)
    with torch.no_grad():
        s = tok.tokenize(x).flatten(1)
        s_pred = S.teacher_forced_prediction(prior, s, labels)
        recon, pred = (sample.to_uint8(tok.decode_indices(t.view(-1, 8, 8))) for t in (s, s_pred))
    grid = read_png(out / "visualize.png").astype(int)
    for i, p in enumerate(picked):
        tri = read_png(out / f"triptych_{i:06d}.png").astype(int)
        assert tri.shape == (32, 96, 3)
        assert np.array_equal(tri[:, :32], read_png(p))  # the input, untouched
        # batch sizes differ: allow float rounding
        assert np.abs(tri[:, 32:64] - recon[i]).max() <= 1
        assert np.abs(tri[:, 64:] - pred[i]).max() <= 1
        # visualize.png row i holds the same three images (2 px padding around each)
        for j in range(3):
            cell = grid[2 + 34 * i: 34 + 34 * i, 2 + 34 * j: 34 + 34 * j]
            assert np.abs(cell - tri[:, 32 * j: 32 * (j + 1)]).max() <= 1
    acc = (s_pred == s).float().mean().item()
    assert f"top-1 token accuracy of s' vs s: {acc:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_sample_bad_input_is_one_clear_error_and_writes_nothing(ar_run, nar_run, tokenizer_ckpt,
                                                                tmp_path):
    ar, nar = os.path.join(ar_run, "ckpt.pt"), os.path.join(nar_run, "ckpt.pt")
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    small = edited_tokenizer(tokenizer_ckpt, tmp_path / "k16.pt", shrink_codebook)
    big = edited_tokenizer(tokenizer_ckpt, tmp_path / "s64.pt", double_image_size)
    moved = str(tmp_path / "moved.pt")  # a prior whose tokenizer file has gone
    torch.save({**torch.load(ar, weights_only=True), "tokenizer": str(tmp_path / "gone.pt")}, moved)
    for argv, match in [
        (["--prior", ar, "--tokenizer", small],
         "has 16 codes and 8x8 = 64 tokens per image, but prior .* was trained on 32 codes"),
        (["--prior", ar, "--tokenizer", big],
         "has 32 codes and 16x16 = 256 tokens per image, but prior .* 32 codes and 64 tokens"),
        (["--prior", ar, "--class", "2"], r"--class 2 is out of range: .* knows classes 0..1"),
        (["--prior", ar, "--class", "-1"], "--class -1 is out of range"),
        (["--prior", nar, "--class", "0"], "unconditional prior; drop --class"),
        (["--prior", nar, "--steps", "0"], "needs 1 to 64 steps"),
        (["--prior", nar, "--steps", "65"], "needs 1 to 64 steps"),
        (["--prior", ar, "--steps", "8"], "--steps does not apply to .*, an AR prior"),
        (["--prior", nar, "--top-p", "0.9"], "--top-p does not apply to .*, an NAR"),
        (["--prior", nar, "--visualize", "--images", str(tmp_path)],
         "--visualize needs an AR prior"),
        (["--prior", ar, "--visualize", "--images", str(tmp_path / "nope")], "does not exist"),
        (["--prior", ar, "--visualize", "--images", str(tmp_path / "empty")], "holds no images"),
        (["--prior", ar, "--visualize"], "--visualize needs --images"),
        (["--prior", ar, "--tokenizer", ar],
         "is a prior checkpoint, expected a tokenizer checkpoint"),
        (["--prior", tokenizer_ckpt], "is a tokenizer checkpoint, expected a prior checkpoint"),
        ([], "needs --prior CKPT"),
        (["--prior", moved], "the prior's tokenizer .*gone.pt is gone; pass --tokenizer"),
        (["--prior", ar, "--n", "0"], "--n and --batch-size must be at least 1"),
        (["--prior", ar, "--temperature", "0"], r"the temperature must be > 0 .*--top-k 1"),
        (["--prior", nar, "--temperature", "-1"], "the temperature must be > 0"),
        (["--prior", ar, "--top-p", "0"], r"--top-p in \(0, 1\]"),
        (["--prior", ar, "--top-k", "-2"], "--top-k must be >= 0"),
    ]:
        with pytest.raises(S.SeqganError, match=match):
            sample.main(argv + ["--device", "cpu", "--out", out])
        assert not os.path.exists(out), argv
    # an output folder with PNGs in it: fid.py would mix old and new samples
    os.makedirs(out)
    (tmp_path / "out" / "000000.png").write_bytes(b"old")
    with pytest.raises(S.SeqganError, match="already holds PNG files"):
        sample.main(["--prior", ar, "--n", "1", "--out", out])
    assert os.listdir(out) == ["000000.png"]


@pytest.mark.slow
def test_errors_are_one_line_and_exit_2_from_the_command_line(ar_run, tmp_path):
    """Through P.cli, as both scripts end: one `error:` line, exit code 2, no traceback, nothing
    written. (One subprocess only: starting Python with torch costs seconds.)"""
    r = subprocess.run([sys.executable, "sample.py", "--prior", os.path.join(ar_run, "ckpt.pt"),
                        "--class", "7", "--out", str(tmp_path / "o")], cwd=HERE,
                       capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --class 7 is out of range"), r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["regvq", "vqkd"])
def test_each_objective_runs_phase1_phase2_prior_and_sampling(objective, prior_images, tmp_path):
    """Reg-VQ and VQ-KD are switches of the same scripts: phase 1, phase 2 (VQ-KD: first pixel
    decoder, encoder and codebook bit-identical), train_prior.py, sample.py and --visualize all run
    unchanged."""
    p1, p2, prior, samples = (str(tmp_path / d) for d in ("p1", "p2", "prior", "samples"))
    train_tokenizer.main(TINY + ["--objective", objective, "--data", prior_images, "--steps", "2",
                                 "--gan-start", "1", "--out", p1])
    ck1 = P.load_checkpoint(os.path.join(p1, "ckpt.pt"), "tokenizer")
    assert ck1["model_config"]["objective"] == objective
    if objective == "vqkd":
        assert ck1["model_config"]["feature_dim"] == 512 and ck1["model_config"]["cosine_codebook"]
        # decodes features, not 3 colours
        assert ck1["model"]["decoder.conv_out.weight"].shape[0] == 512
        with pytest.raises(S.SeqganError,
                           match="no pixel decoder yet; run train_tokenizer.py --phase 2"):
            P.load_tokenizer(os.path.join(p1, "ckpt.pt"))
    else:
        assert ck1["model_config"]["mask_ratio"] == 0.4 and ck1["loss_config"]["pcl_weight"] > 0
        changed = re.search(r"^step 2 \|.* sample_changed ([\d.]+) ",
                            open(os.path.join(p1, "log.txt")).read(), re.M)
        # logged: the mask samples other codes than the nearest
        assert 0 < float(changed.group(1)) <= 1
    train_tokenizer.main(["--phase", "2", "--init", os.path.join(p1, "ckpt.pt"), "--steps", "2",
                          "--out", p2, "--log-every", "2", "--eval-every", "2"])
    ck2 = P.load_checkpoint(os.path.join(p2, "ckpt.pt"), "tokenizer")
    for k, v in ck1["model"].items():
        if k.startswith(("encoder.", "quantizer.")):
            assert torch.equal(v, ck2["model"][k]), k
    train_prior.main(TINY_PRIOR + ["--tokenizer", os.path.join(p2, "ckpt.pt"), "--steps", "2",
                                   "--out", prior])
    sample.main(["--prior", os.path.join(prior, "ckpt.pt"), "--n", "3", "--out", samples,
                 "--device", "cpu"])
    assert sorted(f for f in os.listdir(samples) if f[0].isdigit()) == ["000000.png", "000001.png",
                                                                        "000002.png"]
    sample.main(["--prior", os.path.join(prior, "ckpt.pt"), "--visualize", "--images",
                 prior_images, "--n", "2", "--out", str(tmp_path / "vis"), "--device", "cpu"])
    assert os.path.isfile(tmp_path / "vis" / "visualize.png")


@pytest.mark.slow
def test_vqkd_phase1_checkpoint_is_refused_where_pixels_are_needed(prior_images, ar_run, tmp_path):
    """A VQ-KD phase-1 tokenizer has no pixel decoder: sample.py says to run phase 2; and phase 2 of
    VQ-KD needs a VQ-KD phase-1 checkpoint."""
    p1 = str(tmp_path / "p1")
    train_tokenizer.main(TINY + ["--objective", "vqkd", "--data", prior_images, "--steps", "1",
                                 "--out", p1])
    with pytest.raises(S.SeqganError, match="VQ-KD phase-1 tokenizer: it has no pixel decoder"):
        sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--tokenizer",
                     os.path.join(p1, "ckpt.pt"), "--out", str(tmp_path / "s"), "--device", "cpu"])
    with pytest.raises(S.SeqganError, match="VQ-KD phase-1 tokenizer"):
        sample.main(["--prior", os.path.join(ar_run, "ckpt.pt"), "--tokenizer",
                     os.path.join(p1, "ckpt.pt"), "--visualize", "--images", prior_images,
                     "--out", str(tmp_path / "v"), "--device", "cpu"])
    other = str(tmp_path / "seqgan")
    train_tokenizer.main(TINY + ["--data", prior_images, "--steps", "1", "--out", other])
    with pytest.raises(S.SeqganError, match="has --objective seqgan, not vqkd"):
        train_tokenizer.main(["--phase", "2", "--objective", "vqkd", "--init",
                              os.path.join(other, "ckpt.pt"), "--out", str(tmp_path / "p2")])


# -----------------------------------------------------------------------------
# bench.py


@pytest.mark.slow
def test_bench_runs_every_tokenizer_preset_and_writes_its_table(tmp_path):
    """bench.py times real steps of the presets (here one step each on the CPU) and writes the
    table."""
    out = str(tmp_path / "bench.json")
    small = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--batch-size", "2",
             "--prior-batch-size", "2", "--sample-batch", "2", "--prior-preset", "cpu",
             "--json", out]
    bench.main(small + ["--tokenizer-preset", "cpu", "--only", "tok1,tok2,prior_ar,sample_nar"])
    rows = json.load(open(out))["rows"]
    assert [r["stage"] for r in rows] == ["tok1", "tok2", "prior_ar", "sample_nar"]
    assert all(r["rate"] > 0 and r["unit"] in ("images/s", "tokens/s") for r in rows)
    assert "cpu 32px b2" in rows[0]["shape"] and "4x128 T=64" in rows[2]["shape"]
    for argv, match in [(["--tokenizer-preset", "huge"], "unknown preset"),
                        (["--prior-preset", "xl"], "unknown preset"),
                        (["--iters", "0"], "must be at least 1"),
                        (["--only", "tok3"], "unknown stage")]:
        with pytest.raises(S.SeqganError, match=match):
            bench.main(small + argv)


# -----------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing overwritten


@pytest.mark.slow
def test_bad_data_folders(tmp_path):
    with pytest.raises(S.SeqganError, match="does not exist"):
        train_tokenizer.main(TINY + ["--data", str(tmp_path / "nope"), "--out",
                                     str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SeqganError, match="holds no images"):
        train_tokenizer.main(TINY + ["--data", str(tmp_path / "empty"), "--out",
                                     str(tmp_path / "o")])


def test_cifar10_is_downloaded_by_rank_0_alone_and_offline_is_one_clear_error(monkeypatch,
                                                                              tmp_path):
    """Concurrent torchrun ranks must not write one archive at once: rank 0 downloads, the others
    wait at a barrier and read. Offline (no archive), every rank reports the same one line."""
    calls = []

    def fake_cifar(root, train, download):
        calls.append(download)
        raise RuntimeError("Dataset not found or corrupted")

    monkeypatch.setattr(S.torchvision.datasets, "CIFAR10", fake_cifar)
    monkeypatch.setattr(P, "barrier", lambda: calls.append("barrier"))
    with pytest.raises(S.SeqganError,
                       match="cannot download CIFAR-10 into .*; put cifar-10-python.tar.gz there"):
        P.load_dataset("cifar10", str(tmp_path), 32)
    # rank 0 (no torchrun: the master) downloads, then everyone reads
    assert calls == [True, "barrier", False]
    calls.clear()
    monkeypatch.setattr(P, "is_master", lambda: False)
    with pytest.raises(S.SeqganError, match="cannot download CIFAR-10"):
        P.load_dataset("cifar10", str(tmp_path), 32)
    assert calls == ["barrier", False]  # another rank never downloads


def write_idx_gz(path, array):
    """A gzipped idx file (the MNIST format): 0, 0, type 0x08 (uint8), the number of dimensions,
    each size as a big-endian int32, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root):
    """root/fashion-mnist with 6 training and 5 test images (28x28, values 1..255) and labels."""
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng, data = np.random.default_rng(0), {}
    for split, n in (("train", 6), ("t10k", 5)):
        x = rng.integers(1, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx_gz(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx_gz(folder / f"{split}-labels-idx1-ubyte.gz", y)
        data[split] = x, y
    return data


def test_fashion_mnist_is_read_from_its_idx_files_as_32px_rgb(tmp_path, monkeypatch):
    """--data fashion-mnist reads DATA_ROOT/fashion-mnist (or the system copy): each 28x28 grey
    image becomes uint8 RGB 32x32, zero-padded by 2 px, with its label; train and test splits; 10
    classes. Neither copy present: one clear error."""
    data = fake_fashion_mnist(tmp_path)
    for train, split in ((True, "train"), (False, "t10k")):
        ds, n_classes = P.load_dataset("fashion-mnist", str(tmp_path), 32, train=train)
        x, y = data[split]
        assert n_classes == 10 and len(ds) == len(x)
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and int(label) == y[i]
            assert torch.equal(image[:, 2:30, 2:30], torch.from_numpy(x[i]).expand(3, 28, 28))
            assert image.long().sum() == image[:, 2:30, 2:30].long().sum()  # a zero border
    monkeypatch.setattr(P, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(S.SeqganError, match="Fashion-MNIST not found"):
        P.load_dataset("fashion-mnist", str(tmp_path / "nowhere"), 32)


def test_export_test_images_writes_class_folders_of_pngs_that_read_back_exactly(tmp_path):
    """export_test_images: the first n test images as out/CLASS/NNNNN.png (fid.py's and
    --visualize's real-image folder), pixel for pixel the loader's images; n beyond the split
    writes the whole split."""
    data = fake_fashion_mnist(tmp_path)
    ds, _ = P.load_dataset("fashion-mnist", str(tmp_path), 32, train=False)
    _, y = data["t10k"]
    for n, out in ((3, tmp_path / "three"), (50, tmp_path / "all")):
        P.export_test_images("fashion-mnist", str(out), n, root=str(tmp_path))
        pngs = sorted(os.path.relpath(p, out) for p in P.list_images(str(out)))
        assert len(pngs) == min(n, 5)
        for path in pngs:
            label, name = path.split(os.sep)
            i = int(name.split(".")[0])
            assert name.endswith(".png") and int(label) == y[i]
            pixels = torch.from_numpy(read_png(out / path).copy()).permute(2, 0, 1)
            assert torch.equal(pixels, ds[i][0]), path
        assert {int(p.split(os.sep)[1][:5]) for p in pngs} == set(range(min(n, 5)))


@pytest.mark.slow
def test_bad_flags(image_folder, tmp_path):
    out = ["--data", image_folder, "--out", str(tmp_path / "o")]
    with pytest.raises(S.SeqganError, match=r"outside \[0, 1\]"):
        train_tokenizer.main(TINY + out + ["--alpha", "1.5"])
    with pytest.raises(S.SeqganError, match="phase 2 needs --init"):
        train_tokenizer.main(TINY + out + ["--phase", "2"])
    with pytest.raises(S.SeqganError, match="--init is for phase 2"):
        train_tokenizer.main(TINY + out + ["--init", "x.pt"])
    # 0 would divide by zero later
    for flag in ("--steps", "--log-every", "--eval-every", "--eval-images"):
        with pytest.raises(S.SeqganError,
                           match="--eval-every and --eval-images must be at least 1"):
            train_tokenizer.main(TINY + out + [flag, "0"])
    with pytest.raises(S.SeqganError, match="--r1-every 0: R1 runs every N >= 1"):
        S.LossConfig(r1_every=0)  # a preset value, checked where the config is built
    if not torch.cuda.is_available():
        with pytest.raises(S.SeqganError, match="no CUDA GPU; use --device cpu"):
            train_tokenizer.main(TINY + out + ["--device", "cuda"])
    assert not (tmp_path / "o").exists()  # nothing written by a refused run


@pytest.mark.slow
def test_wrong_phase_and_wrong_config_checkpoints(phase1_ckpt, tmp_path):
    out1 = os.path.dirname(phase1_ckpt)
    with pytest.raises(S.SeqganError, match="phase-1 checkpoint; resume it with --phase 1"):
        train_tokenizer.main(["--phase", "2", "--resume", "--out", out1])
    with pytest.raises(S.SeqganError, match="trained with --channels 16, not 32"):
        train_tokenizer.main(["--resume", "--out", out1, "--channels", "32"])
    with pytest.raises(S.SeqganError, match="phase 2 keeps the phase-1 encoder"):
        train_tokenizer.main(["--phase", "2", "--init", phase1_ckpt, "--code-dim", "4", "--out",
                              str(tmp_path / "p")])
    torch.save({"kind": "prior"}, tmp_path / "prior.pt")
    with pytest.raises(S.SeqganError, match="is a prior checkpoint, expected a tokenizer"):
        train_tokenizer.main(["--phase", "2", "--init", str(tmp_path / "prior.pt"), "--out",
                              str(tmp_path / "p")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(S.SeqganError, match="not a readable checkpoint"):
        P.load_tokenizer(str(tmp_path / "junk.pt"))


@pytest.mark.slow
def test_existing_checkpoint_is_never_overwritten(phase1_ckpt):
    before = open(phase1_ckpt, "rb").read()
    with pytest.raises(S.SeqganError, match="exists; pass --resume"):
        train_tokenizer.main(TINY + ["--out", os.path.dirname(phase1_ckpt)])
    assert open(phase1_ckpt, "rb").read() == before


def test_clean_state_dict_strips_compile_and_ddp_prefixes_only_at_the_start():
    """'module.' (DDP) and '_orig_mod.' (torch.compile) are dropped in front of a key, in any
    nesting; a submodule that happens to be called 'module' keeps its name."""
    sd = {"module._orig_mod.encoder.w": 1, "_orig_mod.module.decoder.b": 2, "decoder.module.w": 3,
          "head._orig_mod.b": 4}
    assert P.clean_state_dict(sd) == {"encoder.w": 1, "decoder.b": 2, "decoder.module.w": 3,
                                      "head._orig_mod.b": 4}


def test_running_means_average_the_window_and_time_it_alone(monkeypatch):
    """Means over the steps since the last read, steps/s over that window only (an evaluation
    between windows does not count), a NaN one clear error."""
    ticks = iter([0.0, 10.0, 10.0, 14.0, 14.0, 15.0, 15.0])
    monkeypatch.setattr(P, "time", SimpleNamespace(time=lambda: next(ticks)))
    m = P.RunningMeans()
    for v in (1.0, 3.0):
        m.add(dict(loss=torch.tensor(v)))
    assert m.read(1, 2, 1e-4, "ckpt.pt") == ({"loss": 2.0}, 0.2)  # 2 steps in 10 s
    m.add(dict(loss=torch.tensor(5.0)))
    assert m.read(1, 3, 1e-4, "ckpt.pt") == ({"loss": 5.0}, 0.25)  # 1 step in the next 4 s
    m.add(dict(loss=torch.tensor(float("nan"))))
    with pytest.raises(S.SeqganError, match="non-finite loss at step 4: loss=nan"):
        m.read(1, 4, 1e-4, "ckpt.pt")


def test_checkpoint_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    """Durable against a power loss, not only a kill: the data of the temp file reaches the disk
    before the rename makes it the checkpoint, and the folder (holding the rename) after it."""
    import stat
    calls, fsync = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino,
                      os.path.exists(path)))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = str(tmp_path / "run" / "ckpt.pt")
    P.save_checkpoint(path, dict(kind="prior", step=1, w=torch.arange(3)))
    assert calls == [("file", os.stat(path).st_ino, False),
                     ("dir", os.stat(tmp_path / "run").st_ino, True)]
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]
    assert torch.equal(P.load_checkpoint(path, "prior")["w"], torch.arange(3))
    # over an existing one: the same order again
    P.save_checkpoint(path, dict(kind="prior", step=2))
    assert [c[0] for c in calls] == ["file", "dir"] * 2
    assert P.load_checkpoint(path, "prior")["step"] == 2


@pytest.mark.slow
def test_unreadable_image_is_one_line_and_exit_2(image_folder, tmp_path):
    """Through a subprocess and a DataLoader worker: stderr holds exactly one line naming the
    file."""
    bad = tmp_path / "data" / "cls"
    bad.mkdir(parents=True)
    for i in range(4):
        (bad / f"{i}.png").write_bytes(open(os.path.join(image_folder, "cats", "1.png"),
                                            "rb").read())
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    # --num-workers 1: the error crosses a process boundary
    r = subprocess.run([sys.executable, "train_tokenizer.py", *TINY, "--num-workers", "1",
                        "--data", str(tmp_path / "data"), "--batch-size", "5",
                        "--out", str(tmp_path / "o")], cwd=HERE, capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "broken.png" in lines[0] and "delete or replace it" in lines[0]
    assert not (tmp_path / "o" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# more than one process: torchrun with gloo on CPU

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TOK = ["--vgg-weights", "random", "--channels", "16", "--n-codes", "32", "--code-dim", "8",
       "--disc-channels", "8", "--log-every", "2", "--eval-every", "2", "--eval-images", "8",
       "--num-workers", "0", "--device", "cpu"]
PRIOR = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--dropout", "0", "--log-every", "2",
         "--eval-every", "2", "--eval-batches", "2", "--device", "cpu"]
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun(script, *args, expect_ok=True, timeout=240):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 script args` from the repo
    root."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(TORCHRUN + [script, *map(str, args)], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def ckpt(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, worst


def files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def ddp_images(tmp_path_factory):
    """24 random 32x32 PNGs in two class folders."""
    return write_class_folder(tmp_path_factory.mktemp("ddp_images"), 24, (32, 32), ("b", "a"),
                              name="{:02d}.png")


@pytest.fixture(scope="module")
def ddp_tokenizer(tmp_path_factory, ddp_images):
    out = str(tmp_path_factory.mktemp("ddp_tokenizer"))
    train_tokenizer.main(TOK + ["--data", ddp_images, "--batch-size", "4", "--steps", "1",
                                "--gan-start", "100", "--out", out])
    return os.path.join(out, "ckpt.pt")


@pytest.fixture(scope="module")
def ddp_prior(tmp_path_factory, ddp_tokenizer):
    """A class-conditional AR prior (2 classes), 2 steps, one process."""
    out = str(tmp_path_factory.mktemp("ddp_prior"))
    train_prior.main(PRIOR + ["--tokenizer", ddp_tokenizer, "--batch-size", "4", "--steps", "2",
                              "--out", out])
    return os.path.join(out, "ckpt.pt")


# -----------------------------------------------------------------------------
# the distributed helpers of plumbing.py, one process


def test_shards_are_contiguous_balanced_and_in_rank_order():
    for n in (0, 1, 5, 8, 13):
        for world in (1, 2, 3, 8):
            parts = [P.shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_without_torchrun_there_is_one_process(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    assert P.setup_distributed("cpu") == (False, 0, 0, 1, torch.device("cpu"))
    assert P.is_master()
    x = torch.arange(6.0).view(3, 2)
    assert P.gather_rows(x) is x and P.all_reduce_sum(x) is x


def torchrun_env(monkeypatch, local_rank=1, nproc=2):
    for k, v in dict(RANK=local_rank, LOCAL_RANK=local_rank, WORLD_SIZE=nproc,
                     LOCAL_WORLD_SIZE=nproc).items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.slow
def test_bad_distributed_setups_are_one_clear_error_before_any_process_waits(monkeypatch,
                                                                            ddp_tokenizer,
                                                                            tmp_path):
    """Refused before init_process_group (which would wait for the other ranks): a fixed GPU
    index, more processes on a node than it has GPUs."""
    torchrun_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    match = r"started 2 processes on this node, which has 1 GPU\(s\); pass --nproc_per_node 1"
    with pytest.raises(S.SeqganError, match=match):
        P.setup_distributed("auto")
    with pytest.raises(S.SeqganError, match="each process takes the GPU cuda:LOCAL_RANK"):
        P.setup_distributed("cuda:1")
    assert not torch.distributed.is_initialized()


# -----------------------------------------------------------------------------
# per-sample randomness of the samplers


def test_inverse_cdf_sampling_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    ids = S.sample_probs(probs.expand(len(u), -1), u)
    freq = torch.bincount(ids, minlength=5).float() / len(u)
    assert torch.allclose(freq, probs, atol=0.005) and freq[1] == 0 and freq[4] == 0
    edge = S.sample_probs(probs[None].expand(2, -1), torch.tensor([0.0, 1 - 2 ** -24]))
    assert edge.tolist() == [0, 3]  # u = 0 and the largest u below 1


@pytest.mark.parametrize("causal", [True, False])
def test_each_sample_depends_on_its_own_generator_only(causal):
    """With one generator per row, row i is the same whether drawn alone or in a batch: sample.py's
    images do not depend on how they are split into batches or across GPUs."""
    torch.manual_seed(0)
    cfg = S.PriorConfig(n_codes=16, grid=12, n_classes=3, n_layer=1, n_head=2, n_embd=16,
                        dropout=0.0, causal=causal)
    model = S.Prior(cfg).eval()
    y = torch.tensor([0, 1, 2])

    def gens(rows):
        return [torch.Generator().manual_seed(100 + i) for i in rows]

    def generate(rows):
        if causal:
            return S.generate_ar(model, len(rows), y[rows], top_k=8, generator=gens(rows))
        return S.generate_maskgit(model, len(rows), y[rows], steps=4, generator=gens(rows))

    together = generate([0, 1, 2])
    for i in range(3):
        assert torch.equal(generate([i])[0], together[i])
    assert not torch.equal(together[0], together[1])


# -----------------------------------------------------------------------------
# training under torchrun


PRESET_RUNNER = """
import sys
sys.path.insert(0, {here!r})
import train_tokenizer
train_tokenizer.PRESETS["classroom"].update({preset!r})
train_tokenizer.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_tokenizer_two_processes_take_the_steps_of_one_process_with_twice_the_batch(
        ddp_images, tmp_path, monkeypatch):
    """Before the GAN starts, with the entropy term off and the plain Eq. 3 MSE (each would see each
    rank's batch only: D's minibatch stddev, the soft code usage, the energy that normalises each
    VGG layer), 2 ranks x batch 2 train as 1 process x batch 4. Against 1 x 2 x --grad-accum 2 the
    weights match exactly (DDP averages the two halves' gradients as accumulation adds them);
    against batch 4 the gradients match to rounding (checked below)."""
    run = TOK + ["--data", ddp_images, "--steps", "3", "--gan-start", "100",
                 "--entropy-weight", "0"]
    ddp, big, accum = (str(tmp_path / d) for d in ("ddp", "big", "accum"))
    plain_mse = dict(perceptual_norm="none")  # a preset value: here and in the torchrun processes
    monkeypatch.setattr(S, "load_vgg16", LOAD_VGG16)  # the same random VGG16 as the ranks build
    monkeypatch.setitem(train_tokenizer.PRESETS, "classroom",
                        {**train_tokenizer.PRESETS["classroom"], **plain_mse})
    runner = tmp_path / "runner.py"
    runner.write_text(PRESET_RUNNER.format(here=HERE, preset=plain_mse))
    torchrun(runner, *run, "--batch-size", "2", "--out", ddp)
    train_tokenizer.main(run + ["--batch-size", "4", "--out", big])
    train_tokenizer.main(run + ["--batch-size", "2", "--grad-accum", "2", "--out", accum])
    d, b, a = ckpt(ddp), ckpt(big), ckpt(accum)
    assert d["step"] == 3 and d["world_size"] == 2
    for key in ("model", "disc"):
        assert_same_params(d[key], a[key], atol=1e-6)
    # Against batch 4: the first moments (decayed sums of the global batch's gradients) agree to
    # rounding, and so do the weights, except where the gradient itself is rounding noise (e.g. a
    # conv bias right before a one-channel-per-group GroupNorm has exact gradient 0): there Adam's
    # g / (|g| + eps) turns noise into steps of up to lr either way. The optimizer's order is the
    # parameters' (no buffers).
    state, names = b["opt_g"]["state"], list(b["model"])
    assert len(state) == len(names)
    scale = max(s["exp_avg"].abs().max() for s in state.values())
    for i, k in enumerate(names):
        diff = d["opt_g"]["state"][i]["exp_avg"] - state[i]["exp_avg"]
        assert diff.abs().max() <= 1e-3 * scale, k
        real = state[i]["exp_avg"].abs() > 1e-3 * scale
        assert torch.allclose(d["model"][k][real], b["model"][k][real], rtol=0, atol=1e-5), k
    # only rank 0 writes: the files of a one-process run, and one copy of every log line
    assert files(ddp) == files(big) == ["ckpt.pt", "log.txt", "recon_0000002.png",
                                        "recon_0000003.png"]
    log = open(os.path.join(ddp, "log.txt")).read()
    assert "global batch 4 (2 x 2 processes)" in log and "device cpu x 2 processes" in log
    assert log.count("eval step 2 |") == 1
    assert len(log.splitlines()) == len(open(os.path.join(big, "log.txt")).readlines())
    # the logged terms are averaged over the ranks: the numbers of batch 4, except the entropy
    # H(D_bar), which is of each rank's own batch mean (column 7; its weight is 0 here)
    def terms(text):
        line = [l for l in text.splitlines() if l.startswith("step 3 |")][0]
        values = np.array([float(v) for v in line.split("|")[1].split()[1::2]])
        return np.delete(values, 7)
    assert np.allclose(terms(log), terms(open(os.path.join(big, "log.txt")).read()), atol=2e-4)


RUNNER = """
import os, sys, torch
sys.path.insert(0, {here!r})
import seqgan as S, train_tokenizer
# the modules main() trains, to save each rank's copy (the script itself writes on rank 0 only)
made = []
class Tokenizer(S.Tokenizer):
    def __init__(self, *a):
        super().__init__(*a)
        made.append(self)
class Discriminator(S.Discriminator):
    def __init__(self, *a):
        super().__init__(*a)
        made.append(self)
S.Tokenizer, S.Discriminator = Tokenizer, Discriminator
train_tokenizer.main({argv!r})
torch.save(dict(model=made[0].state_dict(), disc=made[1].state_dict()),
           os.path.join({dump!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


@pytest.mark.slow
def test_phase2_with_gan_r1_and_accumulation_stays_in_sync_across_ranks(ddp_images, tmp_path,
                                                                      monkeypatch):
    """Phase 2 under torchrun: only the decoder trains (DDP syncs what requires grad), D from step 0
    with R1 every step, 2 micro-steps. Both ranks end with the same weights. R1 bypasses DDP
    (create_graph): its gradients are averaged only because the DDP backward that follows averages
    all of .grad, so a rank-local R1 would make the ranks' discriminators drift apart."""
    p1, p2, dump = (str(tmp_path / d) for d in ("p1", "p2", "dump"))
    os.makedirs(dump)
    monkeypatch.setitem(train_tokenizer.PRESETS["classroom"], "r1_every", 1)  # phase 2 keeps it
    train_tokenizer.main(TOK + ["--data", ddp_images, "--steps", "1", "--batch-size", "2",
                                "--grad-accum", "2", "--gan-start", "0", "--out", p1])
    argv = ["--phase", "2", "--init", os.path.join(p1, "ckpt.pt"), "--steps", "2",
            "--log-every", "2", "--eval-every", "2", "--device", "cpu", "--out", p2]
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(here=HERE, argv=argv, dump=dump))
    torchrun(runner)
    r0, r1 = (torch.load(os.path.join(dump, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    c1, c2 = ckpt(p1), ckpt(p2)
    for key in ("model", "disc"):
        assert_same_params(r0[key], r1[key], atol=0)
        assert_same_params(r0[key], c2[key], atol=0)  # what rank 0 saved
        assert max_diff(c1[key], c2[key]) > 0
    assert c2["phase"] == 2 and c2["world_size"] == 2
    assert all(s["step"].item() == 2 for s in c2["opt_d"]["state"].values())  # D took both steps
    for k, v in c1["model"].items():  # encoder and codebook frozen under DDP too
        if k.startswith(("encoder.", "quantizer.")):
            assert torch.equal(v, c2["model"][k]), k
    log = open(os.path.join(p2, "log.txt")).read()
    assert "global batch 8 (2 x 2 accum x 2 processes)" in log
    assert files(p2) == ["ckpt.pt", "log.txt", "recon_0000002.png"]


@pytest.mark.slow
def test_prior_two_processes_equal_one_with_twice_the_batch_and_resume(ddp_tokenizer, tmp_path):
    """AR prior, dropout 0: 2 ranks x batch 2 == 1 process x batch 4 == 1 process x 2 x --grad-accum
    2, for 2 steps and again after --resume to step 4 (every rank resumes from rank 0's
    checkpoint)."""
    ddp, big, accum = (str(tmp_path / d) for d in ("ddp", "big", "accum"))
    run = PRIOR + ["--tokenizer", ddp_tokenizer, "--steps", "2"]
    torchrun("train_prior.py", *run, "--batch-size", "2", "--out", ddp)
    ddp2 = ckpt(ddp)
    train_prior.main(run + ["--batch-size", "4", "--out", big])
    big2 = ckpt(big)
    train_prior.main(run + ["--batch-size", "2", "--grad-accum", "2", "--out", accum])
    assert_same_params(ddp2["model"], big2["model"], atol=1e-5)
    assert_same_params(ckpt(accum)["model"], big2["model"], atol=1e-5)
    assert files(ddp) == files(big) == ["ckpt.pt", "log.txt", "samples_0000002.png", "tokens.pt"]
    log = open(os.path.join(ddp, "log.txt")).read()
    assert "global batch 4 (2 x 2 processes)" in log and log.count("tokenizing the data into") == 1

    torchrun("train_prior.py", "--resume", "--steps", "4", "--out", ddp)
    train_prior.main(["--resume", "--steps", "4", "--out", big])
    d4, b4 = ckpt(ddp), ckpt(big)
    assert d4["step"] == 4 and all(s["step"].item() == 4 for s in d4["optimizer"]["state"].values())
    assert_same_params(d4["model"], b4["model"], atol=1e-5)
    assert max_diff(d4["model"], ddp2["model"]) > 1e-4  # it trained on
    log = open(os.path.join(ddp, "log.txt")).read()
    assert "start step 2" in log and "reusing token cache" in log and "global batch of" not in log
    # a longer run's schedule is another curve: the resumed run says so, with both lrs
    assert ("warning: --steps 4, the checkpoint's run had 2: the lr schedule is a function of "
            "--steps, so step 2") in log

    # one process resuming the 2-process run with --batch-size 2: global batch 2, not 4: one
    # warning line
    train_prior.main(["--resume", "--steps", "5", "--out", ddp])
    warnings = [l for l in open(os.path.join(ddp,
                                             "log.txt")) if l.startswith("warning: the checkpoint")]
    assert len(warnings) == 1
    assert "global batch of 4 (2 process(es)); continuing with a global batch of 2," in warnings[0]
    assert ckpt(ddp)["step"] == 5 and ckpt(ddp)["world_size"] == 1


# -----------------------------------------------------------------------------
# sample.py and fid.py under torchrun


@pytest.mark.slow
def test_sample_two_processes_write_the_same_pngs_as_one(ddp_prior, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--prior", ddp_prior, "--batch-size", "2", "--device", "cpu"]
    # --n-images: torchrun would take `--n` for an abbreviation of its own --nnodes / --nproc-per-
    # node
    torchrun("sample.py", *args, "--n-images", "5", "--out", two)
    sample.main(args + ["--n", "5", "--out", one])
    assert files(two) == files(one) == [f"{i:06d}.png" for i in range(5)] + ["sampling.json"]
    for f in files(one):
        if f.endswith(".png"):
            assert open(os.path.join(one, f), "rb").read() == open(os.path.join(two, f),
                                                                   "rb").read(), f
    assert open(one + "_grid.png", "rb").read() == open(two + "_grid.png", "rb").read()
    rec1, rec2 = (json.load(open(os.path.join(d, "sampling.json"))) for d in (one, two))
    assert {**rec1, "out": None, "grid": None} == {**rec2, "out": None, "grid": None}


@pytest.mark.slow
def test_fid_statistics_and_inception_score_with_two_processes_equal_one(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):  # IS needs 10 (one per split); real-size Inception on CPU: ~0.5 s per image
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = [str(folder), "--is", "--inception-weights", "random", "--device", "cpu",
            "--num-workers", "0", "--batch-size", "5"]
    r = torchrun("fid.py", *args, "--save-stats", tmp_path / "two.npz")
    one = fid.main(args + ["--save-stats", str(tmp_path / "one.npz")])
    s1, s2 = fid.load_stats(str(tmp_path / "one.npz")), fid.load_stats(str(tmp_path / "two.npz"))
    assert s1["n"] == s2["n"] == 10 and s1["fingerprint"] == s2["fingerprint"]
    assert np.allclose(s1["mu"], s2["mu"], rtol=1e-6, atol=1e-9)
    assert np.allclose(s1["sigma"], s2["sigma"], rtol=1e-6, atol=1e-9)
    assert f"IS {one['is'][0]:.3f} +- {one['is'][1]:.3f}" in r.stdout
    # rank 0 alone prints
    assert r.stdout.count("saved statistics") == 1 and r.stderr.count("RANDOM weights") == 1


RECON_RUNNER = """
import json, sys
sys.path.insert(0, {here!r})
import fid, {module} as tests
fid.load_inception = lambda weights, device: tests.TinyFeatures()
r = fid.main({argv!r})
if r:
    json.dump(r, open({dump!r}, "w"))
"""


@pytest.mark.slow
def test_recon_metrics_with_two_processes_equal_one(ddp_tokenizer, ddp_images, tmp_path,
                                                    monkeypatch):
    """fid.py --recon under torchrun: rFID, PSNR and codebook usage over the ranks' shards, as with
    one."""
    argv = ["--recon", ddp_tokenizer, "--images", ddp_images, "--device", "cpu", "--num-workers",
            "0", "--batch-size", "5"]
    runner = tmp_path / "runner.py"
    runner.write_text(RECON_RUNNER.format(here=HERE, module=__name__, argv=argv,
                                          dump=str(tmp_path / "two.json")))
    r = torchrun(runner)
    assert r.stdout.count("rFID") == 1  # rank 0 alone prints
    two = json.load(open(tmp_path / "two.json"))
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: TinyFeatures())
    one = fid.main(argv)
    assert one["n"] == two["n"] == 24 and one["codes_used"] == two["codes_used"]
    for k in ("rfid", "psnr", "usage", "perplexity"):
        assert two[k] == pytest.approx(one[k], rel=1e-5), k


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    """The broken image sorts last, into rank 1's shard: rank 1 fails while rank 0 waits for its
    features in all_gather; rank 1 exits 2 and torchrun stops rank 0. Nothing is written."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    (folder / "z_broken.png").write_bytes(b"\x89PNG not really")
    r = torchrun("fid.py", folder, "--save-stats", tmp_path / "s.npz", "--inception-weights",
                 "random", "--device", "cpu", "--num-workers", "0", expect_ok=False, timeout=120)
    assert r.returncode != 0
    # rank 0's progress bar and rank 1's error share stderr, maybe one line: find the messages
    # anywhere
    errors = re.findall(r"error(?: \(rank \d\))?: [^\r\n]*", r.stderr)
    assert len(errors) == 1, r.stderr[-2000:]
    assert errors[0].startswith("error (rank 1): cannot read image "), r.stderr[-2000:]
    assert "z_broken.png" in errors[0] and errors[0].endswith("delete or replace it")
    # torchrun's report: rank 1 exited with seqgan.cli's code 2
    assert re.search(r"exitcode\W+2", r.stderr)
    assert not (tmp_path / "s.npz").exists()


# -----------------------------------------------------------------------------
# the project stays minimal: a single-file method and short scripts, at nanoGPT's scale

SCRIPT_LINES = {"train_tokenizer.py": 250, "train_prior.py": 250, "sample.py": 250,
                "bench.py": 250, "observations.py": 250,
                "fid.py": 400}  # fid.py carries the FID Inception network


def flag_count(script, monkeypatch):
    """The command-line options of a script's parser (--help left out), caught as main() parses."""
    class Parsed(Exception):
        pass

    parsers = []

    def catch(self, *args, **kwargs):
        parsers.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed):
        script.main([])
    monkeypatch.undo()
    return sum(1 for a in parsers[-1]._actions
               if a.option_strings and "--help" not in a.option_strings)


# The trainers are not yet at 250 lines: today's counts are a ratchet (never grow), and the test
# below fails (strict xfail) until both reach 250; then drop TRAINERS_TODAY and the xfail.
TRAINERS_TODAY = {"train_tokenizer.py": 303, "train_prior.py": 318}


@pytest.mark.xfail(strict=True, reason="train_tokenizer.py and train_prior.py are over 250 lines")
def test_trainers_are_at_most_250_lines():
    assert all(len(open(os.path.join(HERE, n)).read().splitlines()) <= 250 for n in TRAINERS_TODAY)


def test_project_stays_minimal(monkeypatch):
    """seqgan.py <= 1,000 lines, plumbing.py <= 350, each script <= 250 (fid.py 400); no function of
    the scripts or plumbing.py over 60 lines; train_tokenizer.py <= 30 flags, train_prior.py <= 22;
    at most 10 lines over 100 characters in all .py files; README.md <= 300 lines."""
    def lines(name):
        return open(os.path.join(HERE, name)).read().splitlines()

    limits = {"seqgan.py": 1000, "plumbing.py": 350, **SCRIPT_LINES, **TRAINERS_TODAY,
              "README.md": 300}
    too_many = {name: len(lines(name)) for name, limit in limits.items()
                if len(lines(name)) > limit}
    long_functions = {}
    for name in ["plumbing.py", *SCRIPT_LINES]:
        for node in ast.walk(ast.parse("\n".join(lines(name)))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions[f"{name}:{node.name}"] = n
    flags = {"train_tokenizer": (flag_count(train_tokenizer, monkeypatch), 30),
             "train_prior": (flag_count(train_prior, monkeypatch), 22)}
    too_many_flags = {k: n for k, (n, limit) in flags.items() if n > limit}
    wide = [f"{name}:{i}" for name in sorted(os.listdir(HERE)) if name.endswith(".py")
            for i, line in enumerate(lines(name), 1) if len(line) > 100]
    assert not too_many and not long_functions and not too_many_flags and len(wide) <= 10, (
        too_many, long_functions, too_many_flags, len(wide), wide[:20])


# -----------------------------------------------------------------------------
# the scripts' command lines and defaults: Table 9's phase 2 in the paper preset, the flags each
# script offers, --dec-attn, the presets living in train_tokenizer.py (configs only, no training)

PAPER_SHAPE = dict(image_size=256, channels=128, ch_mult=(1, 1, 2, 2, 4), attn_block=8)

def phase1_checkpoint(path, preset="classroom", batch_size=64, weights=False, **shape):
    """A phase-1 tokenizer checkpoint as train_tokenizer.py writes it (weights only if asked;
    perceptual weight 0: phase 2 builds no VGG16)."""
    model_cfg = S.TokenizerConfig(**shape)
    loss_cfg = S.LossConfig(disc_channels=8, perceptual_weight=0.0)
    model, disc = {}, {}
    if weights:
        model = S.Tokenizer(model_cfg).state_dict()
        disc = S.Discriminator(model_cfg.image_size, 8, 512).state_dict()
    P.save_checkpoint(str(path), dict(
        kind="tokenizer", phase=1, step=1, model=model, disc=disc, model_config=asdict(model_cfg),
        loss_config=asdict(loss_cfg),
        train_config=asdict(train_tokenizer.TrainConfig(preset=preset, batch_size=batch_size))))
    return str(path)

def phase2(init, tmp_path, *argv):
    argv = ["--phase", "2", "--init", init, "--out", str(tmp_path / "p2"), *argv]
    return train_tokenizer.configure(train_tokenizer.parse(argv))

def help_text(module, capsys):
    with pytest.raises(SystemExit):
        module.parse(["--help"])
    return capsys.readouterr().out

def test_paper_preset_phase2_is_table9_200k_iterations_at_5e_5_with_half_the_batch(tmp_path):
    """Table 9: phase 2 runs 200,000 iterations at lr 5e-5 with the batch halved (ImageNet 256 ->
    128, FFHQ 64 -> 32): half the phase-1 run's batch per process, so 8 x 32 becomes 8 x 16."""
    ffhq = phase1_checkpoint(tmp_path / "ffhq.pt", "paper", 64, **PAPER_SHAPE)  # one process
    train_cfg, model_cfg, loss_cfg, _, _ = phase2(ffhq, tmp_path)
    assert (train_cfg.steps, train_cfg.lr, train_cfg.batch_size) == (200_000, 5e-5, 32)
    assert train_tokenizer.get_lr(150_000, train_cfg) == 5e-5
    assert loss_cfg.alpha == 0 and model_cfg.dec_attn
    imagenet = phase1_checkpoint(tmp_path / "imagenet.pt", "paper", 32, **PAPER_SHAPE)  # 8 x 32
    assert phase2(imagenet, tmp_path)[0].batch_size == 16
    assert phase2(imagenet, tmp_path, "--batch-size", "64")[0].batch_size == 64  # flags win

def test_small_presets_keep_their_own_phase2_lengths_and_batch(tmp_path):
    """Ours, not Table 9's: classroom 20,000 steps at 5e-5, cpu 300 at 2e-4; both keep the phase-1
    batch."""
    classroom = phase2(phase1_checkpoint(tmp_path / "classroom.pt", "classroom", 64), tmp_path)[0]
    cpu = phase2(phase1_checkpoint(tmp_path / "cpu.pt", "cpu", 16), tmp_path)[0]
    assert (classroom.steps, classroom.lr, classroom.batch_size) == (20_000, 5e-5, 64)
    assert (cpu.steps, cpu.lr, cpu.batch_size) == (300, 2e-4, 16)

def test_dec_attn_trains_attention_from_phase1_and_phase2_keeps_its_weights(tmp_path):
    """--dec-attn N: N attention layers after each decoder ResBlock, from phase 1 on (2: Table 1's
    "+Attention x2" row); phase 2 starts from those weights and cannot drop layers."""
    tiny = dict(channels=16, n_codes=32, code_dim=8, attn_heads=2)
    phase1 = train_tokenizer.configure(train_tokenizer.parse(["--out", str(tmp_path / "a")]))
    assert phase1[1].dec_attn == 0
    argv = ["--dec-attn", "2", "--out", str(tmp_path / "b")]
    assert train_tokenizer.configure(train_tokenizer.parse(argv))[1].dec_attn == 2
    torch.manual_seed(0)
    init = phase1_checkpoint(tmp_path / "attn.pt", weights=True, dec_attn=2, **tiny)
    ck = P.load_checkpoint(init, "tokenizer")
    ck["model"] = {k: v + 1 if ".attn." in k else v for k, v in ck["model"].items()}  # "trained"
    P.save_checkpoint(init, ck)
    train_cfg, model_cfg, loss_cfg, _, init_ck = phase2(init, tmp_path)
    assert model_cfg.dec_attn == 2
    model = train_tokenizer.build(train_cfg, model_cfg, loss_cfg, None, init_ck,
                                  torch.device("cpu"))[0]
    attn = {k: v for k, v in model.state_dict().items() if ".attn." in k}
    assert attn and all(torch.equal(v, ck["model"][k]) for k, v in attn.items())
    with pytest.raises(S.SeqganError, match="phase 2 keeps the phase-1 encoder"):
        phase2(init, tmp_path, "--dec-attn", "1")
    plain = phase1_checkpoint(tmp_path / "plain.pt", **tiny)
    assert phase2(plain, tmp_path)[1].dec_attn == 1  # the paper's phase 2: one layer per ResBlock

def test_flag_counts_and_no_backend_flag(capsys):
    """What no user needs to change is a preset value: at most 30 tokenizer flags, 22 prior flags;
    --backend is gone everywhere (auto: NCCL on GPUs, gloo on CPU)."""
    def flags(module):
        return re.findall(r"^  (?:-\w, )?(--[\w-]+)", help_text(module, capsys), re.M)

    tokenizer, prior = flags(train_tokenizer), flags(train_prior)
    assert len(tokenizer) - 1 <= 30 and len(prior) - 1 <= 22  # -1: --help
    for module in (train_tokenizer, train_prior, sample):
        assert "--backend" not in flags(module)
    for kept in ("--data", "--preset", "--phase", "--init", "--vgg-weights", "--objective",
                 "--alpha", "--entropy-weight", "--perceptual-weight", "--gan-weight",
                 "--gan-start", "--dec-attn"):
        assert kept in tokenizer, kept
    for kept in ("--tokenizer", "--model", "--preset", "--uncond", "--token-cache",
                 "--eval-batches"):
        assert kept in prior, kept

def test_sample_help_prints_the_imagenet_flags_of_table10(capsys):
    """Table 10: ImageNet samples AR at top-p 0.92 and NAR at temperature 0.45; the defaults are
    the other data sets' 0.98 and 0.65. --help names the exact flags to pass."""
    text = " ".join(help_text(sample, capsys).split())
    assert "--top-p 0.92" in text and "--temperature 0.45" in text and "ImageNet" in text
    assert (S.AR_TOP_P, S.NAR_TEMPERATURE) == (0.98, 0.65)

def test_tokenizer_help_names_the_dataset_of_each_paper_batch(capsys):
    """Table 9's global batch is ImageNet's 256 and FFHQ's 64: --help never calls 256 the paper's
    batch without saying it is ImageNet's."""
    text = " ".join(help_text(train_tokenizer, capsys).split())
    assert "ImageNet 256, FFHQ 64" in text
    assert "paper's batch" not in text

def test_presets_and_objectives_live_in_train_tokenizer(monkeypatch, tmp_path):
    """The scripts resolve presets and objectives without seqgan.PRESETS / seqgan.OBJECTIVES."""
    for name in ("PRESETS", "OBJECTIVES"):
        monkeypatch.delattr(S, name, raising=False)
    train_cfg, model_cfg, loss_cfg, _, _ = train_tokenizer.configure(train_tokenizer.parse(
        ["--preset", "cpu", "--objective", "regvq", "--out", str(tmp_path / "o")]))
    assert (train_cfg.data, train_cfg.steps, model_cfg.n_codes) == ("fashion-mnist", 600, 256)
    assert (loss_cfg.alpha, model_cfg.mask_ratio, loss_cfg.perceptual_weight) == (0.0, 0.4, 0.1)
    cfg = bench.preset_config(S.TokenizerConfig, bench.BenchConfig(tokenizer_preset="paper"))
    assert cfg.grid == 16 and cfg.channels == 128

@pytest.mark.parametrize("preset, perceptual_weight",
                         [("classroom", 0.1), ("paper", 1.0), ("cpu", 0.1)])
def test_each_preset_sets_its_own_perceptual_weight(preset, perceptual_weight, tmp_path):
    """The weight every run uses comes from the preset, whatever LossConfig's default."""
    argv = ["--preset", preset, "--out", str(tmp_path / "o")]
    loss_cfg = train_tokenizer.configure(train_tokenizer.parse(argv))[2]
    assert loss_cfg.perceptual_weight == perceptual_weight

def test_prior_takes_table10s_decay_and_the_tokenizers_data_from_the_preset_layer(tmp_path,
                                                                                   monkeypatch):
    """train_prior.py: the lr decay by --model (LR_DECAY, Table 10) and the tokenizer run's data are
    the preset layer; a changed LR_DECAY reaches the run without a flag."""
    tok = str(tmp_path / "tok.pt")
    P.save_checkpoint(tok, dict(kind="tokenizer", phase=2, step=1, model={}, disc={},
                                loss_config={}, model_config=asdict(S.TokenizerConfig()),
                                train_config=dict(data="/imgs", data_root="/root", num_workers=3)))
    train_cfg = train_prior.configure(train_prior.parse(["--tokenizer", tok, "--model", "nar"]))[0]
    assert (train_cfg.lr_decay_start, train_cfg.end_lr) == (50_000, 0.0)
    assert (train_cfg.data, train_cfg.data_root, train_cfg.num_workers) == ("/imgs", "/root", 3)
    monkeypatch.setitem(train_prior.LR_DECAY, "ar", (2, 1e-5))
    assert train_prior.configure(train_prior.parse(["--tokenizer", tok]))[0].lr_decay_start == 2

def test_setup_distributed_takes_no_backend(monkeypatch):
    """Auto is enough: NCCL on GPUs, gloo on CPU; there is no backend argument to get wrong."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert P.setup_distributed("cpu") == (False, 0, 0, 1, torch.device("cpu"))
    with pytest.raises(TypeError):
        P.setup_distributed("cpu", "gloo")
    assert os.path.basename(P.__file__) == "plumbing.py"


def observation_results(gfid_by_alpha, rfid_by_alpha, attn):
    """A results dict as observations.py records it: the sweep's rows and Table 1's pair."""
    res = {}
    for (a, row), g, r in zip(observations.SWEEP, gfid_by_alpha, rfid_by_alpha):
        res[f"{row}/tok1/recon"] = dict(value=dict(rfid=r, psnr=20.0, used=256, K=256))
        res[f"{row}/tok1/gfid"] = dict(value=dict(gfid=g, n=2048, n_ref=3000, grid=""))
        res[f"{row}/ar/val_loss"] = dict(value=2.0)
    res["attn-a0/tok1/recon"] = dict(value=dict(rfid=attn[0], psnr=21.0, used=256, K=256))
    res["attn-a0/tok1/gfid"] = dict(value=dict(gfid=attn[1], n=2048, n_ref=3000, grid=""))
    return {k: dict(v, cmd="", host="", date="2026-12-03") for k, v in res.items()}


def test_observations_state_what_the_numbers_say_about_fig6_and_table1(tmp_path):
    """Fig. 6: gFID falls steadily with alpha, rFID best near 0.4; Table 1: the stronger decoder
    reconstructs better and generates worse. The verdicts follow the numbers, either way."""
    paper = observation_results([90, 80, 70, 60, 50], [30, 20, 25, 35, 40], attn=(20, 95))
    say = " ".join(observations.verdicts(paper))
    assert "gFID falls steadily" in say and "rFID is best at alpha 0.25" in say
    assert "reconstructs better (rFID 20.0 vs 30.0) and generates worse (gFID 95.0 vs 90.0)" in say
    other = observation_results([90, 95, 70, 60, 50], [20, 25, 30, 35, 40], attn=(40, 85))
    say = " ".join(observations.verdicts(other))
    assert "does not fall steadily" in say and "best at alpha 0 " in say
    assert "reconstructs worse" in say and "generates better" in say
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\nkept\n{observations.BEGIN}STALE{observations.END}\nafter\n")
    observations.write_results(str(md), paper)
    text = md.read_text()
    assert "kept" in text and "after" in text and "STALE" not in text
    assert "| alpha 0.5 | 256/256 | 20.00 | 25.0 | 2.000 | 70.0 |" in text
    assert "No comparison" not in text and observations.verdicts({}) == [
        "No comparison has all its rows yet."]


def test_observations_seed_spread_says_whether_the_gap_exceeds_it():
    """Mean +- sd over tokenizer seeds, and whether the two objectives' seed ranges overlap."""
    res = {}
    for kind, base in (("seqgan", 80.0), ("vqgan", 100.0)):
        for s in range(3):
            res[f"{kind}-s{s}/tok1/gfid"] = dict(value=dict(gfid=base + s), date="d", host="h")
    assert observations.cell([80.0, 81.0, 82.0], "{:.1f}") == "81.0 +- 1.0 (3)"
    say = " ".join(observations.verdicts(res))
    assert "gFID, conv decoder: SeQ-GAN 81 vs VQGAN-like 101; the seed ranges do not overlap" in say
    res["seqgan-s2/tok1/gfid"]["value"]["gfid"] = 120.0
    assert "overlap: the gap is within the spread" in " ".join(observations.verdicts(res))


def test_observations_runner_measures_lazily_resumes_and_keeps_the_grid(tmp_path, monkeypatch):
    """A row's steps in order (tokenizer, prior, samples; --resume where a ckpt.pt was left), each
    number recorded once with its command, the grid copied to assets; a rerun redoes nothing."""
    ran, fids = [], []
    def run(self, cmd):  # what each step writes, without training anything
        ran.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        if cmd[0] == "sample.py":
            os.makedirs(out)
            open(os.path.join(out, "sampling.json"), "w").close()
            Image.new("RGB", (4, 4)).save(out + "_grid.png")
        else:
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "ckpt.pt"), "w").close()
            with open(os.path.join(out, "log.txt"), "w") as f:
                f.write("eval step 10 | val loss 9.0 acc 0.1\neval step 20 | val loss 1.2345 a\n")
    def fid_main(argv):
        fids.append(argv)
        return (dict(rfid=12.5, psnr=20.25, codes_used=250, n_codes=256) if "--recon" in argv
                else dict(fid=80.5, n=(100, 64)))
    monkeypatch.setattr(observations.Runner, "run", run)
    monkeypatch.setattr(observations.fid, "main", fid_main)
    args = SimpleNamespace(out=str(tmp_path), results=str(tmp_path / "obs.json"), quick=True)
    os.makedirs(tmp_path / "assets")
    os.makedirs(tmp_path / "attn-a0" / "tok1")  # a stopped run: ckpt.pt, no DONE
    open(tmp_path / "attn-a0" / "tok1" / "ckpt.pt", "w").close()
    observations.Runner(args).measure("attn-a0", 1)
    assert [c[0] for c in ran] == ["train_tokenizer.py", "train_prior.py", "sample.py"]
    tok = " ".join(ran[0])
    assert "--alpha 0.0 --seed 0" in tok and "--dec-attn 2" in tok and tok.endswith("--resume")
    assert "--resume" not in ran[1] and "--token-cache" in ran[1]
    res = json.load(open(args.results))
    assert res["attn-a0/tok1/recon"]["value"] == dict(rfid=12.5, psnr=20.25, used=250, K=256)
    assert res["attn-a0/ar/val_loss"]["value"] == 1.2345  # the last eval line
    grid = res["attn-a0/tok1/gfid"]["value"]["grid"]
    assert grid == str(tmp_path / "assets" / "attn-a0_tok1.png") and os.path.exists(grid)
    assert "fid.py --recon" in res["attn-a0/tok1/recon"]["cmd"]
    assert len(fids) == 2
    del ran[:], fids[:]
    observations.Runner(args).measure("attn-a0", 1)  # resumed: every number is there
    assert ran == [] and fids == []
