"""The ``bp-apps`` command.

``fit | validate | test | predict`` go to Lightning's CLI (the config's ``class_path`` picks
the model and data module); ``demo``, ``compare`` and ``bench`` are the core's own commands;
``plot`` draws a run's curves; the others predict with a task's checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    from bp_apps.experiments.compare import CompareConfig

    defaults = CompareConfig()
    parser.add_argument("--width", type=int, default=defaults.width, help="hidden layer width")
    parser.add_argument("--depth", type=int, default=defaults.depth, help="number of hidden layers")
    parser.add_argument("--activation", default=defaults.activation,
                        choices=["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh"])
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=["sgd", "adam", "adamw"])
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float64"])
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and batch order")
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed, help="train/test split")
    parser.add_argument("--out", type=Path, default=None, help="folder for compare.md and compare.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--task", default="digits", choices=["digits", *TASK_COMPARE_CONFIGS],
                        help="digits: the MLP above on the embedded digits; vision, speech, labeling, summarization: "
                        "the task's engine model from --config, its first --steps training batches (default: digits)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a task's engine config (default: configs/vision/mnist_cnn_engine.yaml, "
                        "configs/speech/fsdd_connected_ctc_engine.yaml, configs/text/srl_propbank_ewt_engine.yaml, "
                        "configs/text/summarize_aeslc_engine.yaml)")
    parser.add_argument("--steps", type=int, default=50,
                        help="a task's engine model: training steps compared (default 50)")
    parser.add_argument("--task-optimizer", action="store_true",
                        help="tasks: step with the config's optimizer (e.g. AdamW) instead of SGD with "
                        "momentum 0.9 at its learning rate; Adam's per-entry scaling turns float32 rounding in "
                        "near-zero gradients into ±lr steps, so trajectories part by ~1e-4")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="tasks: a config override, as the fit command takes it without its dashes "
                        "(e.g. --set data.batch_size=64); repeatable")


ENGINE_CONFIGS = ("configs/vision/mnist_cnn_engine.yaml", "configs/speech/fsdd_connected_ctc_engine.yaml",
                  "configs/speech/fsdd_digits_engine.yaml", "configs/text/srl_propbank_ewt_engine.yaml",
                  "configs/text/summarize_aeslc_engine.yaml")
TASK_COMPARE_CONFIGS = {"vision": "configs/vision/mnist_cnn_engine.yaml",
                        "speech": "configs/speech/fsdd_connected_ctc_engine.yaml",
                        "labeling": "configs/text/srl_propbank_ewt_engine.yaml",
                        "summarization": "configs/text/summarize_aeslc_engine.yaml"}


def _compare_task(args: argparse.Namespace) -> dict:
    """The report of ``compare --task vision|speech``: model and data from the config, as ``fit`` builds them."""
    from bp_apps.experiments.compare_tasks import compare_task_modules

    config = args.config or Path(TASK_COMPARE_CONFIGS[args.task])
    if not config.is_file():
        raise FileNotFoundError(f"compare --task {args.task}: no config file {config} (give one with --config)")
    if args.steps < 1:
        raise ValueError(f"compare: --steps must be at least 1, got {args.steps}")
    overrides = []
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"compare: --set takes KEY=VALUE, got {item!r}")
        overrides.append(f"--{item}")
    model, data = instantiate_for_training(config, overrides)
    setup = f"{config}{' ' + ' '.join(args.set) if args.set else ''}"
    return compare_task_modules(model, iter(data.train_dataloader()), steps=args.steps, setup=setup,
                                optimizer="task" if args.task_optimizer else "sgd", dtype=args.dtype)


def instantiate_from_config(config: Path, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """The model and data module a ``fit`` config (plus ``--key=value`` overrides) builds, linked as in ``fit``."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class InstantiateCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            link_data_to_model(parser)

    with warnings.catch_warnings():  # its "args and sys.argv both given" warning: they are not the same here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = InstantiateCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                             subclass_mode_data=True, run=False, save_config_callback=None,
                             auto_configure_optimizers=False,
                             args=["--config", str(config), *overrides, "--trainer.logger=false"])
    return cli.model, cli.datamodule


