"""The prepared GPU check runs end to end (here on the CPU, where it skips fp16) and reports
each case; bad arguments are refused."""
import json

import pytest


def test_the_gpu_check_trains_every_case_and_reports_it(tmp_path, capsys):
    from bench import gpu_check
    out = tmp_path / "check.json"
    assert gpu_check.main(["--steps", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] and "cuda" in report["environment"]
    cases = {r["case"]: r for r in report["results"]}
    assert {"lora tiny no", "lora tiny bf16", "lora tiny flux bf16", "lora tiny zimage bf16",
            "lora tiny fp8 base", "textual inversion tiny", "textual inversion tiny fp8 base",
            "dreambooth tiny bf16",
            "lora tiny bf16 block swap 2, TE cached (offloaded)", "lora tiny flux bf16 block swap 1",
            "lora tiny qwenimage bf16",
            "dreambooth tiny full_bf16 + fused backward (Adafactor)",
            "dreambooth tiny chroma transformer, full_bf16 + fused, TE cached"} <= set(cases)
    for name, result in cases.items():
        assert "error" not in result, (name, result.get("error"))
        assert result["finite"] and result["loads"], name
        assert name in printed
    assert f"{len(cases)} passed, 0 failed" in printed


def test_on_cuda_the_check_adds_the_fp16_cases(tmp_path, monkeypatch):
    """fp16 compute needs CUDA: the cases are only listed there (nothing runs here)."""
    from bench import gpu_check
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    names = [name for name, _, _ in gpu_check.cases(2, tmp_path, sd15=False)]
    assert {"lora tiny fp16", "dreambooth tiny full_fp16 (loss scaling)"} <= set(names)
    fp16 = dict((name, cfg) for name, _, cfg in gpu_check.cases(2, tmp_path / "again", False))
    cfg = fp16["dreambooth tiny full_fp16 (loss scaling)"]
    assert cfg.full_fp16 and cfg.mixed_precision == "fp16"
    cfg.validate()


def test_the_gpu_check_refuses_too_few_steps():
    from bench import gpu_check
    with pytest.raises(SystemExit) as caught:
        gpu_check.main(["--steps", "1"])
    assert caught.value.code == 2
