"""The fast denoising loop: each step a fixed-shape, sync-free function over static buffers, replayed as one
CUDA graph on a GPU and run eagerly elsewhere; one host synchronisation per step (the stop check).

`FastStep.run` is `Denoiser.run` for uniform noise (DiffusionGemma): same arguments, sampler, schedule, stop rule,
candidates, seeded and fixed canvases, early commit (decided on device); deadline and cancellation are checked at
the per-step sync. Static buffers per (candidates, prompt capacity): canvas, draft, tempered and
self-conditioning logits (a per-row flag zeroes the latter on the first step instead of passing `None`), history,
row states, stop flags, and the step's random draws (`torch.multinomial`'s exponential variates, then the
re-noising tokens), drawn from the request's generator outside the graph in `Denoiser.run`'s order. The prompt's
KV view is copied into fixed-capacity buffers, an attention mask marking the valid slots; capacity is the next
power of two >= the prompt (at least `min_capacity`), so one capture serves every length in its bucket and,
above `min_capacity`, padding at most doubles the keys attention reads.

Parity: padded attention sums in another order than the unpadded reference (logits within ~2e-5 on the CPU;
tokens equal in tests/engine/test_fast_step.py); on CUDA the masked attention also runs another SDPA kernel, so
tokens can differ at near-ties (`benchmarks/gpu_step.py` reports the agreement). Not served (`select_denoiser`
falls back): absorbing noise, attention without masks. Knows nothing about text, templates or the prompt cache.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from engine.denoiser import DenoiseControl, DenoiseOutput, Denoiser
from engine.hf_compat import with_cache
from engine.sampling import token_entropy

log = logging.getLogger("dgls.engine")
FAST_STEP_MODES = ("auto", "on", "off")
MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a 4-D padding mask
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS handles, lazy allocations)


def select_denoiser(denoiser: Denoiser, mode: str) -> Denoiser | FastStep:
    """`auto`: the fast step on CUDA when it serves the model; `on`: wherever it serves the model (eagerly on the
    CPU), else a ValueError saying why; `off`: the reference loop. Both answer `run(...)` alike."""
    if mode not in FAST_STEP_MODES:
        raise ValueError(f"unknown fast-step mode {mode!r}; use auto, on or off")
    reason = FastStep.unsupported(denoiser)
    if mode == "on" and reason:
        raise ValueError(f"--fast-step on: {reason}")
    if mode == "off" or reason or (mode == "auto" and denoiser.model.device.type != "cuda"):
        if reason and mode == "auto":
            log.info("fast step off: %s", reason)
        return denoiser
    return FastStep(denoiser)


@dataclass(slots=True)
class StepBuffers:
    """Everything a step reads and writes, for `batch` candidates and prompts of up to `capacity` tokens."""

    batch: int
    capacity: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H, slots, D] (slots: see `slots`)
    slots: dict[str, int]  # layer type -> KV slots (sliding layers hold at most window - 1)
    masks: dict[str, torch.Tensor]  # layer type -> [1, 1, C, slots + C]: valid prompt slots and the canvas
    view: DynamicCache  # the decoder's view of `kv`, expanded to `batch` rows
    positions: torch.Tensor  # [1, C] int32 canvas positions
    canvas: torch.Tensor  # [B, C] current canvas
    argmax: torch.Tensor  # [B, C] the draft
    processed: torch.Tensor  # [B, C, V] float32 tempered logits of the last step
    self_conditioning: torch.Tensor  # [B, C, V] embedding dtype
    conditioned: torch.Tensor  # [B] bool: False before the first step (zero self-conditioning)
    history: torch.Tensor  # [T, B, C] drafts of the last T steps
    finished: torch.Tensor  # [B] bool
    forwards: torch.Tensor  # [B] long: forwards each row took part in
    committed: torch.Tensor  # [B] long: tokens committed early (0: none)
    fixed: torch.Tensor  # [C] bool: seeded positions that never change
    commit_on: torch.Tensor  # [] bool
    line_mode: torch.Tensor  # [] bool: commit at the first line end, else at EOS
    temperature: torch.Tensor  # [] float32: the divisor, or its reciprocal (see FastStep.reciprocal)
    exponential: torch.Tensor  # [B*C, V] float32: torch.multinomial's exponential variates for this step
    noise: torch.Tensor  # [B, C] long: re-noising tokens for this step
    flags: torch.Tensor  # [2] bool: early commit, converged
    host_flags: torch.Tensor | None = None  # pinned copy of `flags` (CUDA)
    ready: Any = None  # torch.cuda.Event recorded after the flags' copy
    graph: Any = None  # torch.cuda.CUDAGraph of one step, when captured


class FastStep:
    """The denoising loop of `denoiser` (uniform noise) over static buffers; CUDA graphs where `graphs`."""

    def __init__(self, denoiser: Denoiser, graphs: bool | None = None, min_capacity: int = 256,
                 max_entries: int = 4) -> None:
        reason = self.unsupported(denoiser)
        if reason:
            raise ValueError(reason)
        self.denoiser, self.model = denoiser, denoiser.model
        self.device = torch.device(self.model.device)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.text_config = self.model.config.get_text_config(decoder=True)
        self.layer_types: list[str] = list(self.text_config.layer_types)
        self.window = int(getattr(self.text_config, "sliding_window", 0) or 0)
        self.vocab_size, self.canvas_length = denoiser.vocab_size, denoiser.canvas_length
        self.min_capacity, self.max_entries = min_capacity, max_entries
        self.entries: OrderedDict[tuple[int, int], StepBuffers] = OrderedDict()
        self.canvas_positions = torch.arange(self.canvas_length, device=self.device)  # [C]
        self.is_eos = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)  # [V] (isin may sync)
        self.is_eos[denoiser.eos_ids] = True
        settings = denoiser.settings
        schedule = [settings.temperature(step) for step in range(1, settings.max_steps + 1)]
        self.reciprocal = _reciprocal_rule(self.device, schedule)  # None: the step divides like the reference
        self.pool: Any = None  # one CUDA graph memory pool shared by every capture (replays never overlap)

    @staticmethod
    def unsupported(denoiser: Denoiser) -> str | None:
        """Why the fast step cannot serve this model, or None."""
        if denoiser.noise == "mask":
            return "absorbing (mask) noise runs in the reference loop"
        attention = denoiser.model.config.get_text_config(decoder=True)._attn_implementation
        if attention not in MASKED_ATTENTION:
            return f"attention {attention!r} takes no padding mask (use sdpa or eager)"
        return None

    @property
    def kind(self) -> str:
        return "graph" if self.graphs else "eager"

    @torch.no_grad()
    def run(self, cache_view: Any, prompt_length: int, batch: int, generator: torch.Generator | None,
            control: DenoiseControl, seed_canvas: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
            ) -> DenoiseOutput:
        """`Denoiser.run`'s answer; views whose rows differ (never the engine's) go to `Denoiser.run`."""
        if any(layer.keys.shape[0] > 1 and layer.keys.stride(0) != 0 for layer in cache_view.layers):
            return self.denoiser.run(cache_view, prompt_length, batch, generator, control, seed_canvas, fixed)
        s = self.denoiser.settings
        e = self._buffers(cache_view, prompt_length, batch)
        self._reset(e, cache_view, prompt_length, generator, control, seed_canvas, fixed)
        steps, stop_reason, step_seconds = 0, "max_steps", 0.0
        for cur_step in range(s.max_steps, 0, -1):
            if (halt := control.halt(steps, step_seconds)) is not None:
                stop_reason = halt
                break
            started = time.monotonic()
            early, converged = self._advance(e, generator, cur_step)
            steps += 1
            step_seconds = time.monotonic() - started
            if early:
                stop_reason = "early_commit"
                break
            if converged:
                stop_reason = "converged"
                break
        score = self.denoiser.score(e.processed, e.argmax, steps)
        converged = bool(e.finished.all()) or stop_reason == "early_commit"
        return DenoiseOutput(canvas=e.argmax.clone(), committed=e.committed.tolist(), score=score, steps=steps,
                             forwards=e.forwards.tolist(), converged=converged,
                             cancelled=stop_reason == "cancelled", stop_reason=stop_reason)

    def _advance(self, e: StepBuffers, generator: torch.Generator | None, cur_step: int) -> list[bool]:
        """Draw this step's random numbers, run the step (replay its graph), return its stop flags."""
        e.exponential.exponential_(1.0, generator=generator)  # multinomial's draws, then re-noising, as
        e.noise.random_(0, self.vocab_size, generator=generator)  # Denoiser.run draws them
        e.temperature.fill_(self._temperature(cur_step))
        if e.graph is not None:
            e.graph.replay()
        else:
            self._step(e)
        return self._read_flags(e)  # the step's one host synchronisation

    def _step(self, e: StepBuffers) -> None:
        """One denoising step on device: reads and writes only `e`, no host synchronisation (CUDA-graph safe)."""
        s, batch, length = self.denoiser.settings, e.batch, self.canvas_length
        frozen = e.finished.clone()[:, None]  # [B, 1] rows already finished keep their state
        e.forwards.add_((~e.finished).long())
        logits = self.model(
            decoder_input_ids=e.canvas,
            self_conditioning_logits=e.self_conditioning,
            self_conditioning_mask=e.conditioned,
            decoder_attention_mask=e.masks,
            decoder_position_ids=e.positions,
            **with_cache(e.view),
        ).logits  # [B, C, V] float32
        processed = logits * e.temperature if self.reciprocal is not None else logits / e.temperature
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32).view(-1, self.vocab_size)
        sampled = torch.div(probs, e.exponential).argmax(dim=-1).view(batch, length)  # = torch.multinomial
        argmax = processed.argmax(dim=-1)
        entropy = token_entropy(processed)  # [B, C]
        sorted_entropy, order = torch.sort(entropy, dim=-1)
        selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= s.entropy_bound
        accepted = torch.scatter(torch.zeros_like(selected), -1, order, selected) | e.fixed
        sampled = torch.where(e.fixed, e.canvas, sampled)
        argmax = torch.where(frozen, e.argmax, torch.where(e.fixed, e.canvas, argmax))
        canvas = torch.where(frozen, e.canvas, torch.where(accepted, sampled, e.noise))
        processed = torch.where(frozen[..., None], e.processed, processed)
        if s.stability_threshold:
            stable = (e.history == argmax[None]).all(dim=-1).all(dim=0)
            history = torch.roll(e.history, shifts=-1, dims=0)
            history[-1] = argmax
            e.history.copy_(history)
        else:
            stable = torch.ones_like(e.finished)
        e.finished.logical_or_(stable & (entropy.mean(dim=-1) < s.confidence_threshold))
        self._commit(e, argmax, accepted & (sampled == argmax))
        e.canvas.copy_(canvas)
        e.argmax.copy_(argmax)
        e.processed.copy_(processed)
        e.self_conditioning.copy_(processed)  # the tempered logits, as transformers' generate feeds them
        e.conditioned.fill_(True)
        committed = e.committed > 0
        early = e.commit_on & (committed | e.finished).all() & committed.any()
        e.flags.copy_(torch.stack([early, e.finished.all()]))

    def _commit(self, e: StepBuffers, argmax: torch.Tensor, settled: torch.Tensor) -> None:
        """`Denoiser._commit` on device: commit rows whose text up to the first line end (or EOS) is settled."""
        length = self.canvas_length
        is_end = self.is_eos[argmax] | (e.line_mode & self.denoiser.ends_line[argmax])
        first = torch.where(is_end, self.canvas_positions, length).amin(dim=-1)  # [B]; C: no end
        through = self.canvas_positions[None] <= first[:, None]
        ready = (settled | ~through).all(dim=-1) & (first < length)
        newly = e.commit_on & ready & (e.committed == 0) & ~e.finished
        e.committed.copy_(torch.where(newly, first + 1, e.committed))

    def _temperature(self, cur_step: int) -> float:
        temperature = self.denoiser.settings.temperature(cur_step)
        if self.reciprocal is None:
            return temperature
        return RECIPROCALS[self.reciprocal](temperature)

    def _read_flags(self, e: StepBuffers) -> list[bool]:
        if e.host_flags is None:
            return e.flags.tolist()
        e.host_flags.copy_(e.flags, non_blocking=True)
        e.ready.record()
        e.ready.synchronize()
        return e.host_flags.tolist()

    def _buffers(self, view: Any, prompt_length: int, batch: int) -> StepBuffers:
        """The buffers (and graph) for this batch and prompt bucket: reused, else allocated and captured."""
        capacity = max(self.min_capacity, 1 << max(prompt_length - 1, 0).bit_length())
        key = (batch, capacity)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        while len(self.entries) >= self.max_entries:
            self.entries.popitem(last=False)
        e = self._allocate(view, batch, capacity)
        if self.graphs:
            e.graph = self._capture(e)
        self.entries[key] = e
        return e

    def _allocate(self, view: Any, batch: int, capacity: int) -> StepBuffers:
        device, length, vocab = self.device, self.canvas_length, self.vocab_size
        slots = {kind: min(capacity, self.window - 1) if kind == "sliding_attention" and self.window else capacity
                 for kind in set(self.layer_types)}
        kv, decoder_view = [], DynamicCache(config=self.text_config)
        layers: list[Any] = list(decoder_view.layers)  # attention layers only (no linear attention here)
        for kind, src, layer in zip(self.layer_types, view.layers, layers, strict=True):
            keys = src.keys.new_zeros((1, src.keys.shape[1], slots[kind], src.keys.shape[3]))
            values = src.values.new_zeros((1, src.values.shape[1], slots[kind], src.values.shape[3]))
            kv.append((keys, values))
            expanded_keys, expanded_values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
            layer.lazy_initialization(expanded_keys, expanded_values)
            layer.keys, layer.values = expanded_keys, expanded_values
        attention = self.text_config._attn_implementation
        mask_dtype = torch.bool if attention == "sdpa" else self.model.dtype
        masks = {kind: torch.zeros((1, 1, length, n + length), dtype=mask_dtype, device=device)
                 for kind, n in slots.items()}
        embed_dtype = self.denoiser.embed_dtype

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        e = StepBuffers(
            batch=batch, capacity=capacity, kv=kv, slots=slots, masks=masks, view=decoder_view,
            positions=zeros(1, length, dtype=torch.int32), canvas=zeros(batch, length), argmax=zeros(batch, length),
            processed=zeros(batch, length, vocab, dtype=torch.float32),
            self_conditioning=zeros(batch, length, vocab, dtype=embed_dtype),
            conditioned=zeros(batch, dtype=torch.bool),
            history=zeros(self.denoiser.settings.stability_threshold, batch, length),
            finished=zeros(batch, dtype=torch.bool), forwards=zeros(batch), committed=zeros(batch),
            fixed=zeros(length, dtype=torch.bool), commit_on=zeros(dtype=torch.bool),
            line_mode=zeros(dtype=torch.bool), temperature=torch.ones((), device=device),
            exponential=torch.ones((batch * length, vocab), device=device), noise=zeros(batch, length),
            flags=zeros(2, dtype=torch.bool),
        )
        for kind in slots:
            self._set_mask(e, kind, 0)
        if device.type == "cuda":
            e.host_flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
            e.ready = torch.cuda.Event()
        return e

    def _set_mask(self, e: StepBuffers, kind: str, valid_slots: int) -> None:
        slots, mask = e.slots[kind], e.masks[kind]
        index = torch.arange(slots + self.canvas_length, device=self.device)
        valid = (index < valid_slots) | (index >= slots)
        if mask.dtype != torch.bool:  # eager attention adds the mask to the scores
            zero = torch.zeros((), dtype=mask.dtype, device=self.device)
            valid = torch.where(valid, zero, torch.finfo(mask.dtype).min)
        mask.copy_(valid.expand_as(mask))

    def _reset(self, e: StepBuffers, view: Any, prompt_length: int, generator: torch.Generator | None,
               control: DenoiseControl, seed_canvas: torch.Tensor | None, fixed: torch.Tensor | None) -> None:
        """Load a request into `e`: its prompt KV and mask, positions, first canvas (same draw as Denoiser.run)."""
        lengths: dict[str, int] = {}
        for kind, (keys, values), src in zip(self.layer_types, e.kv, view.layers, strict=True):
            n = lengths.setdefault(kind, int(src.keys.shape[-2]))
            if n > e.slots[kind]:
                raise ValueError(f"{kind} view of {n} positions exceeds its {e.slots[kind]} slots")
            keys[:, :, :n].copy_(src.keys[:1])
            values[:, :, :n].copy_(src.values[:1])
        for kind, n in lengths.items():
            self._set_mask(e, kind, n)
        e.positions.copy_((self.canvas_positions + prompt_length).to(torch.int32)[None])
        canvas = torch.randint(0, self.vocab_size, (e.batch, self.canvas_length), device=self.device,
                               generator=generator)
        if seed_canvas is not None:
            seed = seed_canvas.to(self.device).expand(e.batch, -1)
            canvas = torch.where(seed >= 0, seed, canvas)
        e.canvas.copy_(canvas)
        e.argmax.copy_(canvas)
        if fixed is not None and seed_canvas is not None:
            e.fixed.copy_(fixed.to(self.device))
        else:
            e.fixed.zero_()
        for buffer in (e.conditioned, e.finished, e.forwards, e.committed):
            buffer.zero_()
        e.history.fill_(-1)
        e.commit_on.fill_(control.commit is not None)
        e.line_mode.fill_(control.commit == "line")

    def _capture(self, e: StepBuffers) -> Any:
        """Warm the step up on a side stream, then capture it; None (eager from now on) if capture fails."""
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self._step(e)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._step(e)
            return graph
        except Exception as exc:  # e.g. a model op that syncs or changes shape (per-expert loops), OOM
            log.warning("fast step: CUDA graph capture failed, running the step eagerly: %s", exc)
            self.graphs = False
            return None


# How a device may compute `tensor / python_float`: by multiplying with a float32 reciprocal, rounded from the
# double quotient (measured on an H200, torch 2.11, at 10 temperatures) or computed in float32 (what PyTorch's
# CUDA source reads as); the probe below finds which one this device uses, if either.
RECIPROCALS = {
    "double": lambda value: float(torch.tensor(1.0 / value, dtype=torch.float32)),
    "float": lambda value: float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(value, dtype=torch.float32)),
}


def _reciprocal_rule(device: torch.device, temperatures: list[float]) -> str | None:
    """The `RECIPROCALS` rule by which `tensor / t` on `device` equals a multiply, for every t the schedule uses;
    None when it divides (CPUs do) or no rule matches. The step then does the same with a device scalar, so its
    tempered logits have the reference's bits."""
    values = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0)).mul_(30).to(device)
    temperatures = [t for t in temperatures if t > 0]
    for name, reciprocal in RECIPROCALS.items():
        if all(torch.equal(values / t, values * torch.tensor(reciprocal(t), dtype=torch.float32, device=device))
               for t in temperatures):
            return name
    return None
