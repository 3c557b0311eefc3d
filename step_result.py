"""The deferred guard: a one-pass LOMO step that never waits for the GPU to know whether its loss was finite.

Attaches to lomo.py's guard seam, in place of `SyncGuard`, which reads a one-pass step's loss before backward
and its gradient norm after: two host syncs, each leaving the GPU idle while the CPU then launches the next
work. Here:
- The loss is copied to the host when the step begins, without waiting (`copy_to_host`). Updates that hold
  themselves back on the device (fused_update.py's kernel, and the vectors' multi-tensor add) read whether it
  is finite from a flag made on the device, so they never wait for it. The first update that cannot (the CPU,
  fp32, value clipping: `before_update`) reads the copy then, long arrived, with backward's first kernels
  already queued; a non-finite loss makes the rest of that pass only free gradients.
- The norm is copied to the host without waiting too, and checked when the next step begins
  (`check_previous_step`, which train.py also calls before writing each step's row): a non-finite norm with a
  finite loss stops training there, before another weight moves. A step the device held back is counted as
  skipped there as well, so `consecutive_skips` and `state_dict()` are current only after it.
- `StepResult`s read their loss and norm only when first asked for (`LazyStepResult`): a step nobody reads
  never waits.
`Unchecked` is the paper's LOMO (train.py --no-finite-checks): no loss read and no norms, no host sync.
Held equal to SyncGuard's steps by tests/test_lomo.py (the same weights, skips and errors, a step later).
Left out: anything asynchronous beyond one CUDA event per value (no callbacks, no futures).
"""
import math

import torch

from lomo import StepResult, non_finite_norm_error


def copy_to_host(tensor):
    """(a host copy, the CUDA event to wait for before reading it), without making the CPU wait now; on the
    CPU, (the tensor, None)."""
    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)  # queued on the tensor's device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    return host, copied


def read(value):
    """A float from a host copy with its event (a wait only until that copy is done), a tensor (a host sync),
    or anything else as it is."""
    if isinstance(value, tuple):
        host, copied = value
        if copied is not None:
            copied.synchronize()
        return float(host)
    if isinstance(value, torch.Tensor):
        return float(value)
    return value


class LazyStepResult(StepResult):
    """A StepResult whose loss and norm may still be on their way from the device. `loss_decides`: the device
    decided whether the step was skipped (from the loss's finiteness), so `skipped` and `reason` read the loss."""
    loss_decides = False

    @property
    def loss(self) -> float:
        self._loss = read(self._loss)
        return self._loss

    @loss.setter
    def loss(self, value):
        self._loss = value

    @property
    def grad_norm(self):
        self._settle()
        self._grad_norm = read(self._grad_norm)
        return self._grad_norm

    @grad_norm.setter
    def grad_norm(self, value):
        self._grad_norm = value

    @property
    def skipped(self) -> bool:
        self._settle()
        return self._skipped

    @skipped.setter
    def skipped(self, value):
        self._skipped = value

    @property
    def reason(self) -> str:
        self._settle()
        return self._reason

    @reason.setter
    def reason(self, value):
        self._reason = value

    def _settle(self):  # (once the loss is read, cheap and changes nothing more)
        if self.loss_decides and not self._skipped and not math.isfinite(self.loss):
            self._skipped, self._reason, self._grad_norm = True, f"non-finite loss {self.loss}", None


class DeferredGuard:
    """lomo.py's guard seam, without host syncs (see the top of this file)."""
    checks = True
    result_class = LazyStepResult

    def __init__(self):
        self.host_loss = self.step_loss = self.flag = self.loss_value = None
        self.unchecked = None  # the last one-pass step, until check_previous_step reads it

    def begin(self, lomo, result, mean_loss) -> bool:
        if not lomo.needs_norm_pass:  # (a norm pass reads the loss with the norm: LOMO.decide)
            self.begin_on_device(mean_loss)
            self.host_loss = copy_to_host(mean_loss)
        return True

    def begin_on_device(self, mean_loss):
        """The flag will be made from this loss, and nothing is copied to the host (a CUDA graph's capture)."""
        self.host_loss, self.step_loss, self.flag, self.loss_value = None, mean_loss, None, None

    def before_update(self, lomo) -> bool:
        if self.host_loss is not None:
            self.loss_value, self.host_loss = read(self.host_loss), None
            if not math.isfinite(self.loss_value):
                lomo.discarding = True
        return not lomo.discarding

    def device_flag(self, device):
        if self.flag is None:  # made at the step's first guarded update (queued after the loss)
            self.flag = torch.isfinite(self.step_loss).view(torch.uint8)
        return self.flag

    def unread_flag(self):
        return self.flag if self.host_loss is not None else None

    def end(self, lomo, result, grad_norm) -> bool:
        unread = self.host_loss if self.flag is not None else None
        if unread is None:
            self.before_update(lomo)  # no gradient reached a weight unguarded: read it now (may discard)
        if lomo.discarding:
            result.loss = self.loss_value
            self.step_loss = self.flag = None
            return True
        result.grad_norm = copy_to_host(grad_norm)
        self.finish(result, unread if unread is not None else self.loss_value, unread is not None)
        return unread is None  # else the device decided: check_previous_step counts it

    def finish(self, result, loss, loss_decides: bool):
        result.loss, result.loss_decides = loss, loss_decides
        self.unchecked, self.host_loss, self.step_loss, self.flag = result, None, None, None

    def check_previous_step(self, lomo):
        result, self.unchecked = self.unchecked, None
        if result is None:
            return
        if result.loss_decides:
            if result.skipped:  # a non-finite loss: the device left every weight as it was
                lomo.skip(result, result.reason)
                return
            lomo.consecutive_skips = 0
        if not math.isfinite(result.grad_norm):
            raise non_finite_norm_error(result.step, result.grad_norm, result.loss)

    def reset(self):
        self.unchecked = None


class Unchecked(DeferredGuard):
    """The paper's one pass: no loss read and no gradient norm, so no host sync and no extra read of any
    gradient; a non-finite loss or gradient reaches the weights unseen (train.py then checks the weights before
    each save). A norm pass checks anyway: its norm is the check."""
    checks = False

    def begin(self, lomo, result, mean_loss) -> bool:
        if not lomo.needs_norm_pass:
            result.loss = copy_to_host(mean_loss)
        return True

    def end(self, lomo, result, grad_norm) -> bool:
        return True
