"""`Engine`: one loaded model answering `FillRequest`s, synchronously, on the caller's thread.

Startup order reads top to bottom in `__init__`: model and tokenizer are given (see `loading`), then the prompt
template, the sampler settings, the prompt cache. `fill` is the whole request path: render the prompt, reuse or
extend an encoded prefix, denoise, turn tokens into text. Scheduling, sockets and superseding live elsewhere
(`scheduler`, `server`); this module never blocks on anything but the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.denoiser import DenoiseControl, Denoiser
from engine.fast_step import FastStep, select_denoiser
from engine.fill import FillRequest, FillRequestError, FillResult
from engine.hf_compat import returned_cache, with_cache
from engine.lean_decoder import PromptKV
from engine.lean_forward import select_forward
from engine.loading import LoadedModel
from engine.prompt_cache import PromptCache, decode_view, new_recording_cache, sliced_cache
from engine.sampling import SamplerSettings
from engine.templates import PromptBuilder, PromptTemplate, load_template

log = logging.getLogger("dgls.engine")
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
MAX_DRAFTS = 256  # documents whose last completion is remembered for warm starts


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        template: PromptTemplate | str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        settings: SamplerSettings | None = None,
        fast_step: str = "auto",
        lean_forward: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        if not isinstance(template, PromptTemplate):
            template = load_template(template or loaded.template or "diffusiongemma-it")
        self.template = template
        self.builder = PromptBuilder(self.tokenizer, template)
        self.text_config = self.model.config.get_text_config(decoder=True)
        self.settings = settings or SamplerSettings.from_generation_config(self.model.generation_config)
        self.eos_ids = _as_list(self.model.generation_config.eos_token_id or self.text_config.eos_token_id)
        self.pad_id = self.text_config.pad_token_id
        self.denoiser = Denoiser(
            self.model,
            self.settings,
            noise=loaded.noise,
            mask_token_id=loaded.mask_token_id,
            eos_ids=self.eos_ids,
            newline_ids=self._newline_token_ids(),
            pad_id=self.text_config.pad_token_id,
        )
        self.text_end_ids = frozenset(self.denoiser.end_ids.tolist())  # see `_until_end`
        self.fast_step_mode = fast_step
        self.stepper: Denoiser | FastStep = select_denoiser(self.denoiser, fast_step)  # engine/fast_step.py
        self.lean_forward_mode = lean_forward
        self.denoiser.lean = select_forward(self.model, lean_forward)  # engine/lean_forward.py
        self.cache = PromptCache(cache_bytes)
        self.drafts: dict[str, tuple[str, str, str]] = {}  # document -> (prefix, suffix, completion)
        self.max_positions = int(self.text_config.max_position_embeddings)

    def warm_up(self) -> float:
        """Run one throwaway fill so the first real request does not pay torch's first-call costs (seconds on
        a CPU, a graph capture on a GPU); leaves no cache entry or draft behind. Returns its duration in ms.

        With the lean forward chosen automatically, the warm-up first compares one of its decoder steps with
        transformers' and keeps transformers' forward if they differ by more than rounding (`_check_lean`).
        With the fast step chosen automatically, the warm-up also checks it: if it fails (e.g. the model cannot
        be captured in a CUDA graph), fills fall back to the reference loop; if its tokens differ from the
        reference loop's, that is logged (padding the prompt KV changes the attention's summation order, so
        near-ties may flip)."""
        started = time.monotonic()
        request = FillRequest(prefix="def main():\n    return ", suffix="\n", deadline_ms=60_000, use_cache=False)
        if self.denoiser.lean is not None and self.lean_forward_mode == "auto":
            self._check_lean(request)
        if isinstance(self.stepper, FastStep) and self.fast_step_mode == "auto":
            self._check_fast_step(self.stepper, request)
        else:
            self.fill(request)
        return _ms(started, time.monotonic())

    def _check_fast_step(self, fast_step: FastStep, request: FillRequest) -> None:
        """Fill `request` with the fast step and with the reference loop; keep the reference loop if the fast
        step raises, say so if they disagree."""
        try:
            fast = self.fill(request)
        except Exception as exc:  # never let the optional fast path take the engine down
            log.warning("fast step failed in the warm-up (%s: %s); using the reference loop", type(exc).__name__, exc)
            self.stepper = self.denoiser
            self.fill(request)
            return
        self.stepper = self.denoiser
        reference = self.fill(request)
        self.stepper = fast_step
        if fast.text != reference.text:
            log.warning("fast step and reference loop disagree on the warm-up fill (%r vs %r); "
                        "'--fast-step off' uses the reference loop", fast.text[:40], reference.text[:40])

    @torch.no_grad()
    def _check_lean(self, request: FillRequest) -> None:
        """Compare one decoder step of the lean forward (over the encoded prompt, and encoding the prompt in the
        same step) with transformers' on `request`'s prompt; use transformers' forward if the lean one raises or
        its logits differ by more than rounding."""
        try:
            ids = tuple(self.builder.render(request))
            full_cache, _ = self._encode(ids, use_cache=False)
            view = decode_view(full_cache, self.text_config, batch=1)
            canvas = self.denoiser.noise_like(1, torch.Generator(device=self.model.device).manual_seed(0))
            lean = self.denoiser.decoder(view, len(ids), 1)(canvas, None)
            # ... and as fills run it: the prompt's tokens encoded in the same first step
            pending = PromptKV(cache=new_recording_cache(self.text_config), length=len(ids),
                               pending=torch.tensor([ids], dtype=torch.long, device=self.model.device))
            fused = self.denoiser.decoder(pending, len(ids), 1)(canvas, None)
            lean_forward, self.denoiser.lean = self.denoiser.lean, None
            reference = self.denoiser.decoder(view, len(ids), 1)(canvas, None)
            self.denoiser.lean = lean_forward
        except Exception as exc:  # never let the optional fast path take the engine down
            log.warning("lean forward failed in the warm-up (%s: %s); using transformers' forward",
                        type(exc).__name__, exc)
            self.denoiser.lean = None
            return
        tolerance = (1e-3 if self.model.dtype == torch.float32 else 5e-2) * max(1.0, float(reference.abs().max()))
        difference = max(float((lean - reference).abs().max()), float((fused - reference).abs().max()))
        if not difference <= tolerance:  # also catches NaN
            log.warning("lean forward differs from transformers' by %.3g on the warm-up step (tolerance %.3g); "
                        "using transformers' forward", difference, tolerance)
            self.denoiser.lean = None

    def _newline_token_ids(self) -> list[int]:
        """Every vocabulary entry whose text contains a line break (the line-mode commit points)."""
        vocab_size = int(self.text_config.vocab_size)
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(self.tokenizer)))))
        newline_ids = []
        for index, piece in enumerate(pieces):
            if piece and ("\n" in piece or "Ċ" in piece):  # Ċ: byte-level BPE's spelling of "\n"
                newline_ids.append(index)
        return newline_ids

    @torch.no_grad()
    def fill(self, request: FillRequest, cancelled: Callable[[], bool] | None = None) -> FillResult:
        started = time.monotonic()
        deadline = started + request.deadline_ms / 1000.0
        ids = self.builder.render(request)
        canvas_length = self.denoiser.canvas_length
        if len(ids) + canvas_length > self.max_positions:
            raise FillRequestError(
                f"prompt of {len(ids)} tokens plus a {canvas_length}-token canvas exceeds the model's "
                f"{self.max_positions} positions; lower the template budgets"
            )
        tokenized = time.monotonic()
        prompt: Any
        if self.denoiser.lean is not None and self.stepper is self.denoiser:
            # the rest of the prompt is encoded by the first denoising step, in the same forward as the canvas
            prompt, cached_tokens = self._reuse(tuple(ids), use_cache=request.use_cache)
        else:
            full_cache, cached_tokens = self._encode(tuple(ids), use_cache=request.use_cache)
            prompt = decode_view(full_cache, self.text_config, batch=request.candidates)
        encoded = time.monotonic()

        seed, fixed, warm = self._seed_canvas(request)
        generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
        output = self.stepper.run(
            prompt,
            prompt_length=len(ids),
            batch=request.candidates,
            generator=generator,
            control=DenoiseControl(
                deadline=deadline,
                cancelled=cancelled,
                commit=request.mode if request.early_commit else None,
            ),
            seed_canvas=seed,
            fixed=fixed,
        )
        denoised = time.monotonic()
        if isinstance(prompt, PromptKV) and request.use_cache and not prompt.pending.shape[1]:
            self.cache.put(tuple(ids), prompt.cache)  # not when cancelled before the first step encoded the rest
        texts, valid_tokens = [], 0
        for row in range(request.candidates):
            tokens = output.canvas[row].tolist()
            if output.committed[row]:
                tokens = tokens[: output.committed[row]]
            tokens = self._until_end(tokens)
            valid_tokens += len(tokens)
            texts.append(self._finish_text(tokens, request.mode))
        order = sorted(range(len(texts)), key=lambda row: -float(output.score[row]))
        candidates = list(dict.fromkeys(texts[row] for row in order))
        if not output.cancelled:
            self._remember(request, candidates[0])
        forwards = max(sum(output.forwards), 1)
        return FillResult(
            text=candidates[0],
            candidates=candidates,
            steps=output.steps,
            prompt_tokens=len(ids),
            cached_prompt_tokens=cached_tokens,
            converged=output.converged,
            cancelled=output.cancelled,
            tokens_per_forward=round(valid_tokens / forwards, 3),
            stop_reason=output.stop_reason,
            warm_start=warm,
            timings={
                "total_ms": _ms(started, time.monotonic()),
                "tokenize_ms": _ms(started, tokenized),
                "encode_ms": _ms(tokenized, encoded),
                "denoise_ms": _ms(encoded, denoised),
            },
        )

    def _encode(self, tokens: tuple[int, ...], use_cache: bool) -> tuple[Any, int]:
        """Full (past-recording) cache for `tokens` through transformers' encoder, reusing the longest cached
        prefix when allowed."""
        prompt, reused = self._reuse(tokens, use_cache)
        cache, new_ids = prompt.cache, prompt.pending
        if reused < len(tokens):
            positions = torch.arange(reused, len(tokens), dtype=torch.int32, device=self.model.device).unsqueeze(0)
            attention = torch.ones((1, len(tokens)), dtype=torch.bool, device=self.model.device)
            masks = self.model.model.encoder.create_masks_for_generate(
                config=self.model.config,
                inputs_embeds=torch.empty((1, len(tokens) - reused, 0), dtype=self.model.dtype,
                                          device=self.model.device),
                attention_mask=attention,
                **with_cache(cache),
                position_ids=positions,
            )
            cache = returned_cache(self.model.model.encoder(
                input_ids=new_ids, attention_mask=masks, position_ids=positions, **with_cache(cache)
            ))
        if use_cache:
            self.cache.put(tokens, cache)
        return cache, reused

    def _reuse(self, tokens: tuple[int, ...], use_cache: bool) -> tuple[PromptKV, int]:
        """The longest cached prefix of `tokens` (when allowed) and the rest, left for the first step."""
        entry, reused = self.cache.longest_prefix(tokens) if use_cache else (None, 0)
        if entry is not None and reused:
            cache = sliced_cache(entry.cache, reused, self.text_config)
        else:
            cache, reused = new_recording_cache(self.text_config), 0
        pending = torch.tensor([tokens[reused:]], dtype=torch.long, device=self.model.device)
        return PromptKV(cache=cache, pending=pending, length=len(tokens)), reused

    def _seed_canvas(self, request: FillRequest) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """The canvas to start from: the request's own seed, else a warm start from this document's last
        completion when the user has typed its first characters, else noise. Returns (seed, fixed, warm)."""
        text, warm = request.seed_canvas, False
        if text is None:
            text = self._warm_start_text(request)
            warm = text is not None
        if text is None:
            return None, None, False
        canvas_length = self.denoiser.canvas_length
        ids = self.builder.text_ids(text)[:canvas_length]
        if warm and len(ids) < canvas_length and request.mode == "block":
            ids.append(self.eos_ids[0])  # the remembered completion ended here
        device = self.model.device
        seed = torch.full((canvas_length,), -1, dtype=torch.long, device=device)
        seed[: len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        if not request.keep_fixed or warm:
            return seed, None, warm
        fixed = torch.zeros(canvas_length, dtype=torch.bool, device=device)
        fixed[: len(ids)] = True
        return seed, fixed, False

    def _warm_start_text(self, request: FillRequest) -> str | None:
        """The rest of the last completion of this document, if the new prefix typed into it."""
        last = self.drafts.get(request.document) if request.document and request.warm_start else None
        if last is None or last[1] != request.suffix or not request.prefix.startswith(last[0]):
            return None
        typed = request.prefix[len(last[0]) :]
        completion = last[2]
        if not typed or not completion.startswith(typed) or len(completion) == len(typed):
            return None
        return completion[len(typed) :] + ("\n" if request.mode == "line" else "")

    def _remember(self, request: FillRequest, text: str) -> None:
        if not request.document:
            return
        self.drafts.pop(request.document, None)
        self.drafts[request.document] = (request.prefix, request.suffix, text)
        while len(self.drafts) > MAX_DRAFTS:
            self.drafts.pop(next(iter(self.drafts)))

    def _until_end(self, tokens: list[int]) -> list[int]:
        """The row's text: up to its first end token (EOS; padding too under absorbing noise, see `Denoiser`)."""
        for index, token in enumerate(tokens):
            if token in self.text_end_ids:
                return tokens[:index]
        return [t for t in tokens if t != self.pad_id]

    def _finish_text(self, tokens: list[int], mode: str) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in self.template.stop:
            if stop in text:
                text = text[: text.index(stop)]
        if mode == "line" and "\n" in text:
            text = text[: text.index("\n")]
        return text

    def describe(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "model": str(loaded.path),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "quantize": loaded.quantize,
            "parameters": loaded.parameters,
            "template": self.template.name,
            "noise": loaded.noise,
            "canvas_length": self.denoiser.canvas_length,
            "max_denoising_steps": self.settings.max_steps,
            "fast_step": self.stepper.kind if isinstance(self.stepper, FastStep) else "off",
            "forward": "lean" if self.denoiser.lean is not None else "transformers",
            "cache_bytes": self.cache.nbytes,
            "cache_entries": len(self.cache.entries),
        }


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 2)
