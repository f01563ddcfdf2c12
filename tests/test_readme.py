"""Every command shown in the README's shell blocks runs, as written, with small settings.

Each README section runs in its own fresh working folder that looks like the repository root to the commands
(``configs/`` and ``scripts/`` linked in, ``../shared`` reachable), in README order, so a later command finds what
an earlier one wrote (``lightning_logs/version_0/...``, ``runs/digits/...``). The only changes to a command:
- fit/validate/test get small-settings overrides appended (one epoch, two batches, smaller data);
- placeholders become real things: ``CKPT`` and checkpoint globs the best checkpoint of the section's matching
  fit, ``PATH`` a small image folder, ``a.png, ``a.wav``, ``sentences.jsonl``... small
  files made here, ``[--opt]`` is used with the option;
- commands that need the network (``--data.download=true``, Hugging Face names) are checked with
  ``--print_config`` (they parse and build their config), which is all an offline machine can do.
"""

from __future__ import annotations

import glob
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
README = (ROOT / "README.md").read_text(encoding="utf-8")

SMALL = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
SMALL_DATA = {  # config stem -> data settings small enough for seconds, not minutes
    "label_punct_embedded": ["--data.max_docstrings=300"],
    "srl_propbank_ewt": ["--data.limit_train=300", "--data.limit_val=64"],
    "srl_propbank_ewt_engine": ["--data.limit_train=300", "--data.limit_val=64"],
    "summarize_embedded": ["--data.max_pairs=300", "--data.tokenizer_vocab_size=500"],
    "summarize_aeslc": ["--data.limit_train=300", "--data.limit_val=32", "--data.tokenizer_vocab_size=500"],
    "summarize_dialogsum": ["--data.limit_train=300", "--data.limit_val=32", "--data.tokenizer_vocab_size=500"],
    "fsdd_digits": ["--data.limit_per_split=60"],
    "fsdd_connected_ctc": ["--data.train_utterances=24", "--data.val_utterances=8", "--data.test_utterances=8"],
    "synth_ctc": ["--data.train_utterances=12", "--data.val_utterances=4", "--data.test_utterances=4"],
    "mnist_overfit_mlp": ["--trainer.check_val_every_n_epoch=1"],  # one epoch: validate it, to keep a best
}
ONLINE_CONFIGS = {"ner_conll", "summarize_pretrained"}  # need the Hugging Face hub or `datasets` downloads
LIGHTNING = {"fit", "validate", "test", "predict"}


