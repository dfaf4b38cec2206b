"""Train the digits DDPM U-Net and classifier shipped in fusediff/assets/ (CPU, ~10 minutes).

    python examples/train_digits.py --steps 1500 --out fusediff/assets --seed 0

Writes ``<out>/digits_classifier.pt`` and ``<out>/digits_unet.pt`` (EMA weights stored in fp16),
then samples 256 digits with DDIM-50 from the saved U-Net, prints the metrics of
``fusediff.digits.evaluate`` (Fréchet distance on classifier features, classifier confidence)
next to those of pure noise and of real digits, and writes a sample grid PNG.
See docs/digits.md for the recorded run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fusediff import digits

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="U-Net optimizer steps (default 1500)")
    p.add_argument("--out", type=Path, default=REPO / "fusediff" / "assets", help="asset directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--grid", type=Path, default=REPO / "docs" / "images" / "digits_samples.png",
                   help="sample grid PNG (first 64 evaluation samples); '' to skip")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args()


def shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (background -1), plus light noise."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i]: dy[i] + 16, dx[i]: dx[i] + 16] for i in range(n)])
    return (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def train_classifier(args: argparse.Namespace) -> tuple[digits.DigitsClassifier, float]:
    x, y = digits.digits_dataset()
    g = torch.Generator().manual_seed(args.seed)
    # Stratified-enough 80/20 split by a seeded permutation.
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = x.shape[0] // 5
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    torch.manual_seed(args.seed)
    model = digits.DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.classifier_epochs * steps_per_epoch)
    for epoch in range(args.classifier_epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        total = 0.0
        for b in order.split(64):
            loss = F.cross_entropy(model(shift_augment(x[b], g)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = float((model(x[test_idx]).argmax(1) == y[test_idx]).float().mean())
            print(f"[classifier] epoch {epoch + 1:3d} loss {total / len(train_idx):.4f} test acc {acc:.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = float((model(x[test_idx]).argmax(1) == y[test_idx]).float().mean())
    return model, acc


def train_unet(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    x, _ = digits.digits_dataset()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    unet = digits.build_unet(digits.DEFAULT_UNET_CONFIG)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"[unet] {n_params / 1e6:.3f} M parameters, {x.shape[0]} training images", flush=True)
    ac = digits.alphas_cumprod(digits.DEFAULT_SCHEDULER_CONFIG)
    T = ac.shape[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(100, args.steps // 10 + 1)

    def lr_lambda(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    t0, c0 = time.time(), time.process_time()
    running, losses = None, []
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=g)
        x0 = x[idx]
        t = torch.randint(0, T, (args.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        loss_value = float(loss.detach())
        losses.append(loss_value)
        running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"[unet] step {step + 1:5d}/{args.steps} loss {loss_value:.4f} (smoothed {running:.4f}) "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:6.1f}s", flush=True)
    wall = time.time() - t0
    tail = losses[-100:]
    info = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - c0, 1),  # differs from wall_s on a shared machine
        "final_loss_mean_last100": round(sum(tail) / len(tail), 5),
        "threads": args.threads,
        "torch": str(torch.__version__),
    }
    return ema, info


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    clf, acc = train_classifier(args)
    print(f"[classifier] final test accuracy {acc:.4f}", flush=True)
    clf_path = args.out / "digits_classifier.pt"
    torch.save({"config": {"width": clf.width, "feature_dim": clf.feature_dim},
                "state_dict": clf.state_dict(), "test_accuracy": acc}, clf_path)

    ema, info = train_unet(args)
    unet_path = args.out / "digits_unet.pt"
    torch.save({
        "config": digits.DEFAULT_UNET_CONFIG,
        "scheduler": digits.DEFAULT_SCHEDULER_CONFIG,
        "state_dict": {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()},
        "train": info,
    }, unet_path)
    print(f"[saved] {unet_path} ({unet_path.stat().st_size / 1e6:.2f} MB), "
          f"{clf_path} ({clf_path.stat().st_size / 1e6:.2f} MB)", flush=True)

    # Evaluate what was saved, through the public loaders.
    unet = digits.load_digits_unet(unet_path)
    clf = digits.load_classifier(clf_path)
    t0 = time.time()
    samples = digits.ddim_sample(unet, n=args.eval_samples, steps=args.eval_steps, seed=args.seed)
    sample_s = time.time() - t0
    m_samples = digits.evaluate(samples, clf)
    noise = torch.randn(args.eval_samples, 1, 16, 16, generator=torch.Generator().manual_seed(args.seed + 7))
    m_noise = digits.evaluate(noise.clamp(-1, 1), clf)
    m_real = digits.evaluate(digits.real_digits(args.eval_samples, seed=args.seed + 3), clf)
    print(f"[eval] DDIM-{args.eval_steps}, {args.eval_samples} samples in {sample_s:.1f}s", flush=True)
    for name, m in (("ddim", m_samples), ("noise", m_noise), ("real", m_real)):
        print(f"[eval] {name:5s} " + json.dumps(m), flush=True)
    if str(args.grid):
        path = digits.save_grid_png(samples[:64], args.grid, nrow=8, scale=3)
        print(f"[grid] {path}", flush=True)
    print(f"[done] total {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
