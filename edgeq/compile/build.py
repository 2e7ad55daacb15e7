"""``edgeq build``: from a timm model to a deployable artifact directory (see :mod:`edgeq.compile.artifact`).

Stages, each a plain function of the one before::

    calibrate -> (plan) -> quantize -> export ONNX -> import to Relax -> integer lowering
              -> compile for the target (model.so) and for this host (host.so) -> golden batch -> accuracies

in three steps: :func:`prepare_build` resolves and checks everything that can fail early (target, toolchain,
plan, model, evaluation data), :func:`compile_artifact` writes every file and returns the
:class:`edgeq.compile.artifact.Manifest` that describes them, :func:`write_artifact_manifest` hashes the files into it and
seals it.

The integer program is built twice, once per target: the kernels' micro-kernels differ between x86 and ARM,
their integer results do not, so the host library's outputs are the exact reference a board must reproduce.

The output directory is written atomically: everything goes to ``PARENT/.NAME.<pid>.partial`` and is renamed
into place only after the manifest is written, so a failed or interrupted build leaves an earlier artifact of the
same name untouched. A build holds ``PARENT/.NAME.lock`` from start to end: a second build into the same
directory fails at once (:class:`edgeq.errors.OutputBusyError`).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgeq import __version__
from edgeq.compile import artifact as A
from edgeq.bitplan import storage_bits
from edgeq.errors import ArtifactError, BitPlanError
from edgeq.fileio import check_output_path, exclusive_output, remove_stale_partials, replace_directory
from edgeq.interrupt import deferred, raise_if_interrupted

#: ``progress(stage, done, total)``: a stage name, and how far it is when it has steps (else None, None).
Progress = Callable[[str, Optional[int], Optional[int]], None]

DEFAULT_MODEL = "edgeq/vit-cifar10"
DEFAULT_EVAL_LIMIT = 500
GOLDEN_COUNT = 8
#: Float builds compare board and host outputs with this tolerance (integer builds must match exactly).
FLOAT_ATOL = 1e-4
#: Per output channel, besides the weights (the "plus scales" of the size check): a float32 scale, an int32 bias
#: and the float32 rounding residual of that bias, which the integer lowering keeps so that layers whose output
#: returns to float lose nothing to the bias rounding (edgeq.lower.integer.kernel_constants).
CHANNEL_OVERHEAD_BYTES = 12
#: How far the artifact's weight bytes may be from the expected figure.
WEIGHT_BYTES_TOLERANCE = 0.05

_REPO = Path(__file__).resolve().parents[2]
#: Calibration recipe and validation data of the bundled reference models.
REFERENCE_CALIBRATION = _REPO / "calibration" / "cifar10-32.yaml"
REFERENCE_EVAL_DATA = "cifar10/val.tar.gz"


@dataclass(frozen=True)
class BuildConfig:
    """What to build: plain values, as the command line gives them."""

    target: str = "host"
    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    random_init: bool = False
    calib: Optional[str] = None          # folder, archive or recipe; None: the reference recipe, else synthetic
    calib_count: Optional[int] = None
    calib_seed: Optional[int] = None
    bits: Optional[str] = None           # "w8a8"; None with no plan: w8a8
    plan: Optional[str] = None           # plan.json path
    method: str = "lrp-qvit"
    float_model: bool = False            # build the unquantized model
    reconstruct: str = "none"            # block reconstruction after calibration: none | adaround | auto
    recon_iters: Optional[int] = None    # None: ReconstructionConfig's default
    device: Optional[str] = None         # where calibration and reconstruction run (edgeq.quant.device); None: cpu
    eval_data: Optional[str] = None      # None: the reference models' CIFAR-10 val set, else no accuracy
    eval_limit: Optional[int] = DEFAULT_EVAL_LIMIT  # 0: skip the accuracy stage
    golden_count: int = GOLDEN_COUNT
    tuning_db: Optional[str] = None      # `edgeq tune` database for the float ops of CPU targets


def _say(progress: Optional[Progress], stage: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
    raise_if_interrupted()  # every stage boundary: a Ctrl-C that TVM turned into a caught error stops here
    if progress is not None:
        progress(stage, done, total)


# --- checks that run before any long work ----------------------------------------------------------------------

def check_integer_target(spec, plan) -> None:
    """Refuse an integer build for a target without integer kernels, naming what it lacks and what works.

    The kernels exist for CPUs (llvm: x86 AVX2, ARM NEON / dot product, generic vectors) and CUDA GPUs with the
    int8 dot product ``__dp4a`` (sm_61 and newer); OpenCL/Vulkan devices and older CUDA GPUs run float only.
    """
    default = plan.default
    what = f"integer plan (default w{default.w}a{default.a})"
    kind = spec.kind
    if kind == "cuda":
        arch = str(spec.target.get("arch", ""))
        digits = "".join(ch for ch in arch if ch.isdigit())
        if digits and int(digits) < 61:
            raise BitPlanError(
                f"{spec.name} ({arch}) cannot run the {what}: edgeq's int8 CUDA kernels use __dp4a, which needs "
                "sm_61 or newer; build it with --float instead")
    elif kind not in ("llvm", "c"):
        raise BitPlanError(
            f"{spec.name} ({kind}) cannot run the {what}: edgeq's integer kernels exist for CPUs (llvm) and CUDA "
            "GPUs (sm_61+); build it with --float instead")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that cannot take an artifact: a file, or a folder holding something else."""
    check_output_path(out_dir, "--out", directory=True)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / A.MANIFEST).is_file():
        raise ArtifactError(f"--out {out_dir} exists and is not an edgeq artifact; choose another directory "
                            "(an earlier artifact there would be replaced, anything else is kept)")


