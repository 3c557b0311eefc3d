"""The training loss straight from the final hidden states: the output head and cross-entropy fused, in
vocabulary chunks, so that the (tokens x vocab) logits never exist in full.

Why: for 7B at 4 x 512 tokens the logits are 2048 x 32000; in fp32, with the softmax and its gradient
beside them, they are ~0.7 GiB, more than everything else LOMO keeps beyond the weights (PERFORMANCE.md, 'losses.py').
At 16 x 1024 they are ~6 GiB. Here each chunk of vocabulary rows is multiplied, reduced and freed:

- forward: for each chunk, logits = hidden @ W[chunk]^T (in the weights' dtype, as `model.output` would
  compute them), then in fp32 an online log-sum-exp (a running max and a running sum of exp, rescaled
  when the max grows) and the target's logit. loss = logsumexp - target logit. Saved for backward: only
  the hidden states, the head weight (a parameter, no copy) and one log-sum-exp per token.
- backward: the logits of each chunk are recomputed (one extra head matmul, ~1% of a 7B step), and
  d loss / d logits = softmax - one_hot gives this chunk's rows of the head gradient exactly (one
  matmul, no accumulation across chunks) and a partial d loss / d hidden, summed over chunks in fp32.
- tensor parallelism: the head is split along the vocabulary (shard.py), so each rank reduces its own
  rows and three all-reduces of one number per token (max, sum of exp, target logit) finish the job, as
  in Megatron's vocab-parallel cross-entropy. The sum of d hidden over ranks is done by the copy-to-tp
  function that shard.py already places on the final norm's output.

Numerically it is the unfused `cross_entropy(model.output(hidden).float(), labels)`: the same bf16 logits,
fp32 from there on; only the order of the sums differs (tests/test_losses.py checks it against
autograd in float64, at tp = 1 and 2). Left out: a fused GPU kernel (this is plain PyTorch; each chunk is
a matmul plus a few elementwise passes), label smoothing, z-loss.
"""
import torch
import torch.distributed as dist

from model import IGNORE_INDEX
from shard import all_reduce

# Elements of one chunk of logits: 2**22 fp32 values = 16 MiB, whatever the batch. For 2048 tokens
# that is 2048 vocabulary rows per chunk (16 chunks for LLaMA's 32000: each matmul is still 2048 x 4096 x
# 2048, large enough to run at full speed); for 16,384 tokens, 256 rows. Backward runs while the head's
# gradient (the largest one LOMO holds) and every checkpointed input are alive, so its temporaries (a
# chunk in fp32 and in bf16) count: with the inputs offloaded this is the peak of a 7B step.
CHUNK_ELEMENTS = 2 ** 22


