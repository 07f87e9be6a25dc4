"""The model runner: prefill, the batched decode step, the KV caches, sampling and capture.

Everything here runs on the engine's worker thread, under `torch.inference_mode`, for the
requests the scheduler (`services.llm.scheduler`) admits and the batches it hands over:

- **Prefill** (`prefill`): one request alone. Its media are embedded with its adapter
  version's connectors (`MultimodalLM.embed`); a time-token preset adds the LLM embedding of
  the matched frame to each prompt time token (`timestamps.add_source_frames`, shared with
  training); the forward is causal, or takes a 4D mask where the preset's media spans attend
  bidirectionally (`services.models.lm.attention`); a request with media of the timestamp
  heads' modality goes through a `TimedDecode`, which matches every position against the
  frames. The request takes its first token at once; if it goes on, its KV cache joins the
  batch cache of its adapter version and its `Row` is returned for the scheduler to run.
- **Step** (`step`): one forward for every row of a version's batch over its left-padded KV
  cache (`services.llm.batching.BatchCache`: per-row positions and mask), after selecting the
  version's connectors and LoRA. The step's logits get the penalised rows' penalties in one
  call (`sampling.penalise_rows`), then each row, in its own logging context, takes its next
  token; a row that finishes, fails or is cancelled ends there and the cache drops it, so it
  never stalls the others.
- **Tokens** (`_take`): a row's next token is the forced one (the rest of a NExT-GPT signal
  span, `SignalCapture`) or its `Sampler`'s choice from its own logits, remembered by its
  `Penalties`; the token goes to the row's `OutputStream`, which makes the event to send.
- **Capture**: a row with a `TimedDecode` feeds a time token as the matched frame's
  embedding and matches from its hidden states; a row with a `SignalCapture` keeps the hidden
  states its spans need, projects each complete span, and after its last token feeds its
  appended spans from its own cache, alone (`_finish_signals`).

What it must not do: queue, admit or order requests (the scheduler), or turn tokens into
text and events (`services.llm.stream`). Its state across iterations is one `BatchCache` per
adapter version, whose rows are the scheduler's rows of that version, in the same order: a row
joins both in the iteration of its prefill, and a step leaves both with the rows that go on.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from services.llm.adapter_manager import AdapterManager
from services.llm.batching import BatchCache
from services.llm.metrics import LLMMetrics
from services.llm.request import PreparedRequest
from services.llm.sampling import Penalties, Sampler, apply_penalties, penalise_rows
from services.llm.scheduler import Channel, Waiting
from services.llm.signals import SignalCapture, output_signal_ids
from services.llm.stream import OutputStream
from services.models.lm.attention import prefill_attention_mask
from services.models.lm.loading import LoadedModel
from services.models.lm.time_matching import TimedDecode
from services.models.lm.timestamps import add_source_frames, source_frames

CheckCancelled = Callable[[PreparedRequest, int | None], None]  # Scheduler.check_cancelled


@dataclass(eq=False)
class Row:
    """A request in a running batch: its output stream, sampler, capture and the token to feed next."""

    job: PreparedRequest
    context: contextvars.Context  # its logging context (request id)
    out: OutputStream
    sampler: Sampler
    penalties: Penalties | None = None  # a request with penalties: its token memory
    timed: TimedDecode | None = None
    capture: SignalCapture | None = None
    token: int = -1  # sampled, not yet fed


class ModelRunner:
    """Runs the served model for the engine's scheduler: prefill, batched steps, tokens.

    Args:
        loaded: The served model, tokenizer and preset.
        adapters: The loaded adapter versions (a prefill or step selects its row's version).
        metrics: Where prefill and step measurements go.
        check_cancelled: Raises for a cancelled request (`Scheduler.check_cancelled`): a row
            asks it before its prefill and after each of its tokens.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        adapters: AdapterManager,
        metrics: LLMMetrics,
        check_cancelled: CheckCancelled,
    ) -> None:
        self.loaded, self.adapters, self.metrics = loaded, adapters, metrics
        self.check_cancelled = check_cancelled
        self.signal_ids = output_signal_ids(loaded.preset, loaded.tokenizer)
        self._caches: dict[str, BatchCache] = {}  # per adapter version key: its batch's KV cache

    def reset(self) -> None:
        """Drop every batch cache (the loop failed and its rows have ended)."""
        self._caches.clear()

    @torch.inference_mode()
    def prefill(self, waiting: Waiting[PreparedRequest]) -> Row | None:
        """Prefill one request alone and take its first token; its row (its KV cache has joined
        its version's batch cache), or None if it ended (its channel has its end)."""
        job, model, metrics = waiting.job, self.loaded.model, self.metrics
        start = time.perf_counter()
        metrics.queue_time.observe(start - job.admitted)
        row: Row | None = None
        try:
            self.check_cancelled(job, None)
            connectors = self.adapters.select(job.version)
            embeds = model.embed(
                job.prompt.input_ids, job.prompt.media_spans, job.media, connectors, job.instructions
            )  # (1, L, D)
            embeds = self._add_source_times(job, embeds)
            timed = self._timed(job, embeds)
            capture = self._capture(job)
            mask = self._prefill_mask(job, embeds)  # None: causal
            if timed is None:
                out = model.lm(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    use_cache=True,
                    logits_to_keep=1,
                    output_hidden_states=capture is not None,
                )
            else:
                out = timed.prefill(embeds, mask)
            stream = self._stream(job, waiting.channel, start)
            row = Row(job, waiting.context, stream, Sampler(job.request.sampling))
            row.timed, row.capture = timed, capture
            row.penalties = self.penalties(job, out.logits)
            if capture is not None:
                capture.on_states(out.hidden_states)
            metrics.prefill_time.observe(time.perf_counter() - start)
            metrics.prompt_tokens.inc(len(job.prompt.input_ids))
            logits = out.logits[:, -1]  # (1, V)
            if row.penalties is not None:
                logits = apply_penalties(logits, [row.penalties])
            go_on = self._take(row, logits[0], lambda: out.past_key_values)
        except BaseException as e:
            if row is None:
                waiting.channel.finish(e)
            else:
                row.out.end(e)
            return None
        if not go_on:
            row.out.end(None)
            return None
        self._caches.setdefault(job.adapter, BatchCache()).add(out.past_key_values)
        return row

    @torch.inference_mode()
    def step(self, key: str, rows: list[Row]) -> list[Row]:
        """One decode step of every row of batch `key` (one forward), then each row's next
        token; the rows that go on, in order (the others have ended)."""
        lm, kv = self.loaded.model.lm, self._caches[key]
        try:
            self.adapters.select(rows[0].job.version)  # every row of a batch holds this version
            table = lm.get_input_embeddings()
            tokens = torch.tensor([[row.token] for row in rows], device=table.weight.device)  # (B, 1)
            x = table(tokens)  # (B, 1, D)
            for i, row in enumerate(rows):
                if row.timed is not None:
                    x[i : i + 1] = row.timed.step_input(row.token)
            hidden = any(row.timed is not None or row.capture is not None for row in rows)
            cache, mask, positions = kv.step_inputs()
            out = lm(
                inputs_embeds=x,
                past_key_values=cache,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                output_hidden_states=hidden,
            )
            kv.stepped()
        except BaseException as e:
            for row in rows:
                row.out.end(e)
            del self._caches[key]
            return []
        self.metrics.batch_size.observe(len(rows))
        logits = penalise_rows(out.logits[:, -1], [row.penalties for row in rows])  # (B, V)
        keep = [
            i
            for i, row in enumerate(rows)
            if row.context.run(self._advance, kv, row, i, out, logits[i], hidden)
        ]
        if keep:
            kv.keep(keep)
        else:
            del self._caches[key]
        return [rows[i] for i in keep]

    def penalties(self, job: PreparedRequest, logits: torch.Tensor) -> Penalties | None:
        """The token memory of a request with penalties, or None: the prompt's ids outside its
        media spans, less the timestamp token (as E.T. Chat's processor leaves out -200 and
        `<vid>`)."""
        if not job.request.sampling.penalised:
            return None
        time_token = self.loaded.time_token_id
        return Penalties(
            job.request.sampling,
            logits.shape[-1],
            job.prompt.input_ids,
            skip_spans=set(job.prompt.media_spans),
            skip_ids=() if time_token is None else (time_token,),
            device=logits.device,
        )

    def _advance(
        self, kv: BatchCache, row: Row, i: int, out: Any, logits: torch.Tensor, hidden: bool
    ) -> bool:
        """Row `i` of a step's output: its states, then its next token from its (penalised)
        logits (V,); whether it goes on (a row that ends has ended here)."""
        try:
            if hidden:
                states = tuple(h[i : i + 1] for h in out.hidden_states)
                if row.timed is not None:
                    row.timed.after_step(states)
                if row.capture is not None:
                    row.capture.on_states(states)
                    row.out.outputs += row.capture.ready()
            go_on = self._take(row, logits, functools.partial(kv.row_cache, i))
        except BaseException as e:
            row.out.end(e)
            return False
        if not go_on:
            row.out.end(None)
        return go_on

    def _take(self, row: Row, logits: torch.Tensor, row_cache: Callable[[], Any]) -> bool:
        """Choose and report a row's next token from its logits (V,); whether it goes on.

        Args:
            row: The row.
            logits: Its last position's logits.
            row_cache: Its KV cache alone (batch 1, for the signal tokens fed after the last one).

        Raises:
            CancelledError, UnavailableError: The request was cancelled (or the engine closed).
        """
        out, capture = row.out, row.capture
        forced = None if capture is None else capture.next_forced()
        token = row.sampler(logits) if forced is None else forced
        if row.penalties is not None:
            row.penalties.add(token)
        out.clock()
        if capture is not None and capture.is_signal(token):
            event = out.push(token, signal=True)
            capture.on_token(token, out.signal_offset)
        else:
            event = out.push(token, None if row.timed is None else row.timed.on_token(token))
            if capture is not None:
                capture.on_token(token, out.text_length)
        if out.finish is not None and capture is not None:
            event = out.with_outputs(event, self._finish_signals(capture, out.text_length, row_cache()))
        if event is not None:
            out.send(event)
        if out.finish is not None:
            return False
        self.check_cancelled(row.job, out.count)
        row.token = token
        return True

    def _stream(self, job: PreparedRequest, channel: Channel, start: float) -> OutputStream:
        loaded = self.loaded
        return OutputStream(
            job, channel, loaded.tokenizer, loaded.eos_ids, loaded.preset.generation, self.metrics, start
        )

    def _capture(self, job: PreparedRequest) -> SignalCapture | None:
        """The output-signal state of a request, or None (the preset has no outputs)."""
        if not self.loaded.preset.outputs:
            return None
        lm = self.loaded.model.lm
        return SignalCapture(
            self.loaded.preset,
            self.signal_ids,
            job.version.projectors,
            lm.get_input_embeddings(),
            job.outputs,
            eos_ids=self.loaded.eos_ids,
        )

    def _finish_signals(self, capture: SignalCapture, text_length: int, cache: Any) -> list[Any]:
        """Complete the request's signals after its last token, feeding what they need from its
        own KV cache `cache` (batch 1); the outputs, to go with its last event."""
        lm, device = self.loaded.model.lm, self.loaded.model.device
        state = {"out": SimpleNamespace(past_key_values=cache)}

        def feed(tokens: list[int]) -> Any:
            ids = torch.tensor([tokens], device=device)  # (1, n)
            state["out"] = lm(
                input_ids=ids,
                past_key_values=state["out"].past_key_values,
                use_cache=True,
                output_hidden_states=True,
            )
            return state["out"].hidden_states

        return capture.finish(feed, text_length)

    def _prefill_mask(self, job: PreparedRequest, embeds: torch.Tensor) -> torch.Tensor | None:
        """The prompt's 4D attention mask where media spans attend bidirectionally (the preset's
        `attention`, `services.models.lm.attention`), or None: causal. Decode steps need none."""
        return prefill_attention_mask(
            self.loaded.preset,
            self.loaded.model.lm,
            [m.modality for m in job.media],
            job.prompt.media_spans,
            embeds,
        )

    def _timed(self, job: PreparedRequest, embeds: torch.Tensor) -> TimedDecode | None:
        """The time-token decode state of a request, or None (no heads, or no media to match)."""
        spec = self.loaded.preset.heads.timestamps
        if spec is None:
            return None
        return TimedDecode.for_request(
            self.loaded.model.lm,
            job.version.heads,
            self.loaded.time_token_id,
            spec.modality,
            job.media,
            job.prompt.media_spans,
            embeds,
        )

    def _add_source_times(self, job: PreparedRequest, embeds: torch.Tensor) -> torch.Tensor:
        """The prompt's time tokens + the LLM embedding of the frame at their time (1, L, D)."""
        spec = self.loaded.preset.heads.timestamps
        if not job.prompt.time_tokens or spec is None:
            return embeds
        media = job.media
        items = [i for i, m in enumerate(media) if m.modality == spec.modality]
        spans = [job.prompt.media_spans[i] for i in items]
        chosen = source_frames(job.prompt.time_tokens, spans, [media[i].times for i in items])
        frames = torch.stack([embeds[0, spans[k][0] + frame] for _, k, frame in chosen])  # (N, D)
        return add_source_frames(embeds, [0] * len(chosen), [pos for pos, _, _ in chosen], frames)
