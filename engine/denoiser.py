"""The denoising loop: refine one canvas of tokens against an encoded prompt.

Reproduces `DiffusionGemmaForBlockDiffusion.generate` for one canvas (entropy-bound sampler, linear
temperature schedule, self-conditioning, stable-and-confident adaptive stop; same random draws in the same
order, so with the same seed the tokens are identical) and adds what an editor needs: a deadline that returns
the best draft so far, early commit once the line (or block) up to its end is accepted, cancellation before
every step (and every layer, with dgls' forward), N candidates as one batch, and seeded canvases with fixed
positions. The noise process is the checkpoint's: uniform random tokens (DiffusionGemma) or an absorbing mask
token. With absorbing noise, once every row has decided where its text ends (an EOS or padding token), later
steps run the canvas only that far (`SamplerSettings.cut_canvas`): what follows is padding the output never
shows, and a line completion's second step then costs ~7 instead of ~11 ms on the shipped model
(benchmarks/README.md has the quality check). Knows nothing about text, templates or caches beyond the decoder
view it is handed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.hf_compat import with_cache
from engine.lean_decoder import DecoderSession, PromptKV, StepCancelled
from engine.lean_forward import LeanForward
from engine.sampling import (
    SamplerSettings,
    mean_log_probability,
    sample_by_cdf,
    sample_multinomial,
    token_entropy,
)

CommitMode = Literal["line", "block"] | None


@dataclass(slots=True)
class DenoiseControl:
    """Per-request limits. `deadline` is a `time.monotonic()` instant; `cancelled` is polled before every step
    and, with dgls' lean forward, before every layer of a step (a cancel then waits at most one layer)."""

    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    commit: CommitMode = None

    def halt(self, steps: int, step_seconds: float) -> str | None:
        """Why the loop stops before its next step: `cancelled`, or `deadline` when a step as long as the last
        one would overrun it (the first step always runs, so there is a draft); None to go on."""
        if self.cancelled is not None and self.cancelled():
            return "cancelled"
        if steps and self.deadline is not None and time.monotonic() + step_seconds > self.deadline:
            return "deadline"
        return None


@dataclass(slots=True)
class DenoiseOutput:
    canvas: torch.Tensor  # [B, C] argmax canvas (the draft)
    committed: list[int]  # per row: tokens committed early (0 when the row ran to convergence or was cut)
    score: torch.Tensor  # [B] mean log-probability of the draft tokens
    steps: int
    forwards: list[int]
    converged: bool
    cancelled: bool
    stop_reason: str  # converged | early_commit | deadline | max_steps | cancelled


