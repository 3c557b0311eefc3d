"""Text generation: greedy, temperature and nucleus (top-p) sampling, with a KV cache.

The prompt runs through the model once, filling the cache; each further step feeds only the newest
token. Under tensor parallelism the model returns this rank's vocabulary slice of the logits, so the
caller passes `gather_logits` (shard.gather_from_tp); every rank of the tp group then samples the
same token, because they share the generator's seed.
"""
import torch

from model import KVCache


def sample_next_token(logits, temperature: float, top_p: float, generator=None):
    """Pick one token id per row of `logits` (batch, vocab). temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one).
    outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.9,
             eos_id=None, generator=None, gather_logits=None, use_cache: bool = True):
    """Continue `prompt_ids` (a list of ints) by up to `max_new_tokens` tokens; returns the new ids.

    use_cache=False recomputes the whole prefix at every step (the reference the cache is tested against).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - len(prompt_ids))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(len(model.layers)) if use_cache else None
    new_ids, step_input = [], tokens
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[:, -1] if use_cache else model(tokens)[:, -1]
        if gather_logits is not None:
            logits = gather_logits(logits)
        next_id = sample_next_token(logits, temperature, top_p, generator)
        if eos_id is not None and int(next_id) == eos_id:
            break
        new_ids.append(int(next_id))
        step_input = next_id[:, None]
        tokens = torch.cat([tokens, step_input], dim=1)
    model.train(was_training)
    return new_ids
