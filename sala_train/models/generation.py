"""Autoregressive generation with a cache: greedy or sampled, batched with left padding.

Our own loop rather than transformers' GenerationMixin: the SALA hybrid cache (K/V for sparse layers,
recurrent states for lightning layers) does not fit transformers' cache classes, and owning the loop
keeps chunked prefill and both models on one code path across transformers versions.
"""

from __future__ import annotations

import torch


class GenerationMixin:
    """Adds ``generate`` to a causal LM whose forward takes ``past_key_values`` and returns ``logits``."""

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        prefill_chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        **unused,
    ) -> torch.LongTensor:
        """input_ids [B, T] (left-padded when the prompts differ in length, with ``attention_mask``)
        -> [B, T + n] with n <= max_new_tokens; sequences that finished are padded with ``pad_token_id``.

        ``prefill_chunk_size`` feeds a long prompt through the model in chunks of that many tokens, so
        peak activation memory follows the chunk, not the prompt.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        config = self.config
        if eos_token_id is None:
            eos_token_id = config.eos_token_id
        eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the cheaper causal path

        B, T = input_ids.shape
        cache = self.new_cache(capacity=T + max_new_tokens)  # one allocation: a doubled buffer could not fit
        chunk = prefill_chunk_size or T
        logits = None
        for start in range(0, T, chunk):
            end = min(start + chunk, T)
            mask = attention_mask[:, :end] if attention_mask is not None else None
            logits = self(input_ids[:, start:end], attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits

        eos = torch.tensor(eos_ids, device=input_ids.device, dtype=input_ids.dtype)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            next_token = _pick(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            new_tokens.append(next_token)
            if eos.numel():
                finished |= torch.isin(next_token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = self(next_token[:, None], attention_mask=attention_mask, past_key_values=cache).logits
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _pick(logits: torch.Tensor, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
