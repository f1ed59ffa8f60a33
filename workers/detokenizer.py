"""Incremental detokenization and stop-string matching for one request.

Text is produced with the prefix_offset/read_offset technique: decode a short window of already-emitted
tokens alone and together with the new tokens, and emit the difference once it no longer ends in an
incomplete UTF-8 sequence ("\ufffd"). Decoding from a token boundary inside the window keeps BPE/sentencepiece
leading spaces right, and costs O(window) per step rather than O(output).

Stop rules (vLLM's: vllm/v1/engine/detokenizer.py `update` and vllm/v1/core/sched/utils.py `check_stop`):
  - A stop token (an id in `stop_token_ids`, or EOS unless `ignore_eos`) ends the request in the engine, and only
    once `min_tokens` tokens exist (before that the sampler bans those ids). Its text is left out of the output
    unless `include_stop_str_in_output`; its id stays in the token ids.
  - A stop string may only end the request at the (min_tokens + 1)-th token or later, and only by text that
    tokens after the first `min_tokens` produced: text of the first `min_tokens` tokens never matches alone (a
    match may start in it and end after it). The output ends before the stop string, or after it with
    `include_stop_str_in_output`; tokens after the one that completed it are dropped.
"""
from __future__ import annotations

from workers.sampling_params import SamplingParams

# How many prompt tokens the first window reaches back (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
INITIAL_DETOKENIZATION_OFFSET = 5


class IncrementalDetokenizer:
    """Turns one request's output tokens into text as they arrive, and watches for its stop strings.

    `output_text` never contains a matched stop string unless `include_stop_str_in_output`; once a stop string
    has matched, later updates are ignored. With `tokenizer=None` (dummy models) only token ids are tracked and
    `output_text` stays "".
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_text = ""
        # The stop string that ended the request, if any.
        self.stop_str: str | None = None
        # Window over token_ids: [prefix_offset, read_offset) was already emitted as text.
        self._prefix_offset = max(self.num_prompt_tokens - INITIAL_DETOKENIZATION_OFFSET, 0)
        self._read_offset = self.num_prompt_tokens
        self._num_sent_chars = 0
        # Text that may still turn out to be the start of a stop string is held back from deltas.
        self._stop_hold_back = 0 if params.include_stop_str_in_output else max(params.max_stop_str_len - 1, 0)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append newly sampled tokens; returns the stop string that matched, else None.

        `stop_terminated`: the engine ended the request at the last of these tokens (a stop token id or EOS), so
        its text is left out unless include_stop_str_in_output. When a stop string completes before the last
        token, the later tokens are dropped, as if tokens had come one at a time.
        """
        if self.stop_str is not None or not new_token_ids:
            return None
        skipped = None
        if stop_terminated and not self.params.include_stop_str_in_output:
            *new_token_ids, skipped = new_token_ids
        if self.tokenizer is None or not self.params.stop:
            self.token_ids.extend(new_token_ids)
            if self.tokenizer is not None:
                self.output_text += self._decode_new_text()
        else:
            for token_id in new_token_ids:
                self._update_one(token_id)
                if self.stop_str is not None:
                    return self.stop_str  # the stop token, if any, came after: dropped with the rest
        if skipped is not None:
            self.token_ids.append(skipped)
        return self.stop_str

    def _update_one(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        new_text = self._decode_new_text()
        num_old_chars = len(self.output_text)
        self.output_text += new_text
        # A match must end in this token's text, and not before the (min_tokens + 1)-th token.
        if self.params.stop and new_text and len(self.token_ids) - self.num_prompt_tokens > self.params.min_tokens:
            self._check_stop_strings(num_old_chars)

    def get_next_text_delta(self, finished: bool = False) -> str:
        """Text not returned before, for streaming. Pass finished=True on the last call of a request.

        Until the request finishes, the last (longest stop string - 1) characters are held back, so that the
        concatenated deltas never include text a stop string later cuts off.
        """
        end = len(self.output_text)
        if not finished and self.stop_str is None:
            end = max(end - self._stop_hold_back, self._num_sent_chars)
        delta = self.output_text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta

    def _decode_new_text(self) -> str:
        # Both decodes start at the same token, so they agree on the window's leading text.
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            # Special tokens only, or a multi-byte character still incomplete: wait for more tokens.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]

    def _decode(self, token_ids: list[int]) -> str:
        # No tokenization-space cleanup: it is not prefix-stable (" ." -> "."), so windows would disagree.
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _check_stop_strings(self, num_old_chars: int) -> None:
        """Search the new text plus enough old text for a stop string spanning the boundary; truncate on a hit."""
        text = self.output_text
        best_start, best_str = -1, None
        for stop_str in self.params.stop:
            start = text.find(stop_str, max(num_old_chars - len(stop_str) + 1, 0))
            if start != -1 and (best_start == -1 or start < best_start):
                best_start, best_str = start, stop_str
        if best_str is None:
            return
        end = best_start + len(best_str) if self.params.include_stop_str_in_output else best_start
        self.output_text = text[:end]
        self.stop_str = best_str
