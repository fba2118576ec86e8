"""The `dgls` command line: engine lifecycle, one-shot completion, model download.

Each subcommand is a thin function: parse, call the engine client (or the engine itself for `serve`), print.
Errors are one line on stderr and a non-zero exit status, never a traceback. torch is imported only by
`dgls engine serve`, inside the engine process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from engine.checkpoint import CheckpointError
from engine.client import EngineClient, EngineError, EngineUnavailable, ensure_engine
from engine.fill import FillRequest, FillRequestError
from engine.plan import add_plan_arguments, run_plan
from engine.protocol import default_socket_path


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--template", help="prompt template name or JSON file (default: the model's own)")
    parser.add_argument("--idle-timeout", type=float, help="exit after this many idle seconds (frees the model)")
    parser.add_argument("--cache-mb", type=int, default=512, help="prompt KV cache budget in MiB (default 512)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"],
                        help="weight-only quantization applied while loading, shard by shard (default none)")
    parser.add_argument("--quantize-embeddings", action="store_true", help="quantize the (tied) embeddings too")
    parser.add_argument("--expert-dequant", default="layer", choices=["layer", "expert"],
                        help="dequantize all experts of a layer at once (faster) or one expert at a time (less memory)")
    parser.add_argument("--fast-step", default="auto", choices=["auto", "on", "off"],
                        help="static-buffer denoising step, a CUDA graph on a GPU (auto: on CUDA for uniform noise)")
    parser.add_argument("--lean-forward", default="auto", choices=["auto", "on", "off"],
                        help="dgls' own forward pass instead of transformers' (auto: wherever it serves the model "
                             "and matches transformers' logits at warm-up)")


def _socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None, help=f"engine socket (default {default_socket_path()})")


def _serve_args(args: argparse.Namespace) -> list[str]:
    extra = ["--device", args.device, "--dtype", args.dtype, "--cache-mb", str(args.cache_mb)]
    if args.model is not None:
        extra += ["--model", str(args.model.resolve())]
    if args.template:
        extra += ["--template", args.template]
    if args.idle_timeout:
        extra += ["--idle-timeout", str(args.idle_timeout)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.fast_step != "auto":
        extra += ["--fast-step", args.fast_step]
    if args.lean_forward != "auto":
        extra += ["--lean-forward", args.lean_forward]
    if args.quantize != "none":
        extra += ["--quantize", args.quantize, "--expert-dequant", args.expert_dequant]
        if args.quantize_embeddings:
            extra.append("--quantize-embeddings")
    return extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgls", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    engine = commands.add_parser("engine", help="run and manage the resident model engine")
    engine_commands = engine.add_subparsers(dest="engine_command", required=True)
    for name, help_text in (("serve", "run the engine in the foreground"),
                            ("start", "start the engine in the background; returns once the model is loaded")):
        sub = engine_commands.add_parser(name, help=help_text)
        _socket_option(sub)
        _engine_options(sub)
        sub.add_argument("--log-level", default="INFO")
    status = engine_commands.add_parser("status", help="show whether an engine runs and what it serves")
    _socket_option(status)
    status.add_argument("--json", action="store_true")
    stop = engine_commands.add_parser("stop", help="stop the engine")
    _socket_option(stop)
    plan = engine_commands.add_parser("plan", help="will a model fit this GPU, and how fast can a forward be")
    add_plan_arguments(plan)

    complete = commands.add_parser("complete", help="complete FILE at LINE:COL (1-based) and print the result")
    complete.add_argument("position", help="FILE:LINE:COL, 1-based as editors show them")
    _socket_option(complete)
    _engine_options(complete)
    complete.add_argument("--deadline-ms", type=float, default=10_000.0)
    complete.add_argument("--candidates", type=int, default=1)
    complete.add_argument("--mode", choices=["auto", "line", "block"], default="auto")
    complete.add_argument("--seed", type=int, default=0)
    complete.add_argument("--json", action="store_true", help="print one JSON object")

    lsp = commands.add_parser("lsp", help="serve the language server (stdio by default)")
    lsp.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio")
    _socket_option(lsp)

    model = commands.add_parser("model", help="manage model checkpoints")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    pull = model_commands.add_parser("pull", help="download a checkpoint into the Hugging Face cache")
    pull.add_argument("repo_id")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--cache-dir", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "socket", "unset") is None:
        args.socket = default_socket_path()
    try:
        if args.command == "engine":
            return ENGINE_COMMANDS[args.engine_command](args)
        if args.command == "complete":
            return cmd_complete(args)
        if args.command == "lsp":
            from dgls.server import run_lsp

            return run_lsp(tcp=args.tcp, socket_path=args.socket)
        return cmd_model_pull(args)
    except (CliError, EngineError, FillRequestError, CheckpointError) as exc:
        print(f"dgls: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.loading import CheckpointError
    from engine.server import EngineAlreadyRunning, ServeOptions, serve
    from engine.templates import TemplateError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    try:
        serve(ServeOptions(
            socket_path=args.socket, model=args.model, device=args.device, dtype=args.dtype,
            template=args.template, idle_timeout=args.idle_timeout, cache_bytes=args.cache_mb * 2**20,
            quantize=args.quantize, quantize_embeddings=args.quantize_embeddings, expert_dequant=args.expert_dequant,
            fast_step=args.fast_step, lean_forward=args.lean_forward,
        ))
    except (CheckpointError, TemplateError, EngineAlreadyRunning, ValueError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    status = _start(args, quiet=False)
    print(f"engine ready on {args.socket}: {status.get('model')} ({status.get('device')}, {status.get('dtype')})")
    return 0


def _start(args: argparse.Namespace, quiet: bool) -> dict[str, Any]:
    shown = {"percent": -1}

    def progress(status: dict[str, Any]) -> None:
        percent = int(100 * status.get("loading_progress", 0))
        if not quiet and status.get("loading") and percent != shown["percent"]:
            print(f"loading model: {percent}%", file=sys.stderr)
            shown["percent"] = percent

    status = ensure_engine(args.socket, _serve_args(args), on_progress=progress)
    if args.model is not None and Path(status.get("model", "")).resolve() != args.model.resolve():
        raise CliError(
            f"the engine on {args.socket} serves {status.get('model')}, not {args.model}; "
            "run 'dgls engine stop' or pass another --socket"
        )
    return status


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with EngineClient(args.socket, timeout=10.0) as client:
            status = client.status()
    except EngineUnavailable:
        status = {"ready": False, "running": False, "socket": str(args.socket)}
    if args.json:
        print(json.dumps(status))
    elif status.get("running") is False:
        print(f"no engine on {args.socket}")
    else:
        state = "ready" if status.get("ready") else f"loading {int(100 * status.get('loading_progress', 0))}%"
        print(f"{state}: {status.get('model')} on {status.get('device')} (pid {status.get('pid')})")
        if status.get("error"):
            print(f"error: {status['error']}")
    return 0 if status.get("ready") else 1


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        with EngineClient(args.socket, timeout=10.0) as client:
            client.shutdown()
    except EngineUnavailable:
        print(f"no engine on {args.socket}")
        return 0
    print("engine stopped")
    return 0


ENGINE_COMMANDS = {"serve": cmd_serve, "start": cmd_start, "status": cmd_status, "stop": cmd_stop, "plan": run_plan}


def parse_position(position: str) -> tuple[Path, int, int]:
    parts = position.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise CliError(f"position {position!r} must look like FILE:LINE:COL (1-based), e.g. app.py:12:5")
    return Path(parts[0]), int(parts[1]), int(parts[2])


def split_at(text: str, line: int, column: int, path: Path) -> tuple[str, str]:
    """Prefix and suffix around 1-based LINE:COL (COL counts characters; one past the end is allowed)."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise CliError(f"{path} has {len(lines)} lines; line {line} is outside it")
    if not 1 <= column <= len(lines[line - 1]) + 1:
        raise CliError(f"line {line} of {path} has {len(lines[line - 1])} characters; column {column} is outside it")
    offset = sum(len(item) + 1 for item in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def pick_mode(prefix: str, suffix: str) -> str:
    """Block on an empty line (only indentation before, nothing after); line otherwise."""
    before = prefix.rsplit("\n", 1)[-1]
    after = suffix.split("\n", 1)[0]
    return "block" if not before.strip() and not after.strip() else "line"


LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust",
             ".java": "java", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".hpp": "cpp"}


def cmd_complete(args: argparse.Namespace) -> int:
    path, line, column = parse_position(args.position)
    if not path.is_file():
        raise CliError(f"{path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    prefix, suffix = split_at(text, line, column, path)
    request = FillRequest(
        prefix=prefix, suffix=suffix, path=str(path), language=LANGUAGES.get(path.suffix, path.suffix.lstrip(".")),
        mode=args.mode if args.mode != "auto" else pick_mode(prefix, suffix),  # type: ignore[arg-type]
        candidates=args.candidates, deadline_ms=args.deadline_ms, seed=args.seed,
        document=str(path.resolve()),
    )
    request.validate()
    _start(args, quiet=args.json)
    with EngineClient(args.socket, timeout=args.deadline_ms / 1000 + 60) as client:
        result = client.fill(request)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
        if not result.text.strip():
            print(f"[dgls] the model proposed nothing at {args.position} ({result.steps} denoising steps, "
                  f"{result.timings.get('total_ms', 0):.0f} ms)", file=sys.stderr)
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    from engine.hub import pull_checkpoint

    print(pull_checkpoint(args.repo_id, revision=args.revision, cache_dir=args.cache_dir))
    return 0
