"""Offline API in the spirit of vLLM's `LLM`: batch generation over the engine, in this process."""
from __future__ import annotations

from collections.abc import Sequence

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams
from workers.tokenizer import encode_chat

Prompt = str | list[int]


class LLM:
    """LLM(model=None, **engine_options): model is None (the default SmolLM2-135M-Instruct GGUF), a Hugging
    Face folder of safetensors, a .gguf file, or a named architecture with load_format="dummy".

    Engine options use vLLM's names: dtype, device, max_model_len, tensor_parallel_size, block_size,
    kv_cache_memory_bytes, gpu_memory_utilization, enable_prefix_caching, max_num_batched_tokens,
    max_num_seqs, enable_chunked_prefill, scheduling_policy, role, seed, load_format; and for GPUs
    attention_backend ("auto": triton on CUDA, sdpa on CPU), enforce_eager (no CUDA graphs) and
    cudagraph_capture_sizes (decode batch sizes captured as graphs; default 1, 2, 4, 8, 16, ... max_num_seqs).
    """

    def __init__(self, model: str | None = None, **engine_options):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p, prio in zip(prompts, params_list, priorities):
                req_id = self.engine.add_request(prompt, p, priority=prio)
                req = self.engine.scheduler.requests[req_id]
                results[req_id] = RequestOutput(req_id, prompt if isinstance(prompt, str) else None, req.prompt_token_ids)
                order.append(req_id)
        except Exception:
            for req_id in order:
                self.engine.abort_request(req_id)
            raise
        return self._run(results, order)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation (a list of {"role", "content"}) or many.

        The options are vLLM's (see workers.tokenizer.encode_chat); message content is text, as on the router.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(conv, add_generation_prompt, continue_final_message, chat_template_kwargs)
                   for conv in conversations]
        return self.generate(prompts, params)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            chat_template_kwargs: dict | None = None) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("messages: this model has no chat template; pass a prompt to generate() instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: must be a dict with 'role' and 'content'")
        return encode_chat(tok, messages, add_generation_prompt, continue_final_message=continue_final_message,
                           chat_template_kwargs=chat_template_kwargs)

    def _run(self, results: dict[str, RequestOutput], order: list[str]) -> list[RequestOutput]:
        pending = set(order)
        scheduler = self.engine.scheduler
        while pending:
            events = self.engine.step()
            if not events and not self.engine.has_unfinished_requests():
                break
            if not events and scheduler.num_running == 0 and scheduler.num_waiting > 0:
                # Nothing runs and nothing can be admitted: only KV blocks held for hand-off can cause this.
                for req_id in pending:
                    self.engine.abort_request(req_id)
                raise RuntimeError("KV cache is full of blocks held for hand-off; release them with release_kv()")
            for ev in events:
                if ev.req_id in results:
                    results[ev.req_id].add(ev)
                    if ev.finished:
                        pending.discard(ev.req_id)
        return [results[r] for r in order]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
