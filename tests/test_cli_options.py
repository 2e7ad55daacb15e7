"""Options several commands share are declared once."""
from __future__ import annotations

import subprocess
import sys

import click

from edgeq.cli import cli
from edgeq.quant.config import METHODS


def test_every_quantization_method_option_offers_the_methods_of_quant_config():
    offered = {(name, param.name): tuple(param.type.choices)
               for name, command in cli.commands.items() for param in command.params
               if param.name in ("method", "quant_method") and isinstance(param.type, click.Choice)}
    assert offered == {("quantize", "method"): METHODS, ("build", "method"): METHODS,
                       ("profile", "method"): METHODS, ("plan", "quant_method"): METHODS}


def test_loading_the_command_line_does_not_import_torch():
    probe = "import sys, edgeq.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
