"""AdaLomo: LOMO with an adaptive learning rate per parameter, as an update rule for lomo.py's seam.

Lv, Yan, Guo, Lv and Qiu, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate" (arXiv 2310.10195,
Findings of ACL 2024), Algorithm 1. For a matrix W (m x n) with gradient G at its t-th update:

    beta2 = 1 - t ** decay_rate                          (0 at t = 1: the first update uses G^2 alone)
    R = beta2 R + (1 - beta2) rowmean(G^2 + eps1)        (m numbers: the factored second moment)
    C = beta2 C + (1 - beta2) colmean(G^2 + eps1)        (n numbers)
    V = (R / mean(R)) outer C                            (the rank-one estimate of E[G^2], never stored)
    U = G / sqrt(V)
    U = U / max(1, RMS(U) / clip_threshold)              (grouped update normalisation, per parameter)
    lr_t = lr * max(eps2, RMS(W))                        (a step relative to the weights' own size)
    W = (1 - lr_t * weight_decay) W - lr_t U

A vector (the RMSNorm weights) keeps an unfactored second moment v = beta2 v + (1 - beta2)(G^2 + eps1) and
U = G / sqrt(v), as Adafactor does; there is nothing to factor in n numbers. The state is O(m + n) per matrix,
about 11 MB for LLaMA-7B. The paper argues that the per-parameter normalisation makes global-norm clipping
unnecessary, so AdaLomo trains with one backward pass; `clip_grad_norm` still works as LOMO's does.

Where it departs from the official code (lomo_optim/adalomo.py), and why:
- The paper writes R and C as row and column sums; the code, and this file, use means. V is the same (the
  factor n or m cancels in R / mean(R)), and means stay in range for wide matrices.
- RMS(W), the step size and the normalisation stay on the device as tensors (the official code compares a tensor
  with a float in Python, one host sync per parameter).
- The step count t is per parameter and advances only when that parameter is updated, so a skipped step (a
  non-finite loss, an fp16 overflow: LOMO decides before any update) leaves t, R, C and W as they were.
- Tensor parallelism: every statistic is over the whole matrix, not one shard. A shard split along its rows
  (column-parallel layers, the embedding) holds whole rows, so its row means are local while its column means,
  mean(R), RMS(U) and RMS(W) are summed over the tp group; a shard split along its columns the other way round.
  Replicated parameters hold the same gradient on every tp rank and are computed locally, counted once.
- The state goes through state_dict with the factors gathered whole, so it loads at any tp (the official code
  keeps it outside state_dict, so resuming loses it).
Left out: momentum (the paper keeps none: the adaptive learning rate is what closes the gap to AdamW), and
AdaLomo's fixed loss scale (lomo.py's dynamic loss scaling is used instead).
"""
import math

import torch
import torch.distributed as dist


def check_settings(eps, clip_threshold, decay_rate, weight_decay):
    """Refuse settings the algorithm is undefined for, each with the paper's value."""
    for name, value in (("eps1", eps[0]), ("eps2", eps[1]), ("clip_threshold", clip_threshold)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"AdaLomo {name}={value} must be a positive number (the paper's: eps1=1e-30, "
                             f"eps2=1e-3, clip_threshold=1.0)")
    if not (math.isfinite(decay_rate) and decay_rate < 0):
        raise ValueError(f"AdaLomo decay_rate={decay_rate} must be negative, so that beta2 = 1 - t^decay_rate "
                         f"grows towards 1 (the paper's: -0.8)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay} must be a finite number >= 0")