def instantiate_for_training(config: Path, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """:func:`instantiate_from_config`, with the data prepared and set up for fitting and the network built (the
    text tasks build theirs in ``setup`` from the data's vocabulary or tokenizer file)."""
    model, data = instantiate_from_config(config, overrides)
    data.prepare_data()
    data.setup("fit")
    if getattr(model, "net", None) is None:
        model.setup("fit")
    return model, data


def link_data_to_model(parser: Any) -> None:
    """Link each data-module attribute of ``LINKED`` (class count, input shape or feature size, class names,
    training words, vocabulary and tokenizer files) to the model's argument of the same name. A link applies when
    the data module has the attribute and the model the argument, and then wins over the config's value."""
    from bp_apps.core.datalink import LINKED

    for name in LINKED:
        parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def _run_compare(args: argparse.Namespace, default_out: str) -> int:
    from bp_apps.experiments.compare import CompareConfig, format_markdown, run_comparison, write_report

    if args.task != "digits":
        report = _compare_task(args)
        print(format_markdown(report))
        paths = write_report(report, args.out or Path(f"{default_out}-{args.task}"), args.json)
        print()
        for kind, path in paths.items():
            print(f"wrote {kind}: {path}")
        return 0
    config = CompareConfig(width=args.width, depth=args.depth, activation=args.activation,
                           batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                           momentum=args.momentum, dtype=args.dtype, device=args.device, seed=args.seed,
                           split_seed=args.split_seed)
    report = run_comparison(config)
    print(format_markdown(report))
    paths = write_report(report, args.out or Path(default_out), args.json)
    print()
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    if args.what == "core":
        from bp_apps.experiments.bench import format_core_table, run_core_bench

        report = run_core_bench(sizes=args.sizes, repeats=args.repeats, device=args.device)
        print(format_core_table(report))
    elif args.what == "layers":
        from bp_apps.experiments.bench_layers import (
            LAYER_CASES,
            format_layers_table,
            run_layers_bench,
            synthetic_batch,
        )

        names = {case.layer for case in LAYER_CASES}
        chosen = names if args.layers is None else set(args.layers.split(","))
        if chosen - names:
            raise ValueError(f"bench layers: unknown layer {', '.join(sorted(chosen - names))}; choose among "
                             f"{', '.join(sorted(names))}")
        models = []
        for config in args.configs:
            model, data = instantiate_from_config(Path(config))
            batch_size = getattr(data, "batch_size", None) or data.hparams["batch_size"]
            batch = synthetic_batch(model, batch_size)
            if batch is None:  # text: a real batch (its vocabulary and tokenizer come from the data)
                model, data = instantiate_for_training(Path(config))
                batch = next(iter(data.train_dataloader()))
            models.append((model.task_name, config, model, batch))
        report = run_layers_bench(models, device=args.device, repeats=args.repeats or 20,
                                  cases=[case for case in LAYER_CASES if case.layer in chosen])
        print(format_layers_table(report))
    elif args.what == "privacy":
        from bp_apps.experiments.bench_privacy import format_privacy_table, run_privacy_bench

        report = run_privacy_bench(batches=args.batches, repeats=args.repeats or 10, threads=args.threads)
        print(format_privacy_table(report))
    else:
        from bp_apps.experiments.bench_digits import format_digits_table, run_digits_bench

        report = run_digits_bench(seeds=range(args.seeds))
        print(format_digits_table(report))
    if args.json:
        from bp_apps.core.io import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x128,256x512' -> ((64, 128), (256, 512))."""
    try:
        sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must look like 64x128,256x512 (positive BATCHxHIDDEN), got {text!r}")
    return sizes  # type: ignore[return-value]


def _parse_batches(text: str) -> tuple[int, ...]:
    """'256,64' -> (256, 64)."""
    try:
        batches = tuple(int(item) for item in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) <= 0:
        raise argparse.ArgumentTypeError(f"batches must look like 256,64 (positive batch sizes), got {text!r}")
    return batches


def _lightning(argv: Sequence[str]) -> int:
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

    import bp_apps.core.distributed  # noqa: F401  (registers the `ddp_engine` strategy name)
    from bp_apps.core.internals import checkpoint_is_data_cli

    class BpAppsCLI(checkpoint_is_data_cli()):
        """LightningCLI that passes the model what it needs from the data, logs to CSV (and TensorBoard when
        installed) unless the config names a logger, writes checkpoints atomically (:func:`use_atomic_checkpoints`),
        takes a ``--ckpt_path`` checkpoint as data, never as configuration (its task checked first), adds
        :func:`default_callbacks` to the callbacks of the config and command line, and, after ``fit``, tests the
        best checkpoint when the data has a test split."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            link_data_to_model(parser)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            trainer = config.trainer
            callbacks = default_callbacks(trainer.enable_progress_bar, callback_classes(trainer.callbacks),
                                          trainer.enable_model_summary)
            model_class = callback_classes(config.model)[0] if getattr(config.model, "class_path", None) else None
            offered = getattr(model_class, "user_data_callback", None)  # a task's check of a user's data module
            self.trainer_defaults["callbacks"] = [*callbacks, *([offered()] if offered is not None else [])]

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            if self.config[self.subcommand].trainer.logger in (None, True):  # the default: replace it
                self.trainer.loggers = default_loggers(self.trainer.default_root_dir)
            use_atomic_checkpoints(self.trainer)

        def after_fit(self) -> None:
            if self.trainer.interrupted or not hasattr(self.datamodule, "test_dataloader"):
                return
            from bp_apps.core.callbacks import best_checkpoint_callback

            best = getattr(best_checkpoint_callback(self.trainer), "best_model_path", "") or None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    class SaveConfigToLogs(SaveConfigCallback):
        """``config.yaml`` into the logger's folder; a run without a logger writes none (Lightning's would land in
        the current folder)."""

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if trainer.loggers:
                super().setup(trainer, pl_module, stage)

    # LightningCLI warns when it is given args while sys.argv has some too (it cannot tell that they are the same);
    # when they are, it reads sys.argv itself. (sys.argv must stay as it is: DDP starts its other processes with it.)
    args = None if list(argv) == sys.argv[1:] else list(argv)
    # auto_configure_optimizers=False: a task's optimizer and schedule are its `optim` group; LightningCLI's own
    # --optimizer/--lr_scheduler would replace both without a word (and cannot drive the engine's optimizers).
    try:
        BpAppsCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=args, save_config_callback=SaveConfigToLogs, save_config_kwargs={"overwrite": True},
                  auto_configure_optimizers=False, parser_kwargs=help_listing_kwargs(argv))
    except MisconfigurationException as error:  # a Trainer setting the model cannot take: a bad setting
        raise ValueError(explain_misconfiguration(str(error))) from error
    return 0


LISTED_MODULES = {
    "model": ("bp_apps.vision.task", "bp_apps.speech.task", "bp_apps.text.labeling.task",
              "bp_apps.text.summarization.task"),
    "data": ("bp_apps.vision.data", "bp_apps.speech.data", "bp_apps.text.labeling.data",
             "bp_apps.text.summarization.data"),
}
"""The modules whose LightningModule (``model``) and LightningDataModule (``data``) classes ``fit --help`` lists."""
NOT_LISTED = frozenset({"VisionDataModule", "SpeechDataModule", "RecognitionDataModule"})
"""Base classes in those modules that are not used by themselves."""
_MARKUP = ((re.compile(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`"), r"\1"), (re.compile(r"``([^`]*)``"), r"\1"))


def summary_line(cls: type) -> str:
    """The first sentence of a class's docstring, on one line and without reST markup."""
    paragraph = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    for pattern, replacement in _MARKUP:
        paragraph = pattern.sub(replacement, paragraph)
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def listed_classes(kind: str) -> list[tuple[str, str]]:
    """``(class path, summary line)`` for the suite's task classes (``kind="model"``) or data modules (``"data"``)
    that the Lightning subcommands accept, in the order of :data:`LISTED_MODULES`."""
    import lightning as L

    base = L.LightningModule if kind == "model" else L.LightningDataModule
    found = []
    for module_name in LISTED_MODULES[kind]:
        for name, cls in vars(importlib.import_module(module_name)).items():
            if (isinstance(cls, type) and issubclass(cls, base) and cls.__module__ == module_name
                    and not name.startswith("_") and name not in NOT_LISTED):
                found.append((f"{module_name}.{name}", summary_line(cls)))
    return found


