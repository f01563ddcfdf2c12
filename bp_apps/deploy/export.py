"""``bp-apps export``: a checkpoint's network as ONNX or as a ``torch.export`` program, checked against PyTorch.

What is exported is the network, not the task around it: its inputs are what the network reads after the task's
preprocessing, and its outputs are raw scores.

- vision: ``images`` (B, C, H, W), already resized and normalised with the checkpoint's ``mean``/``std`` (written
  to the JSON beside the export) → ``logits`` (B, classes);
- speech: ``features`` (B, T, F), the log-mel frames of the checkpoint's feature settings (or waveform samples
  ``(B, T, 1)`` for a waveform model), and ``lengths`` (B,) → a recognizer's ``log_probs`` (B, T', V) and
  ``out_lengths`` (CTC decoding stays outside), or a digit classifier's ``logits`` (B, 10);
- labeling (BiLSTM tagger): the padded batch of ``collate_sentences`` — ``words`` (B, T), ``chars`` (B, T, C),
  ``predicate`` (B, T), ``predicate_class`` (B,), ``mask`` (B, T) — → the per-word ``emissions`` (B, T, labels).
  CRF or constrained Viterbi decoding stays outside (the CRF's transitions are in the checkpoint), and the
  vocabulary that maps words to ids is written to the JSON.

An engine network is exported as its autograd twin (``to_autograd()``, the same weights), and an engine MLP head
inside an autograd network as its ``torch.nn`` twin: the exporters trace ``torch.nn`` modules.

ONNX goes through the TorchScript-based exporter (``dynamo=False``): it maps recurrent layers to ONNX's GRU and LSTM
operators with the batch and the time (or sentence) axis left dynamic, where the ``torch.export``-based exporter
unrolls them over the sample's length. The ``torch.export`` program (``.pt2``) keeps the batch axis dynamic but
takes exactly the frames / tokens it was exported with (``sample_length``, recorded in the JSON): ``torch.export``
unrolls recurrent layers, and ceil-mode pooling guards the length to the sample's parity. Pad shorter inputs to
it; ``lengths`` (or ``mask``) mark the real frames, as in a padded batch. Packing, whose shapes depend on the
lengths' values, cannot be traced: the speech GRUs run unpacked (:func:`run_gru`, the same values) while
tracing.

Every export is checked before it is kept: the exported model and the checkpoint's own PyTorch network run on
random inputs of other batch sizes and lengths than the export sample, and the largest absolute difference of their
outputs must stay within :data:`TOLERANCE`; otherwise the export is refused and nothing is written. The figure is
printed and written to ``<export>.json`` with the input and output description.

Summarization models export in Hugging Face form only (``--format hf``), as do the other tasks' ``hf`` exports
(``export_hugging_face`` of each task's ``hf_export`` module).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bp_apps.core.io import atomic_output, atomic_write_text
from bp_apps.core.task import backend_of
from bp_apps.deploy.checkpoints import (
    LABELING,
    RECOGNIZER,
    SPOKEN_DIGITS,
    SUMMARIZATION,
    VISION,
    checkpoint_task,
    require,
)

__all__ = ["FORMATS", "TOLERANCE", "ExportSpec", "autograd_network", "export_model", "run_gru"]

FORMATS = ("onnx", "torch-export", "hf")
TOLERANCE = 1e-4
"""The largest absolute difference allowed between the exported model's outputs and PyTorch's."""
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
HF_MODULES = {RECOGNIZER: "bp_apps.speech.hf_export", SPOKEN_DIGITS: "bp_apps.speech.hf_export",
              LABELING: "bp_apps.text.labeling.hf_export", SUMMARIZATION: "bp_apps.text.summarization.hf_export"}
ONNX_OPSET = 17
CHECK_SIZES = ((3, 1.6), (1, 0.5))
"""The batch sizes and lengths (as a multiple of the export sample's) of the parity check's inputs."""


@dataclass
class ExportSpec:
    """What to export and how to feed it: ``network`` (pure ``torch.nn``, eval mode) takes ``input_names`` and
    returns ``output_names``; ``reference`` is the checkpoint's own network on the same inputs (the parity check's
    PyTorch side); ``sample(batch, length, generator)`` draws inputs; ``dynamic`` names each input's and output's
    dynamic axes; ``describe`` and ``extra`` go to the JSON."""

    network: nn.Module
    reference: Callable[..., Any]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]
    sample: Callable[[int, int, torch.Generator], tuple[Tensor, ...]]
    sample_length: int
    describe: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)



# -- the networks as plain torch.nn -------------------------------------------------------------

def autograd_network(net: nn.Module) -> nn.Module:
    """A ``torch.nn``-only copy of ``net`` in eval mode: an engine network's autograd twin (``to_autograd()``), and
    every engine MLP head inside an autograd network replaced by its ``torch.nn`` twin (same weights)."""
    from bp_apps.engine.bridge import EngineMLPHead

    if backend_of(net) == "engine":
        if not callable(getattr(net, "to_autograd", None)):
            raise ValueError(f"{type(net).__name__} is an engine network without an autograd twin (to_autograd): it "
                             "cannot be exported")
        net = net.to_autograd()
    else:
        net = copy.deepcopy(net)

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, EngineMLPHead):
                setattr(module, name, child.mlp.to_autograd())
            else:
                replace(child)

    replace(net)
    return net.eval()


def run_gru(gru: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """``gru`` (batch-first) over padded ``x[B, T, F]`` without packing: what ``pad_packed_sequence(gru(
    pack_padded_sequence(x, lengths)))`` gives, zero at padding. The forward direction runs as is, the backward one
    over each sequence reversed within its length (as :func:`bp_apps.text.labeling.rnn.run_lstm` does for LSTMs):
    ``torch.export`` cannot trace packing, whose shapes depend on the lengths' values."""
    steps = x.shape[1]
    lengths = lengths.clamp(min=1).to(x.device)
    positions = torch.arange(steps, device=x.device)
    valid = positions < lengths[:, None]
    reverse = torch.where(valid, lengths[:, None] - 1 - positions, positions).unsqueeze(-1)
    out = x
    for layer in range(gru.num_layers):
        outputs = [_gru_direction(gru, out, layer, "")]
        if gru.bidirectional:
            backward = _gru_direction(gru, out.gather(1, reverse.expand(-1, -1, out.shape[2])), layer, "_reverse")
            outputs.append(backward.gather(1, reverse.expand(-1, -1, backward.shape[2])))
        out = torch.cat(outputs, dim=-1)
    return out.masked_fill(~valid.unsqueeze(-1), 0.0)


