"""Train the default model: ``python -m engine.training.train --out DIR [--minutes M] [--steps N] ...``.

Owns the training loop: the run directory (cached corpus, tokenizer, resumable ``checkpoint.pt``,
``loss.csv``), length-bucketed batches, AdamW with warmup and a cosine decay over the step or time budget,
periodic held-out validation loss, and the final export of the HF layout to ``OUT/model`` (and to
``--export DIR`` atomically, e.g. ``engine/default_model``). ``--init DIR`` starts from an exported model
(``engine.training.continuation``) with a fresh optimizer and schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase

from engine.training import continuation, corpus, examples, export, model_config, objective
from engine.training import tokenizer as tokenizer_lib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=None, help="step budget")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint.pt to resume from")
    parser.add_argument("--init", type=Path, default=None,
                        help="exported model directory (e.g. engine/default_model) whose weights, tokenizer and "
                             "sampler start this run; its TRAINING.json is carried into the new one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=tuple(model_config.PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 autocast (fp32 master weights): ~1.6x faster steps on AVX512-BF16 CPUs")
    parser.add_argument("--ar-weight", type=float, default=0.5,
                        help="weight of the encoder's next-token loss (0 disables it)")
    parser.add_argument("--noise-copies", type=int, default=2, help="noise draws per encoded prompt")
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="cached corpus directory")
    parser.add_argument("--export", type=Path, default=None, help="also write the HF layout here, atomically")
    parser.add_argument("--sampler", type=Path, default=None,
                        help="JSON of tuned sampler defaults for generation_config.json (read at export time)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that cut and tokenize examples (0: in the training process; a GPU "
                             "step outruns one process, which makes ~250 examples/s)")
    parser.add_argument("--experts", choices=("auto", "eager", "grouped_mm"), default="auto",
                        help="MoE expert implementation (auto: transformers' choice for the device)")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--sdpa-kernels", default="auto",
                        help="comma-separated torch SDPA backends to allow (flash, efficient, math, cudnn); auto: "
                             "torch's choice on a CPU, efficient,math on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    args = parser.parse_args(argv)
    if args.sdpa_kernels == "auto" and args.device == "cuda":
        args.sdpa_kernels = CUDA_SDPA_KERNELS
    unknown = set(args.sdpa_kernels.split(",")) - set(SDPA_BACKENDS) if args.sdpa_kernels != "auto" else set()
    if unknown:
        parser.error(f"--sdpa-kernels: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SDPA_BACKENDS)}")
    if args.minutes is None and args.steps is None:
        parser.error("give --minutes and/or --steps")
    if args.init is not None and args.resume is not None:
        parser.error("--init and --resume both set the weights: --resume continues a run directory's checkpoint, "
                     "--init starts a new run from an exported model; give one")
    if args.init is not None and (lacking := continuation.missing(args.init)):
        parser.error(f"--init {args.init}: no {', '.join(lacking)} there; give an exported model directory "
                     "(engine/default_model, or a run's OUT/model)")
    if args.init is not None and (args.out / "checkpoint.pt").exists():
        parser.error(f"--init starts a new run, but {args.out} holds one (checkpoint.pt); give a new --out, or "
                     f"--resume {args.out / 'checkpoint.pt'} to continue that run")
    if args.sampler is not None and not args.sampler.is_file():
        parser.error(f"--sampler {args.sampler}: no such file (a JSON of sampler defaults, e.g. the best line of "
                     "'python -m engine.training.evaluate MODEL --grid'); leave it out to keep the defaults")
    return args


def load_corpus(directory: Path) -> tuple[list[corpus.SourceFile], list[corpus.SourceFile], dict]:
    if not (directory / "train.jsonl").exists():
        train, heldout = corpus.collect()
        corpus.save(train, directory / "train.jsonl")
        corpus.save(heldout, directory / "heldout.jsonl")
        tables = {"train": corpus.license_table(train), "heldout": corpus.license_table(heldout)}
        (directory / "sources.json").write_text(json.dumps(tables, indent=1))
    train = corpus.load(directory / "train.jsonl")
    heldout = corpus.load(directory / "heldout.jsonl")
    return train, heldout, json.loads((directory / "sources.json").read_text())


def load_tokenizer(out: Path, train: list[corpus.SourceFile], init: Path | None = None) -> PreTrainedTokenizerBase:
    directory = out / "tokenizer"
    if init is not None:  # the weights' token ids are the init model's: its tokenizer, or one identical to it
        continuation.adopt_tokenizer(init, directory)
    if not (directory / "tokenizer.json").exists():
        texts = tokenizer_lib.sample_texts([s.text for s in train], max_chars=20_000_000)
        tokenizer_lib.save(tokenizer_lib.train_tokenizer(texts), directory)
    return AutoTokenizer.from_pretrained(str(directory))


def batches(stream: Iterator[examples.Example], batch_size: int, seed: int, pool: int = 8
            ) -> Iterator[examples.Batch]:
    """Bucket by prompt length: draw ``pool`` batches' worth, sort by length, emit in shuffled order."""
    rng = random.Random(seed)
    while True:
        drawn = sorted((next(stream) for _ in range(batch_size * pool)), key=lambda e: len(e.prompt))
        chunks = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield examples.collate(chunk)