def help_listing(width: int = 120) -> str:
    """The task classes and data modules with one line each, for the Lightning subcommands' ``--help``."""
    groups = (("task classes (--model=CLASS_PATH, or model.class_path in a config):", listed_classes("model")),
              ("data modules (--data=CLASS_PATH; your own LightningDataModule yielding the task's batches works too):",
               listed_classes("data")))
    lines = []
    for title, entries in groups:
        column = max(len(path) for path, _ in entries) + 2
        lines.append(title)
        for path, summary in entries:
            line = f"  {path:<{column}}{summary}"
            lines.append(line if len(line) <= width else line[: width - 4].rsplit(" ", 1)[0] + " ...")
        lines.append("")
    return "\n".join(lines).rstrip()


def help_listing_kwargs(argv: Sequence[str]) -> dict[str, Any]:
    """LightningCLI's ``parser_kwargs`` that put :func:`help_listing` under each Lightning subcommand's help, when
    help is asked for (listing imports every task module, which an ordinary run does not need)."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return {}
    from jsonargparse import DefaultHelpFormatter

    class ListingFormatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the listing's lines as written
            return "".join(indent + line for line in text.splitlines(keepends=True))

    epilog = help_listing()
    # a subcommand's parser takes the main parser's formatter (jsonargparse), so the formatter goes there
    return {"formatter_class": ListingFormatter, **{name: {"epilog": epilog} for name in LIGHTNING_SUBCOMMANDS}}


ENGINE_TRAINER_HINT = ("the engine backend takes its own optimizer steps: clip gradients with "
                       "--model.optim.max_grad_norm=VALUE (not --trainer.gradient_clip_val), and it steps on every "
                       "batch (no --trainer.accumulate_grad_batches: raise the data's batch_size instead)")


def explain_misconfiguration(message: str) -> str:
    """Lightning's message for a Trainer setting the model refuses, with what to do for the engine backend."""
    if "manual optimization" in message:
        return f"{message} — {ENGINE_TRAINER_HINT}"
    return message


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give the trainer's strategy :class:`~bp_apps.core.checkpoint_io.AtomicCheckpointIO` unless a config chose
    another checkpoint plugin than Lightning's default."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from bp_apps.core.checkpoint_io import AtomicCheckpointIO

    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def callback_classes(entries: Sequence[Any] | Any | None) -> list[type]:
    """The classes named by a parsed ``trainer.callbacks`` setting (one ``class_path`` entry, a list, or None)."""
    entries = entries if isinstance(entries, list) else [] if entries is None else [entries]
    classes = []
    for entry in entries:
        module, _, name = entry.class_path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def default_callbacks(enable_progress_bar: bool | None, given: Sequence[type],
                      enable_model_summary: bool | None = None) -> list:
    """The callbacks every Lightning command adds to the config's and the command line's (``given``, their
    classes): ``metrics.json`` unless a ``MetricsJson`` is given, ``predictions.jsonl`` (after ``predict``) unless a
    prediction writer is given, a model summary that counts an engine network's weights as trainable unless the
    summary is off or another is given, and Rich's progress bar unless the progress bar
    is off, another progress bar is given, or rich is not installed (Lightning's tqdm bar then stays). Rich's bar
    draws nothing when the output is not a terminal."""
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, ProgressBar, RichProgressBar

    from bp_apps.core.callbacks import MetricsJson, PredictionsJsonl
    from bp_apps.core.internals import EngineAwareModelSummary, EngineAwareRichModelSummary

    callbacks: list = [] if any(issubclass(c, MetricsJson) for c in given) else [MetricsJson()]
    if not any(issubclass(c, BasePredictionWriter) for c in given):
        callbacks.append(PredictionsJsonl())
    if enable_progress_bar is not False and not any(issubclass(c, ProgressBar) for c in given):
        with contextlib.suppress(ModuleNotFoundError):  # rich is not installed
            callbacks.append(RichProgressBar())
    if enable_model_summary is not False and not any(issubclass(c, ModelSummary) for c in given):
        # Lightning's own (Rich's when rich is installed), counting an engine network's weights as trainable
        rich = importlib.util.find_spec("rich") is not None
        callbacks.append(EngineAwareRichModelSummary() if rich else EngineAwareModelSummary())
    return callbacks


