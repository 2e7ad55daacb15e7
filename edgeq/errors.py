"""Errors a user can cause, each with its own process exit code.

The CLI turns any :class:`EdgeqError` into one line on stderr and exits with
``exit_code``; the table in the README is checked against this module by the
tests, so add a row there when adding a class here.
"""
from __future__ import annotations


class EdgeqError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class OutputPathError(EdgeqError):
    """An output path that cannot be written (a directory where a file goes, a parent that is a file or is not
    writable); checked before the work starts."""

    exit_code = 3


class OutputBusyError(EdgeqError):
    """Another edgeq process is writing the same output (its lock is held)."""

    exit_code = 4


class ModelNotFoundError(EdgeqError):
    exit_code = 10


class CheckpointError(EdgeqError):
    exit_code = 11


class WeightsUnavailableError(EdgeqError):
    exit_code = 12


class DataError(EdgeqError):
    exit_code = 13


class ClassCountError(EdgeqError):
    exit_code = 14


class TargetError(EdgeqError):
    """Unknown board name, malformed target YAML or JSON, or a target TVM refuses (known boards are listed)."""

    exit_code = 60


class ToolchainMissingError(EdgeqError):
    """The cross compiler (or qemu, apt, dpkg for the emulated board) is missing or broken; the Debian package is named."""

    exit_code = 61


class RemoteUnreachableError(EdgeqError):
    """No RPC server or tracker answers at the address given, or the tracker has no board with that key."""

    exit_code = 70


class RemoteRunError(EdgeqError):
    """The board was reached but died or dropped the session while loading or running a module."""

    exit_code = 71


class ArtifactTargetMismatchError(EdgeqError):
    """The library was built for another architecture or device than the board has."""

    exit_code = 72


class ArtifactError(EdgeqError):
    """A build directory that is missing, incomplete, of an unknown version, or changed after the build (file named)."""

    exit_code = 40


class BitPlanError(EdgeqError):
    """A bit plan file or bit spec that is malformed, out of range, or names unknown layers."""

    exit_code = 20


class CalibrationError(EdgeqError):
    """Calibration data unusable: too few images, wrong image size, non-finite activations."""

    exit_code = 21


class QuantizedModelError(EdgeqError):
    """A quantized-model file that is unreadable or does not match the model it claims."""

    exit_code = 22


class UnsupportedModelError(EdgeqError):
    """A model or module pattern edgeq cannot quantize or lower; the message names it and what is supported."""

    exit_code = 23


class DeviceUnavailableError(EdgeqError):
    """``--device`` names a torch device this machine does not have (e.g. cuda without a GPU) or no device at all."""

    exit_code = 24


class PlanningError(EdgeqError):
    """Unknown planning method, malformed budget, or a latency table that does not fit."""

    exit_code = 30


class BudgetInfeasibleError(EdgeqError):
    """No bit plan meets the budget; the message names the smallest feasible budget."""

    exit_code = 31


def all_error_classes() -> list[type[EdgeqError]]:
    """Every concrete error class, for documentation and tests."""
    found: list[type[EdgeqError]] = []
    pending = [EdgeqError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.exit_code)
