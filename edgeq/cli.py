"""The ``edgeq`` command line: parse, call one stage, print. Logic lives in the stages."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.fileio import check_output_path

RANDOM_INIT_HELP = "Use seeded random weights, the same in every run (for latency work)."

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


class WidthList(click.ParamType):
    """``"4"`` or ``"2,3,4"``: distinct bit widths from 2 to 8, as a sorted tuple."""

    name = "widths"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            widths = sorted({int(part) for part in str(value).split(",")})
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of bit widths", param, ctx)
        if not widths or not all(2 <= w <= 8 for w in widths):
            self.fail(f"{value!r}: every width must be from 2 to 8", param, ctx)
        return tuple(widths)


def model_options(command):
    """--model, --checkpoint and --random-init, shared by every command that loads a model."""
    command = click.option("--random-init", is_flag=True, help=RANDOM_INIT_HELP)(command)
    command = click.option("--checkpoint", type=click.Path(path_type=Path),
                           help="Weights (.safetensors or .pth) to load.")(command)
    return click.option("--model", "model_name", required=True, help="edgeq/<name> or a timm model name.")(command)


class LazyChoice(click.Choice):
    """Choices from ``load()``, called when click first reads them: importing :mod:`edgeq.quant` loads torch
    (seconds), which commands that take no such option and ``edgeq --help`` should not wait for."""

    def __init__(self, load) -> None:  # click.Choice's would store the choices now
        self.case_sensitive = True
        self._load = load

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


def _quant_methods():
    from edgeq.quant.config import METHODS

    return METHODS


def _reconstruction_choices():
    from edgeq.quant.reconstruct import RECONSTRUCTION_CHOICES

    return RECONSTRUCTION_CHOICES


def quant_method_option(flag: str = "--method", help: str | None = None):
    return click.option(flag, type=LazyChoice(_quant_methods), default="lrp-qvit", show_default=True, help=help)


def calibration_options(command):
    command = click.option("--calib-seed", type=int, help="Seed for choosing calibration images (default: recipe's, else 0).")(command)
    command = click.option("--calib-count", type=click.IntRange(min=1),
                           help="Calibration images (default: recipe's, else 32).")(command)
    return click.option("--calib", required=True, metavar="DIR|ARCHIVE|RECIPE.yaml",
                        help="Calibration images: a folder, an archive, or a recipe in calibration/.")(command)


def reconstruction_options(command):
    """--reconstruct and --recon-iters, shared by quantize and build."""
    command = click.option("--recon-iters", type=click.IntRange(min=1), default=None,
                           help="Reconstruction iterations per block (default: ReconstructionConfig.iters, "
                                "edgeq/quant/reconstruct.py).")(command)
    return click.option("--reconstruct", type=LazyChoice(_reconstruction_choices), default="none",
                        show_default=True,
                        help="Block reconstruction after calibration: adaround (learned rounding + LSQ steps, "
                             "QDrop) or gptq (Hessian-guided rounding, no training loop, fast); auto: adaround when "
                             "some layer has 4 bits or fewer. Results are cached.")(command)


def device_option(command):
    """--device, shared by plan, quantize and build; checked before any model is loaded."""
    def check(_ctx, _param, value):
        from edgeq.quant.device import resolve_device

        resolve_device(value)  # DeviceUnavailableError (exit 24) before any work
        return value

    return click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]|auto",
                        callback=check,
                        help="Where calibration, sensitivity trials and reconstruction run: cpu, cuda, cuda:N, or "
                             "auto (the first CUDA device torch sees, else the CPU).")(command)


def check_calibration_option(calib: str, count: int | None, seed: int | None) -> None:
    """The recipe parses and its images exist: checked before the model loads (seconds to a minute)."""
    from edgeq.data.archive import resolve_data_path
    from edgeq.data.calibration import resolve_recipe

    resolve_data_path(resolve_recipe(calib, count=count, seed=seed).data)


def check_data_option(data: str) -> None:
    from edgeq.data.archive import resolve_data_path

    resolve_data_path(data)


def load_calibration_option(model, calib: str, count: int | None, seed: int | None):
    from edgeq.data import data_config
    from edgeq.data.calibration import load_calibration, resolve_recipe

    return load_calibration(resolve_recipe(calib, count=count, seed=seed), data_config(model))


@cli.command("models")
@click.option("--timm", "pattern", metavar="PATTERN",
              help="Also list timm model names containing PATTERN (e.g. 'deit'; wildcards like 'deit*tiny*' work too).")
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
            weights = f"val top-1 {meta['val_top1']:.2f} % when trained (epoch {meta['epoch']}/{meta['epochs']})"
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

        pattern = pattern.lower()  # timm's names are all lower case: "DeiT" finds the deit models
        wildcard = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = timm.list_models(wildcard)
        click.echo(f"\ntimm models matching {wildcard!r}: {len(names)}")
        for name in names:
            click.echo(f"  {name}")
        if not names:
            click.echo("  (none: names are lower case with underscores, e.g. deit_tiny_patch16_224; "
                       "`edgeq models --timm vit` lists many)")


@cli.command("targets")
@click.argument("name", required=False)
def targets_command(name: str | None) -> None:
    """List the boards edgeq knows, or show one (NAME: a board, TVM tag or JSON target)."""
    import json

    from edgeq.compile.targets import list_targets, load_target

    if name is None:
        for known in list_targets():
            spec = load_target(known)
            click.echo(f"  {known:<18} {spec.description}")
        click.echo("\n--target also takes a TVM tag (e.g. arm/rasp4b64) or a JSON target for boards not listed.")
        return
    from edgeq.lower.kernels.micro import kernel_family

    spec = load_target(name)
    click.echo(json.dumps({**spec.summary(), **kernel_family(spec)}, indent=2))


def check_outputs(*options: tuple[str, Path | None]) -> None:
    """Refuse unwritable output files before any work (see :func:`edgeq.fileio.check_output_path`)."""
    for option, path in options:
        if path is not None:
            check_output_path(path, option)


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

    check_outputs(("--output", output))
    check_data_option(data)  # cheap checks first: loading a model takes seconds to a minute
    if quantized is not None and not quantized.exists() and not quantized.is_symlink():
        from edgeq.errors import QuantizedModelError

        raise QuantizedModelError(f"quantized model {quantized} does not exist")
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
@click.option("--method", default="lrp", show_default=True, metavar="lrp|sensitivity|nuclear|mix|random",
              help="How layers are judged: LRP relevance, measured quantization sensitivity, nuclear-norm "
                   "sensitivity, mix (sensitivity weighted by LRP relevance), or a random control.")
@quant_method_option("--quant-method",
                     help="Quantization the sensitivity and mix trials use (as `edgeq quantize --method`).")
@click.option("--budget", "budgets", multiple=True, required=True, metavar="KIND=VALUE",
              help="avg-bits=4, weight-bytes=1.5MB, bops=1.2G or latency-ms=12 (with --latency-table); repeatable.")
@click.option("--latency-table", type=click.Path(path_type=Path), help="Per-layer latency table (JSON) for latency-ms budgets.")
@click.option("--w-bits", "w_bits", type=WidthList(), default="2,3,4,6,8", show_default=True, metavar="N[,N...]",
              help="Weight widths a layer may get.")
@click.option("--a-bits", "a_bits", type=WidthList(), default="4,6,8", show_default=True, metavar="N[,N...]",
              help="Activation widths a layer may get: one value fixes them all (4 for an A4 plan), several let "
                   "a bops or latency-ms budget choose (avg-bits and weight-bytes count weights only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random control.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where the bit plan (JSON) goes.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw per-layer scores and chosen bits (PNG).")
@click.option("--trial-reconstruct", type=click.Choice(["none", "gptq"]), default="none", show_default=True,
              help="sensitivity/mix: round each trial layer with GPTQ, so the damage is that of a reconstructed "
                   "layer (better 3-bit plans for reconstructed models, README; none: round to nearest).")
@device_option
def plan_command(model_name, checkpoint, random_init, calib, calib_count, calib_seed, method, quant_method, budgets,
                 latency_table, w_bits, a_bits, seed, out, plot, trial_reconstruct, device) -> None:
    """Choose per-layer bit widths under a budget and write a bit plan."""
    from edgeq.bitplan import write_plan
    from edgeq.plan import check_method, make_plan, parse_budgets, plan_metrics, plot_plan, layer_costs

    from edgeq.errors import PlanningError
    from edgeq.plan import load_latency_table
    from edgeq.plan.budget import LATENCY_MS

    check_method(method)  # cheap checks first: loading a model and calibrating take a minute
    if any(b.kind == LATENCY_MS for b in parse_budgets(list(budgets))) and latency_table is None:
        raise PlanningError("a latency-ms budget needs --latency-table (write one with `edgeq profile --per-op "
                            "--latency-table FILE`)")
    if latency_table is not None:
        load_latency_table(latency_table)
    check_outputs(("--out", out), ("--plot", plot))
    if method != "random":
        check_calibration_option(calib, calib_count, calib_seed)
    model = load_model_option(model_name, checkpoint, random_init)
    images = None
    if method != "random":
        calibration = load_calibration_option(model, calib, calib_count, calib_seed)
        images = calibration.images
    with progress_bar("measuring sensitivity") as update:
        plan, scores = make_plan(model, method, list(budgets), images, seed=seed, latency=latency_table,
                                 model_name=model_name, quant_method=quant_method, w_bits=w_bits, a_bits=a_bits,
                                 progress=lambda done, total, _layer: update(done, total), device=device,
                                 sensitivity_reconstruct=trial_reconstruct)
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
@quant_method_option()
@click.option("--reparam/--no-reparam", default=None, help="Ablation: post-LayerNorm channel-wise → layer-wise reparameterization.")
@click.option("--log2/--no-log2", default=None, help="Ablation: log√2 (as log2) quantizer for post-Softmax activations.")
@click.option("--clip/--no-clip", default=None, help="Ablation: LRP-QViT clipping of post-LayerNorm channel ranges.")
@reconstruction_options
@device_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where q.safetensors goes.")
def quantize_command(model_name, checkpoint, random_init, calib, calib_count, calib_seed, bits, plan_path, method,
                     reparam, log2, clip, reconstruct, recon_iters, device, out) -> None:
    """Calibrate and quantize a model with uniform bits or a bit plan; write q.safetensors."""
    import warnings

    from edgeq.bitplan import resolve_plan
    from edgeq.quant import quantize, save_quantized
    from edgeq.quant.reconstruct import resolve_reconstruction

    plan = resolve_plan(bits, plan_path)
    check_outputs(("--out", out))
    reconstruction = resolve_reconstruction(reconstruct, plan, recon_iters)
    if calib is not None:
        check_calibration_option(calib, calib_count, calib_seed)
    model = load_model_option(model_name, checkpoint, random_init)
    images = None
    if calib is not None:
        images = load_calibration_option(model, calib, calib_count, calib_seed).images
    else:
        click.echo("edgeq: warning: no --calib given: calibrating on images synthesized from the model", err=True)
    switches = {k: v for k, v in (("reparam", reparam), ("log2", log2), ("clip", clip)) if v is not None}
    with progress_bar("calibrating" + (" and reconstructing" if reconstruction else "")) as update, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-calibration warning was printed above
        qmodel = quantize(model, images, plan, method=method, progress=lambda d, t, _what: update(d, t),
                          reconstruction=reconstruction, device=device, **switches)
    written = save_quantized(qmodel, out)
    click.echo(f"quantized {model_name} ({method}, {plan.provenance.get('spec') or plan_path}) → {written}")


@cli.command("build")
@click.option("--model", "model_name", default="edgeq/vit-cifar10", show_default=True,
              help="edgeq/<name> or a timm model name.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Weights (.safetensors or .pth) to load.")
@click.option("--random-init", is_flag=True, help=RANDOM_INIT_HELP)
@click.option("--calib", metavar="DIR|ARCHIVE|RECIPE.yaml",
              help="Calibration images (default: calibration/cifar10-32.yaml for the bundled models, "
                   "else images synthesized from the model).")
@click.option("--calib-count", type=click.IntRange(min=1), help="Calibration images (default: recipe's, else 32).")
@click.option("--calib-seed", type=int, help="Seed for choosing calibration images (default: recipe's, else 0).")
@click.option("--bits", help="One width for every layer, e.g. w8a8 or w4a4 (default w8a8).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-layer bit plan (JSON) from `edgeq plan`.")
@quant_method_option()
@click.option("--float", "float_model", is_flag=True, help="Build the unquantized model (float kernels).")
@reconstruction_options
@device_option
@click.option("--target", required=True, metavar="NAME|TAG|JSON",
              help="A board from `edgeq targets`, a TVM tag, or a JSON target.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Artifact directory (default build/<model>-<target>); replaced only when the build succeeds.")
@click.option("--eval-data", metavar="DIR|ARCHIVE",
              help="Images for the accuracies in the manifest (default: CIFAR-10 val for the bundled models).")
@click.option("--eval-limit", type=click.IntRange(min=0), default=500, show_default=True,
              help="Class-balanced images for the accuracies; 0 skips them.")
@click.option("--tuning-db", type=click.Path(path_type=Path),
              help="MetaSchedule database from `edgeq tune` (e.g. build/NAME.tuning): tuned float-op schedules.")
def build_command(model_name, checkpoint, random_init, calib, calib_count, calib_seed, bits, plan_path, method,
                  float_model, reconstruct, recon_iters, device, target, out, eval_data, eval_limit,
                  tuning_db) -> None:
    """Quantize, lower to integer kernels and compile for a board: writes an artifact directory."""
    from edgeq.compile.artifact import load_artifact
    from edgeq.compile.build import BuildConfig, build_artifact, is_reference
    from edgeq.compile.targets import load_target

    if float_model and (bits or plan_path):
        raise click.UsageError("--float builds the unquantized model: drop --bits/--plan")
    if out is None:
        out = Path("build") / f"{model_name.rsplit('/', 1)[-1]}-{load_target(target).name.replace('/', '-')}"
    config = BuildConfig(target=target, model=model_name, checkpoint=str(checkpoint) if checkpoint else None,
                         random_init=random_init, calib=calib, calib_count=calib_count, calib_seed=calib_seed,
                         bits=bits, plan=str(plan_path) if plan_path else None, method=method,
                         float_model=float_model, reconstruct=reconstruct, recon_iters=recon_iters, device=device,
                         eval_data=eval_data, eval_limit=eval_limit,
                         tuning_db=str(tuning_db) if tuning_db else None)
    if calib is None and not float_model and not is_reference(model_name):
        click.echo("edgeq: warning: no --calib given: calibrating on images synthesized from the model", err=True)
    with stage_progress() as progress:
        path = build_artifact(config, out, progress=progress)
    manifest = load_artifact(path, verify=False).manifest
    accuracy = manifest.accuracy
    summary = f"{manifest.precision}, {manifest.weights.bytes:,} weight bytes"
    if accuracy is not None:
        summary += (f"; top-1 on {accuracy.images} images: float {accuracy.fp_top1:.2f} %, compiled "
                    f"{accuracy.compiled_top1:.2f} %")
    if manifest.tuning is not None:
        summary += f"; tuned schedules for {len(manifest.tuning.applied)} PrimFunc(s)"
    click.echo(f"built {model_name} for {manifest.target.name} → {path} ({summary})")


@contextmanager
def stage_progress() -> Iterator:
    """``progress(stage, done, total)`` for multi-stage commands: a bar on a terminal, stage lines elsewhere."""
    if not sys.stderr.isatty():
        seen: list[str] = []

        def plain(stage: str, done, total) -> None:
            if not seen or seen[-1] != stage:
                seen.append(stage)
                click.echo(f"edgeq: {stage}", err=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    # elapsed for the whole command, remaining for the stage that counts its steps (calibration, reconstruction)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(stage: str, done, total) -> None:
            bar.update(task, description=stage, completed=done or 0, total=total)

        yield update


@contextmanager
def plan_progress() -> Iterator:
    """``progress(plan, step, done, total)`` for `edgeq profile`: on a terminal a bar with ETA per plan (boards
    measure plans in parallel), elsewhere a line when a plan's step changes."""
    if not sys.stderr.isatty():
        last: dict[str, str] = {}

        def plain(plan: str, step: str, done, total) -> None:
            if last.get(plan) != step:
                last[plan] = step
                unit = {"timing": "rounds", "checking accuracy": "images"}.get(step, "calls")
                click.echo(f"edgeq: {plan}: {step} ({total} {unit})", err=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, tuple[int, str]] = {}

        def update(plan: str, step: str, done, total) -> None:
            task, shown = tasks.get(plan) or (bar.add_task(plan, total=None), "")
            tasks[plan] = (task, step)
            if step != shown:  # a new step restarts the bar, so the ETA is the step's own
                bar.reset(task, description=f"{plan}: {step}", completed=done, total=total)
            else:
                bar.update(task, completed=done, total=total)

        yield update


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the files (faster for large libraries).")
def inspect_command(artifact: Path, as_json: bool, no_verify: bool) -> None:
    """Show what a build directory holds: target, bits and bytes per layer, accuracies, versions, golden batch."""
    import json

    from edgeq.compile.artifact import inspect_sections, load_artifact

    loaded = load_artifact(artifact, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(loaded.manifest.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    for title, columns, rows in inspect_sections(loaded.manifest):
        table = Table(title=title, title_justify="left", show_header=any(columns))
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row, style="bold" if row and row[0] == "total" else None)
        console.print(table)


def _timeout_to_env(variable: str):
    """A click callback that hands an option's seconds to the RPC layer through its environment variable."""
    def store(_ctx, _param, seconds: float | None) -> None:
        import os

        if seconds is not None:
            os.environ[variable] = repr(seconds)
    return store


def board_options(command):
    """--rpc, or --rpc-tracker with --rpc-key (else the TVM_TRACKER_HOST/PORT/KEY variables); RPC time limits."""
    seconds = click.FloatRange(min=0, min_open=True)
    command = click.option("--rpc-timeout", type=seconds, metavar="SECONDS", expose_value=False,
                           callback=_timeout_to_env("EDGEQ_RPC_TIMEOUT"),
                           help="Longest one upload, load or run on the board may take before exit 71 "
                                "(default: $EDGEQ_RPC_TIMEOUT, else 600).")(command)
    command = click.option("--rpc-connect-timeout", type=seconds, metavar="SECONDS", expose_value=False,
                           callback=_timeout_to_env("EDGEQ_RPC_CONNECT_TIMEOUT"),
                           help="Longest reaching the board and its RPC handshake may take before exit 70 "
                                "(default: $EDGEQ_RPC_CONNECT_TIMEOUT, else 30).")(command)
    command = click.option("--rpc-key", "rpc_key", metavar="KEY",
                           help="Board key at the tracker (default: $TVM_TRACKER_KEY, else the target's).")(command)
    command = click.option("--rpc-tracker", "rpc_tracker", metavar="HOST[:9190]",
                           help="RPC tracker (default: $TVM_TRACKER_HOST:$TVM_TRACKER_PORT).")(command)
    return click.option("--rpc", metavar="HOST:PORT",
                        help="The board's RPC server, directly (default: the one board `edgeq board start` "
                             "left running here, when no tracker is set).")(command)


# qemu-user's aarch64 models that match an edgeq target's features (qemu-aarch64 -cpu help lists them all)
EMULATED_CPUS = ("cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "max")


@cli.group("board")
def board_group() -> None:
    """Start, stop and list boards edgeq runs on this machine (the emulated aarch64 board)."""


@board_group.command("start")
@click.option("--emulated", is_flag=True, help="The emulated aarch64 board (qemu-user); required for now.")
@click.option("--port", type=click.IntRange(1, 65535), help="RPC port (default: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless asked).")
@click.option("--tracker", metavar="HOST:PORT", help="Register with this RPC tracker.")
@click.option("--key", help="Key to register under at the tracker (default rasp4-emulated).")
@click.option("--cpu", type=click.Choice(EMULATED_CPUS), default="cortex-a72", show_default=True,
              help="qemu's CPU model: cortex-a72 as a Raspberry Pi 4, cortex-a76 as a Pi 5 (dot product), max for "
                   "every feature qemu has (int8 matrix multiply: orion-o6 builds).")
def board_start_command(emulated: bool, port: int | None, host: str, tracker: str | None, key: str | None,
                        cpu: str) -> None:
    """Start a board in the background and print its address (`edgeq board stop` ends it)."""
    from edgeq.boards.background import start_emulated_in_background

    if not emulated:
        raise click.UsageError("only --emulated boards can be started here; a real board runs deploy/board-setup.sh")
    if key and not tracker:
        raise click.UsageError("--key only means something with --tracker")
    if not _is_loopback(host):
        click.echo(f"edgeq: warning: --host {host} lets anyone who can reach this machine's port use the board: "
                   "its RPC server loads and runs whatever code it is sent, unauthenticated; keep 127.0.0.1 "
                   "unless the network is trusted", err=True)
    click.echo("edgeq: starting the emulated aarch64 board (builds its sysroot once; 15-20 s to serve)", err=True)
    board = start_emulated_in_background(port, tracker, key, host=host, cpu=cpu,
                                         log=lambda message: click.echo(f"edgeq: {message}", err=True))
    click.echo(f"{board.describe()} serving after {board.start_seconds} s")
    if board.tracker:
        click.echo(f"use: --rpc-tracker {board.tracker} --rpc-key {board.key}")
    else:
        click.echo(f"use: --rpc {board.address}")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@board_group.command("stop")
@click.option("--port", type=click.IntRange(1, 65535), help="Stop only the board on this port (default: all).")
def board_stop_command(port: int | None) -> None:
    """Stop boards started with `edgeq board start` (server and worker processes)."""
    from edgeq.boards.background import select_boards, stop_board

    boards = select_boards(port)
    if not boards:
        click.echo("no board started by edgeq is recorded")
    for board in boards:
        was = stop_board(board)
        click.echo(f"stopped {board.describe()}" if was else f"{board.describe()} was no longer running; forgotten")


@board_group.command("status")
def board_status_command() -> None:
    """List boards started with `edgeq board start`, and whether they serve."""
    from edgeq.boards.background import list_boards

    boards = list_boards()
    if not boards:
        click.echo("no board started by edgeq is recorded")
    for board in boards:
        state = "serving" if board.alive() and board.listening() else ("running, not answering" if board.alive()
                                                                         else "not running")
        click.echo(f"{board.describe()}: {state}; log {board.log}")


@cli.command("deploy")
@click.argument("artifact", type=click.Path(path_type=Path))
@board_options
@click.option("--output", type=click.Path(path_type=Path), help="Also write the report as JSON here.")
def deploy_command(artifact: Path, rpc, rpc_tracker, rpc_key, output: Path | None) -> None:
    """Verify an artifact, load it on a board and compare its golden batch (exit 1 on a mismatch)."""
    from edgeq.boards.deploy import deploy_artifact
    from edgeq.fileio import atomic_write_json

    check_outputs(("--output", output))
    result = deploy_artifact(artifact, rpc=rpc, tracker=rpc_tracker, key=rpc_key)
    click.echo(result.report())
    if output is not None:
        atomic_write_json(output, result.to_json())
    if not result.ok:
        sys.exit(1)


@cli.command("check")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", required=True, metavar="DIR|ARCHIVE", help="Validation images (ImageFolder or archive).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Class-balanced images to run.")
@board_options
@click.option("--output", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def check_command(artifact: Path, data: str, limit: int, rpc, rpc_tracker, rpc_key, output: Path | None) -> None:
    """On-device top-1 and agreement with the host library (integer builds must be exact; exit 1 otherwise)."""
    from edgeq.boards.check import check_artifact
    from edgeq.fileio import atomic_write_json

    check_outputs(("--output", output))
    with progress_bar("checking") as progress:
        result = check_artifact(artifact, data, limit, rpc=rpc, tracker=rpc_tracker, key=rpc_key, progress=progress)
    click.echo(result.report())
    if output is not None:
        atomic_write_json(output, result.to_json())
        click.echo(f"report written to {output}")
    if not result.ok:
        sys.exit(1)


@cli.command("profile")
@click.option("--target", required=True, metavar="NAME|TAG|JSON", help="The board's target (as for `edgeq build`).")
@click.option("--plans", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Bit plans (JSON): --plans a.json b.json ... (or repeat --plans).")
@click.argument("more_plans", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="edgeq/vit-cifar10", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path))
@click.option("--random-init", is_flag=True, help=RANDOM_INIT_HELP)
@click.option("--calib", metavar="DIR|ARCHIVE|RECIPE.yaml", help="Calibration images (as for `edgeq build`).")
@quant_method_option()
@board_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Results folder: results.json, results.csv, pareto.png, artifacts/.")
@click.option("--repeat", type=click.IntRange(min=2), default=10, show_default=True, help="Timed runs per plan.")
@click.option("--per-op", is_flag=True, help="Also time each integer kernel on the board.")
@click.option("--data", metavar="DIR|ARCHIVE", help="Check accuracy on the board on these images.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Images for --data.")
@click.option("--latency-table", type=click.Path(path_type=Path),
              help="Write the planner's per-layer latency table here (needs --per-op).")
def profile_command(target, plans, more_plans, model_name, checkpoint, random_init, calib, method, rpc, rpc_tracker, rpc_key,
                    out, repeat, per_op, data, limit, latency_table) -> None:
    """Build, deploy, time and check each bit plan on a board; results table, CSV and Pareto plot."""
    from edgeq.compile.build import BuildConfig
    from edgeq.boards.profile import ProfileConfig, format_table, profile_plans

    if latency_table is not None and not per_op:
        raise click.UsageError("--latency-table needs --per-op")
    check_outputs(("--latency-table", latency_table))
    check_output_path(out, "--out", directory=True)
    if rpc is None and rpc_tracker is None:
        from edgeq.runtime import started_board_address

        rpc = started_board_address()
    build = BuildConfig(target=target, model=model_name, checkpoint=str(checkpoint) if checkpoint else None,
                        random_init=random_init, calib=calib, method=method)
    config = ProfileConfig(build, plans=list(plans) + list(more_plans), out=out, rpc=rpc, tracker=rpc_tracker,
                           key=rpc_key, repeat=repeat, per_op=per_op, data=data, limit=limit if data else None,
                           latency_table=latency_table)
    with plan_progress() as progress:
        outcome = profile_plans(config, log=lambda message: click.echo(f"edgeq: {message}", err=True),
                                progress=progress)
    click.echo(format_table(outcome.rows))
    click.echo(f"results: {out}/results.json, {out}/results.csv, {out}/pareto.png"
               + (f"; latency table {latency_table}" if latency_table else ""))


@cli.command("tune")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", metavar="NAME|TAG|JSON",
              help="Target to tune for (default: an artifact's own; required for an ONNX file).")
@click.option("--trials", type=click.IntRange(min=1), default=64, show_default=True,
              help="Measured candidates in all (MetaSchedule trial budget).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Database directory (default: <artifact>.tuning beside an artifact, <file>.tuning for an ONNX file).")
@board_options
def tune_command(source: Path, target: str | None, trials: int, out: Path | None, rpc, rpc_tracker, rpc_key) -> None:
    """MetaSchedule-tune the float ops of an artifact (build/NAME) or ONNX file; hand-written kernels stay.

    Candidates run on this machine for the host target, on the board given by --rpc/--rpc-tracker otherwise;
    rebuild with `edgeq build --tuning-db DIR` to use the database."""
    from edgeq.compile.tune import default_database, tune_onnx, tune_source

    onnx_path, target, integer = tune_source(source, target)
    if not target:
        raise click.UsageError("--target is needed to tune an ONNX file")
    database = out or default_database(source)
    check_output_path(database, "--out", directory=True)
    result = tune_onnx(onnx_path, target, database, trials=trials, integer=integer, rpc=rpc, tracker=rpc_tracker,
                       key=rpc_key)
    click.echo(f"tuned {result.tasks} operators with {result.trials} trials measured on {result.measured_on} "
               f"({result.records} records): {database}")
    click.echo(f"use: edgeq build --target {target} ... --tuning-db {database}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and their documented exit code; SIGINT and SIGTERM
    exit 130 and 143 whatever exception carried them out of TVM (see :mod:`edgeq.interrupt`)."""
    from edgeq import interrupt

    try:
        _run_reporting_errors(argv)
    finally:
        interrupt.clear()  # the process may go on (tests, notebooks): the next command starts afresh


def _run_reporting_errors(argv: list[str] | None) -> None:
    from edgeq import interrupt

    try:
        with interrupt.handled():
            cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
            interrupt.raise_if_interrupted()  # a signal swallowed on the way must still end in 130/143
    except interrupt.Interrupted as exc:
        _exit_interrupted(exc.signum)
    except EdgeqError as exc:
        if interrupt.pending():
            _exit_interrupted(interrupt.pending())
        click.echo(f"edgeq: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _exit_interrupted(interrupt.pending() or 2)
    except click.UsageError as exc:  # click's own form takes four lines (usage, hint, blank, error)
        command = exc.ctx.command_path if exc.ctx is not None else "edgeq"
        click.echo(f"edgeq: error: {one_line(exc.format_message())} (see `{command} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _exit_interrupted(2)
    except Exception:
        if interrupt.pending():  # the signal reached us wrapped in another error (TVM's RuntimeError)
            _exit_interrupted(interrupt.pending())
        raise


def one_line(message: str) -> str:
    """Errors quoting other tools (tarfile, YAML, TVM) can span lines; the house rule is one line."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip())


def _exit_interrupted(signum: int) -> None:
    click.echo("edgeq: interrupted" if signum == 2 else f"edgeq: terminated (signal {signum})", err=True)
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