def default_loggers(root: str | Path) -> list:
    """A CSVLogger (read by ``bp-apps plot``) and, when tensorboard or tensorboardX is installed, a
    TensorBoardLogger, both writing into the same ``<root>/lightning_logs/version_N`` folder."""
    from lightning.pytorch.loggers import CSVLogger

    from bp_apps.core.internals import unique_file_tensorboard_logger

    csv_logger = CSVLogger(root, name="lightning_logs")
    loggers: list = [csv_logger]
    with contextlib.suppress(ModuleNotFoundError):  # neither tensorboard nor tensorboardX: CSV only
        loggers.append(unique_file_tensorboard_logger()(
            root, name="lightning_logs", version=csv_logger.version, default_hp_metric=False))
    return loggers


def _run_plot(args: argparse.Namespace) -> int:
    from bp_apps.experiments.plot import plot_runs

    out = args.out or Path(args.runs[0]) / "plots"
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    for path in plot_runs(args.runs, out, metrics):
        print(f"wrote {path}")
    return 0


def _run_predict_image(args: argparse.Namespace) -> int:
    from bp_apps.vision.task import predict_images

    results = predict_images(args.paths, args.ckpt, args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        ranked = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in result["top"])
        print(f"{result['path']}\t{ranked}")
    return 0


