"""The driver and the CLI start without torch: a fresh interpreter each, `torch` never in sys.modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

HELP = """
import sys
from click.testing import CliRunner
from jobs.cli import main
for args in [["--help"]] + [[name, "--help"] for name in main.commands]:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output)
"""


# a dynamic-resolution model's contract, as the driver learns it: its processor configs -> ModelInfo -> as_dict ->
# the decode settings (the Qwen-VL family's describe will make the ModelInfo; here it is built by hand)
CONTRACT = """
from lavi.families import ModelInfo
from lavi.qwenvl.processor_config import ProcessorConfig
from pipeline.config import RunConfig
files = {"preprocessor_config.json": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14}}
contract = ProcessorConfig.read("qwen2_vl", files.get).contract
info = ModelInfo(name="q", family="f", fusion="f", vision_in_context=True, image_size=28, dynamic=contract).as_dict()
settings = RunConfig(inputs=("x.jpg",), out="o").decode_settings(28, 8, info["pinpoints"], info["dynamic"])
assert settings.dynamic == contract and settings.dynamic.image.max_pixels == 12845056
"""


@pytest.mark.parametrize("code", [
    pytest.param("import pipeline.driver", id="pipeline.driver"),
    pytest.param(HELP, id="lavi-label --help"),
    pytest.param(CONTRACT, id="dynamic-resolution contract"),
])
def test_driver_and_cli_leave_torch_unimported(code):
    """Guards against an import chain (jobs/*, bench/*, shapes/*, pipeline/*, lavi/__init__) that loads torch
    where it is never used: seconds on every `lavi-label --help` and every driver start, and a driver that needs
    the GPU stack installed to submit a job."""
    check = code + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