class Denoiser:
    """Owns the sampling rules of one model; `run` refines a canvas against a decoder cache view."""

    def __init__(
        self,
        model: Any,
        settings: SamplerSettings,
        noise: str = "uniform",
        mask_token_id: int | None = None,
        eos_ids: list[int] | None = None,
        newline_ids: list[int] | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.noise = noise
        self.mask_token_id = mask_token_id
        self.mask_id = mask_token_id if mask_token_id is not None else -1  # -1: no token is the mask
        self.vocab_size = int(model.config.text_config.vocab_size)
        self.canvas_length = int(model.config.canvas_length)
        device = model.device
        self.eos_ids = torch.tensor(eos_ids or [], dtype=torch.long, device=device)
        # Tokens that end a row's text. Absorbing noise is dgls' training layout, middle + EOS + padding: a
        # padding token ends the text as an EOS does (never the mask token, should a checkpoint share its id).
        # Uniform noise keeps transformers' rule, EOS only. The last one fills the draft after a cut canvas.
        ends = list(eos_ids or [])
        if noise == "mask" and mask_token_id is not None and pad_id is not None and pad_id != mask_token_id:
            ends.append(pad_id)
        self.end_ids = torch.tensor(ends, dtype=torch.long, device=device)
        ends_line = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        if newline_ids:
            ends_line[torch.tensor(newline_ids, device=device)] = True
        self.ends_line = ends_line  # [V] tokens that contain a newline
        self.embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self.lean: LeanForward | None = None  # dgls' own forward (engine/lean_forward.py), when the engine sets it
        self.plain_step_seconds: float | None = None  # the last step without prompt tokens (deadline predictions)

    def noise_like(self, batch: int, generator: torch.Generator | None, length: int | None = None) -> torch.Tensor:
        device, length = self.model.device, length or self.canvas_length
        if self.mask_token_id is not None and self.noise == "mask":
            return torch.full((batch, length), self.mask_token_id, dtype=torch.long, device=device)
        return torch.randint(0, self.vocab_size, (batch, length), device=device, generator=generator)

    @torch.inference_mode()
    def run(
        self,
        cache_view: Any,
        prompt_length: int,
        batch: int,
        generator: torch.Generator | None,
        control: DenoiseControl,
        seed_canvas: torch.Tensor | None = None,  # [C] start tokens; -1 where the canvas starts as noise
        fixed: torch.Tensor | None = None,  # [C] bool: seeded positions that never change
    ) -> DenoiseOutput:
        s, device = self.settings, self.model.device
        canvas = self.noise_like(batch, generator)  # canvas: [B, C]
        if seed_canvas is not None:
            seed = seed_canvas.to(device).expand(batch, -1)
            canvas = torch.where(seed >= 0, seed, canvas)
        argmax = canvas
        draft = canvas.clone()  # the full-length draft, for canvases cut short after their text's end
        decode = self.decoder(cache_view, prompt_length, batch)
        if isinstance(decode, DecoderSession):
            decode.cancelled = control.cancelled
        self_conditioning: torch.Tensor | None = None
        history = torch.full((s.stability_threshold, batch, self.canvas_length), -1, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        committed = [0] * batch
        forwards = torch.zeros(batch, dtype=torch.long, device=device)
        processed = torch.zeros(0)  # replaced by the first step's logits
        steps, stop_reason, step_seconds = 0, "max_steps", 0.0
        absorbing = self.noise == "mask" and self.mask_token_id is not None
        for cur_step in range(s.max_steps, 0, -1):
            if (halt := control.halt(steps, step_seconds)) is not None:
                stop_reason = halt
                break
            started = time.monotonic()
            forwards += (~finished).long()
            try:
                logits = decode(canvas, self_conditioning)  # [B, C, V] float32
            except StepCancelled:  # mid-step: the draft is the last finished step's
                forwards -= (~finished).long()
                stop_reason = "cancelled"
                break
            new_processed = logits / s.temperature(cur_step)
            if self.noise == "mask":
                new_processed[..., self.mask_token_id] = float("-inf")
            new_argmax = new_processed.argmax(dim=-1)
            # Absorbing noise: decided tokens stay; only still-masked positions compete for acceptance.
            undecided = canvas.eq(self.mask_id) if absorbing else None
            if undecided is None:
                candidates = entropy = token_entropy(new_processed)  # [B, C]
            else:
                candidates = self._masked_entropy(new_processed, undecided)
            sorted_entropy, order = torch.sort(candidates, dim=-1)
            selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= s.entropy_bound
            accepted = torch.scatter(torch.zeros_like(selected), -1, order, selected)  # [B, C] bool
            if undecided is None:  # uniform noise: every position draws, in generate's order (same bits)
                sampled = sample_multinomial(new_processed.view(-1, self.vocab_size), generator).view_as(canvas)
            else:  # absorbing noise: only the positions accepted this step need a token
                sampled = canvas.clone()
                newly = accepted & undecided
                sampled[newly] = sample_by_cdf(new_processed[newly], generator)
                accepted = accepted | ~undecided
            if fixed is not None and seed_canvas is not None:
                kept = fixed[: canvas.shape[1]]
                accepted = accepted | kept
                sampled = torch.where(kept, canvas, sampled)
                new_argmax = torch.where(kept, canvas, new_argmax)
            new_canvas = torch.where(accepted, sampled, canvas)
            new_canvas = torch.where(~accepted, self.noise_like(batch, generator, canvas.shape[1]), new_canvas)
            if absorbing:  # the draft is what is decided, with the best guesses where it is not yet
                new_argmax = torch.where(new_canvas.ne(self.mask_id), new_canvas, new_argmax)
            if finished.any():
                new_argmax = torch.where(finished[:, None], argmax, new_argmax)
                new_canvas = torch.where(finished[:, None], canvas, new_canvas)
                new_processed = torch.where(finished[:, None, None], processed, new_processed)
            if absorbing:  # done when nothing before the first end token is masked
                finished |= self._decided(new_canvas)
            else:  # done when the draft is stable for `stability_threshold` steps and confident
                stable = (history == new_argmax[None]).all(dim=-1).all(dim=0) if s.stability_threshold else True
                history = torch.roll(history, shifts=-1, dims=0)
                if s.stability_threshold:
                    history[-1] = new_argmax
                if finished.any():
                    entropy = token_entropy(new_processed)
                finished |= stable & (entropy.mean(dim=-1) < s.confidence_threshold)
            canvas, argmax, processed = new_canvas, new_argmax, new_processed
            # Self-conditioning input as the model was trained: transformers' generate (uniform noise) feeds
            # the tempered logits; dgls' absorbing-noise training feeds the raw ones.
            self_conditioning = (logits if absorbing else processed).to(self.embed_dtype)
            steps += 1
            step_seconds = time.monotonic() - started
            share = getattr(decode, "canvas_share", 1.0) if steps == 1 else 1.0
            if share < 1.0:  # this step also encoded prompt tokens: predict the next by the last plain step
                step_seconds = self.plain_step_seconds or step_seconds * share
            elif canvas.shape[1] == self.canvas_length:  # a cut canvas's steps are cheaper than a whole one's
                self.plain_step_seconds = step_seconds
            if control.commit is not None:
                self._commit(argmax, accepted & (sampled == argmax), control.commit, finished, committed)
                if all(committed[row] or finished[row] for row in range(batch)) and any(committed):
                    stop_reason = "early_commit"
                    break
            if bool(finished.all()):
                stop_reason = "converged"
                break
            if absorbing and s.cut_canvas:
                length = self._length_to_end(canvas)
                if length < canvas.shape[1]:  # every row's text has ended: what follows is padding
                    draft[:, length:] = self.end_ids[-1]  # the kept positions are written back at the end
                    canvas, argmax, processed = canvas[:, :length], argmax[:, :length], processed[:, :length]
                    self_conditioning = self_conditioning[:, :length]
        score = self.score(processed, argmax, steps)
        draft[:, : argmax.shape[1]] = argmax
        return DenoiseOutput(
            canvas=draft,
            committed=committed,
            score=score,
            steps=steps,
            forwards=forwards.tolist(),
            converged=bool(finished.all()) or stop_reason == "early_commit",
            cancelled=stop_reason == "cancelled",
            stop_reason=stop_reason,
        )

    @staticmethod
    def _masked_entropy(processed: torch.Tensor, undecided: torch.Tensor) -> torch.Tensor:
        """[B, C] entropy at undecided positions, inf elsewhere (computed only where needed)."""
        if bool(undecided.all()):
            return token_entropy(processed)
        entropy = torch.full(undecided.shape, float("inf"), dtype=processed.dtype, device=processed.device)
        entropy[undecided] = token_entropy(processed[undecided])
        return entropy

    def decoder(self, prompt: Any, prompt_length: int, batch: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """`decode(canvas, self_conditioning_logits) -> logits` for one request: dgls' lean forward when set
        (`prompt` may then be a `PromptKV` whose pending tokens the first step encodes), else transformers'
        forward over `prompt`, a decoder cache view."""
        if self.lean is not None:
            return self.lean.session(prompt, prompt_length, batch, self.canvas_length)
        if isinstance(prompt, PromptKV):
            raise TypeError("a PromptKV needs the lean forward; encode the prompt and pass its decode_view")
        model, device = self.model, self.model.device
        inputs: dict[int, tuple[torch.Tensor, Any]] = {}  # canvas length -> positions, masks

        def decode(canvas: torch.Tensor, self_conditioning: Any) -> torch.Tensor:
            length = canvas.shape[1]  # shorter than the canvas once `run` cuts it after the text's end
            if length not in inputs:
                inputs[length] = (
                    torch.arange(prompt_length, prompt_length + length, dtype=torch.int32, device=device),
                    model.model.decoder.create_diffusion_decoder_attention_mask(
                        config=model.config,
                        inputs_embeds=torch.zeros((batch, length, 1), dtype=torch.long, device=device),
                        **with_cache(prompt),
                        decoder_attention_mask=torch.ones((batch, prompt_length + length), dtype=torch.bool,
                                                          device=device),
                    ),
                )
            positions, mask_mapping = inputs[length]
            return model(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                         decoder_attention_mask=mask_mapping, **with_cache(prompt),
                         decoder_position_ids=positions.unsqueeze(0)).logits

        return decode

    def _commit(
        self, argmax: torch.Tensor, settled: torch.Tensor, mode: str, finished: torch.Tensor, committed: list[int]
    ) -> None:
        """Mark rows whose text up to the first line end (line mode) or text end (block mode) is settled."""
        is_end = torch.isin(argmax, self.end_ids)
        if mode == "line":
            is_end = is_end | self.ends_line[argmax]
        for row in range(argmax.shape[0]):
            if committed[row] or bool(finished[row]):
                continue
            ends = torch.nonzero(is_end[row]).flatten()
            if len(ends) and bool(settled[row, : int(ends[0]) + 1].all()):
                committed[row] = int(ends[0]) + 1

    def _length_to_end(self, canvas: torch.Tensor) -> int:
        """How much of `canvas` [B, L] later steps need: up to and including each row's first decided end token
        (EOS or padding), for the row where that comes last; L while some row has none."""
        ends = torch.isin(canvas, self.end_ids)
        if not len(self.end_ids) or not bool(ends.any(dim=-1).all()):
            return canvas.shape[1]
        return int(ends.int().argmax(dim=-1).max()) + 1

    def _decided(self, canvas: torch.Tensor) -> torch.Tensor:
        """[B] bool: no position before the row's first end token is still masked (absorbing noise is done)."""
        after_end = torch.isin(canvas, self.end_ids).long().cumsum(dim=-1) > 0
        return ~(canvas.eq(self.mask_id) & ~after_end).any(dim=-1)

    def score(self, processed: torch.Tensor, argmax: torch.Tensor, steps: int) -> torch.Tensor:
        """[B] mean log-probability of each row's draft, which ranks candidates; zeros for a single row (nothing
        to rank: the log-softmax over the canvas costs ~0.3 ms on a CPU) or before any step."""
        if not steps or argmax.shape[0] == 1:
            return torch.zeros(argmax.shape[0])
        return mean_log_probability(processed, argmax)
