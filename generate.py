"""Text generation: greedy, temperature and nucleus (top-p) sampling, with a KV cache.

The prompt runs through the model once, filling the cache; each further step feeds only the newest
token. Under tensor parallelism the model returns this rank's vocabulary slice of the logits, so the
caller passes `gather_logits` (shard.gather_from_tp); every rank of the tp group then samples the
same token, because they share the generator's seed.

Command line: `python generate.py --ckpt DIR --prompt "..." [--template alpaca]` continues a prompt with a
checkpoint's model. Left out: chat templates (this project's tokenizers are SentencePiece, without them).
"""
import argparse

import torch

import checkpoint
import cli
from model import KVCache
from tasks import alpaca_prompt


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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Continue a prompt with the model of a checkpoint folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a Meta, Hugging Face or training-state folder, or a .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--template", default="none", choices=["none", "alpaca"], help="wrap the prompt as an instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model, tokenizer = checkpoint.load_pretrained(args.ckpt, args.tokenizer)
    model = model.to(args.device)
    prompt = alpaca_prompt(args.prompt) if args.template == "alpaca" else args.prompt
    ids = generate(model, tokenizer.encode(prompt), args.max_new_tokens, args.temperature, args.top_p,
                   eos_id=tokenizer.eos_id, generator=torch.Generator(args.device).manual_seed(args.seed))
    text = tokenizer.decode(ids)
    print(text)
    return text


if __name__ == "__main__":
    cli.run(main, "generate.py")
