"""Evaluation: validation loss and perplexity, and multiple-choice accuracy by per-candidate loss.

Multiple choice is scored as the LOMO paper scores SuperGLUE: each candidate answer is appended to the
prompt and the candidate the model finds least surprising wins. Two numbers, as lm-evaluation-harness
reports them: `acc` takes the lowest summed loss of the answer tokens, `acc_norm` the lowest loss per
byte of answer text, which removes the bias towards short answers. The end-of-sequence token is not part
of the scored answer, as in lm-eval.

Under tensor parallelism every rank of a tp group scores the same examples (the loss needs all vocabulary
slices); under data parallelism each dp rank scores its share and the counts are summed. Losses come
from losses.model_token_losses, the same fused head + cross-entropy as training, so an evaluation batch
never needs more memory than a training batch of the same size.

Command line: `python evaluate.py --ckpt DIR --data FILE [--format ...]` scores a checkpoint's model on every
example of a data file: loss and perplexity, and acc and acc_norm for multiple choice (one JSON line).
"""
import argparse
import json
import math

import torch
import torch.distributed as dist

import checkpoint
import cli
from data import collate, encode_prompt_answer
from losses import model_token_losses
from model import IGNORE_INDEX
from tasks import load_dataset


@torch.no_grad()
def validation_loss(model, items, batch_size, device, max_batches=None, grid=None):
    """Mean loss per target token over `items` (lists of (ids, labels)), and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)][:max_batches]
    for batch in batches:
        inputs, targets = (t.to(device) for t in collate(batch))
        total += float(model_token_losses(model, inputs, targets, grid).sum())
        count += int((targets != IGNORE_INDEX).sum())
    model.train()
    return total / count, math.exp(min(total / count, 50.0))


@torch.no_grad()
def candidate_losses(model, example, tokenizer, seq_len, device, grid=None):
    """Summed loss of each candidate answer's tokens after the prompt, and how many candidates had to be
    truncated (from the left of the prompt) to fit seq_len + 1 tokens."""
    encoded = [encode_prompt_answer(tokenizer, example.prompt, choice, seq_len, train_on_prompt=False,
                                    long="truncate", answer_eos=False) for choice in example.choices]
    inputs, targets = (t.to(device) for t in collate([item for item, _ in encoded]))
    losses = model_token_losses(model, inputs, targets, grid).sum(dim=1).tolist()
    return losses, sum(truncated for _, truncated in encoded)


@torch.no_grad()
def multiple_choice_accuracy(model, examples, tokenizer, seq_len, device, grid=None):
    """{'acc', 'acc_norm', 'n'} over `examples` (MultipleChoice), shared out over the dp ranks."""
    model.eval()
    dp_rank, dp = (grid.dp_rank, grid.dp) if grid is not None else (0, 1)
    # correct by summed loss, correct per byte, examples, truncated candidates
    counts = torch.zeros(4, dtype=torch.float64)
    for example in examples[dp_rank::dp]:
        losses, truncated = candidate_losses(model, example, tokenizer, seq_len, device, grid)
        per_byte = [loss / max(1, len(choice.encode("utf-8"))) for loss, choice in zip(losses, example.choices)]
        golds = example.golds or (example.label,)
        counts += torch.tensor([losses.index(min(losses)) in golds, per_byte.index(min(per_byte)) in golds, 1.0,
                                truncated], dtype=torch.float64)
    if grid is not None and grid.dp_group is not None:
        counts = counts.to(device)
        dist.all_reduce(counts, group=grid.dp_group)
        counts = counts.cpu()
    model.train()
    correct, correct_norm, n, truncated = counts.tolist()
    return dict(acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1), n=int(n), truncated=int(truncated))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Score the model of a checkpoint folder on every example of a data file.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a Meta, Hugging Face or training-state folder, or a .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's)")
    p.add_argument("--data", required=True, help="a data file in any format train.py reads")
    p.add_argument("--format", default="auto", help="as train.py's --format")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model, tokenizer = checkpoint.load_pretrained(args.ckpt, args.tokenizer)
    model = model.to(args.device)
    seq_len = args.seq_len or model.args.max_seq_len - 1
    data = load_dataset(args.data, args.format, tokenizer, seq_len)
    loss, perplexity = validation_loss(model, data.items, args.batch_size, args.device)
    result = dict(data=str(args.data), examples=len(data.items), val_loss=loss, val_ppl=perplexity)
    if data.choices:
        result.update(multiple_choice_accuracy(model, data.choices, tokenizer, seq_len, args.device))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