def prepare_out_dir(out_dir: Path) -> Path:
    """The partial directory this process builds in (call while holding the output's lock)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    remove_stale_partials(out_dir)  # left by killed builds: the lock says none of them is still running
    partial = out_dir.parent / f".{out_dir.name}.{os.getpid()}.partial"
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, out_dir: Path) -> Path:
    """Move the finished ``partial`` into ``out_dir``, replacing an earlier artifact only now."""
    return replace_directory(partial, out_dir)


# --- stages ------------------------------------------------------------------------------------------------------

def load_model(config: BuildConfig):
    from edgeq.models import create_model

    return create_model(config.model, checkpoint=config.checkpoint, pretrained=not config.random_init)


def is_reference(name: str) -> bool:
    from edgeq.models.reference import REFERENCE_MODELS

    return name in REFERENCE_MODELS


def calibration_images(config: BuildConfig, model) -> tuple[Optional[Any], A.Calibration]:
    """Calibration images (None: synthesized by the quantizer) and the manifest's ``calibration`` entry."""
    from edgeq.data import data_config
    from edgeq.data.calibration import load_calibration, resolve_recipe

    spec = config.calib
    if spec is None and is_reference(config.model):
        spec = str(REFERENCE_CALIBRATION)
    if spec is None:
        return None, A.Calibration(source="synthetic")
    calibration = load_calibration(resolve_recipe(spec, count=config.calib_count, seed=config.calib_seed),
                                   data_config(model))
    recipe = calibration.recipe
    if spec == str(REFERENCE_CALIBRATION):
        spec = str(REFERENCE_CALIBRATION.relative_to(_REPO))  # the same recipe in every checkout
    source = recipe.data if spec == recipe.data else f"{spec} ({recipe.data})"
    return calibration.images, A.Calibration(source=source, sha256=calibration.digest,
                                             images=int(calibration.images.shape[0]), seed=recipe.seed)


