"""LOMO: SGD fused into the backward pass, so that at most one parameter gradient is alive at a time.

Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources" (2023). This file is
the reference: plain PyTorch, correct on every device. Faster ways to run the same step attach from outside
(speedups.py) through four seams, and tests hold them equal to this file.
- Each trained parameter gets a post-accumulate-grad hook. When its gradient is complete, the hook takes it out
  of `.grad`, updates the parameter in fp32 maths (rounded back once) and lets it go: `LOMO.step(loss, lr)`
  runs backward and is the step.
- Clipping by global norm needs every norm before any update: a norm pass sums squared norms, one host read sets
  clip_grad_norm_'s factor, an update pass runs backward again. fp16 always takes the norm pass, so an overflow
  skips the step (and halves the loss scale) before any weight moves. A one-pass step (bf16, fp32) reads the
  loss first; a non-finite gradient norm after it stops training. tp shards sum their squared norms over the tp
  group; each gradient is averaged over dp in its hook.
Seams: `rule` (one update's maths, in `rule.update` only; a rule that is exactly w += alpha * g says so in
`axpy_alpha`), `fast_paths` (fused_update.py), `extensions` (work around a pass: gram_norm.py, offload.py) and
`guard` (when a one-pass step reads its loss: step_result.py's reads it without host syncs).
Left out: momentum (state, which LOMO exists to avoid), fp32 master weights (each step rounds back to the
parameter's dtype, as the paper does), gradient accumulation (an update inside backward cannot wait).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# A bf16/fp16 parameter is updated in fp32 chunks of this many elements (64 MiB per fp32 temporary).
UPDATE_CHUNK_NUMEL = 2**24
LOW_PRECISION = (torch.bfloat16, torch.float16)


class DynamicLossScaler:
    """fp16 loss scaling: start at `init_scale`, halve on an overflow (the step is skipped), double after
    `growth_interval` clean steps. An overflow at `min_scale` is an error: no scale can help."""

    def __init__(self, init_scale=2.0**16, growth_interval=1000, min_scale=1.0):
        if init_scale < min_scale:
            raise ValueError(f"init_scale={init_scale} is below min_scale={min_scale}")
        self.scale, self.growth_interval, self.min_scale = float(init_scale), int(growth_interval), float(min_scale)
        self.clean_steps = 0  # steps since the last overflow or growth

    def update(self, overflow: bool, step: int):
        if overflow and self.scale <= self.min_scale:
            raise FloatingPointError(
                f"step {step}: fp16 gradients overflow even at the minimum loss scale {self.min_scale}; "
                f"train in bf16 (--dtype bf16), lower the learning rate, or clip gradients")
        self.clean_steps = 0 if overflow else self.clean_steps + 1
        if overflow:
            self.scale = max(self.scale / 2, self.min_scale)
        elif self.clean_steps == self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2, 0


class SGD:
    """The update rule: p <- p - lr * (g + weight_decay * p), torch.optim.SGD's own two operations (fp32 steps
    equal it bit for bit); no state. Without weight decay an axpy: p += (-lr) * g. A rule has these members."""
    chunkable = True  # elementwise: a bf16 parameter may be updated in fp32 pieces

    def __init__(self, weight_decay: float = 0.0):
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay} must be a finite number >= 0")
        self.weight_decay = weight_decay

    def update(self, param, p32, g32, lr):  # param: the key of a rule's state; p32 updated in place
        if self.weight_decay:
            g32 = g32.add(p32, alpha=self.weight_decay)
        p32.add_(g32, alpha=-lr)

    def axpy_alpha(self, lr) -> Optional[float]:
        return -lr if not self.weight_decay else None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"the saved state holds another rule's state ({state.get('rule', 'unknown')}), SGD has "
                             f"none: resume with the optimizer the run was started with (--optimizer)")


@dataclass(eq=False)
class StepResult:
    """What one step did. loss: the mean loss; grad_norm: of the unscaled (value-clipped) gradients."""
    step: int
    lr: float
    loss_scale: Optional[float] = None  # fp16 only: the scale this step used
    loss: float = math.nan
    grad_norm: Optional[float] = None
    skipped: bool = False  # True: no weight changed
    reason: str = ""


def check_lr(lr, what):
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{what} must be a finite number >= 0 (a schedule's --min-lr-ratio between 0 and 1)")


def non_finite_norm_error(step, grad_norm, loss) -> FloatingPointError:
    return FloatingPointError(
        f"step {step}: gradient norm {grad_norm} with a finite loss ({loss:.4g}); in one-pass mode the weights "
        f"were updated before the norm was known, so some are no longer finite. Resume from the last checkpoint "
        f"(--resume) with --clip-grad-norm, whose norm pass checks every gradient before any weight moves, or a "
        f"lower --lr")


class SyncGuard:
    """The reference guard (a guard has these members): a one-pass step reads its loss before backward (a
    non-finite loss skips it) and its norm after, a host sync each; a norm pass reads both at once (`decide`)."""
    checks, result_class = True, StepResult  # checks: a one-pass step sums its gradients' norms

    def begin(self, lomo, result, mean_loss) -> bool:  # False: skip the step before backward
        if not lomo.needs_norm_pass:
            result.loss = float(mean_loss)
        return lomo.needs_norm_pass or math.isfinite(result.loss)

    def before_update(self, lomo) -> bool:  # False: discard the rest of the pass (set lomo.discarding)
        return True

    def end(self, lomo, result, grad_norm) -> bool:  # after a one-pass step; False: the next step settles it
        result.grad_norm = float(grad_norm)
        if not math.isfinite(result.grad_norm):
            raise non_finite_norm_error(result.step, result.grad_norm, result.loss)
        return True

    def check_previous_step(self, lomo):  # a deferring guard settles the last step here; this one has nothing left
        pass

    def reset(self):  # forget an unsettled step (a state was loaded)
        pass


class LOMO:
    """Fused backward + update. Usage: `result = lomo.step(loss, lr)` instead of backward and optimizer.step."""

    def __init__(self, model: torch.nn.Module, lr: float, clip_grad_norm: Optional[float] = None,
                 clip_grad_value: Optional[float] = None, loss_scaler: Optional[DynamicLossScaler] = None,
                 max_consecutive_skips: int = 25, tp_group=None, dp_group=None, rule=None, guard=None,
                 fast_paths=(), extensions=()):
        check_lr(lr, f"lr={lr}")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a positive number, or None to turn it off")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        self.names = {p: name for name, p in model.named_parameters()}
        if loss_scaler is None and any(p.dtype == torch.float16 for p in self.params):
            loss_scaler = DynamicLossScaler()  # fp16 without loss scaling underflows; never run it bare
        self.lr, self.clip_grad_norm, self.clip_grad_value = lr, clip_grad_norm, clip_grad_value
        self.loss_scaler, self.max_consecutive_skips = loss_scaler, max_consecutive_skips
        self.tp_group, self.dp_group = tp_group, dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.rule, self.guard = rule or SGD(), guard or SyncGuard()
        self.fast_paths, self.extensions = list(fast_paths), list(extensions)
        self.step_count, self.consecutive_skips = 0, 0
        # The pass running now: its kind ("norm", "update" after a norm pass, "one-pass"; None outside step()),
        # whether it discards its gradients (the guard found the loss non-finite), its numbers and its norms.
        self.pass_kind, self.discarding, self.lr_now, self.clip_coef, self.inv_scale = None, False, lr, 1.0, 1.0
        self.norms, self.device = {True: [], False: []}, None
        # Each fast path claims its parameters once; a batched one updates them after backward (no hook).
        self._claims = [(path, dict.fromkeys(path.claim(self), path)) for path in self.fast_paths]
        batched = {p for path, claimed in self._claims if path.batched for p in claimed}
        self._route = {}  # parameter -> the fast path that updates it in this pass
        self.hooked = [p for p in self.params if p not in batched]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.hooked]

    @property
    def needs_norm_pass(self) -> bool:
        return self.clip_grad_norm is not None or self.loss_scaler is not None

    def name_of(self, param) -> str:
        return self.names.get(param, "a parameter")

    # The hook: once per parameter per pass, when its gradient is complete (grad mode is off in it).

    def _hook(self, param):
        grad = param.grad
        if grad is None or self.pass_kind is None:
            return  # no gradient (an extension gave its norm instead), or a backward outside step()
        param.grad = None  # free it now: this is where LOMO's memory saving comes from
        path = self._route.get(param)
        if path is not None:  # a fast path guards, averages, sums and updates in its own way
            return path.update(param, grad, self)
        if self.discarding or not self.guard.before_update(self):
            return
        grad = self.average(grad)
        if self.pass_kind == "norm" or (self.pass_kind == "one-pass" and self.guard.checks):
            self.record_norm(param, grad)
        if self.pass_kind != "norm":
            self.update(param, grad)

    def average(self, grad):
        """The gradient's mean over the dp group (divided first: a sum of scaled fp16 gradients may overflow)."""
        if self.dp_group is not None:
            dist.all_reduce(grad.div_(self.dp_size), group=self.dp_group)
        return grad

    def record_norm(self, param, grad):
        """This gradient's norm into the pass's global norm (on the device: no host sync)."""
        if self.clip_grad_value is None:
            # One read; the loss scale comes off after the pass (squaring a scaled fp16 gradient could overflow).
            norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        else:  # the norm of the gradients that will be applied: unscaled and clamped, in fp32 chunks
            norm = sum(torch.linalg.vector_norm((chunk.float() * self.inv_scale).clamp_(
                -self.clip_grad_value, self.clip_grad_value)).square()
                for chunk in grad.view(-1).split(UPDATE_CHUNK_NUMEL)).sqrt()
            if self.loss_scaler is not None:  # clamping turns an overflow into clip_value: keep it non-finite
                norm = norm + 0.0 * torch.linalg.vector_norm(grad, dtype=torch.float32)
        self.add_norm(norm, sharded=hasattr(param, "tensor_parallel_dim"))

    def add_norm(self, norm, sharded: bool):  # norm: a 0-dim tensor, not squared
        self.norms[sharded].append(norm)

    def update(self, param, grad):
        """The reference update: the gradient unscaled, value-clipped and scaled by the clip factor, then the
        rule, all in fp32; a bf16/fp16 parameter goes through fp32 copies in chunks and is rounded back once."""
        low_precision = param.dtype in LOW_PRECISION
        if low_precision and self.rule.chunkable:
            pieces = zip(param.view(-1).split(UPDATE_CHUNK_NUMEL), grad.view(-1).split(UPDATE_CHUNK_NUMEL))
        else:
            pieces = [(param, grad)]
        for p_piece, g_piece in pieces:
            g32, p32 = (g_piece.float(), p_piece.float()) if low_precision else (g_piece, p_piece)
            if self.inv_scale != 1.0:
                g32.mul_(self.inv_scale)
            if self.clip_grad_value is not None:
                g32.clamp_(-self.clip_grad_value, self.clip_grad_value)
            if self.clip_coef != 1.0:
                g32.mul_(self.clip_coef)
            self.rule.update(param, p32, g32, self.lr_now)
            if p32 is not p_piece:
                p_piece.copy_(p32)  # round the fp32 result back into the bf16/fp16 parameter

    def axpy_alpha(self) -> Optional[float]:
        """alpha of this pass if the rule is w += alpha * g (with the clip factor and unscaling folded in)."""
        alpha = self.rule.axpy_alpha(self.lr_now)
        return None if alpha is None else alpha * self.clip_coef * self.inv_scale

    # One step, in public phases: cuda_graph.py runs the same ones around its replays.

    def step(self, loss: torch.Tensor, lr: Optional[float] = None) -> StepResult:
        """Backward (once, or twice with clipping or fp16) with the update fused in. Returns what happened."""
        result = self.begin_step(lr)
        mean_loss = self.mean_loss(loss)
        if not self.guard.begin(self, result, mean_loss):
            return self.skip(result, f"non-finite loss {result.loss}")
        scaled_loss = loss * self.loss_scaler.scale if self.loss_scaler is not None else loss
        try:
            if self.needs_norm_pass:
                self.backward_pass("norm", scaled_loss, retain_graph=True)
                if not self.decide(result, mean_loss, self.norm()):
                    return result  # skipped: no weight moved
                self.backward_pass("update", scaled_loss)
            else:
                self.backward_pass("one-pass", scaled_loss)
        finally:  # also after an error inside backward: nothing of this step may leak into the next
            self.pass_kind, self._route = None, {}
            for extension in self.extensions:
                extension.end_step()
            for p in self.params:
                p.grad = None
        return self.end_step(result)

    def begin_step(self, lr: Optional[float] = None) -> StepResult:
        """The host's checks and count before any weight of this step moves; the step's numbers set."""
        self.check_previous_step()
        lr = self.lr if lr is None else lr
        check_lr(lr, f"learning rate {lr}")
        stale = next((p for p in self.params if p.grad is not None), None)
        if stale is not None:
            raise ValueError(f"{self.name_of(stale)} has a .grad from a backward outside LOMO.step, which this "
                             f"step would add to: clear it first with model.zero_grad(set_to_none=True)")
        self.step_count, scale = self.step_count + 1, self.loss_scaler.scale if self.loss_scaler else None
        self.lr_now, self.clip_coef, self.inv_scale, self.discarding = lr, 1.0, 1 / scale if scale else 1.0, False
        return self.guard.result_class(step=self.step_count, lr=lr, loss_scale=scale)

    def mean_loss(self, loss):
        """The loss averaged over dp replicas: the report, and a decision that every replica takes alike (one
        that skipped alone would hang the next collective)."""
        mean_loss = loss.detach().clone()
        if self.dp_group is not None:
            dist.all_reduce(mean_loss, group=self.dp_group)
            mean_loss /= self.dp_size
        return mean_loss

    def backward_pass(self, kind: str, loss, retain_graph: bool = False):
        """One backward pass, whose hooks sum norms ("norm") or update ("update", "one-pass")."""
        self.pass_kind, self.norms, self.device, self._route = kind, {True: [], False: []}, loss.device, {}
        for path, claimed in reversed(self._claims):  # the first path listed wins a parameter
            if path.begin_pass(kind, self) and not path.batched:
                self._route.update(claimed)
        with contextlib.ExitStack() as stack:
            for extension in self.extensions:
                stack.enter_context(extension.during(kind, self))
            loss.backward(retain_graph=retain_graph)
        for path in self.fast_paths:
            path.end_pass(kind, self)

    def norm(self):
        """The global gradient norm of the last pass, on the device (value clipping unscaled it already)."""
        unscale = self.inv_scale if self.clip_grad_value is None else 1.0
        sharded, replicated = ((torch.stack(norms) * unscale).square().sum() if norms else
                               torch.zeros((), device=self.device) for norms in (self.norms[True], self.norms[False]))
        if self.tp_group is not None:
            dist.all_reduce(sharded, group=self.tp_group)  # each tp rank holds a different slice
        return (sharded + replicated).sqrt()

    def decide(self, result: StepResult, mean_loss, grad_norm) -> bool:
        """Between the passes: the norm and the loss read (one host sync); False: the step is skipped, else the
        clip factor is set for the update pass."""
        result.grad_norm, result.loss = torch.stack([grad_norm, mean_loss.float()]).tolist()
        reason = None
        if not math.isfinite(result.loss):
            reason = f"non-finite loss {result.loss}"
        elif not math.isfinite(result.grad_norm) and self.loss_scaler is None:
            reason = f"non-finite gradient norm {result.grad_norm}"
        elif not math.isfinite(result.grad_norm):
            reason = f"fp16 gradient overflow at loss scale {self.loss_scaler.scale:g}"
            self.loss_scaler.update(overflow=True, step=self.step_count)  # halves the scale
        if reason is not None:
            self.skip(result, reason)
            return False
        if self.clip_grad_norm is not None:  # the formula of torch.nn.utils.clip_grad_norm_
            self.clip_coef = min(1.0, self.clip_grad_norm / (result.grad_norm + 1e-6))
        return True

    def end_step(self, result: StepResult) -> StepResult:
        settled = self.needs_norm_pass or self.guard.end(self, result, self.norm() if self.guard.checks else None)
        if self.discarding:  # the guard found the loss non-finite during the pass: no weight moved
            return self.skip(result, f"non-finite loss {result.loss}")
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False, step=self.step_count)
        if settled:
            self.consecutive_skips = 0
        return result

    def check_previous_step(self):
        """What the guard left of the last step to check; call it before saving or reading consecutive_skips."""
        self.guard.check_previous_step(self)

    def skip(self, result: StepResult, reason: str) -> StepResult:
        for p in self.params:
            p.grad = None  # nothing of this step may leak into the next
        result.skipped, result.reason, self.consecutive_skips = True, reason, self.consecutive_skips + 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"step {result.step}: {self.consecutive_skips} bad steps in a row (last: {result.reason}); "
                f"training is diverging: lower the learning rate, enable --clip-grad-norm, or use bf16")
        return result

    # State: the step counter, the loss scaler and the rule's state (SGD has none).

    def state_dict(self):
        return dict(step_count=self.step_count, consecutive_skips=self.consecutive_skips, rule=self.rule.state_dict(),
                    loss_scaler=dict(vars(self.loss_scaler)) if self.loss_scaler is not None else None)

    def load_state_dict(self, state):
        if (state["loss_scaler"] is None) != (self.loss_scaler is None):
            raise ValueError("the saved state and this LOMO disagree on loss scaling (fp16 vs bf16/fp32): "
                             "resume with the --dtype the run was started with")
        self.step_count, self.consecutive_skips = int(state["step_count"]), int(state["consecutive_skips"])
        self.guard.reset()  # a step of before the restore is not this state's to count
        if self.loss_scaler is not None:
            vars(self.loss_scaler).update(state["loss_scaler"])  # scale, clean_steps, growth_interval, min_scale
        self.rule.load_state_dict(state.get("rule", {}))  # a state saved before rules had state: SGD's, none

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles, self.hooked = [], []
        for extension in self.extensions:
            extension.detach()