def _gru_direction(gru: nn.GRU, x: Tensor, layer: int, suffix: str) -> Tensor:
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if gru.bias else ())
    params = [getattr(gru, f"{name}_l{layer}{suffix}") for name in names]
    hidden = x.new_zeros(1, x.shape[0], gru.hidden_size)
    return torch.gru(x, hidden, params, gru.bias, 1, 0.0, False, False, True)[0]


@contextlib.contextmanager
def _unpacked_speech_gru() -> Iterator[None]:
    """While tracing for ``torch.export``, the speech networks run their GRUs by :func:`run_gru` instead of
    packing (the same values; the parity check compares with the packed original)."""
    from bp_apps.speech import models

    packed = models._masked_gru
    models._masked_gru = run_gru
    try:
        yield
    finally:
        models._masked_gru = packed


class _Arguments(nn.Module):
    """A network that takes one tuple (or dict) called with separate inputs, so exporters see named tensors."""

    def __init__(self, net: nn.Module, pack: Callable[..., Any]) -> None:
        super().__init__()
        self.net, self.pack = net, pack

    def forward(self, *inputs: Tensor) -> Any:
        return self.net(self.pack(*inputs))


def _lengths(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """Sequence lengths in [length / 2, length], the first one full (so the padded length is ``length``)."""
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=generator)
    lengths[0] = length
    return lengths


# -- the specs of each task -----------------------------------------------------------------------

def _vision_spec(path: Path, sample_length: int | None) -> ExportSpec:
    from bp_apps.vision.task import load_image_classifier

    model, prep = load_image_classifier(path)
    shape = tuple(int(s) for s in prep["input_shape"])

    def sample(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, *shape, generator=generator),)

    return ExportSpec(
        autograd_network(model.net), model.net, ("images",), ("logits",),
        {"images": {0: "batch"}, "logits": {0: "batch"}}, sample, 0,
        {"images": f"float32 (batch, {', '.join(map(str, shape))}): the image resized to {shape[1]}x{shape[2]}, "
                   f"{'grayscale' if shape[0] == 1 else 'RGB'}, scaled to [0, 1], then (x - mean) / std",
         "logits": f"float32 (batch, {len(prep['class_names'])}): class scores; softmax gives probabilities"},
        {"preprocessing": {k: prep[k] for k in ("input_shape", "mean", "std", "class_names")}})