class ExampleBatches(torch.utils.data.IterableDataset):
    """Endless training batches; each DataLoader worker draws its own stream (seed offset by its id)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, files: list[corpus.SourceFile], batch_size: int,
                 seed: int) -> None:
        self.tokenizer, self.files, self.batch_size, self.seed = tokenizer, files, batch_size, seed

    def __iter__(self) -> Iterator[examples.Batch]:
        info = torch.utils.data.get_worker_info()
        seed = self.seed + 7919 * (info.id if info is not None else 0)
        return batches(examples.stream(self.tokenizer, self.files, seed=seed), self.batch_size, seed=seed)


def batch_stream(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, files: list[corpus.SourceFile],
                 step: int) -> Iterator[examples.Batch]:
    """Training batches, made in this process (``--workers 0``) or in worker processes."""
    dataset = ExampleBatches(tokenizer, files, args.batch_size, seed=args.seed + step)
    if args.workers == 0:
        return iter(dataset)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism; no forked thread pools
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                         persistent_workers=True)
    return iter(loader)


def learning_rate(args: argparse.Namespace, step: int, elapsed_s: float) -> float:
    progress = 0.0
    if args.steps:
        progress = max(progress, step / args.steps)
    if args.minutes:
        progress = max(progress, elapsed_s / (60 * args.minutes))
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# Measured on an H200 (torch 2.11, batch 256 of left-padded prompts): with torch's own kernel choice the loss
# went NaN within 8 steps (the padding rows of the causal encoder attend to nothing) and a step took 2.9 s;
# restricted to these two kernels, no NaN in 773 steps and 0.22 s a step.
CUDA_SDPA_KERNELS = "efficient,math"
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_kernels(names: str) -> contextlib.AbstractContextManager:
    """Restrict torch's scaled-dot-product attention to the named backends (``auto``: torch's choice)."""
    if names == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[name] for name in names.split(",")])


def to_device(batch: examples.Batch, device: str) -> examples.Batch:
    return examples.Batch(*(getattr(batch, f).to(device) for f in examples.Batch.__slots__))


def autocast(args: argparse.Namespace) -> torch.autocast:
    return torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def validation_loss(model: DiffusionGemmaForBlockDiffusion, val: list[examples.Batch],
                    args: argparse.Namespace) -> float:
    """Mean loss on fixed held-out batches with a fixed noise seed (comparable across steps)."""
    device = args.device
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad(), autocast(args), sdpa_kernels(args.sdpa_kernels):
        losses = [objective.loss(model, to_device(b, device), generator, 0.0).item() for b in val]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_files, heldout_files, sources = load_corpus(args.corpus)
    tokenizer = load_tokenizer(args.out, train_files, args.init)
    config = model_config.build_config(args.preset, vocab_size=len(tokenizer))
    model = model_config.build_model(config, seed=args.seed, attention=args.attention)
    earlier = None
    if args.init is not None:
        continuation.load_weights(model, args.init, args.preset)
        earlier = continuation.record(args.init)
        init_sampler = continuation.sampler(args.init)
        if init_sampler is not None and not (args.out / "sampler.json").exists():  # the run's sampler from now on
            (args.out / "sampler.json").write_text(json.dumps(init_sampler) + "\n")
    model.to(args.device)
    if args.experts != "auto":
        model.set_experts_implementation(args.experts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, elapsed, rows = 0, 0.0, []
    if args.resume is not None:
        state = torch.load(args.resume, map_location=args.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, rows = state["step"], state["elapsed_s"], state["rows"]
        earlier = state.get("initialized_from")
    # a continued run draws other batches and noise than every run before it in its chain
    offset = continuation.total_steps(earlier)
    val_stream = examples.stream(tokenizer, heldout_files, seed=999)
    val = [examples.collate([next(val_stream) for _ in range(args.batch_size)]) for _ in range(4)]
    generator = torch.Generator().manual_seed(args.seed + offset + step)
    print(json.dumps({"parameters": model_config.parameter_count(model), "train_files": len(train_files),
                      "heldout_files": len(heldout_files), "start_step": step}), flush=True)
    model.train()
    running, running_ar, started = [], [], time.monotonic() - elapsed
    start_step, skipped, waited = step, 0, 0.0
    batches_in = batch_stream(args, tokenizer, train_files, offset + step)
    while True:
        fetch_started = time.monotonic()
        batch = next(batches_in)
        waited += time.monotonic() - fetch_started  # only the wait for data
        elapsed = time.monotonic() - started
        if (args.steps is not None and step >= args.steps) or (args.minutes and elapsed >= 60 * args.minutes):
            break
        lr = learning_rate(args, step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(args), sdpa_kernels(args.sdpa_kernels):
            parts = objective.losses(model, to_device(batch, args.device), generator,
                                     noise_copies=args.noise_copies, ar_weight=args.ar_weight)
        value = parts["total"]
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step += 1
        if torch.isfinite(norm) and torch.isfinite(value):
            optimizer.step()
            running.append(parts["canvas"].item())
            if "encoder_ar" in parts:
                running_ar.append(parts["encoder_ar"].item())
        else:  # one bad batch must not poison the weights: no update, the step still logs and checkpoints
            skipped += 1
            if skipped > max(10, (step - start_step) // 10):
                raise SystemExit(f"training stopped: {skipped} of {step - start_step} steps had a non-finite loss "
                                 "or gradient; nothing was exported (try a lower --lr, or --attention eager)")
        if step % args.log_every == 0:
            row = {"step": step, "elapsed_s": round(elapsed, 1), "lr": lr,
                   "loss": round(sum(running) / len(running), 4) if running else "", "val_loss": "",
                   "ar_loss": round(sum(running_ar) / len(running_ar), 4) if running_ar else ""}
            if step % args.eval_every == 0:
                row["val_loss"] = round(validation_loss(model, val, args), 4)
            rows.append(row)
            running, running_ar = [], []
            print(json.dumps({**row, "skipped": skipped, "data_wait_s": round(waited, 1)}), flush=True)
        if step % args.checkpoint_every == 0:
            save_checkpoint(args.out, model, optimizer, step, time.monotonic() - started, rows, args.preset, earlier)
    elapsed = time.monotonic() - started
    final_val = validation_loss(model, val, args)
    rows.append({"step": step, "elapsed_s": round(elapsed, 1), "lr": 0.0,
                 "loss": round(sum(running) / len(running), 4) if running else rows[-1]["loss"] if rows else "",
                 "val_loss": round(final_val, 4)})
    save_checkpoint(args.out, model, optimizer, step, elapsed, rows, args.preset, earlier)
    training = {"parameters": model_config.parameter_count(model), "steps": step,
                "train_seconds": round(elapsed, 1), "batch_size": args.batch_size, "threads": args.threads,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "workers": args.workers, "attention": args.attention, "sdpa_kernels": args.sdpa_kernels,
                "nonfinite_steps_skipped": skipped, "data_wait_s": round(waited, 1),  # this session's
                "ar_weight": args.ar_weight, "preset": args.preset, "seed": args.seed, "data_seed": args.seed + offset,
                "lr": args.lr, "warmup": args.warmup, "minutes": args.minutes, "steps_budget": args.steps,
                "noise_copies": args.noise_copies, "precision": args.precision,
                "final_train_loss": rows[-1]["loss"], "final_val_loss": round(final_val, 4),
                "train_files": len(train_files), "heldout_files": len(heldout_files),
                "train_chars": sum(len(s.text) for s in train_files)}
    if earlier is not None:
        training.update(continuation.totals(earlier, step, elapsed))
    model.cpu()
    # --sampler, else the run's own sampler.json (where --init put the continued model's, and where
    # `python -m engine.training.export RUN DIR` reads it too), else the defaults
    sampler_file = args.sampler or args.out / "sampler.json"
    sampler = json.loads(sampler_file.read_text()) if sampler_file.is_file() else None
    export.write(model, tokenizer, args.out / "model", sources, training, sampler)
    if args.export is not None:
        export.write(model, tokenizer, args.export, sources, training, sampler)
    print(json.dumps({"done": training}), flush=True)


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    elapsed: float, rows: list[dict], preset: str, initialized_from: dict | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "elapsed_s": elapsed, "rows": rows, "preset": preset, "initialized_from": initialized_from}
    torch.save(state, out / "checkpoint.pt.tmp")
    os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")
    with (out / "loss.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "elapsed_s", "lr", "loss", "val_loss", "ar_loss"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
