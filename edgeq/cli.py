"""The ``edgeq`` command line: parse, call one stage, print. Logic lives in the stages."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from edgeq import __version__
from edgeq.errors import EdgeqError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A callback ``update(done, total)`` drawing a bar on a terminal and nothing elsewhere (CI logs)."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console

    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="edgeq")
def cli() -> None:
    """Quantize vision transformers with per-layer mixed precision and run them as integer code on edge boards."""


def model_options(command):
    """--model, --checkpoint and --random-init, shared by every command that loads a model."""
    command = click.option("--random-init", is_flag=True, help="Use random weights (timm models; for latency work).")(command)
    command = click.option("--checkpoint", type=click.Path(path_type=Path),
                           help="Weights (.safetensors or .pth) to load.")(command)
    return click.option("--model", "model_name", required=True, help="edgeq/<name> or a timm model name.")(command)


def calibration_options(command):
    command = click.option("--calib-seed", type=int, help="Seed for choosing calibration images (default: recipe's, else 0).")(command)
    command = click.option("--calib-count", type=click.IntRange(min=1),
                           help="Calibration images (default: recipe's, else 32).")(command)
    return click.option("--calib", required=True, metavar="DIR|ARCHIVE|RECIPE.yaml",
                        help="Calibration images: a folder, an archive, or a recipe in calibration/.")(command)


def load_calibration_option(model, calib: str, count: int | None, seed: int | None):
    from edgeq.data import data_config
    from edgeq.data.calibration import load_calibration, resolve_recipe

    return load_calibration(resolve_recipe(calib, count=count, seed=seed), data_config(model))


@cli.command("models")
@click.option("--timm", "pattern", metavar="PATTERN", help="Also list timm model names matching PATTERN (e.g. 'deit*').")
def models_command(pattern: str | None) -> None:
    """List the bundled reference models, and timm names that --model accepts."""
    from edgeq.models import list_reference_models
    from edgeq.models.weights_io import read_weights_metadata

    rows = []
    for ref in list_reference_models():
        meta = read_weights_metadata(ref.weights_path) if ref.weights_path.exists() else None
        if meta is None:
            weights = "missing"
        else:
            weights = f"val top-1 {meta['val_top1']:.2f} % (epoch {meta['epoch']}/{meta['epochs']})"
        rows.append((ref.name, weights, ref.summary))
    width = max(len(r[0]) for r in rows)
    click.echo("Bundled reference models (CIFAR-10, 32x32):")
    for name, weights, summary in rows:
        click.echo(f"  {name:<{width}}  {weights}\n  {'':<{width}}  {summary}")
    click.echo(
        "\nAny timm model name is accepted too (e.g. deit_tiny_patch16_224, swin_tiny_patch4_window7_224):\n"
        "pretrained weights are fetched when the network allows, else pass --checkpoint FILE\n"
        "(.safetensors or .pth) or --random-init."
    )
    if pattern:
        import timm

        names = timm.list_models(pattern)
        click.echo(f"\ntimm models matching {pattern!r}: {len(names)}")
        for name in names:
            click.echo(f"  {name}")


@cli.command("targets")
@click.argument("name", required=False)
def targets_command(name: str | None) -> None:
    """List the boards edgeq knows, or show one (NAME: a board, TVM tag or JSON target)."""
    import json

    from edgeq.targets import list_targets, load_target

    if name is None:
        for known in list_targets():
            spec = load_target(known)
            click.echo(f"  {known:<18} {spec.description}")
        click.echo("\n--target also takes a TVM tag (e.g. arm/rasp4b64) or a JSON target for boards not listed.")
        return
    click.echo(json.dumps(load_target(name).summary(), indent=2))


def load_model_option(model: str, checkpoint: Path | None, random_init: bool):
    from edgeq.models import create_model

    return create_model(model, checkpoint=checkpoint, pretrained=not random_init)


@cli.command("eval")
@model_options
@click.option("--data", required=True, help="ImageFolder folder or .tar/.tar.gz archive (relative paths also tried under $EDGEQ_DATA).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate a class-balanced subset of N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--quantized", type=click.Path(path_type=Path),
              help="Evaluate this quantized model (q.safetensors from `edgeq quantize`) of --model.")
def eval_command(model_name: str, checkpoint: Path | None, random_init: bool, data: str, limit: int | None,
                 batch_size: int, output: Path | None, quantized: Path | None) -> None:
    """Top-1/top-5 accuracy of a model (float, or quantized with --quantized) on an image folder or archive."""
    from edgeq.data import balanced_indices, data_config, load_image_folder
    from edgeq.evaluate import evaluate
    from edgeq.fileio import atomic_write_json

    model = load_model_option(model_name, checkpoint, random_init or quantized is not None)
    config = data_config(model)
    if quantized is not None:
        from edgeq.quant import load_quantized

        # The file holds every tensor, so the float weights it was made from are not needed.
        model = load_quantized(quantized, model)
    dataset = load_image_folder(data, config)
    indices = balanced_indices(dataset.labels, limit, seed=0) if limit else None
    with progress_bar("evaluating") as progress:
        metrics = evaluate(model, dataset, indices, batch_size=batch_size, progress=progress)
    result = {
        "model": model_name,
        **({"quantized": str(quantized)} if quantized is not None else {}),
        **metrics,
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "img_size": config["input_size"][-1],
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
        "data": str(data),
    }
    click.echo(
        f"{model_name}: top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  "
        f"on {result['num_images']} images of {data}"
    )
    if output is not None:
        atomic_write_json(output, result)
        click.echo(f"results written to {output}")


@cli.command("plan")
@model_options
@calibration_options
@click.option("--method", type=click.Choice(["lrp", "nuclear", "random"]), default="lrp", show_default=True,
              help="How layers are scored: LRP relevance, nuclear-norm sensitivity, or a random control.")
@click.option("--budget", "budgets", multiple=True, required=True, metavar="KIND=VALUE",
              help="avg-bits=4, weight-bytes=1.5MB, bops=1.2G or latency-ms=12 (with --latency-table); repeatable.")
@click.option("--latency-table", type=click.Path(path_type=Path), help="Per-layer latency table (JSON) for latency-ms budgets.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random control.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where the bit plan (JSON) goes.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw per-layer scores and chosen bits (PNG).")
def plan_command(model_name, checkpoint, random_init, calib, calib_count, calib_seed, method, budgets,
                 latency_table, seed, out, plot) -> None:
    """Choose per-layer bit widths under a budget and write a bit plan."""
    from edgeq.bitplan import write_plan
    from edgeq.plan import make_plan, parse_budgets, plan_metrics, plot_plan, layer_costs

    parse_budgets(list(budgets))  # a malformed budget fails before any model work
    model = load_model_option(model_name, checkpoint, random_init)
    images = None
    if method != "random":
        calibration = load_calibration_option(model, calib, calib_count, calib_seed)
        images = calibration.images
    plan, scores = make_plan(model, method, list(budgets), images, seed=seed, latency=latency_table,
                             model_name=model_name)
    write_plan(plan, out)
    metrics = plan_metrics(plan, layer_costs(model), latency=latency_table)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    click.echo(f"plan written to {out} ({method}; {summary})")
    if plot is not None:
        plot_plan(scores, plan, plot, title=f"{model_name}: {method}, {' '.join(budgets)}")
        click.echo(f"plot written to {plot}")


@cli.command("quantize")
@model_options
@click.option("--calib", metavar="DIR|ARCHIVE|RECIPE.yaml",
              help="Calibration images; without it, images are synthesized from the model (data-free, less accurate).")
@click.option("--calib-count", type=click.IntRange(min=1), help="Calibration images (default: recipe's, else 32).")
@click.option("--calib-seed", type=int, help="Seed for choosing calibration images (default: recipe's, else 0).")
@click.option("--bits", help="One width for every layer, e.g. w8a8 or w4a4 (default w8a8).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-layer bit plan (JSON) from `edgeq plan`.")
@click.option("--method", type=click.Choice(["lrp-qvit", "repq", "minmax"]), default="lrp-qvit", show_default=True)
@click.option("--reparam/--no-reparam", default=None, help="Ablation: post-LayerNorm channel-wise → layer-wise reparameterization.")
@click.option("--log2/--no-log2", default=None, help="Ablation: log√2 (as log2) quantizer for post-Softmax activations.")
@click.option("--clip/--no-clip", default=None, help="Ablation: LRP-QViT clipping of post-LayerNorm channel ranges.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where q.safetensors goes.")
def quantize_command(model_name, checkpoint, random_init, calib, calib_count, calib_seed, bits, plan_path, method,
                     reparam, log2, clip, out) -> None:
    """Calibrate and quantize a model with uniform bits or a bit plan; write q.safetensors."""
    import warnings

    from edgeq.bitplan import resolve_plan
    from edgeq.quant import quantize, save_quantized

    plan = resolve_plan(bits, plan_path)
    model = load_model_option(model_name, checkpoint, random_init)
    images = None
    if calib is not None:
        images = load_calibration_option(model, calib, calib_count, calib_seed).images
    else:
        click.echo("edgeq: warning: no --calib given: calibrating on images synthesized from the model", err=True)
    switches = {k: v for k, v in (("reparam", reparam), ("log2", log2), ("clip", clip)) if v is not None}
    with progress_bar("calibrating") as update, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-calibration warning was printed above
        qmodel = quantize(model, images, plan, method=method, progress=lambda d, t, _what: update(d, t), **switches)
    written = save_quantized(qmodel, out)
    click.echo(f"quantized {model_name} ({method}, {plan.provenance.get('spec') or plan_path}) → {written}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and their documented exit code."""
    try:
        cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
    except EdgeqError as exc:
        click.echo(f"edgeq: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("edgeq: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("edgeq: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
