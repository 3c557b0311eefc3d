"""What one `LOMO.step` did (`StepResult`), with values that may still be on their way from the GPU.

A step should not wait for the GPU: reading a number computed there makes the CPU stop launching work until
the GPU has caught up, and the GPU then idles while the CPU launches the next step. So lomo.py hands the
loss and the gradient norm over as host copies queued without waiting (`copy_to_host`), and `StepResult`
reads them only when first asked for (`read`): by then, usually, they have long arrived. Where the device
decided whether a step was skipped (fused_update.py's kernel reads whether the loss is finite), `skipped`
and `reason` are settled from the loss when read, too.

Left out: anything asynchronous beyond one CUDA event per value (no callbacks, no futures).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(repr=False, eq=False)  # no ==: a value on its way from the GPU has none
class StepResult:
    """What one `LOMO.step` did."""
    step: int
    lr: float
    loss_scale: Optional[float] = None  # fp16 only: the scale used for this step
    # The mean loss and the global norm of the unscaled gradients (after value clipping; None without checks).
    # Either may still be on its way from the device (check_finite=False's loss; a checked one-pass step's
    # norm, and its loss where the GPU kernel checked it): it is read when first asked for, so that a step
    # nobody reads never waits for the GPU.
    _loss: object = math.nan
    _grad_norm: object = None
    _skipped: bool = False
    _reason: str = ""
    # True: updates were guarded on the device by whether the loss is finite (fused_update.py's kernel, and the
    # vectors' update), so the step did not read it; the host learns whether the step was skipped when it
    # reads the loss: `skipped`, `reason` and `grad_norm` read it.
    _loss_decides: bool = False

    @property
    def skipped(self) -> bool:
        """True: no weight changed."""
        self._settle()
        return self._skipped

    @skipped.setter
    def skipped(self, value):
        self._skipped = value

    @property
    def reason(self) -> str:
        """Why the step was skipped."""
        self._settle()
        return self._reason

    @reason.setter
    def reason(self, value):
        self._reason = value

    def _settle(self):  # (once the loss is read, this is cheap and changes nothing more)
        if self._loss_decides and not self._skipped:
            if not math.isfinite(self.loss):
                self._skipped, self._reason, self._grad_norm = True, f"non-finite loss {self.loss}", None

    @property
    def loss(self) -> float:
        self._loss = read(self._loss)
        return self._loss

    @loss.setter
    def loss(self, value):
        self._loss = value

    @property
    def grad_norm(self) -> Optional[float]:
        self._settle()
        self._grad_norm = read(self._grad_norm)
        return self._grad_norm

    @grad_norm.setter
    def grad_norm(self, value):
        self._grad_norm = value

    def __repr__(self):  # with the loss and the norm, read if still on their way
        return (f"StepResult(step={self.step}, lr={self.lr}, loss={self.loss}, grad_norm={self.grad_norm}, "
                f"skipped={self.skipped}, reason={self.reason!r}, loss_scale={self.loss_scale})")


def copy_to_host(tensor):
    """(a host copy, the CUDA event to wait for before reading it) without making the CPU wait now; on the
    CPU, (the tensor, None)."""
    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)  # queued on the tensor's device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))  # that stream, not the current device's
    return host, copied


def read(value):
    """A float from a value that may still be on the device: a tensor (read now, a host sync) or a host copy
    with its CUDA event from copy_to_host (a wait only until that copy is done); anything else as it is."""
    if isinstance(value, tuple):
        host, copied = value
        if copied is not None:
            copied.synchronize()
        return float(host)
    if isinstance(value, torch.Tensor):
        return float(value)
    return value
