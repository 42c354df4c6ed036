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
    assert backends == {"cpu kernel", "chunked"}
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
