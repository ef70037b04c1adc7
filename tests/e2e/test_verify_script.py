"""benchmarks/verify_coverage.py (issue 9's "done means" over the cases and the zoo) still runs:
its case discovery (grey variants, several inputs, conv leaves) and one whole model, slow."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "verify_coverage.py"
FILE = '''
import torch, torch.nn as nn, torch.nn.functional as F
INPUT_SHAPE = (1, 3, 16, 16)
class PadConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias)
class Net(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.c = PadConv(in_ch, 8, 3)
    def forward(self, x, y):
        return self.c(x) + self.c(y)
def build_model(in_ch=3):
    return Net(in_ch)
'''


def _script():
    spec = importlib.util.spec_from_file_location("verify_coverage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["verify_coverage"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_cases_get_a_grey_variant_one_shape_per_input_and_conv_leaves(tmp_path):
    (tmp_path / "m.py").write_text(FILE)
    cases = _script().case_models(tmp_path)
    assert [c.label for c in cases] == ["m", "m[grey]"]
    assert cases[0].shapes == [(1, 3, 16, 16)] * 2 and cases[1].shapes == [(1, 1, 16, 16), (1, 3, 16, 16)]
    assert cases[1].model_args == {"in_ch": 1}
    assert cases[0].leaf_modules == ["PadConv"] and cases[0].rules == {"PadConv": "conv"}


@pytest.mark.slow
@pytest.mark.heavy  # 10 s: kept out of CI's 15 minutes (the script's checks run on the coverage models beside it)
def test_one_zoo_model_passes_every_check(capsys):
    assert _script().main(["--no-cases", "--only", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "checks passed on 1 models" in out
