"""``bp-apps export``: the vision, speech and labeling networks (autograd and engine ones) as ONNX and as
``torch.export`` programs, equal to PyTorch within 1e-4 on inputs of other batch sizes and lengths than the export
sample; the ONNX file runs in a fresh ONNX Runtime process; failed parity and unsupported tasks or formats are
refused with a clear error and nothing written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_checkpoints import labeling_checkpoint, speech_checkpoint, vision_checkpoint

from bp_apps.cli import main
from bp_apps.core.task import TASK_KEY

pytest.importorskip("onnxruntime", reason="needs the export extra (pip install \"bp_apps[export]\")")
pytest.importorskip("onnx", reason="needs the export extra (pip install \"bp_apps[export]\")")

from bp_apps.deploy import export as export_module
from bp_apps.deploy.export import TOLERANCE, export_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


CASES = {
    "vision_engine_mlp": lambda f: vision_checkpoint(f, "engine_mlp"),
    "vision_cnn_engine_head": lambda f: vision_checkpoint(f, "cnn_engine_head"),
    "speech_conv_gru": lambda f: speech_checkpoint(f, "conv_gru"),
    "speech_engine_conv_gru": lambda f: speech_checkpoint(f, "engine_conv_gru"),
    "speech_digit_gru": lambda f: speech_checkpoint(f, "digit_gru"),
    "speech_engine_digit_cnn": lambda f: speech_checkpoint(f, "engine_digit_cnn"),
    "labeling_srl": lambda f: labeling_checkpoint(f, predicates=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_matches_pytorch_on_other_batch_sizes_and_lengths(folder: Path, case: str) -> None:
    ckpt = CASES[case](folder)
    out = folder / f"{case}.onnx"
    report = export_model(ckpt, out, "onnx", sample_length=10)
    assert out.is_file() and report["max_abs_diff"] <= TOLERANCE == 1e-4
    saved = json.loads(Path(f"{out}.json").read_text())
    assert saved["max_abs_diff"] == report["max_abs_diff"] and saved["task"] == report["task"]
    checked = report["inputs_checked"]
    first = next(iter(checked[0].values()))
    assert [next(iter(c.values()))[0] for c in checked] == [2, 3, 1]  # batch sizes
    if len(first) > 2 and not case.startswith("vision"):  # the time / token axis is dynamic too
        assert len({next(iter(c.values()))[1] for c in checked}) == 3
    assert set(saved["io"]) >= set(saved["inputs"])
    if case.startswith("labeling"):
        assert saved["vocab"]["labels"] == saved["labels"] and "emissions" in saved["io"]


@pytest.mark.parametrize("case", ["vision_engine_mlp", "speech_engine_conv_gru", "labeling_srl"])
def test_torch_export_program_reloads_and_matches_pytorch(folder: Path, case: str) -> None:
    ckpt = CASES[case](folder)
    out = folder / f"{case}.pt2"
    report = export_model(ckpt, out, "torch-export", sample_length=6)
    assert report["max_abs_diff"] <= TOLERANCE and out.is_file()
    assert all(0 in axes for axes in report["dynamic_axes"].values())  # the batch axis stays dynamic
    program = torch.export.load(str(out))
    if case.startswith("vision"):
        logits = program.module()(torch.zeros(5, 1, 8, 8))
        assert logits.shape == (5, 10)
    else:
        assert "fixed at 6" in report["fixed_length"]


def test_the_onnx_file_runs_in_a_fresh_onnxruntime_process(folder: Path) -> None:
    """The file alone (no bp_apps, no torch) gives PyTorch's log-probabilities and output lengths."""
    from bp_apps.speech.task import load_speech_model

    ckpt = speech_checkpoint(folder, "conv_gru")
    out = folder / "fresh.onnx"
    export_model(ckpt, out, "onnx")
    features, lengths = torch.randn(2, 57, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([57, 31])
    with torch.no_grad():
        log_probs, out_lengths = load_speech_model(ckpt)[0](features, lengths)
    np.savez(folder / "inputs.npz", features=features.numpy(), lengths=lengths.numpy())
    script = ("import sys, json, numpy as np, onnxruntime as ort\n"
              "assert 'torch' not in sys.modules\n"
              "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "x = np.load(sys.argv[2])\n"
              "lp, n = s.run(['log_probs', 'out_lengths'], {'features': x['features'], 'lengths': x['lengths']})\n"
              "print(json.dumps({'log_probs': lp.tolist(), 'out_lengths': n.tolist()}))\n")
    result = subprocess.run([sys.executable, "-c", script, str(out), str(folder / "inputs.npz")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout)
    assert got["out_lengths"] == out_lengths.tolist()
    assert float((torch.tensor(got["log_probs"]) - log_probs).abs().max()) <= 1e-4


def test_a_model_failing_parity_is_refused_and_nothing_is_written(folder: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    ckpt = vision_checkpoint(folder, "engine_mlp")
    check = export_module._check_parity

    def off_by_a_little(spec, run, static_length, tolerance):  # the export's outputs drift by 1e-3
        return check(spec, lambda inputs: [np.asarray(o) + 1e-3 for o in run(inputs)], static_length, tolerance)

    monkeypatch.setattr(export_module, "_check_parity", off_by_a_little)
    out = folder / "drifting.onnx"
    with pytest.raises(ValueError, match=r"parity check failed: .* differ from PyTorch's by up to 0\.001 "
                                         r"\(allowed 0\.0001\); nothing was written"):
        export_model(ckpt, out, "onnx")
    assert not out.exists() and not Path(f"{out}.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".drifting")]  # no temporary file left


def test_unsupported_tasks_and_formats_are_refused_clearly(folder: Path) -> None:
    ckpt = vision_checkpoint(folder, "engine_mlp")
    with pytest.raises(ValueError, match=r"unknown format 'tflite'; choose one of onnx, torch-export, hf"):
        export_model(ckpt, folder / "x.tflite", "tflite")
    with pytest.raises(ValueError, match=r"image classifier has no Hugging Face export; use --format onnx"):
        export_model(ckpt, folder / "x_hf", "hf")
    summarizer = folder / "summarizer.ckpt"
    torch.save({TASK_KEY: "text.Summarizer", "state_dict": {}}, summarizer)
    for format in ("onnx", "torch-export"):
        with pytest.raises(ValueError, match=rf"summarization model .* does not export to {format}; use --format hf"):
            export_model(summarizer, None, format)
    stranger = folder / "stranger.ckpt"
    torch.save({TASK_KEY: "audio.Separator", "state_dict": {}}, stranger)
    with pytest.raises(ValueError, match=r"stranger\.ckpt: not a bp_apps task checkpoint: it has task "
                                         r"'audio\.Separator'"):
        export_model(stranger, None, "onnx")
    with pytest.raises(ValueError, match=r"--out .* is a folder"):
        export_model(ckpt, folder, "onnx")


def test_hf_export_goes_to_the_tasks_exporter(folder: Path) -> None:
    """``--format hf`` is each task's ``export_hugging_face``: for networks that are not transformers models (those
    of these tiny checkpoints) its refusal, pointing back to ONNX, is what the user hears."""
    for ckpt, module in ((speech_checkpoint(folder, "digit_cnn"), "bp_apps.speech.hf_export"),
                         (labeling_checkpoint(folder), "bp_apps.text.labeling.hf_export")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(ValueError, match=rf"has no Hugging Face export for .* \({module}\)"):
                export_model(ckpt, None, "hf")
            continue
        with pytest.raises(ValueError, match=r"not a transformers model and has no Hugging Face form.*--format onnx"):
            export_model(ckpt, None, "hf")
        assert not ckpt.with_name(f"{ckpt.stem}_hf").exists()


def test_cli_export_prints_the_parity_and_writes_next_to_the_checkpoint(folder: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = vision_checkpoint(folder, "mlp")
    assert main(["export", "--ckpt", str(ckpt), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {ckpt.with_suffix('.onnx')}" in printed and "parity: max |onnxruntime - pytorch| = " in printed
    assert ckpt.with_suffix(".onnx").is_file() and Path(f"{ckpt.with_suffix('.onnx')}.json").is_file()
    assert main(["export", "--ckpt", str(folder / "missing.ckpt"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bp-apps export: error:") and "does not exist" in err
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(ckpt), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
