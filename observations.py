"""The paper's two observations at classroom scale (Fashion-MNIST, 32 px, cpu presets), one command.

  python observations.py                  # every row; resumable: rerun it to continue
  python observations.py --rows vqgan-s0 --quick --out out/obs_quick   # smoke run, random nets

Rows: SeQ-GAN (alpha 1) and VQGAN-like (alpha 0), the same phase 2, three tokenizer seeds; an alpha
sweep (Fig. 6, Section 3.3.2); conv vs "+Attention x2" at alpha 0 (Table 1, Section 3.3.1). Numbers
go to results/observations.json (tracked), the tables into RESULTS.md.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch

import fid  # called in this process: fid.main returns the numbers it prints
import plumbing

VGG, INCEPTION = "weights/vgg16_imagenet_features.pth", "weights/pt_inception.pth"
# row: (alpha, tokenizer seed, phase 2 too, phase-1 decoder with attention); in the order run
ROWS = {"seqgan-s0": (1.0, 0, True, False), "vqgan-s0": (0.0, 0, True, False),
        "attn-a0": (0.0, 0, False, True), "alpha-0.5": (0.5, 0, False, False),
        "seqgan-s1": (1.0, 1, True, False), "vqgan-s1": (0.0, 1, True, False),
        "alpha-0.25": (0.25, 0, False, False), "alpha-0.75": (0.75, 0, False, False),
        "seqgan-s2": (1.0, 2, True, False), "vqgan-s2": (0.0, 2, True, False)}
SWEEP = ((0, "vqgan-s0"), (0.25, "alpha-0.25"), (0.5, "alpha-0.5"), (0.75, "alpha-0.75"),
         (1, "seqgan-s0"))
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
        self.assets = os.path.join(args.out, "assets") if args.quick else "assets/observations"

    def run(self, cmd):
        """A trainer or sample.py as a subprocess, its output appended to commands.log."""
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run([sys.executable] + cmd, capture_output=True, text=True)
        with open(os.path.join(self.out, "commands.log"), "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + r.stdout + r.stderr)
        if r.returncode:
            sys.exit(f"error: step failed (exit {r.returncode}), see {self.out}/commands.log\n"
                     + r.stderr[-800:])

    def train(self, folder, cmd):
        """Run a trainer unless folder/DONE exists; a stopped run resumes from its ckpt.pt."""
        ckpt = os.path.join(folder, "ckpt.pt")
        if not os.path.exists(os.path.join(folder, "DONE")):
            self.run(cmd + ["--out", folder] + (["--resume"] if os.path.exists(ckpt) else []))
            open(os.path.join(folder, "DONE"), "w").close()
        return ckpt

    def tokenizer(self, row, phase):
        alpha, seed, _, attn = ROWS[row]
        cmd = (["--phase", "2", "--init", self.tokenizer(row, 1)] if phase == 2 else
               ["--preset", "cpu", "--alpha", str(alpha), "--seed", str(seed), "--vgg-weights",
                self.vgg] + (["--dec-attn", "2"] if attn else []))
        return self.train(os.path.join(self.out, row, f"tok{phase}"),
                          ["train_tokenizer.py"] + cmd + self.q["tok"])

    def prior(self, row):
        cmd = ["train_prior.py", "--tokenizer", self.tokenizer(row, 1), "--model", "ar", "--preset",
               "cpu", "--lr", "3e-4", "--batch-size", "64", "--log-every", "250", "--eval-batches",
               "20", "--token-cache", os.path.join(self.out, row, "tokens.pt")] + self.q["prior"]
        return self.train(os.path.join(self.out, row, "ar"), cmd)

    def record(self, key, value, cmds):
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        host = f"{os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"
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
            r = fid.main(cmd[1:])
            self.record(key + "recon", dict(rfid=r["rfid"], psnr=r["psnr"], used=r["codes_used"],
                                            K=r["n_codes"]), [cmd])
        if f"{row}/ar/val_loss" not in self.res:
            log = open(os.path.join(os.path.dirname(self.prior(row)), "log.txt")).read()
            vl = float(re.findall(r"eval step \d+ \| val loss (\S+)", log)[-1])
            self.record(f"{row}/ar/val_loss", vl, [["last eval line of", row + "/ar/log.txt"]])
        if key + "gfid" not in self.res:
            s = os.path.join(self.out, row, "ar", f"samples_tok{phase}")
            cmd = ["sample.py", "--prior", self.prior(row), "--n", self.q["n"], "--batch-size",
                   "256", "--tokenizer", self.tokenizer(row, phase), "--out", s]
            if not os.path.exists(os.path.join(s, "sampling.json")):  # written last by sample.py
                self.run(cmd)
            cmd2 = ["fid.py", self.q["ref"][0] + ".npz", s, "--inception-weights", self.inc]
            r = fid.main(cmd2[1:])
            grid = os.path.join(self.assets, f"{row}_tok{phase}.png")  # tracked: out/ is not
            shutil.copyfile(s + "_grid.png", grid)
            self.record(key + "gfid", dict(gfid=r["fid"], n_ref=r["n"][0], n=r["n"][1], grid=grid),
                        [cmd, cmd2])

    def prepare(self):
        """The first N test images as class folders (ref: gFID reference, recon: rFID) and stats."""
        if self.vgg != "random" and not all(map(os.path.exists, (VGG, INCEPTION))):
            sys.exit(f"error: {VGG} or {INCEPTION} is missing: put torchvision's VGG16 state dict "
                     "and pytorch-fid's file there (offline: ../shared/tools/offline_weights.sh)")
        for folder, n in (self.q["ref"], self.q["recon"]):
            if not os.path.isdir(folder):
                plumbing.export_test_images("fashion-mnist", folder, n)
        if not os.path.exists(self.q["ref"][0] + ".npz"):
            fid.main([self.q["ref"][0], "--save-stats", self.q["ref"][0] + ".npz",
                      "--inception-weights", self.inc])

# --- tables, verdicts and the picture: every number from results/observations.json ------------

def metrics(res, row, phase):
    """The numbers measured so far for one decoder of one row (missing ones left out)."""
    keys = (f"tok{phase}/recon", f"tok{phase}/gfid", "ar/val_loss")
    r, g, v = (res.get(f"{row}/{k}", {}).get("value") for k in keys)
    m = dict(psnr=r["psnr"], rfid=r["rfid"], usage=f"{r['used']}/{r['K']}") if r else {}
    return {**m, **({} if v is None else dict(val=v)), **(dict(gfid=g["gfid"]) if g else {})}

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

def seeds(res, kind, phase):  # SeQ-GAN's or VQGAN-like's three tokenizer seeds
    return [metrics(res, f"{kind}-s{s}", phase) for s in range(3)]

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
        trend = "falls" if all(x > y for x, y in zip(g, g[1:])) else "does not fall"
        say.append(f"Observation 2 (Fig. 6): gFID {trend} steadily from alpha 0 to 1 ({g[0]:.1f}"
                   f" -> {g[-1]:.1f}); rFID is best at alpha {SWEEP[int(np.argmin(r))][0]} "
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
        BEGIN, f"Measured {dates[0]} to {dates[-1]} on {hosts} (setup, N and the networks' limits: "
        "above). 'a +- b (n)': mean +- sd over n tokenizer seeds; '-': not measured yet.",
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
        f"![AR samples per alpha, 0 to 1]({pic})" if os.path.exists(pic) else "-", END])

def write_results(path, res):
    """Replace the marked section of path (RESULTS.md) with the tables, atomically."""
    text = open(path).read() if os.path.exists(path) else BEGIN + END
    text = text[:text.index(BEGIN)] + markdown(res) + text[text.index(END) + len(END):]
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
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                   help="rows to run, in order: " + ", ".join(ROWS))
    p.add_argument("--out", default="out/observations", help="checkpoints, samples, commands.log")
    p.add_argument("--quick", action="store_true", help="smoke run: random networks, tiny steps; "
                   "its numbers and tables go to --out, not results/ and RESULTS.md")
    args = p.parse_args(argv)
    where, md = (args.out, f"{args.out}/RESULTS.md") if args.quick else ("results", "RESULTS.md")
    args.results = os.path.join(where, "observations.json")
    runner = Runner(args)
    for folder in (where, args.out, runner.assets):
        os.makedirs(folder, exist_ok=True)
    runner.prepare()
    for row in args.rows:
        for phase in (1, 2) if ROWS[row][2] else (1,):
            runner.measure(row, phase)
        sweep_picture(runner.res)
        write_results(md, runner.res)
        print(f"row {row} done; tables in {md}", flush=True)

if __name__ == "__main__":
    main()
