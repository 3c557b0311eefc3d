"""The usual full fine-tuning, to compare LOMO and AdaLomo with: loss.backward() keeps every gradient, then
torch.optim.AdamW steps, with two fp32 states per parameter. `train.py --optimizer adamw` trains with it;
bench.py's adamw mode measures its speed and memory on a GPU.

It answers to train.py as LOMO does (`step(loss, lr)` returning a lomo.StepResult, `state_dict`,
`check_previous_step`), so its runs are logged, evaluated, saved and resumed alike. Clipping by norm is
torch's clip_grad_norm_, by value clip_grad_value_; a non-finite loss or gradient norm skips the step with no
weight moved, as LOMO's norm pass does.
Left out: several processes (no dp averaging, no tp norms: the comparison runs in one), and fp16 (no loss
scaling here).
"""
import math
from typing import Optional

import torch

from lomo import StepResult, SyncGuard, check_lr


class AdamWStep:
    needs_norm_pass, loss_scaler, guard = False, None, SyncGuard()  # (what train.py reads of a LOMO)

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 clip_grad_norm: Optional[float] = None, clip_grad_value: Optional[float] = None,
                 max_consecutive_skips: int = 25):
        check_lr(lr, f"lr={lr}")
        if any(p.dtype == torch.float16 for p in model.parameters()):
            raise ValueError("--optimizer adamw with --dtype fp16: the AdamW baseline has no loss scaling; use "
                             "--dtype bf16 or fp32")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.step_count, self.consecutive_skips, self.max_consecutive_skips = 0, 0, max_consecutive_skips

    def step(self, loss: torch.Tensor, lr: float) -> StepResult:
        check_lr(lr, f"learning rate {lr}")
        self.step_count += 1
        result = StepResult(step=self.step_count, lr=lr, loss=float(loss.detach()))
        if not math.isfinite(result.loss):
            return self.skip(result, f"non-finite loss {result.loss}")
        loss.backward()
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_grad_value)
        max_norm = self.clip_grad_norm if self.clip_grad_norm is not None else math.inf  # inf: the norm alone
        result.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(result.grad_norm):
            return self.skip(result, f"non-finite gradient norm {result.grad_norm}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_skips = 0
        return result

    def skip(self, result: StepResult, reason: str) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        result.skipped, result.reason, self.consecutive_skips = True, reason, self.consecutive_skips + 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(f"step {result.step}: {self.consecutive_skips} bad steps in a row (last: "
                                     f"{reason}); lower the learning rate or enable --clip-grad-norm")
        return result

    def check_previous_step(self):
        pass  # every step is checked as it runs

    def state_dict(self):
        return dict(step_count=self.step_count, consecutive_skips=self.consecutive_skips,
                    adamw=self.optimizer.state_dict())

    def load_state_dict(self, state):
        if "adamw" not in state:
            raise ValueError("the saved state has no AdamW moments (the run was trained with --optimizer lomo or "
                             "adalomo): resume it with the optimizer it was started with")
        self.step_count, self.consecutive_skips = int(state["step_count"]), int(state["consecutive_skips"])
        self.optimizer.load_state_dict(state["adamw"])