class FusedHeadCrossEntropy(torch.autograd.Function):
    """Per-token losses (0 where the label is -100) of hidden (tokens, dim) through the head weight
    (vocab rows on this rank, dim), whose first row is vocabulary id `vocab_start`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, chunk_rows):
        n_tokens, n_rows = hidden.shape[0], weight.shape[0]
        maths = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (float64 in the tests)
        ignored = labels == IGNORE_INDEX
        local_labels = labels - vocab_start
        running_max = torch.full((n_tokens,), -torch.inf, dtype=maths, device=hidden.device)
        sum_exp = torch.zeros(n_tokens, dtype=maths, device=hidden.device)
        target_logit = torch.zeros(n_tokens, dtype=maths, device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            logits = (hidden @ weight[start:start + chunk_rows].T).to(maths)
            here = (local_labels >= start) & (local_labels < start + logits.shape[1]) & ~ignored
            picked = logits.gather(1, (local_labels - start).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            target_logit += picked.masked_fill(~here, 0.0)
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            # Online log-sum-exp: sum_exp holds sum(exp(logit - reference)), the reference being the running
            # max; when the max grows, what was summed is rescaled to the new reference. (The exponentials
            # overwrite the logits, which are not needed after this.)
            old_reference, reference = _reference(running_max), _reference(new_max)
            sum_exp = _rescaled(sum_exp, old_reference, reference) + logits.sub_(reference[:, None]).exp_().sum(dim=1)
            running_max = new_max
        reference = _reference(running_max)
        if group is not None:  # combine the ranks' vocabulary slices
            global_max = all_reduce(running_max.clone(), group, op=dist.ReduceOp.MAX)
            sum_exp = all_reduce(_rescaled(sum_exp, reference, _reference(global_max)), group)
            all_reduce(target_logit, group)  # only the rank holding the label added a non-zero
            reference = _reference(global_max)
        log_sum_exp = reference + sum_exp.log()
        ctx.save_for_backward(hidden, weight, labels, log_sum_exp)
        ctx.vocab_start, ctx.chunk_rows = vocab_start, chunk_rows
        return (log_sum_exp - target_logit).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, log_sum_exp = ctx.saved_tensors
        maths = log_sum_exp.dtype
        scale = grad_losses.to(maths).masked_fill(labels == IGNORE_INDEX, 0.0)[:, None]
        local_labels = labels - ctx.vocab_start
        grad_weight = torch.empty_like(weight)
        grad_hidden = torch.zeros(hidden.shape, dtype=maths, device=hidden.device)
        for start in range(0, weight.shape[0], ctx.chunk_rows):
            chunk = weight[start:start + ctx.chunk_rows]
            logits = (hidden @ chunk.T).to(maths)  # recomputed: cheaper than keeping them
            grad_logits = logits.sub_(log_sum_exp[:, None]).exp_().mul_(scale)  # softmax * dL/dloss, in place
            # Minus the one-hot: scale at each label's column, for labels in this chunk (a scatter, not
            # boolean indexing, which would wait for the GPU to count the matches).
            here = (local_labels >= start) & (local_labels < start + chunk.shape[0])
            columns = (local_labels - start).clamp(0, chunk.shape[0] - 1)[:, None]
            grad_logits.scatter_add_(1, columns, -scale * here[:, None])
            grad_logits = grad_logits.to(hidden.dtype)  # as the unfused logits' gradient would be
            del logits  # the fp32 chunk; without this it lives on while the next chunk's is made
            torch.mm(grad_logits.T, hidden, out=grad_weight[start:start + chunk.shape[0]])
            grad_hidden += grad_logits @ chunk
            del grad_logits
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None


def _reference(running_max):
    # A row whose logits so far are all -inf (fp16 overflow) takes 0 as its reference: -inf - -inf is nan.
    return running_max.masked_fill(running_max == -torch.inf, 0.0)


def _rescaled(sum_exp, old_reference, reference):
    # A reference only grows, except from the 0 standing in for -inf, where sum_exp is 0: the clamp keeps
    # that 0 from meeting exp(+large) = inf (0 * inf = nan).
    return sum_exp * (old_reference - reference).clamp(max=0.0).exp()


def fused_token_losses(hidden, head_weight, labels, vocab_start=0, tp_group=None, chunk_elements=None):
    """Per-token fp32 losses of hidden (..., dim) against labels (...), 0 where the label is -100."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS  # read at call time, so tests can shrink it
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_rows = max(1, min(head_weight.shape[0], chunk_elements // max(1, flat_labels.numel())))
    losses = FusedHeadCrossEntropy.apply(flat_hidden, head_weight, flat_labels, vocab_start, tp_group, chunk_rows)
    return losses.view(labels.shape)


def model_token_losses(model, inputs, labels, grid=None):
    """The model's per-token losses on inputs (batch, seq), without materializing the logits."""
    weight = model.output.weight
    tp_group = grid.tp_group if grid is not None else None
    vocab_start = grid.tp_rank * weight.shape[0] if tp_group is not None else 0
    return fused_token_losses(model.hidden_states(inputs), weight, labels, vocab_start, tp_group)


def model_loss(model, inputs, labels, grid=None):
    """Mean next-token loss over labels that are not -100: the training objective."""
    return model_token_losses(model, inputs, labels, grid).sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