class AdaLomo:
    """The rule; pass it to LOMO (or speedups.apply) as `rule=AdaLomo(model, tp_group=...)`."""
    chunkable = False  # its statistics are over the whole parameter, not over fp32 pieces of it

    def __init__(self, model: torch.nn.Module, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0, tp_group=None):
        check_settings(eps, clip_threshold, decay_rate, weight_decay)
        (self.eps1, self.eps2), self.clip_threshold = eps, clip_threshold
        self.decay_rate, self.weight_decay, self.tp_group = decay_rate, weight_decay, tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.names = {p: name for name, p in model.named_parameters()}
        sharded = next((name for p, name in self.names.items() if hasattr(p, "tensor_parallel_dim")), None)
        if sharded is not None and tp_group is None:
            raise ValueError(f"{sharded} is split over a tensor-parallel group, so its statistics need that group: "
                             f"pass AdaLomo(model, tp_group=grid.tp_group)")
        # The dim along which each parameter is split over the tp group (shard.py's attribute), or None.
        self.split = {p: getattr(p, "tensor_parallel_dim", None) if self.tp > 1 else None for p in self.names}
        self.state = {}  # parameter name -> {"step": t, "row": R, "col": C} (a matrix) or {"step": t, "v": v}

    def axpy_alpha(self, lr):
        return None  # not w += alpha * g: no fused kernel, no CUDA graphs

    # Sums over the whole parameter: a split dimension's sum needs every tp rank's part.

    def whole_sum(self, tensor, sharded: bool):
        if sharded:
            dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def rms(self, x, param):
        """RMS over the whole parameter, of a tensor shaped like this rank's shard of it."""
        split = self.split[param]
        square_sum = self.whole_sum(torch.linalg.vector_norm(x).square(), sharded=split is not None)
        return (square_sum / (x.numel() * (self.tp if split is not None else 1))).sqrt()

    def update(self, param, p32, g32, lr):
        """One AdaLomo update of p32 (fp32, updated in place) from g32, the unscaled, clipped gradient."""
        state = self.state.get(self.names[param])
        if state is None:
            state = self.state[self.names[param]] = self.new_state(p32)
        state["step"] += 1
        beta2 = 1.0 - state["step"] ** self.decay_rate
        squared = g32.square().add_(self.eps1)
        if p32.dim() >= 2:  # the factored second moment of a matrix
            split = self.split[param]
            rows, cols = p32.shape[0] * (self.tp if split == 0 else 1), p32.shape[1] * (self.tp if split == 1 else 1)
            row_mean = self.whole_sum(squared.sum(dim=1), sharded=split == 1) / cols
            col_mean = self.whole_sum(squared.sum(dim=0), sharded=split == 0) / rows
            state["row"].mul_(beta2).add_(row_mean, alpha=1.0 - beta2)
            state["col"].mul_(beta2).add_(col_mean, alpha=1.0 - beta2)
            del squared  # (one fp32 temporary the size of the parameter at a time, besides the update)
            mean_row = self.whole_sum(state["row"].sum(), sharded=split == 0) / rows
            update = g32 * (state["row"] / mean_row).rsqrt().unsqueeze(1)
            update.mul_(state["col"].rsqrt().unsqueeze(0))
        else:
            state["v"].mul_(beta2).add_(squared, alpha=1.0 - beta2)
            update = g32 * state["v"].rsqrt()
        update.div_((self.rms(update, param) / self.clip_threshold).clamp(min=1.0))  # grouped normalisation
        step_size = lr * self.rms(p32, param).clamp(min=self.eps2)  # RMS of the weights before this update
        if self.weight_decay:
            p32.mul_(1.0 - step_size * self.weight_decay)
        p32.sub_(step_size * update)

    def new_state(self, p32):
        if p32.dim() >= 2:
            if p32.dim() > 2:
                raise ValueError(f"AdaLomo factors matrices; a parameter of shape {tuple(p32.shape)} is neither "
                                 f"a matrix nor a vector")
            return dict(step=0, row=p32.new_zeros(p32.shape[0]), col=p32.new_zeros(p32.shape[1]))
        return dict(step=0, v=torch.zeros_like(p32))  # (p32: fp32, or float64 for a float64 parameter)

    # State: the factors whole (gathered over tp), so that a state saved at one tp loads at another.

    def factor_split(self, param, key):
        """The dim of this factor that the tp group splits (0), or None if every rank holds all of it."""
        split = self.split[param]
        return 0 if (key == "row" and split == 0) or (key == "col" and split == 1) or \
            (key == "v" and split is not None) else None

    def state_dict(self):
        """Every rank must call it (a gather over tp); the result is the same on every rank."""
        whole = {}
        for param, name in self.names.items():
            if name not in self.state:
                continue
            entry = {}
            for key, value in self.state[name].items():
                if key != "step" and self.factor_split(param, key) is not None:
                    parts = [torch.empty_like(value) for _ in range(self.tp)]
                    dist.all_gather(parts, value.contiguous(), group=self.tp_group)
                    value = torch.cat(parts)
                entry[key] = value if key == "step" else value.detach().cpu().clone()
            whole[name] = entry
        return dict(rule="AdaLomo", state=whole)

    def load_state_dict(self, state):
        if state.get("rule") != "AdaLomo":
            raise ValueError("the saved state has no AdaLomo factors (the run was trained with another rule, "
                             "--optimizer lomo): resume it with the optimizer it was started with")
        saved, by_name = state["state"], {name: param for param, name in self.names.items()}
        unknown = sorted(set(saved) - set(by_name))
        if unknown:
            raise ValueError(f"the saved AdaLomo state has parameters this model lacks ({', '.join(unknown[:3])}): "
                             f"resume with the model the run was started with")
        rank = dist.get_rank(self.tp_group) if self.tp > 1 else 0
        self.state = {}
        for name, entry in saved.items():
            param, loaded = by_name[name], {}
            for key, value in entry.items():
                if key != "step":
                    if self.factor_split(param, key) is not None:
                        value = value.chunk(self.tp)[rank]
                    expected = self.new_state(param.detach())[key].shape
                    if value.shape != expected:
                        raise ValueError(f"the saved AdaLomo {key} factor of {name} has shape {tuple(value.shape)}, "
                                         f"this model's needs {tuple(expected)}: resume with the model the run "
                                         f"was started with")
                    value = value.to(device=param.device, dtype=torch.promote_types(param.dtype, torch.float32),
                                     copy=True)  # never updated in place in the caller's dict
                loaded[key] = value
            self.state[name] = loaded
