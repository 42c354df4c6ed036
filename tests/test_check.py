"""segfocal check: every back end usable here against the float64 reference, failing with the kernel's
own message when a back end is made to raise (the fused loss's fallback would otherwise hide it)."""
import json
import os
import shutil

import pytest

from segfocal.cli import main
from segfocal.losses import cpu_kernels, selfcheck

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")


@needs_compiler
def test_the_quick_check_passes_here_with_the_cpu_kernel_and_the_chunked_pass_and_writes_json(capsys, tmp_path):
    main(["check", "--quick", "--json", str(tmp_path / "check.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] and "PASSED" in out
    backends = {case["backend"] for case in report["cases"]}
    assert backends == {"cpu kernel", "cpu kernel compiled", "chunked"}  # the kernel kept under torch.compile
    assert {case["dtype"] for case in report["cases"] if case["backend"] == "cpu kernel"} == {"float32", "bfloat16"}
    assert any(case["classes"] == 151 for case in report["cases"] if case["backend"] == "chunked")
    assert any(case["ignored"] == "all" for case in report["cases"])
    (timing,) = report["timings"]
    assert timing["preset"] == "camvid" and timing["fused_ms"] > 0 and timing["ratio_to_bound"] > 0
    assert report["environment"]["torch"] and report["copy_bandwidth_gbs"] > 0


@needs_compiler
@pytest.mark.parametrize("entry", ["histogram", "forward"])
def test_a_kernel_that_raises_fails_the_check_with_its_own_message(entry, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError(f"ptxas fatal: {entry} injected")

    monkeypatch.setattr(cpu_kernels, entry, broken)
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--quick", "--no-timing"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "FAILED" in out
    assert f"the back end was turned off: RuntimeError: ptxas fatal: {entry} injected" in out
    report = selfcheck.check("cpu", quick=True, timings=False)  # the chunked pass alone still agrees
    assert all(case.passed for case in report.cases if case.backend == "chunked")


def test_the_gpu_acceptance_run_dry_runs_every_step_on_the_cpu(tmp_path):
    """benchmarks/gpu_acceptance.sh --cpu: the same steps, tiny, so the script the first GPU runs cannot rot."""
    import subprocess

    from recipes import REPO

    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_acceptance.sh"), str(tmp_path / "out"), "--cpu"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = (tmp_path / "out" / "report.md").read_text()
    assert result.returncode == 0, report[-3000:]
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    steps = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1] for row in rows}
    assert set(steps) == {"check", "tests", "loss_camvid_fp32", "train_throughput", "train_throughput_compiled",
                          "train_default_fp32", "train_default_bf16"}
    assert all(verdict == "passed" for name, verdict in steps.items() if name != "train_throughput_compiled")
    assert json.loads((tmp_path / "out" / "check.json").read_text())["passed"]
    assert (tmp_path / "out" / "train_bf16" / "best.pt").is_file()


def test_the_gpu_acceptance_run_reports_a_failing_step_and_exits_1(tmp_path):
    import subprocess

    from recipes import REPO

    fake_python = tmp_path / "python"  # every step's interpreter fails
    fake_python.write_text("#!/bin/sh\nexit 3\n")
    fake_python.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_acceptance.sh"), str(tmp_path / "out"), "--cpu"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": str(fake_python)})
    assert result.returncode == 1
    assert "| check | FAILED (exit 3) |" in (tmp_path / "out" / "report.md").read_text()