def _run_privacy_audit(args: argparse.Namespace) -> int:
    from bp_apps.experiments.privacy_audit import audit_checkpoint, format_audit

    check_output_file(args.json, ckpt=args.ckpt)
    report = audit_checkpoint(args.ckpt, members=args.members, seed=args.seed)
    print(format_audit(report))
    if args.json:
        from bp_apps.core.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def check_output_file(out: Path | None, **inputs: Path | None) -> None:
    """Refuse, before any work, an ``--out`` that is a folder or one of the command's ``inputs`` (option name ->
    path): writing it would replace an input."""
    if out is None:
        return
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the JSONL file to write")
    for option, path in inputs.items():
        if path is not None and out.exists() and Path(path).exists() and out.resolve() == Path(path).resolve():
            raise ValueError(f"--out {out} is the input given as --{option}: writing it would replace the input; "
                             "choose another path")


def _emit_jsonl(records: list[dict], out: Path | None) -> int:
    """One JSON record per line: printed, or written (atomically) to ``out``."""
    from bp_apps.core.io import write_jsonl

    if out is None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    else:
        write_jsonl(out, records)
        print(f"wrote {len(records)} records to {out}")
    return 0


def _run_label(args: argparse.Namespace) -> int:
    from bp_apps.text.labeling.formats import read_labeled_file
    from bp_apps.text.labeling.task import format_labeled, label_sentences, label_text, load_labeler

    check_output_file(args.out, file=args.file, ckpt=args.ckpt)
    module = load_labeler(args.ckpt)
    if args.file is None:
        if args.text is None:
            raise ValueError("give TEXT or --file PATH")
        result = label_text(module, args.text, args.predicate, args.predicate_pos)
        print(json.dumps(result, ensure_ascii=False) if args.json else format_labeled(result))
        return 0
    sentences = read_labeled_file(args.file, require_tags=False)
    tags = label_sentences(module, sentences)
    records = [{**({"id": s.id} if s.id is not None else {}), "tokens": list(s.tokens),
                **({"predicate": s.predicate} if s.predicate is not None else {}), "tags": t}
               for s, t in zip(sentences, tags)]
    return _emit_jsonl(records, args.out)


def _run_summarize(args: argparse.Namespace) -> int:
    from bp_apps.text.summarization.data import read_records
    from bp_apps.text.summarization.task import load_summarizer, summarize

    check_output_file(args.out, file=args.file, ckpt=args.ckpt)
    module = load_summarizer(args.ckpt)
    generation = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens),
                                    ("mbr_samples", args.mbr_samples)) if v is not None}
    if args.file is None:
        if args.text is None:
            raise ValueError("give TEXT or --file PATH")
        summary = summarize(module, [args.text], **generation)[0]
        print(json.dumps({"summary": summary}, ensure_ascii=False) if args.json else summary)
        return 0
    records = read_records(args.file, source_field=args.field, require_target=False)
    summaries = summarize(module, [r.source for r in records], **generation)
    results = [{**({"id": r.id} if r.id is not None else {}), "summary": s} for r, s in zip(records, summaries)]
    return _emit_jsonl(results, args.out)


