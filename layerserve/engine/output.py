"""Turns sampled tokens into what callers see: text deltas, stop strings, finish reasons, usage."""

from __future__ import annotations

from layerserve.engine.request import CompletionDelta, FinishReason, RequestOutput, TokenLogprob
from layerserve.engine.sequence import RequestGroup, Sequence
from layerserve.engine.stop import StopStringMatcher, check_token_stop
from layerserve.text.detokenizer import IncrementalDetokenizer


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)

    def init_sequence(self, seq: Sequence) -> None:
        seq.detok = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens)
        if seq.params.stop:
            seq.stop_matcher = StopStringMatcher(seq.params.stop)
        factory = seq.params.logits_mask_factory
        if factory is not None:
            seq.logits_mask = factory()

    def append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Append one sampled token; True when the sequence has finished."""
        params = seq.params
        seq.token_ids.append(token_id)
        seq.new_token_ids.append(token_id)
        if logprob is not None:
            seq.new_logprobs.append(logprob)
        if seq.logits_mask is not None:
            seq.logits_mask.accept(token_id)
        stop = check_token_stop(token_id, seq.num_output_tokens, seq.num_tokens, params, self.eos_token_ids, self.max_model_len)
        if stop is None or stop[0] is FinishReason.LENGTH:  # a stop token's text is not output
            piece = seq.detok.add(token_id)
            if piece:
                offset = len(seq.text)
                seq.text += piece
                if seq.stop_matcher is not None:
                    hit = seq.stop_matcher.feed(offset, piece)
                    if hit is not None:
                        seq.text = seq.text[: hit[0]]
                        stop = (FinishReason.STOP, hit[1])
        if stop is None and seq.logits_mask is not None and seq.logits_mask.is_finished():
            stop = (FinishReason.STOP, None)
        if stop is None:
            return False
        seq.finish_reason, seq.stop_reason = stop
        return True

    def make_output(self, group: RequestGroup, error: str | None = None) -> RequestOutput:
        """Collect what each sequence produced since the last output."""
        deltas = []
        for seq in group.seqs:
            held = seq.stop_matcher.held() if seq.stop_matcher is not None and not seq.finished else 0
            end = len(seq.text) - held
            end = max(end, seq.num_text_sent)
            text = seq.text[seq.num_text_sent:end]
            report_finish = seq.finished and not seq.finish_reported
            if not (seq.new_token_ids or text or report_finish):
                continue
            seq.finish_reported = seq.finished
            seq.num_text_sent = end
            logprobs = list(seq.new_logprobs) if seq.params.logprobs is not None else None
            finish = seq.finish_reason if seq.finished else None
            deltas.append(CompletionDelta(seq.index, list(seq.new_token_ids), text, logprobs, finish, seq.stop_reason))
            seq.new_token_ids.clear()
            seq.new_logprobs.clear()
        return RequestOutput(
            request_id=group.request_id,
            deltas=deltas,
            prompt_tokens=len(group.prompt_ids),
            completion_tokens=group.num_output_tokens,
            cached_tokens=group.num_cached_tokens,
            finished=group.finished,
            error=error,
        )