def check_build_inputs(config: BuildConfig) -> None:
    """The build's data inputs, checked in a moment before the model is loaded (which can take a minute): the
    calibration recipe parses and its data exists, the evaluation data exists."""
    from edgeq.data.archive import resolve_data_path
    from edgeq.data.calibration import resolve_recipe

    calib = config.calib if config.calib is not None else (
        str(REFERENCE_CALIBRATION) if is_reference(config.model) else None)
    if calib is not None and not config.float_model:
        resolve_data_path(resolve_recipe(calib, count=config.calib_count, seed=config.calib_seed).data)
    data = config.eval_data if config.eval_data is not None else (
        REFERENCE_EVAL_DATA if is_reference(config.model) else None)
    if data is not None and config.eval_limit != 0:
        resolve_data_path(data)


def eval_set(config: BuildConfig, model):
    """``(images, labels, data)`` of the balanced accuracy subset, or None when there is none to use."""
    import torch

    from edgeq.data import balanced_indices, data_config, load_image_folder
    from edgeq.evaluate import check_class_count

    data = config.eval_data
    if data is None and is_reference(config.model):
        data = REFERENCE_EVAL_DATA
    if data is None or config.eval_limit == 0:
        return None
    dataset = load_image_folder(data, data_config(model))
    check_class_count(model, dataset)
    indices = balanced_indices(dataset.labels, config.eval_limit, seed=0) if config.eval_limit else \
        list(range(len(dataset)))
    images, labels = zip(*(dataset[i] for i in indices))
    return torch.stack(images), torch.tensor(labels), str(data)


def quantize_model(config: BuildConfig, model, plan, images, progress: Optional[Progress]):
    from edgeq.quant import SyntheticCalibrationWarning, quantize
    from edgeq.quant.reconstruct import resolve_reconstruction

    reconstruction = resolve_reconstruction(config.reconstruct, plan, config.recon_iters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntheticCalibrationWarning)  # the manifest says "synthetic"
        return quantize(model, images, plan, method=config.method, reconstruction=reconstruction, device=config.device,
                        progress=lambda done, total, _what: _say(progress, "quantizing", done, total))


def _reconstruction_entry(qmodel) -> Optional[A.Reconstruction]:
    """The manifest's ``reconstruction``: how the rounding and steps were learned (None: calibration only)."""
    record = (qmodel.metadata.get("reconstruction") if qmodel is not None else None) or None
    if record is None:
        return None
    return A.Reconstruction.from_json(record)