def _run_transcribe(args: argparse.Namespace) -> int:
    from bp_apps.speech.task import transcribe

    results = transcribe(args.paths, args.ckpt, beam_size=args.beam)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for result in results:
        print(f"{result['path']}\t{result['text']}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from bp_apps.deploy.serve import serve

    if not args.max_request_mb > 0:
        raise ValueError(f"--max-request-mb must be positive, got {args.max_request_mb}")
    serve(args.ckpt, args.host, args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
          max_request_bytes=int(args.max_request_mb * 2**20))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from bp_apps.deploy.export import export_model, format_report

    print(format_report(export_model(args.ckpt, args.out, args.format, sample_length=args.sample_length)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bp-apps", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"Lightning {name} from a YAML config (bp-apps {name} --help for its options)",
                       add_help=False)
    demo = sub.add_parser("demo", help="the main job: engine vs autograd on the embedded digits data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the report files")
    demo.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    compare = sub.add_parser("compare", help="train both backends side by side (digits, or a task's engine model) "
                             "and write a report")
    _add_compare_options(compare)
    bench = sub.add_parser("bench", help="benchmarks: 'core' (ms per MLP step), 'layers' (each engine layer and task "
                           "model vs autograd), 'digits' (accuracy, vs scikit-learn) or 'privacy' (DP-SGD step, "
                           "engine vs Opacus)")
    bench.add_argument("what", choices=["core", "layers", "digits", "privacy"])
    bench.add_argument("--device", default="cpu", help="core, layers: cpu or cuda")
    bench.add_argument("--repeats", type=int, default=None,
                       help="core: timed steps per size (default: by size); layers: timed calls each (default 20); "
                       "privacy: timed steps each (default 10)")
    bench.add_argument("--layers", default=None, metavar="NAMES",
                       help="layers: comma-separated layer names to time (default: all)")
    bench.add_argument("--configs", nargs="*", default=list(ENGINE_CONFIGS), metavar="CONFIG",
                       help="layers: engine task configs whose training step is timed (default: %(default)s)")
    bench.add_argument("--sizes", type=_parse_sizes, default="64x128,256x512,1024x1024",
                       help="core: comma-separated BATCHxHIDDEN sizes (default: %(default)s)")
    bench.add_argument("--seeds", type=int, default=3, help="digits: number of seeds")
    bench.add_argument("--batches", type=_parse_batches, default="256,64", metavar="SIZES",
                       help="privacy: comma-separated batch sizes (default: %(default)s)")
    bench.add_argument("--threads", type=int, default=None,
                       help="privacy: torch CPU threads for the run (default: torch's own setting)")
    bench.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    plot = sub.add_parser("plot", help="loss and metric curves of one or more runs, as PNG files")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR",
                      help="a run's log folder (lightning_logs/version_N) or a folder above it; several: compared")
    plot.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: RUN_DIR/plots)")
    plot.add_argument("--metrics", default=None, help="comma-separated metric names to draw (default: all), "
                      "e.g. loss,acc")
    predict = sub.add_parser("predict-image", help="top classes with probabilities for image files")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files (any size and mode)")
    predict.add_argument("--ckpt", required=True, type=Path, help="an image-classification checkpoint")
    predict.add_argument("--top-k", type=int, default=5, help="how many classes to show (default 5)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of one line per file")
    label = sub.add_parser("label", help="tag the tokens of a text (SRL, punctuation, NER) with a labeling checkpoint")
    label.add_argument("text", nargs="?", metavar="TEXT", help="the text (split into words and punctuation)")
    label.add_argument("--ckpt", required=True, type=Path, help="a token-labeling checkpoint")
    label.add_argument("--predicate", default=None, metavar="INDEX|WORD",
                       help="SRL: the predicate, as a token index or a word (its first occurrence)")
    label.add_argument("--predicate-pos", default=None, metavar="TAG",
                       help="SRL: the predicate's POS tag (VBD, NN, JJ, VERB ...), for models trained with one; "
                            "--file reads it from each record's predicate_pos field")
    label.add_argument("--file", type=Path, default=None,
                       help="label every record of a JSONL or CoNLL file instead (tags not needed)")
    label.add_argument("--out", type=Path, default=None, help="with --file: write the JSONL here (default: stdout)")
    label.add_argument("--json", action="store_true", help="print JSON instead of one line per token")
    summ = sub.add_parser("summarize", help="summarize a text (or each record of a file) with a checkpoint")
    summ.add_argument("text", nargs="?", metavar="TEXT", help="the text to summarize")
    summ.add_argument("--ckpt", required=True, type=Path, help="a summarization checkpoint")
    summ.add_argument("--file", type=Path, default=None, help="summarize every record of a JSONL or CSV file instead")
    summ.add_argument("--field", default="source", help="with --file: the field holding the text (default: source)")
    summ.add_argument("--out", type=Path, default=None, help="with --file: write the JSONL here (default: stdout)")
    summ.add_argument("--beams", type=int, default=None, help="beam width (default: the model's)")
    summ.add_argument("--max-new-tokens", type=int, default=None,
                      help="longest summary in tokens (default: the model's)")
    summ.add_argument("--mbr-samples", type=int, default=None, metavar="N",
                      help="MBR decoding with N samples besides the beams (0: beam search alone; default: the "
                           "model's)")
    summ.add_argument("--json", action="store_true", help="print JSON")
    trans = sub.add_parser("transcribe", help="speech to text for audio files (any sample rate, mono or stereo)")
    trans.add_argument("paths", nargs="+", metavar="FILE", help="audio files soundfile can read (WAV, FLAC, OGG...)")
    trans.add_argument("--ckpt", required=True, type=Path,
                       help="a speech checkpoint (CTC recognizer or digit classifier)")
    trans.add_argument("--beam", type=int, default=None, metavar="N",
                       help="beam search with N beams (flashlight-text), restricted to the training words; 0: greedy "
                            "(default: 8 beams with the lexicon for digit models, greedy for others)")
    trans.add_argument("--json", action="store_true", help="print JSON instead of path<TAB>transcript lines")
    serve = sub.add_parser("serve", help="an HTTP server (POST /predict) for the checkpoint of any task, with "
                           "micro-batching (the 'serve' extra: FastAPI + uvicorn)")
    serve.add_argument("--ckpt", required=True, type=Path, help="a checkpoint of any task")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests run as one model call (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long a request waits for others to join its batch (default 10)")
    serve.add_argument("--max-request-mb", type=float, default=10.0,
                       help="largest request body in MiB; larger ones get 413 (default 10)")
    export = sub.add_parser("export", help="a checkpoint's network as ONNX or a torch.export program, checked "
                            "against PyTorch (the 'export' extra), or in Hugging Face form")
    export.add_argument("--ckpt", required=True, type=Path, help="a checkpoint of any task")
    export.add_argument("--format", required=True, choices=["onnx", "torch-export", "hf"], help="what to write")
    export.add_argument("--out", type=Path, default=None,
                        help="where (default: next to the checkpoint, as .onnx, .pt2 or the folder <stem>_hf)")
    export.add_argument("--sample-length", type=int, default=None, metavar="N",
                        help="frames / tokens of the export sample (a torch-export program takes exactly N; "
                             "default: 120 frames, 12 tokens)")
    audit = sub.add_parser("privacy-audit", help="membership inference against an image-classification checkpoint: "
                           "attack AUC on its training members vs test examples, and the train/test gap")
    audit.add_argument("--ckpt", required=True, type=Path, help="an image-classification checkpoint")
    audit.add_argument("--members", type=int, default=None, metavar="N",
                       help="training members audited, and as many test examples (default 2000, at most the "
                            "split sizes)")
    audit.add_argument("--seed", type=int, default=0, help="which members and test examples are drawn (default 0)")
    audit.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return parser


USER_ERRORS = (ValueError, OSError, FloatingPointError)
"""What a command reports in one line with exit status 2: bad data or settings (ValueError, a missing file), a
file that cannot be written (a full disk, a read-only folder), training that diverged (the non-finite guard)."""


def describe_error(error: BaseException) -> str:
    """The message for ``error``; a failed write names the path and says that the files already there are as
    they were (every file is written under a temporary name, then renamed)."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        return (f"could not write {error.filename}: {error.strerror or error}; files already there are unchanged "
                "(each is written under a temporary name, then renamed)")
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    # The memory profiler of `compare` makes torch's C++ logger warn about blocks allocated before
    # it started; that is expected, so only errors are shown (set before torch is imported).
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        try:
            return _lightning(argv)
        except USER_ERRORS as error:  # bad data or settings, a full disk: say which
            print(f"bp-apps {argv[0]}: error: {describe_error(error)}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            defaults = build_parser().parse_args(["compare"])
            defaults.out, defaults.json = args.out, args.json
            return _run_compare(defaults, "runs/demo")
        if args.command == "compare":
            return _run_compare(args, "runs/compare")
        if args.command == "plot":
            return _run_plot(args)
        if args.command == "predict-image":
            return _run_predict_image(args)
        if args.command == "label":
            return _run_label(args)
        if args.command == "summarize":
            return _run_summarize(args)
        if args.command == "transcribe":
            return _run_transcribe(args)
        if args.command == "privacy-audit":
            return _run_privacy_audit(args)
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "export":
            return _run_export(args)
        return _run_bench(args)
    except USER_ERRORS as error:
        print(f"bp-apps {args.command}: error: {describe_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