def _speech_spec(path: Path, sample_length: int | None) -> ExportSpec:
    from bp_apps.speech.task import SpokenDigitClassifier, load_speech_model

    model, prep = load_speech_model(path)
    dim = int(model.hparams["input_dim"])
    net = model.net
    if type(net).__name__ == "Wav2Vec2CTC":
        raise ValueError(f"{path}: a wav2vec 2.0 recognizer exports in Hugging Face form: use --format hf")
    length = sample_length or 120

    def sample(batch: int, frames: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return torch.randn(batch, frames, dim, generator=generator), _lengths(batch, frames, generator)

    features = (f"float32 (batch, frames, {dim}): the {prep['features'].get('kind', 'logmel')} features of "
                "bp_apps.speech.features.make_extractor for the feature settings in 'preprocessing', zero-padded")
    extra = {"preprocessing": prep}
    if isinstance(model, SpokenDigitClassifier):
        def pack(features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
            return features, lengths

        names = prep.get("class_names")
        return ExportSpec(
            _Arguments(autograd_network(net), pack), lambda f, n: net((f, n)), ("features", "lengths"), ("logits",),
            {"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}, "logits": {0: "batch"}}, sample, length,
            {"features": features, "lengths": "int64 (batch,): the real frames of each row",
             "logits": f"float32 (batch, {len(names or []) or 'classes'}): scores of the class names"}, extra)
    return ExportSpec(
        autograd_network(net), net, ("features", "lengths"), ("log_probs", "out_lengths"),
        {"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}, "log_probs": {0: "batch", 1: "out_frames"},
         "out_lengths": {0: "batch"}}, sample, length,
        {"features": features, "lengths": "int64 (batch,): the real frames of each row",
         "log_probs": "float32 (batch, out_frames, characters): CTC log-probabilities over "
                      "bp_apps.speech.decoding.TOKENS (index 0: blank); decode greedily or by beam search",
         "out_lengths": "int64 (batch,): the real output frames of each row"}, extra)


def _labeling_spec(path: Path, sample_length: int | None) -> ExportSpec:
    from bp_apps.text.labeling.models import BiLSTMTagger
    from bp_apps.text.labeling.task import load_labeler

    module = load_labeler(path)
    net, vocab = module.net, module.vocab
    if not isinstance(net, BiLSTMTagger) or vocab is None:
        raise ValueError(f"{path}: ONNX and torch-export cover the BiLSTM tagger; this checkpoint's "
                         f"{type(net).__name__} (a transformer with its own tokenizer) exports with --format hf")
    names = ("words", "chars", "predicate", "predicate_class", "mask")

    def pack(words: Tensor, chars: Tensor, predicate: Tensor, predicate_class: Tensor, mask: Tensor) -> dict:
        return {"words": words, "chars": chars, "predicate": predicate, "predicate_class": predicate_class,
                "mask": mask}

    def sample(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        lengths = _lengths(batch, length, generator)
        mask = torch.arange(length)[None] < lengths[:, None]
        words = torch.randint(1, len(vocab.words), (batch, length), generator=generator) * mask
        width = max(3, length // 4)
        chars = torch.randint(1, len(vocab.chars), (batch, length, width), generator=generator) * mask[..., None]
        chars[..., width // 2:] *= torch.rand(batch, length, 1, generator=generator) < 0.5  # words of two lengths
        predicate = torch.zeros(batch, length, dtype=torch.long)
        if module.has_predicates:
            predicate[torch.arange(batch), (torch.rand(batch, generator=generator) * lengths).long()] = 1
        classes = torch.randint(0, 5, (batch,), generator=generator)
        return words, chars, predicate, classes, mask

    labels = vocab.labels
    return ExportSpec(
        _Arguments(autograd_network(net), pack), lambda *x: net(pack(*x)), names, ("emissions",),
        {"words": {0: "batch", 1: "tokens"}, "chars": {0: "batch", 1: "tokens", 2: "characters"},
         "predicate": {0: "batch", 1: "tokens"}, "predicate_class": {0: "batch"}, "mask": {0: "batch", 1: "tokens"},
         "emissions": {0: "batch", 1: "tokens"}}, sample, sample_length or 12,
        {"words": "int64 (batch, tokens): word ids of vocab.words (0 padding, 1 unknown; words lower-cased, digits "
                  "as 0, as bp_apps.text.labeling.data.collate_sentences does)",
         "chars": "int64 (batch, tokens, characters): character ids of vocab.chars (at most 20 per word)",
         "predicate": "int64 (batch, tokens): 1 at the predicate (SRL), else 0",
         "predicate_class": "int64 (batch,): the predicate's POS class (0 unknown, 1 verb, 2 noun, 3 adjective, "
                            "4 other)",
         "mask": "bool (batch, tokens): true on real tokens",
         "emissions": f"float32 (batch, tokens, {len(labels)}): per-word label scores; decode with the CRF of the "
                      "checkpoint (Viterbi) or per-token argmax constrained to valid BIO"},
        {"vocab": vocab.to_dict(), "labels": labels, "crf": module.crf is not None,
         "has_predicates": module.has_predicates})


SPECS = {VISION: _vision_spec, RECOGNIZER: _speech_spec, SPOKEN_DIGITS: _speech_spec, LABELING: _labeling_spec}


# -- exporting and checking -----------------------------------------------------------------------

def _flat(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for item in outputs for t in _flat(item)]


def _max_difference(exported: Sequence[Any], reference: Sequence[Tensor], names: Sequence[str]) -> float:
    if len(exported) != len(reference):
        raise ValueError(f"the export gives {len(exported)} outputs, PyTorch {len(reference)} ({', '.join(names)})")
    worst = 0.0
    for name, got, want in zip(names, exported, reference):
        got = torch.as_tensor(got)
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"output {name!r}: the export gives shape {tuple(got.shape)}, PyTorch "
                             f"{tuple(want.shape)}")
        worst = max(worst, float((got.double() - want.detach().double()).abs().max()) if want.numel() else 0.0)
    return worst


def _check_parity(spec: ExportSpec, run: Callable[[tuple[Tensor, ...]], Sequence[Any]], static_length: bool,
                  tolerance: float) -> dict[str, Any]:
    """Run the export and the PyTorch network on the export sample and on :data:`CHECK_SIZES` inputs; the
    largest difference, refused (ValueError) above ``tolerance``."""
    generator = torch.Generator().manual_seed(0)
    length = spec.sample_length
    sizes = [(2, length)] + [(batch, length if static_length or not length else max(2, round(scale * length)))
                             for batch, scale in CHECK_SIZES]
    worst, checked = 0.0, []
    for batch, size in sizes:
        inputs = spec.sample(batch, size, generator)
        with torch.no_grad():
            reference = _flat(spec.reference(*inputs))
        worst = max(worst, _max_difference(run(inputs), reference, spec.output_names))
        checked.append({name: list(t.shape) for name, t in zip(spec.input_names, inputs)})
    if not worst <= tolerance:
        raise ValueError(f"parity check failed: the export's outputs differ from PyTorch's by up to {worst:.3g} "
                         f"(allowed {tolerance:g}); nothing was written")
    return {"max_abs_diff": worst, "tolerance": tolerance, "inputs_checked": checked}


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")  # the exporters' tracer and deprecation warnings say nothing to act on
    return stack


def _export_onnx(spec: ExportSpec, tmp: Path, tolerance: float) -> dict[str, Any]:
    require("onnx", "export", "export --format onnx")
    ort = require("onnxruntime", "export", "export --format onnx")
    sample = spec.sample(2, spec.sample_length, torch.Generator().manual_seed(1))
    with _quiet(), torch.no_grad():
        torch.onnx.export(spec.network, sample, str(tmp), dynamo=False, input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic, opset_version=ONNX_OPSET)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    used = [i.name for i in session.get_inputs()]  # an input the network ignores is not in the graph

    def run(inputs: tuple[Tensor, ...]) -> list[Any]:
        feed = {name: t.numpy() for name, t in zip(spec.input_names, inputs) if name in used}
        return session.run(list(spec.output_names), feed)

    report = _check_parity(spec, run, False, tolerance)
    return {**report, "runtime": f"onnxruntime {ort.__version__}", "opset": ONNX_OPSET,
            "inputs": used, "dynamic_axes": {k: v for k, v in spec.dynamic.items() if k in used or
                                             k in spec.output_names}}


def _export_program(spec: ExportSpec, tmp: Path, tolerance: float) -> dict[str, Any]:
    sample = spec.sample(2, spec.sample_length, torch.Generator().manual_seed(1))
    static_length = bool(spec.sample_length)  # see the module's docstring
    auto = torch.export.Dim.AUTO
    shapes: Any = tuple({axis: auto for axis in spec.dynamic.get(name, {}) if axis == 0 or not static_length} or None
                        for name in spec.input_names)
    if isinstance(spec.network, _Arguments):
        shapes = (shapes,)  # the specs of its one *inputs argument
    with _quiet(), torch.no_grad(), _unpacked_speech_gru():
        program = torch.export.export(spec.network, sample, dynamic_shapes=shapes, strict=False)
    torch.export.save(program, str(tmp))
    with _quiet():
        loaded = torch.export.load(str(tmp)).module()
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    dynamic = {name: [axis for axis, size in enumerate(node.meta["val"].shape) if not isinstance(size, int)]
               for name, node in zip(spec.input_names, user)}

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        with torch.no_grad():
            return _flat(loaded(*inputs))

    report = _check_parity(spec, run, static_length, tolerance)
    notes = {}
    if static_length:
        notes["fixed_length"] = (f"the time/token axis is fixed at {spec.sample_length}: pad inputs to it "
                                 "(lengths/mask mark the real ones) or export again with another --sample-length")
    return {**report, "runtime": f"torch {torch.__version__} (torch.export.load)", "inputs": list(spec.input_names),
            "dynamic_axes": dynamic, **notes}


def default_output(checkpoint: Path, format: str) -> Path:
    """Next to the checkpoint: ``<stem>.onnx``, ``<stem>.pt2`` or the folder ``<stem>_hf``."""
    return checkpoint.with_name(f"{checkpoint.stem}_hf") if format == "hf" else checkpoint.with_suffix(
        SUFFIXES[format])


def export_model(checkpoint: str | Path, out: str | Path | None = None, format: str = "onnx", *,
                 sample_length: int | None = None, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export the network of ``checkpoint`` (any task's) to ``out`` (default: :func:`default_output`) as
    ``onnx``, ``torch-export`` or ``hf``; returns the report also written to ``<out>.json`` (paths, inputs and
    outputs, the parity check's largest difference). ``sample_length`` is the frames / tokens of the export sample
    (a ``torch-export`` program takes exactly that length). A failed parity check raises ValueError and
    writes nothing."""
    checkpoint = Path(checkpoint)
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if sample_length is not None and sample_length < 2:
        raise ValueError(f"export: sample_length must be at least 2, got {sample_length}")
    task = checkpoint_task(checkpoint)
    out = Path(out) if out is not None else default_output(checkpoint, format)
    if format == "hf":
        return _export_hf(task, checkpoint, out)
    if task == SUMMARIZATION:
        raise ValueError(f"{checkpoint}: a summarization model (a transformers encoder-decoder with generate) does "
                         f"not export to {format}; use --format hf (save_pretrained form)")
    if out.is_dir():
        raise ValueError(f"export: --out {out} is a folder; give the path of the {SUFFIXES[format]} file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = SPECS[task](checkpoint, sample_length)
    with atomic_output(out, suffix=SUFFIXES[format]) as tmp:  # renamed to `out` only when the parity check passes
        try:
            if format == "onnx":
                report = _export_onnx(spec, tmp, tolerance)
            else:
                report = _export_program(spec, tmp, tolerance)
        except (RuntimeError, TypeError, NotImplementedError) as error:
            raise ValueError(f"{checkpoint}: could not export {type(spec.network).__name__} to {format}: "
                             f"{str(error).splitlines()[0][:300]}") from error
    report = {"checkpoint": str(checkpoint), "task": task, "format": format, "path": str(out),
              "network": type(spec.network).__name__, **report,
              "io": spec.describe, **({"sample_length": spec.sample_length} if spec.sample_length else {}),
              **spec.extra}
    atomic_write_text(f"{out}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _export_hf(task: str, checkpoint: Path, out: Path) -> dict[str, Any]:
    """``export_hugging_face(checkpoint, out)`` of the task's ``hf_export`` module."""
    name = HF_MODULES.get(task)
    if name is None:
        raise ValueError(f"{checkpoint}: an image classifier has no Hugging Face export; use --format onnx or "
                         "torch-export")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ValueError(f"{checkpoint}: this bp_apps has no Hugging Face export for {task} ({name})") from None
    result = module.export_hugging_face(checkpoint, out)
    return {"checkpoint": str(checkpoint), "task": task, "format": "hf", "path": str(result or out)}


def format_report(report: dict[str, Any]) -> str:
    """The lines ``bp-apps export`` prints."""
    lines = [f"wrote {report['path']} ({report['task']}, {report['format']})"]
    if "max_abs_diff" in report:
        runtime = "onnxruntime" if report["format"] == "onnx" else "the reloaded program"
        lines.append(f"parity: max |{runtime} - pytorch| = {report['max_abs_diff']:.3g} over "
                     f"{len(report['inputs_checked'])} input batches (allowed {report['tolerance']:g})")
        if "fixed_length" in report:
            lines.append(f"note: {report['fixed_length']}")
        lines.append(f"wrote {report['path']}.json")
    return "\n".join(lines)