def weight_layout(qmodel, constants: dict[str, np.ndarray]) -> A.Weights:
    """The manifest's ``weights`` entry: bytes stored per layer against params x bits / 8 plus scales."""
    layers: dict[str, tuple[int, int, int]] = {}  # layer -> (w_bits, params, output channels)
    for name, module in qmodel.layers.items():
        spec = qmodel.metadata["layers"][name]
        if spec.get("w_bits") is None or not hasattr(module, "weight_int"):
            continue
        layers[name] = (int(spec["w_bits"]), int(module.weight_int.numel()), int(module.weight_int.shape[0]))
    stored = dict.fromkeys(layers, 0)
    other = 0
    # keys are "<layer>.<param>": give each to the longest layer name it starts with
    names = sorted(layers, key=len, reverse=True)
    for key, array in constants.items():
        owner = next((n for n in names if key.startswith(n + ".")), None)
        if owner is None:
            other += int(array.nbytes)
        else:
            stored[owner] += int(array.nbytes)
    by_layer = {name: A.LayerWeights(w=w, stored_bits=storage_bits(w), params=params, bytes=stored[name],
                                     expected_bytes=-(-params * w // 8) + channels * CHANNEL_OVERHEAD_BYTES)
                for name, (w, params, channels) in layers.items()}
    return A.Weights(bytes=sum(stored.values()) + other,
                     expected_bytes=sum(e.expected_bytes for e in by_layer.values()),
                     params=sum(e.params for e in by_layer.values()), other_bytes=other, by_layer=by_layer)


def float_weight_layout(model) -> A.Weights:
    params = sum(int(p.numel()) for p in model.parameters())
    return A.Weights(bytes=params * 4, expected_bytes=params * 4, params=params, other_bytes=0, by_layer={})


def save_weights(path: Path, constants: dict[str, np.ndarray], precision: str) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(constants.items())}
    save_file(arrays, str(path), metadata={"format": "edgeq.weights", "precision": precision})


def compile_library(onnx_path: Path, spec, precision: str, path: Path, tuning_db, progress: Optional[Progress]):
    """:func:`edgeq.lower.lower_model` for ``spec`` (its stages told to ``progress``), linked into ``path``."""
    from edgeq.compile.library import export_library
    from edgeq.lower import lower_model

    lowered = lower_model(onnx_path, spec, precision, tuning_db=tuning_db,
                          progress=lambda stage: _say(progress, f"{stage} for {spec.name}"))
    export_library(lowered.module, spec, path)
    return lowered


def _torch_logits(model, images, batch_size: int = 100) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def accuracies(float_model, qmodel, runner, evaluation, progress: Optional[Progress]) -> A.Accuracy:
    """Top-1 of the float and fake-quant PyTorch models and of ``runner`` (the compiled library) on the
    evaluation images."""
    images, labels, data = evaluation
    labels = labels.numpy()
    _say(progress, "accuracy: PyTorch")
    fp = _torch_logits(float_model, images).argmax(1)
    fake = _torch_logits(qmodel, images).argmax(1) if qmodel is not None else fp
    compiled = []
    for i in range(0, len(images), 25):
        compiled.append(runner(images[i:i + 25].numpy()).argmax(1))
        _say(progress, "accuracy: compiled", min(i + 25, len(images)), len(images))
    compiled = np.concatenate(compiled)
    pct = lambda hits: round(100.0 * float(np.mean(hits)), 3)  # noqa: E731
    return A.Accuracy(data=data, images=int(len(labels)), fp_top1=pct(fp == labels),
                      quant_top1=pct(fake == labels) if qmodel is not None else None,
                      compiled_top1=pct(compiled == labels), agreement_compiled_vs_fakequant=pct(compiled == fake))


def versions() -> dict[str, str]:
    import onnx
    import timm
    import torch
    import tvm

    return {"edgeq": __version__, "tvm": tvm.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def weights_digest(config: BuildConfig) -> Optional[str]:
    """sha256 of the float weights file the model was loaded from (the bundled weights change as training goes
    on, so the name alone does not say which weights an artifact holds); None for random or hub weights."""
    from edgeq.models.reference import REFERENCE_MODELS

    if config.checkpoint:
        return A.file_sha256(Path(config.checkpoint))
    if config.random_init or config.model not in REFERENCE_MODELS:
        return None
    return A.file_sha256(REFERENCE_MODELS[config.model].weights_path)


def model_entry(config: BuildConfig, model) -> A.ModelInfo:
    from edgeq.data import data_config
    from edgeq.evaluate import model_num_classes

    data = data_config(model)
    return A.ModelInfo(name=config.model, checkpoint=str(config.checkpoint) if config.checkpoint else None,
                       weights_sha256=weights_digest(config), num_classes=model_num_classes(model),
                       input_size=list(data["input_size"]), mean=list(data["mean"]), std=list(data["std"]),
                       interpolation=data.get("interpolation"), crop_pct=data.get("crop_pct"),
                       crop_mode=data.get("crop_mode"))


def target_entry(spec, host_spec) -> A.TargetInfo:
    from edgeq.lower.kernels.micro import kernel_family

    return A.TargetInfo(name=spec.name, tvm=spec.target, host=spec.host, arch=spec.arch, rpc_key=spec.rpc_key,
                        device=spec.device_kind,
                        reference=host_spec.target if host_spec is not None else spec.target, **kernel_family(spec))


# --- the whole build ---------------------------------------------------------------------------------------------

def build_artifact(config: BuildConfig, out_dir: str | os.PathLike, progress: Optional[Progress] = None, *,
                   model=None) -> Path:
    """Build ``config`` into the artifact directory ``out_dir`` and return its path.

    ``model``: an already created float model to use instead of loading ``config.model`` (tests, notebooks).
    Bad input raises the matching :mod:`edgeq.errors` class before long work starts where it can be seen early
    (an output path that is not an artifact or is busy, unknown target, missing toolchain, a plan the kernels
    cannot run).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    check_build_inputs(config)  # inputs are refused before the output's lock file is made
    database = None
    if config.tuning_db is not None:  # the one check of the database, before the output's lock
        from edgeq.lower.tuning_database import TuningDatabase

        database = TuningDatabase.open(config.tuning_db, option="--tuning-db")
    with exclusive_output(out_dir, "--out"):
        return _build_holding_lock(config, out_dir, progress, model, database)


@dataclass
class Prepared:
    """What a build resolved and checked before any long work: its targets, plan, model and evaluation images."""

    config: BuildConfig
    spec: Any                  # the target's TargetSpec
    host_spec: Any             # this host's, when the target is another machine (it compiles the reference)
    plan: Any                  # the BitPlan; None for float builds
    model: Any                 # the float model
    model_info: A.ModelInfo
    evaluation: Any            # (images, labels, data) or None
    database: Any = None       # the opened TuningDatabase of --tuning-db, checked once

    @property
    def precision(self) -> str:
        return "int" if self.plan is not None else "float"


def prepare_build(config: BuildConfig, progress: Optional[Progress], model=None, database=None) -> Prepared:
    """Resolve the target, plan, model and evaluation data, refusing what cannot be built."""
    from edgeq.bitplan import resolve_plan
    from edgeq.quant import quantizable_layers
    from edgeq.compile.targets import load_target

    spec = load_target(config.target)
    host_spec = None if spec.name == "host" else load_target("host")
    if host_spec is not None and spec.target_json == host_spec.target_json and spec.host_json is None:
        host_spec = None  # the target is this machine under another name
    spec.toolchain.resolve()  # a missing cross compiler fails now, not after quantizing
    if config.tuning_db is not None:  # every library the build compiles takes its schedules: CPU targets only
        from edgeq.lower.tuning_database import TuningDatabase

        database = TuningDatabase.open(database or config.tuning_db, [s for s in (spec, host_spec) if s],
                                       "--tuning-db")
    plan = None if config.float_model else resolve_plan(config.bits, config.plan)
    if plan is not None:
        check_integer_target(spec, plan)
        from edgeq.lower.kernels.micro import kernel_family

        family_note = kernel_family(spec)["kernel_family_note"]
        if family_note:
            _say(progress, f"note: {family_note}")

    _say(progress, "loading model")
    if model is None:
        model = load_model(config)
    model = model.eval()
    model_info = model_entry(config, model)  # now: the weights file may be rewritten while this build runs
    if plan is not None:
        plan.check_layers(quantizable_layers(model))
    _say(progress, "evaluation data")
    evaluation = eval_set(config, model)  # unreadable data or a class-count mismatch fails before compiling
    return Prepared(config, spec, host_spec, plan, model, model_info, evaluation, database)


def _build_holding_lock(config: BuildConfig, out_dir: Path, progress: Optional[Progress], model,
                        database=None) -> Path:
    prepared = prepare_build(config, progress, model, database)
    partial = prepare_out_dir(out_dir)
    try:
        manifest = compile_artifact(prepared, partial, out_dir.name, progress)
        write_artifact_manifest(partial, manifest)
        _say(progress, "done")
        return publish(partial, out_dir)
    except BaseException:
        with deferred():
            shutil.rmtree(partial, ignore_errors=True)
        raise


def compile_artifact(prepared: Prepared, folder: Path, name: str, progress: Optional[Progress]) -> A.Manifest:
    """Quantize, export, lower and compile into ``folder`` every file of the artifact but its manifest, and return
    the manifest that describes them (its ``files`` still empty: :func:`write_artifact_manifest` fills them)."""
    from edgeq.bitplan import write_plan
    from edgeq.lower.export import export_float_onnx, export_onnx
    from edgeq.quant import quantizable_layers
    from edgeq.runtime import HostModel

    config, spec, host_spec, plan, model = (prepared.config, prepared.spec, prepared.host_spec, prepared.plan,
                                            prepared.model)
    precision, evaluation = prepared.precision, prepared.evaluation
    qmodel = images = None
    calibration: Optional[A.Calibration] = None  # float builds are not calibrated
    onnx_path = folder / A.ONNX
    input_size = prepared.model_info.input_size
    if precision == "int":
        _say(progress, "calibration data")
        images, calibration = calibration_images(config, model)
        qmodel = quantize_model(config, model, plan, images, progress)
        _say(progress, "exporting ONNX")
        export_onnx(qmodel, onnx_path, batch=1)  # 4-bit weights as opset-21 INT4 (import widens them)
        write_plan(plan, folder / A.PLAN)
    else:
        _say(progress, "exporting ONNX")
        export_float_onnx(model, onnx_path, input_size=input_size)

    lowered = compile_library(onnx_path, spec, precision, folder / A.LIBRARY, prepared.database, progress)
    if precision == "int":
        from edgeq.lower.integer import kernel_constants

        constants = kernel_constants(lowered.relax)
        weights = weight_layout(qmodel, constants)
    else:
        constants = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        weights = float_weight_layout(model)
    save_weights(folder / A.WEIGHTS, constants, precision)
    tuning = lowered.tuning_entry()
    del lowered
    reference_lib = folder / A.LIBRARY
    if host_spec is not None:
        reference_lib = folder / A.HOST_LIBRARY
        compile_library(onnx_path, host_spec, precision, reference_lib, prepared.database, progress)
    runner = HostModel(reference_lib)

    _say(progress, "golden batch")
    if evaluation is not None:
        golden_inputs = evaluation[0][:config.golden_count].numpy()
    elif images is not None:
        golden_inputs = images[:config.golden_count].numpy()
    else:
        import torch

        golden_inputs = torch.randn(config.golden_count, *input_size,
                                    generator=torch.Generator().manual_seed(0)).numpy()
    golden_inputs = np.ascontiguousarray(golden_inputs, dtype=np.float32)
    np.savez(folder / A.GOLDEN, inputs=golden_inputs, outputs=runner(golden_inputs))
    golden = A.Golden(file=A.GOLDEN, count=int(len(golden_inputs)), exact=precision == "int",
                      atol=FLOAT_ATOL if precision == "float" else None)

    accuracy = accuracies(model, qmodel, runner, evaluation, progress) if evaluation is not None else None
    bits = A.Bits(default=plan.default.to_json(),
                  layers={layer: plan.bits_for(layer).to_json() for layer in quantizable_layers(model)}) \
        if plan is not None else A.Bits(default={"w": 32, "a": 32}, layers={})
    return A.Manifest(
        name=name, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        precision=precision, entry="main", batch=1, model=prepared.model_info, target=target_entry(spec, host_spec),
        bits=bits, method=config.method if precision == "int" else None,
        reconstruction=_reconstruction_entry(qmodel), calibration=calibration, accuracy=accuracy, golden=golden,
        weights=weights, versions=versions(), tuning=A.Tuning.from_json(tuning) if tuning is not None else None,
    )


def write_artifact_manifest(folder: Path, manifest: A.Manifest) -> A.Manifest:
    """Describe every file in ``folder`` in ``manifest``, seal it as ``folder/manifest.json`` and check the
    artifact loads as every later command will load it; the manifest written."""
    for file in folder.iterdir():  # some writers create 0600 files; an artifact is meant to be shared
        file.chmod(0o755 if file.suffix == ".so" else 0o644)
    files = A.describe_files(folder, [p.name for p in folder.iterdir() if p.name != A.MANIFEST])
    manifest = replace(manifest, files={n: A.FileEntry.from_json(e) for n, e in files.items()})
    A.write_manifest(folder, manifest)
    return A.load_artifact(folder).manifest  # fail here rather than in a later command


def weight_bytes_within_tolerance(weights: A.Weights) -> bool:
    expected = weights.expected_bytes or 0
    return expected > 0 and abs(weights.bytes - expected) <= WEIGHT_BYTES_TOLERANCE * expected
