"""The GPU benchmark harness (:mod:`softtopk.bench.gpu`) on CPU: its case list, its report, the CLI wiring. The
timings themselves need a GPU (``softtopk-bench --tag gpu --device cuda``); here the kernels run in Triton's
interpreter (see _kernel_env.py) at one tiny shape."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'softtopk[gpu]'): kernel tests skipped")

from _kernel_env import kernel_env  # noqa: E402, F401  (the fixture, and TRITON_INTERPRET set before any kernel)

from softtopk.bench import cli, gpu  # noqa: E402
from softtopk.bench.plots import write_plots  # noqa: E402
from softtopk.bench.report import render  # noqa: E402
from softtopk.bench.run import Config  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("kernel_env"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def test_case_set_is_the_issues():
    shapes = gpu.GpuConfig().shapes
    assert (4096, 8, 2) in shapes and (2, 10**6, 1000) in shapes and (8, 128000, 4) in shapes
    assert {(r, n) for r, n, _ in shapes} >= {(b, n) for b in (32, 1024) for n in (10**3, 10**4, 10**5, 10**6)}
    assert gpu.GpuConfig().dtypes == ("float32", "bfloat16") and set(gpu.METHODS) >= {"sigmoid", "dftopk"}
    assert all(r * n <= 10**6 for r, n, _ in gpu.GpuConfig.quick().shapes)


@pytest.mark.parametrize(
    "name, label",
    [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
     ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA L4", "L4"),
     ("NVIDIA L40S", None)],
)  # fmt: skip
def test_peak_table(name, label):
    found = gpu._peak_of_name(name)
    assert (found[1] if found else None) == label


def test_measure_and_table_tiny():
    doc = gpu.measure(gpu.GpuConfig.tiny(), torch.device("cpu"), log=lambda line: None)
    rows = doc["rows"]
    assert {(r["method"], r["impl"]) for r in rows} == {
        (m, i) for m in ("sigmoid", "dftopk") for i in ("kernel", "torch")
    }
    assert all(r["skipped"] is None and r["ms"] > 0 and r["bytes"] == 2 * 33 * (2 * 4 + 12) for r in rows)
    assert "measured" in doc["setup"]["peak_source"]
    lines = gpu.table(doc)
    assert len(lines) == 4 + 2 and "| 2 × 33 | 3 | float32 | sigmoid |" in lines[4]


def test_cli_refuses_without_cuda(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--tag", "gpu", "--no-files"])
    assert "--device cuda" in capsys.readouterr().err


def test_cli_measure_wiring(monkeypatch, tmp_path):
    """The tag's path through the CLI's measure, the report and the plots (on CPU, the tiny case set)."""
    monkeypatch.setattr(gpu.GpuConfig, "quick", classmethod(lambda cls: cls.tiny()))
    doc = cli.measure(Config(tags=("gpu",), quick=True), progress=False)
    assert len(doc["gpu"]["rows"]) == 4 and doc["speed"] == []
    render(doc)
    write_plots(doc, tmp_path)