def readme_sections() -> dict[str, list[str]]:
    """The commands of every ``bash`` block, by the README's ``##`` section (comments and blank lines dropped,
    backslash continuations joined)."""
    sections: dict[str, list[str]] = {}
    title = "top"
    for part in re.split(r"(^## .*$)", README, flags=re.M):
        if part.startswith("## "):
            title = part[3:].strip()
            continue
        for block in re.findall(r"```bash\n(.*?)```", part, flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    sections.setdefault(title, []).append(line)
    return sections


SECTIONS = readme_sections()


def config_stem(argv: list[str]) -> str | None:
    return Path(argv[argv.index("--config") + 1]).stem if "--config" in argv else None


class Workspace:
    """A fresh folder that looks like the repository root, and the checkpoints its fits have written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for name in ("configs", "scripts"):
            (path / name).symlink_to(ROOT / name)
        self.fits: list[tuple[str, str]] = []  # (config stem, best checkpoint), in order

    def checkpoint(self, command: list[str]) -> str:
        """The checkpoint a command's placeholder stands for: the section's latest matching fit."""
        wanted = {"predict-image": ("digits_mlp", "mnist", "fashion", "cifar", "imagefolder"),
                  "summarize": ("summarize_",), "transcribe": ("_ctc",),
                  "label": ("srl_",) if "--predicate" in command else ("label_punct",)}.get(command[0], ("",))
        for stem, ckpt in reversed(self.fits):  # export, privacy-audit ...: the section's latest fit
            if stem.startswith(wanted) or any(w in stem for w in wanted):
                return ckpt
        raise AssertionError(f"no earlier fit in this README section gives a checkpoint for {command}")

    # -- small input files the README's examples name ----------------------------------------------------------

    def make_inputs(self) -> None:
        from bp_apps.speech.audio import save_audio
        from bp_apps.vision.data import load_digits_split

        split = load_digits_split()
        for name, index in (("a.png", 0), ("b.jpg", 1)):
            pixels = (split.x_test[index].view(8, 8).numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((24, 24)).save(self.path / name)
        faces = self.path / "faces"
        rng = np.random.default_rng(0)
        for person, shade in (("alice", 60), ("bob", 190)):
            (faces / person).mkdir(parents=True)
            for i in range(12):
                image = np.clip(rng.normal(shade, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(faces / person / f"{i}.png")
        recordings = sorted((SHARED / "data" / "fsdd" / "recordings").glob("*.wav"))
        if recordings:  # real speech for the manifests and for transcribe
            words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
            lines = [json.dumps({"audio": str(p), "text": words[int(p.name.split("_")[0])]})
                     for p in recordings[::50][:24]]
            for name, chunk in (("train.jsonl", lines[:16]), ("dev.jsonl", lines[16:20]), ("test.jsonl", lines[20:])):
                (self.path / name).write_text("\n".join(chunk) + "\n")
            import soundfile as sf

            samples, rate = sf.read(recordings[0])
            save_audio(self.path / "a.wav", samples, rate)
            sf.write(self.path / "b.flac", np.stack([samples, samples], 1), rate)  # stereo FLAC
        (self.path / "sentences.jsonl").write_text(
            json.dumps({"tokens": ["so", "this", "is", "how", "it", "ends", "i", "think"]}) + "\n"
            + json.dumps({"tokens": ["return", "the", "value", "if", "any"]}) + "\n")
        (self.path / "emails.jsonl").write_text(
            json.dumps({"id": "m1", "source": "The meeting moved to Friday at ten. Please bring the report."}) + "\n")


def expand(line: str, ws: Workspace) -> list[str]:
    """A README line as argv, with placeholders made concrete (see the module docstring)."""
    line = re.sub(r"\[(--[^\]]+)\]", r"\1", line)  # optional flags: exercise them
    argv = shlex.split(line)
    if argv[0] == "bp-apps":
        argv = argv[1:]
    out: list[str] = []
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if previous in ("--ckpt", "--ckpt_path") or arg == "CKPT":
            matches = sorted(glob.glob(str(ws.path / arg.replace("<file>", "*"))))
            arg = matches[-1] if matches and "..." not in arg else ws.checkpoint(argv)
        elif arg == "TEXT":
            arg = "The meeting moved to Friday at ten. Please bring the report and the budget figures."
        elif arg.startswith("--data.data_root=PATH"):
            arg = f"--data.data_root={ws.path / 'faces'}"
        out.append(arg)
    return out


def run_lightning(argv: list[str], ws: Workspace) -> None:
    stem = config_stem(argv)
    online = stem in ONLINE_CONFIGS or "--data.download=true" in argv
    needs_gpu = "--trainer.accelerator=gpu" in argv and not torch.cuda.is_available()
    ddp = any(arg.startswith("--trainer.strategy=ddp") for arg in argv)  # ddp or ddp_engine
    if ddp and not needs_gpu:  # Lightning's DDP launcher re-runs the command line:
        run_ddp(argv, ws)      # give it a real one, in a child process
        return
    if online or needs_gpu:  # here a command can only be checked to parse and build its config
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--print_config"])
        assert exit_info.value.code in (0, None), argv
        return
    before = set(ws.path.rglob("metrics.json"))
    assert main([*argv, *SMALL, *SMALL_DATA.get(stem or "", [])]) == 0, argv
    if argv[0] == "fit":
        register_fit(stem, before, ws)


def register_fit(stem: str | None, before: set[Path], ws: Workspace) -> None:
    """Remember a fit's best checkpoint (from the metrics.json every run writes) for later placeholders."""
    (path,) = set(ws.path.rglob("metrics.json")) - before
    ws.fits.append((stem or "", json.loads(path.read_text())["best_checkpoint"]))


def run_ddp(argv: list[str], ws: Workspace) -> None:
    """A DDP fit on CPU: two processes (gloo), each running the real ``bp-apps`` command."""
    # `python -m bp_apps.cli` is the `bp-apps` entry point; Lightning's launcher re-runs it for rank 1
    command = [sys.executable, "-m", "bp_apps.cli", *argv, *SMALL, *SMALL_DATA.get(config_stem(argv) or "", [])]
    before = set(ws.path.rglob("metrics.json"))
    result = subprocess.run(command, cwd=ws.path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = set(ws.path.rglob("metrics.json")) - before
    metrics = json.loads(written.read_text())
    assert metrics["test"] and metrics["validation"], metrics  # rank 0 wrote the synchronised figures


def ensure_runs_exist(argv: list[str], ws: Workspace) -> None:
    """``plot runs/a/... runs/b/...`` compares two earlier runs: make the ones the README assumes."""
    for arg in argv:
        match = re.fullmatch(r"(runs/\w+)/lightning_logs/version_0", arg)
        if match and not (ws.path / arg).exists():
            config = "configs/vision/digits_mlp_engine.yaml"
            assert main(["fit", "--config", config, f"--trainer.default_root_dir={match.group(1)}", *SMALL]) == 0


def run_command(line: str, ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    if line.startswith("python3 -m pip install"):
        _install, *rest = [part.strip() for part in line.split("&&")]
        if rest[0] == "bp-apps demo":
            assert main(["demo"]) == 0
            assert (ws.path / "runs" / "demo" / "compare.md").is_file()
        else:  # the test command: CI runs exactly this line
            assert line in (ROOT / ".ci" / "run").read_text()
        return
    argv = expand(line, ws)
    if argv[0] == "python":
        script = ROOT / argv[1]
        assert script.is_file(), line
        stem = config_stem(argv)
        old_argv = sys.argv
        sys.argv = [str(script), *argv[2:], *SMALL, *SMALL_DATA.get(stem or "", [])]
        before = set(ws.path.rglob("metrics.json"))
        try:
            with pytest.raises(SystemExit) as exit_info:
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = old_argv
        assert exit_info.value.code == 0, line
        register_fit(stem, before, ws)
    elif argv[0] in LIGHTNING:
        run_lightning(argv, ws)
    else:
        ensure_runs_exist(argv, ws)
        capsys.readouterr()
        assert main(argv) == 0, line
        printed = capsys.readouterr().out
        assert printed.strip() or "--out" in argv, f"{line}: printed nothing"
        if "--out" in argv:
            assert (ws.path / argv[argv.index("--out") + 1]).exists(), line


def test_readme_has_the_sections_this_test_walks() -> None:
    assert {"top", "Image classification (`bp_apps/vision/`)", "Text labeling (`bp_apps/text/labeling/`)",
            "Text summarization (`bp_apps/text/summarization/`)", "Speech to text (`bp_apps/speech/`)",
            "Commands"} <= set(SECTIONS)
    assert sum(len(commands) for commands in SECTIONS.values()) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_readme_commands_run_as_written(section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHARED / "data").is_dir():
        pytest.skip("the README's data paths point at ../shared/data, which this checkout does not have")
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)  # ../shared from the working folder, as from the repository
    monkeypatch.chdir(work)
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    ws = Workspace(work)
    ws.make_inputs()
    for line in SECTIONS[section]:
        run_command(line, ws, capsys)


def test_commands_table_options_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """The Commands table's rows name options: each one is an option of that command (the runs themselves are
    covered by test_compare.py, test_bench.py and test_plot.py)."""
    table = re.search(r"^## Commands\n\n(.*?)\n\n", README, flags=re.S | re.M)
    assert table
    rows = re.findall(r"^\| `bp-apps ([a-z-]+(?: core| digits)?)([^`]*)` \|", table.group(1), flags=re.M)
    assert len(rows) >= 5
    for command, rest in rows:
        with pytest.raises(SystemExit):
            main([*command.split()[:1], "--help"])
        help_text = capsys.readouterr().out
        for option in re.findall(r"--[a-z][a-z_-]*", rest):
            if command.split()[0] in LIGHTNING:
                continue  # LightningCLI options (--config, --trainer.*) are checked by the runs above
            assert option in help_text, f"bp-apps {command}: {option} is not an option"
