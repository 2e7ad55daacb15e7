"""Train one of edgeq's bundled reference models on CIFAR-10.

Seeded and resumable: full training state (model, optimizer, epoch, RNG) is
saved after every epoch under the state folder, and a rerun with the same
arguments continues from there. If that state is gone (a new machine), the run
continues from the weights file in edgeq/models/weights, whose metadata records
the epoch it reached. Runs on CUDA when present, else on the CPU.

    python tools/train_reference.py --model edgeq/vit-cifar10 --epochs 40
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeq.data.archive import cache_root  # noqa: E402
from edgeq.data.memory import load_uint8_arrays  # noqa: E402
from edgeq.models.reference import REFERENCE_MODELS  # noqa: E402
from edgeq.models.weights_io import read_weights, write_model_card, write_reference_weights  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--data", default=os.environ.get("EDGEQ_DATA", "../shared/data"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $EDGEQ_CACHE/train/<model>")
    parser.add_argument("--train-limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="where weights and card go (default: edgeq/models/weights)")
    parser.add_argument("--val-limit", type=int, default=0, help="card accuracy on a balanced subset (smoke tests)")
    parser.add_argument("--card-only", action="store_true", help="only re-measure the shipped weights and rewrite the card")
    parser.add_argument("--max-epochs-this-run", type=int, default=0, help="stop after this many epochs (0: run to the end)")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off); with both on, each batch picks one")
    parser.add_argument("--save-every", type=int, default=1, help="write the shipped weights every N epochs (and at the end)")
    parser.add_argument("--skip-card", action="store_true", help="write weights without re-measuring the card (run --card-only later)")
    return parser.parse_args()


def result_defining_args(argv: list[str]) -> list[str]:
    """The command line without the options that only say where files go or how many threads run."""
    placement = {"--state-dir", "--weights-dir", "--threads", "--skip-card", "--save-every", "--max-epochs-this-run"}
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in placement:
            skip_value = "=" not in arg and name != "--skip-card"
            continue
        kept.append(arg)
    return kept


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel reflect-padded image, and random horizontal flip.

    The random draws come from a CPU generator wherever the batch lives, so a
    GPU run and a CPU run of the same seed see the same crops and flips.
    """
    n, _, h, w = batch.shape
    device = batch.device
    padded = F.pad(batch, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=generator).to(device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None].expand(n, 3, h, w + 8)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :].expand(n, 3, h, w)
    cropped = cropped.gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def mix(images: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with its reverse; targets are soft label rows.

    With both enabled each batch takes one of them with equal chance. CutMix's
    mixing weight is corrected to the pasted box's true area.
    """
    if not mixup and not cutmix:
        return images, targets
    use_cutmix = bool(cutmix) and (not mixup or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # torch's Beta sampler takes no generator: seed numpy's from ours so runs stay reproducible
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).beta(alpha, alpha))
    flipped_images, flipped_targets = images.flip(0), targets.flip(0)
    if use_cutmix:
        _, _, h, w = images.shape
        cut_h, cut_w = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = flipped_images[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + flipped_images * (1.0 - lam)
    return images, targets * lam + flipped_targets * (1.0 - lam)


def normalise(images: torch.Tensor, config: dict) -> torch.Tensor:
    mean = torch.tensor(config["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: dict, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            x = normalise(images[start : start + 500].to(device), config)
            correct += (model(x).argmax(1).cpu() == labels[start : start + 500].cpu()).sum().item()
    return 100.0 * correct / len(images)


def card_accuracy(ref, weights_path: Path, data: Path, limit: int = 0) -> dict:
    """Top-1 of the shipped float16 file, through exactly the path `edgeq eval` takes."""
    from edgeq.data import balanced_indices, data_config, load_image_folder
    from edgeq.evaluate import evaluate
    from edgeq.models import create_model

    model = create_model(ref.name, checkpoint=weights_path)
    dataset = load_image_folder(data / "cifar10" / "val.tar.gz", data_config(model))
    return evaluate(model, dataset, balanced_indices(dataset.labels, limit) if limit else None)


def write_card_only(args: argparse.Namespace) -> None:
    ref = REFERENCE_MODELS[args.model]
    weights_path = (args.weights_dir or ref.weights_path.parent) / ref.weights_path.name
    _, meta = read_weights(weights_path)
    measured = card_accuracy(ref, weights_path, Path(args.data), args.val_limit)
    write_model_card(weights_path.with_suffix(".md"), ref, measured["top1"], measured["num_images"],
                     int(meta["epoch"]), int(meta["epochs"]), int(meta["seed"]), meta["command"])
    print(json.dumps({"model": ref.name, "epoch": meta["epoch"], "card_top1": measured["top1"]}))


def main() -> None:
    args = parse_args()
    if args.card_only:
        write_card_only(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ref = REFERENCE_MODELS[args.model]
    state_dir = args.state_dir or cache_root() / "train" / ref.name.replace("/", "_")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "state.pt"

    seed_everything(args.seed)
    data = Path(args.data)
    train_x, train_y, _ = load_uint8_arrays(data / "cifar10" / "train.tar.gz")
    val_x, val_y, _ = load_uint8_arrays(data / "cifar10" / "val.tar.gz")
    train_x = torch.from_numpy(train_x).permute(0, 3, 1, 2).contiguous()
    val_x = torch.from_numpy(val_x).permute(0, 3, 1, 2).contiguous()
    train_y, val_y = torch.from_numpy(train_y), torch.from_numpy(val_y)
    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    if args.val_limit:
        from edgeq.data import balanced_indices

        keep = torch.tensor(balanced_indices(val_y.tolist(), args.val_limit))
        val_x, val_y = val_x[keep], val_y[keep]
    weights_path = (args.weights_dir or ref.weights_path.parent) / ref.weights_path.name
    # The whole data set fits on a GPU (150 MB), which spares a loader per step.
    train_x, train_y = train_x.to(device), train_y.to(device)

    model = ref.build(drop_path_rate=args.drop_path).to(device)
    num_classes = model.num_classes
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return args.lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    start_epoch, best = 0, 0.0
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        print(f"resumed from {state_file} at epoch {start_epoch}", flush=True)
    elif weights_path.exists():
        weights, meta = read_weights(weights_path)
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        start_epoch, best = int(meta.get("epoch", 0)), float(meta.get("val_top1", 0.0))
        print(f"resumed weights from {weights_path} at epoch {start_epoch} (optimizer state restarts)", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        generator.manual_seed(args.seed * 100_003 + epoch)
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        started, seen = time.time(), 0
        loss_sum = torch.zeros((), device=device)
        for step_in_epoch in range(steps_per_epoch):
            index = order[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size].to(device)
            x = normalise(augment(train_x[index], generator), ref.data_config)
            smooth = args.label_smoothing
            targets = F.one_hot(train_y[index], num_classes).float() * (1.0 - smooth) + smooth / num_classes
            x, targets = mix(x, targets, args.mixup, args.cutmix, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step_in_epoch)
            loss = -(targets * F.log_softmax(model(x), dim=1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            seen += len(index)
            loss_sum += loss.detach() * len(index)
        loss_sum = loss_sum.item()
        top1 = evaluate(model, val_x, val_y, ref.data_config, device)
        print(json.dumps({"epoch": epoch + 1, "loss": round(loss_sum / seen, 4), "val_top1": top1,
                          "seconds": round(time.time() - started, 1)}), flush=True)
        partial = state_file.with_suffix(".partial")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "best": max(best, top1), "args": vars(args) | {"state_dir": str(state_dir)}}, partial)
        partial.replace(state_file)
        best = max(best, top1)
        epochs_run += 1
        last = epoch + 1 == args.epochs or (args.max_epochs_this_run and epochs_run >= args.max_epochs_this_run)
        if not last and (epoch + 1) % args.save_every:
            continue
        # The bundled weights always follow the latest epoch, and the card states
        # the accuracy of exactly the float16 file that ships.
        command = "python tools/train_reference.py " + " ".join(result_defining_args(sys.argv[1:]))
        path = write_reference_weights(weights_path, ref, model.state_dict(), epoch=epoch + 1, epochs=args.epochs,
                                       val_top1=top1, seed=args.seed, command=command)
        if not args.skip_card:
            measured = card_accuracy(ref, path, data, args.val_limit)
            write_model_card(path.with_suffix(".md"), ref, measured["top1"], measured["num_images"],
                             epoch + 1, args.epochs, args.seed, command)
        if last:
            break


if __name__ == "__main__":
    main()
