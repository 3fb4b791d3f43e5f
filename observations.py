"""
The paper's two observations at classroom scale (Fashion-MNIST, 32 px, cpu presets), one command.

  python observations.py                  # every row; resumable: rerun it to continue
  python observations.py --rows vqgan-s0 --quick --out out/obs_quick   # smoke run, random nets

Rows are tokenizer runs: SeQ-GAN (alpha 1) and VQGAN-like (alpha 0) with the same phase 2, for three
tokenizer seeds; an alpha sweep of phase 1 (Fig. 6, Section 3.3.2); the alpha-0 conv decoder against
"+Attention x2" trained jointly (Table 1, Section 3.3.1). Each decoder gets PSNR, usage and rFID;
each phase-1 tokenizer an AR prior whose N = 2,048 samples each decoder of the row decodes (gFID).
Finished numbers go to results/observations.json (tracked), the tables into RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import torch

VGG, INCEPTION = "weights/vgg16_imagenet_features.pth", "weights/pt_inception.pth"
# row: (alpha, tokenizer seed, phase 2 too, phase-1 decoder with attention); in the order run
ROWS = {"seqgan-s0": (1.0, 0, True, False), "vqgan-s0": (0.0, 0, True, False),
        "attn-a0": (0.0, 0, False, True), "alpha-0.5": (0.5, 0, False, False),
        "seqgan-s1": (1.0, 1, True, False), "vqgan-s1": (0.0, 1, True, False),
        "alpha-0.25": (0.25, 0, False, False), "alpha-0.75": (0.75, 0, False, False),
        "seqgan-s2": (1.0, 2, True, False), "vqgan-s2": (0.0, 2, True, False)}
SWEEP = ((0, "vqgan-s0"), (0.25, "alpha-0.25"), (0.5, "alpha-0.5"), (0.75, "alpha-0.75"),
         (1, "seqgan-s0"))
# gFID reference images, rFID images (the first N test images as class folders), steps, samples
FULL = dict(ref=("data/fmnist_test3k", 3000), recon=("data/fmnist_test500", 500), tok=[],
            prior=["--steps", "2000", "--eval-every", "500"], n="2048")
QUICK = dict(ref=("data/fmnist_test100", 100), recon=("data/fmnist_test100", 100),
             tok=["--steps", "20", "--gan-start", "10", "--eval-every", "10", "--eval-images", "64",
                  "--log-every", "10"], prior=["--steps", "20", "--eval-every", "10"], n="100")
BEGIN, END = "<!-- observations:begin -->", "<!-- observations:end -->"


class Runner:
    """Trains, samples and measures lazily: a step runs only when a missing number needs it."""

    def __init__(self, args):
        self.out, self.path, self.q = args.out, args.results, QUICK if args.quick else FULL
        self.res = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.vgg, self.inc = ("random", "random") if args.quick else (VGG, INCEPTION)
        self.log = os.path.join(self.out, "commands.log")

    def run(self, cmd):
        """One script as a subprocess, its command and output appended to commands.log -> stdout."""
        cmd = [sys.executable] + cmd
        print("$ " + " ".join(cmd[1:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        with open(self.log, "a") as f:
            f.write("$ " + " ".join(cmd[1:]) + "\n" + r.stdout + r.stderr)
        if r.returncode:
            sys.exit(f"error: a step failed (exit {r.returncode}); see {self.log}:\n"
                     + r.stderr[-1500:])
        return r.stdout

    def train(self, folder, cmd):
        """Run a trainer unless folder/DONE exists; a stopped run resumes from its ckpt.pt."""
        ckpt = os.path.join(folder, "ckpt.pt")
        if not os.path.exists(os.path.join(folder, "DONE")):
            self.run(cmd + ["--out", folder] + (["--resume"] if os.path.exists(ckpt) else []))
            open(os.path.join(folder, "DONE"), "w").close()
        return ckpt

    def tokenizer(self, row, phase):
        alpha, seed, _, attn = ROWS[row]
        if phase == 1:
            cmd = ["train_tokenizer.py", "--preset", "cpu", "--alpha", str(alpha), "--seed",
                   str(seed), "--vgg-weights", self.vgg] + (["--dec-attn", "2"] if attn else [])
        else:
            cmd = ["train_tokenizer.py", "--phase", "2", "--init", self.tokenizer(row, 1)]
        return self.train(os.path.join(self.out, row, f"tok{phase}"), cmd + self.q["tok"])

    def prior(self, row):
        cmd = ["train_prior.py", "--tokenizer", self.tokenizer(row, 1), "--model", "ar", "--preset",
               "cpu", "--lr", "3e-4", "--batch-size", "64", "--log-every", "250", "--eval-batches",
               "20", "--token-cache", os.path.join(self.out, row, "tokens.pt")] + self.q["prior"]
        return self.train(os.path.join(self.out, row, "ar"), cmd)

    def record(self, key, value, cmds):
        host = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        self.res[key] = dict(value=value, cmd=" ; ".join(" ".join(c) for c in cmds), host=host,
                             date=str(datetime.date.today()))
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.res, f, indent=1, sort_keys=True)
        os.replace(self.path + ".tmp", self.path)  # atomic: a stopped run loses one number at most

    def measure(self, row, phase):
        key = f"{row}/tok{phase}/"
        if key + "recon" not in self.res:
            cmd = ["fid.py", "--recon", self.tokenizer(row, phase), "--images", self.q["recon"][0],
                   "--inception-weights", self.inc]
            m = re.search(r"rFID (\S+)\s+PSNR (\S+) dB\s+codebook usage (\d+)/(\d+)", self.run(cmd))
            self.record(key + "recon", dict(rfid=float(m[1]), psnr=float(m[2]), used=int(m[3]),
                                            K=int(m[4])), [cmd])
        if f"{row}/ar/val_loss" not in self.res:
            log = open(os.path.join(os.path.dirname(self.prior(row)), "log.txt")).read()
            vl = float(re.findall(r"eval step \d+ \| val loss (\S+)", log)[-1])
            self.record(f"{row}/ar/val_loss", vl, [["last eval line of", row + "/ar/log.txt"]])
        if key + "gfid" not in self.res:
            s = os.path.join(self.out, row, "ar", f"samples_tok{phase}")
            cmd = ["sample.py", "--prior", self.prior(row), "--tokenizer",
                   self.tokenizer(row, phase), "--n", self.q["n"], "--batch-size", "256",
                   "--out", s]
            self.run(cmd)
            cmd2 = ["fid.py", self.q["ref"][0] + ".npz", s, "--inception-weights", self.inc]
            m = re.search(r"FID (\S+)\s+\(N=(\d+) .*N=(\d+)", self.run(cmd2))
            self.record(key + "gfid", dict(gfid=float(m[1]), n_ref=int(m[2]), n=int(m[3]),
                                           grid=s + "_grid.png"), [cmd, cmd2])

    def prepare(self):
        """The real test images as class folders and the gFID reference statistics."""
        if self.vgg != "random" and not all(map(os.path.exists, (VGG, INCEPTION))):
            sys.exit(f"error: {VGG} or {INCEPTION} is missing: build both with `bash "
                     "../shared/tools/offline_weights.sh weights` or put torchvision's VGG16 state "
                     "dict and pytorch-fid's pt_inception file there")
        import plumbing
        for folder, n in (self.q["ref"], self.q["recon"]):
            if not os.path.isdir(folder):
                plumbing.export_test_images("fashion-mnist", folder, n)
        ref = self.q["ref"][0]
        if not os.path.exists(ref + ".npz"):
            self.run(["fid.py", ref, "--save-stats", ref + ".npz", "--inception-weights", self.inc])


# -----------------------------------------------------------------------------
# tables, verdicts and the picture: every number from results/observations.json


def metrics(res, row, phase):
    """The numbers measured so far for one decoder of one row (missing ones left out)."""
    r, g, v = (res.get(f"{row}/{k}") for k in (f"tok{phase}/recon", f"tok{phase}/gfid",
                                                 "ar/val_loss"))
    m = {} if r is None else dict(psnr=r["value"]["psnr"], rfid=r["value"]["rfid"],
                                  usage=f"{r['value']['used']}/{r['value']['K']}")
    m.update({} if v is None else dict(val=v["value"]))
    m.update({} if g is None else dict(gfid=g["value"]["gfid"]))
    return m


COLS = (("psnr", "PSNR dB", "{:.2f}"), ("rfid", "rFID", "{:.1f}"), ("val", "AR val loss", "{:.3f}"),
        ("gfid", "gFID", "{:.1f}"))


def cell(vals, fmt):
    """'mean +- sd (n seeds)', one value alone as itself, '-' when not measured yet."""
    if len(vals) < 2:
        return fmt.format(vals[0]) if vals else "-"
    return f"{fmt.format(np.mean(vals))} +- {fmt.format(np.std(vals, ddof=1))} ({len(vals)})"


def table(rows):
    """rows: [(label, [metrics of each seed])] -> a markdown table."""
    lines = ["| tokenizer, decoder | codes used | " + " | ".join(c[1] for c in COLS) + " |",
             "| --- " * (2 + len(COLS)) + "|"]
    for label, ms in rows:
        used = ", ".join(m["usage"] for m in ms if "usage" in m) or "-"
        cells = [cell([m[k] for m in ms if k in m], fmt) for k, _, fmt in COLS]
        lines.append(f"| {label} | {used} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds(res, kind, phase):
    return [metrics(res, f"{kind}-s{s}", phase) for s in range(3)]  # for the like-with-like rows


def verdicts(res):
    """One plain sentence per comparison whose rows are all measured."""
    say = []
    for phase, dec in ((1, "conv"), (2, "phase-2")):
        for k, name in (("gfid", "gFID"), ("val", "AR val loss"), ("rfid", "rFID")):
            a, b = ([m[k] for m in seeds(res, t, phase) if k in m] for t in ("seqgan", "vqgan"))
            if len(a) >= 2 and len(b) >= 2:
                o = max(min(a), min(b)) <= min(max(a), max(b))
                say.append(f"{name}, {dec} decoder: SeQ-GAN {np.mean(a):.3g} vs VQGAN-like "
                           f"{np.mean(b):.3g}; the seed ranges "
                           + ("overlap: the gap is within the spread." if o else "do not overlap."))
    sweep = [metrics(res, r, 1) for _, r in SWEEP]
    if all("gfid" in m and "rfid" in m for m in sweep):
        g, r = [m["gfid"] for m in sweep], [m["rfid"] for m in sweep]
        falls = all(x > y for x, y in zip(g, g[1:]))
        trend = "falls steadily" if falls else "does not fall steadily"
        say.append(f"Observation 2 (Fig. 6): gFID {trend} from alpha 0 to 1 ({g[0]:.1f} -> "
                   f"{g[-1]:.1f}); rFID is best at alpha {SWEEP[int(np.argmin(r))][0]} "
                   "(paper: near 0.4).")
    conv, attn = metrics(res, "vqgan-s0", 1), metrics(res, "attn-a0", 1)
    if all(k in m for m in (conv, attn) for k in ("rfid", "gfid")):
        rec, gen = ("better" if attn["rfid"] < conv["rfid"] else "worse",
                    "worse" if attn["gfid"] > conv["gfid"] else "better")
        say.append(f"Observation 1 (Table 1): +Attention x2 reconstructs {rec} (rFID "
                   f"{attn['rfid']:.1f} vs {conv['rfid']:.1f}) and generates {gen} (gFID "
                   f"{attn['gfid']:.1f} vs {conv['gfid']:.1f}).")
    return say or ["No comparison has all its rows yet."]


def markdown(res):
    dates = sorted({e["date"] for e in res.values()}) or ["-"]
    hosts = "; ".join(sorted({e["host"] for e in res.values()})) or "-"
    pic = "assets/alpha_sweep_ar_samples.png"
    return "\n\n".join([
        BEGIN, "## The paper's two observations at classroom scale (`python observations.py`)",
        f"Measured {dates[0]} to {dates[-1]} on {hosts}. Fashion-MNIST 32 px; tokenizers "
        "`--preset cpu` (600 phase-1 steps, 300 phase-2 steps); AR priors `--preset cpu`, 2,000 "
        "steps of batch 64 at lr 3e-4 (ours). Real networks with their limits: VGG16 = ImageNet "
        "conv base with a RANDOM classifier (L_sem's logits are not ImageNet's); FID Inception = "
        "real pool3, RANDOM fc (FID is real; no IS). rFID: N = 500 test images vs their "
        "reconstructions; gFID: N = 2,048 samples (sampling seed 0) vs the first 3,000 test "
        "images; both biased at this N, so compare rows, not published numbers. 'a +- b (n)' is "
        "mean +- sd over n tokenizer seeds; each number's command is in results/observations.json.",
        "**Like with like**: the same phase 2 for both rows; the AR prior learns phase-1 tokens, "
        "which phase 2 keeps, and each decoder decodes the same samples.",
        table([(f"{n}, {d}", seeds(res, t, p)) for t, n in (("seqgan", "SeQ-GAN a=1"),
               ("vqgan", "VQGAN-like a=0")) for p, d in ((1, "conv"), (2, "phase 2"))]),
        "**Observation 2, alpha sweep** (phase 1, conv decoder, seed 0):",
        table([(f"alpha {a}", [metrics(res, r, 1)]) for a, r in SWEEP]),
        "**Observation 1, Table 1** (alpha 0, seed 0; the decoder trained jointly from the start):",
        table([("conv", [metrics(res, "vqgan-s0", 1)]),
               ("+Attention x2", [metrics(res, "attn-a0", 1)])]),
        "**What holds at this scale:**\n\n" + "\n".join(f"- {s}" for s in verdicts(res)),
        f"![AR samples per alpha, 0 to 1]({pic})" if os.path.exists(pic) else "", END])


def write_results(path, res):
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + markdown(res) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + markdown(res) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def sweep_picture(res, path="assets/alpha_sweep_ar_samples.png"):
    """The sweep's AR sample grids side by side, alpha 0 -> 1, each labelled."""
    from PIL import Image, ImageDraw
    grids = [res.get(f"{r}/tok1/gfid", {}).get("value", {}).get("grid") for _, r in SWEEP]
    if not all(g and os.path.exists(g) for g in grids):
        return
    ims = [Image.open(g).convert("RGB") for g in grids]
    w, h = ims[0].size
    canvas = Image.new("RGB", (5 * w + 32, h + 20), "white")
    for i, ((a, _), im) in enumerate(zip(SWEEP, ims)):
        canvas.paste(im, (i * (w + 8), 20))
        ImageDraw.Draw(canvas).text((i * (w + 8) + 4, 4), f"alpha = {a}", fill="black")
    canvas.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows, run in order")
    p.add_argument("--out", default="out/observations", help="checkpoints, samples, commands.log")
    p.add_argument("--results", default="results/observations.json", help="the numbers (tracked)")
    p.add_argument("--md", default="RESULTS.md", help="file whose marked section gets the tables")
    p.add_argument("--quick", action="store_true", help="smoke run: random networks, tiny steps")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        sys.exit(f"error: --rows {args.rows}: choose from {', '.join(ROWS)}")
    for d in (args.out, os.path.dirname(args.results) or "."):
        os.makedirs(d, exist_ok=True)
    runner = Runner(args)
    runner.prepare()
    for row in rows:
        for phase in (1, 2) if ROWS[row][2] else (1,):
            runner.measure(row, phase)
        if not args.quick:
            sweep_picture(runner.res)
        write_results(args.md, runner.res)
        print(f"row {row} done; tables in {args.md}", flush=True)


if __name__ == "__main__":
    main()
