"""fused_update.py's kernel against PyTorch's own ops: the update bit for bit against `add_`, the sum of
squares against float64, and LOMO with the kernel against LOMO without it. The kernel needs a GPU and
Triton: on the CPU, lomo.py's side of it (the loss flag, the skips it decides, the norm from its slots)
runs against the kernel's contract written in PyTorch ops; the kernel itself is tested on the GPU machine."""
import math

import pytest
import torch

import fused_update
from conftest import inject, loss_of, tiny_model
from fused_update import TorchAxpy, TritonAxpy, VectorGroup
from lomo import LOMO, SGD
from step_result import DeferredGuard


def fast(model, lr, fused_kernel=True, **options):
    """LOMO with the fast paths and the deferred guard, as speedups.apply attaches them (without the layers)."""
    paths = [VectorGroup()] + ([TritonAxpy()] if fused_kernel else []) + [TorchAxpy()]
    return LOMO(model, lr, guard=DeferredGuard(), fast_paths=paths, **options)


def uses_kernel(lomo):
    return any(isinstance(path, TritonAxpy) and path.claim(lomo) for path in lomo.fast_paths)

needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() and fused_update.triton is not None),
                                  reason="the kernel needs a GPU and Triton")


def test_without_a_gpu_lomo_takes_the_pytorch_ops(batch):
    model = tiny_model(dtype=torch.bfloat16)
    weight = model.layers[0].attention.wq.weight
    assert not fused_update.available(weight, weight)
    assert not uses_kernel(fast(model, lr=0.1))


@pytest.mark.parametrize("change", ["numel", "grad dtype", "slots", "flag"])
def test_the_kernel_refuses_what_it_would_get_wrong(change):
    # Checked before anything reaches the GPU (so this runs on the CPU): the kernel itself would silently skip
    # a tail of fewer than 16 elements, or read the slots or the flag as another type.
    param, grad = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    slots, apply = torch.zeros(fused_update.NUM_SLOTS), torch.ones((), dtype=torch.uint8)
    if change == "numel":
        param, grad = param[:60], grad[:60]
    elif change == "grad dtype":
        grad = grad.half()
    elif change == "slots":
        slots = slots.double()
    else:
        apply = apply.bool()
    with pytest.raises(ValueError, match="check available"):
        fused_update.update_and_sum_squares(param, grad, -0.1, slots, apply)


def reference_kernel(param, grad, alpha, slots, apply):
    """The kernel's contract in PyTorch ops, so that lomo.py's side of it runs in CPU CI too: w + alpha * g in
    fp32 with add_'s own rounding (one fused multiply-add where the CPU has one, as fused_update.axpy and the
    Triton kernel compute it), rounded once into w's dtype."""
    updated = param.float().add_(grad.float(), alpha=float(alpha)).to(param.dtype)
    param.copy_(torch.where(apply.bool(), updated, param))
    slots[0] += grad.float().square().sum()


def frozen_vectors_model():
    # The norm weights' guarded update is a GPU path (a multi-tensor add): frozen here, only matrices train.
    model = tiny_model(dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(p.dim() > 1)
    return model


@pytest.fixture
def kernel_on_the_cpu(monkeypatch):
    def use_for(which):
        monkeypatch.setattr(fused_update, "available", lambda param, grad: which(param))
        monkeypatch.setattr(fused_update, "update_and_sum_squares", reference_kernel)
    return use_for


def test_with_the_kernel_a_nonfinite_loss_moves_nothing_and_is_counted_when_read(batch, kernel_on_the_cpu):
    kernel_on_the_cpu(lambda param: True)
    models = [frozen_vectors_model() for _ in range(2)]
    fused, plain = fast(models[0], lr=0.37, max_consecutive_skips=2), fast(models[1], lr=0.37, fused_kernel=False)
    assert uses_kernel(fused) and not uses_kernel(plain)
    a, b = fused.step(loss_of(models[0], batch)), plain.step(loss_of(models[1], batch))
    assert a.loss_decides and not b.loss_decides  # the step never read its loss: the flag guarded each update
    assert not a.skipped and a.loss == b.loss and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    before = [p.detach().clone() for p in models[0].parameters()]
    bad = fused.step(loss_of(models[0], batch) * float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), before))
    assert bad.skipped and "non-finite loss" in bad.reason and bad.grad_norm is None  # read before the check
    assert fused.consecutive_skips == 0  # not counted until checked
    fused.check_previous_step()
    assert fused.consecutive_skips == 1
    fused.step(loss_of(models[0], batch))
    fused.check_previous_step()
    assert fused.consecutive_skips == 0  # a good step resets the count
    fused.step(loss_of(models[0], batch) * float("inf"))
    with pytest.raises(FloatingPointError, match="step 5: 2 bad steps in a row"):
        fused.step(loss_of(models[0], batch) * float("nan"))
        fused.check_previous_step()


def test_with_the_kernel_on_some_matrices_the_others_still_wait_for_the_loss(batch, kernel_on_the_cpu):
    kernel_on_the_cpu(lambda param: param.shape[0] == param.shape[1])  # the square ones only
    model = frozen_vectors_model()
    before = [p.detach().clone() for p in model.parameters()]
    lomo = fast(model, lr=0.1)
    result = lomo.step(loss_of(model, batch) * float("nan"))
    assert not result.loss_decides and result.skipped  # read by the first unguarded update
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    result = lomo.step(loss_of(model, batch))
    assert not result.skipped and lomo.consecutive_skips == 0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_with_the_kernel_a_nonfinite_gradient_still_stops_training(batch, kernel_on_the_cpu):
    kernel_on_the_cpu(lambda param: True)
    model = frozen_vectors_model()
    inject(model, float("inf"))
    lomo = fast(model, lr=0.1)
    result = lomo.step(loss_of(model, batch))
    assert not result.skipped and math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    with pytest.raises(FloatingPointError, match="step 1: gradient norm"):
        lomo.check_previous_step()


def test_a_kernel_that_fails_names_the_way_around_it(batch, kernel_on_the_cpu):
    kernel_on_the_cpu(lambda param: True)

    def broken(*args):
        raise ValueError("no build for this GPU")

    fused_update.update_and_sum_squares = broken  # (monkeypatch restores the module's function afterwards)
    model = frozen_vectors_model()
    with pytest.raises(RuntimeError, match="no build for this GPU.*--no-fused-kernel"):
        fast(model, lr=0.1).step(loss_of(model, batch))


def test_a_restored_state_does_not_count_a_step_of_before(batch, kernel_on_the_cpu):
    kernel_on_the_cpu(lambda param: True)
    model = frozen_vectors_model()
    lomo = fast(model, lr=0.1)
    lomo.step(loss_of(model, batch))
    state = lomo.state_dict()
    lomo.step(loss_of(model, batch) * float("nan"))  # unchecked when the state is restored
    lomo.load_state_dict(state)
    lomo.check_previous_step()
    assert lomo.consecutive_skips == 0 and lomo.step_count == 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [16, 4096, fused_update.NUM_SLOTS * fused_update.BLOCK * 2 + 48])  # the last loops
@pytest.mark.parametrize("launch", ["direct", "jit"])
def test_kernel_update_is_add_and_its_sum_of_squares_the_float64_one(dtype, numel, launch, monkeypatch):
    make = torch.Generator(device="cuda").manual_seed(numel)
    # A tensor starting 2 bytes into its storage is not 16-byte aligned: Triton's JIT launches the kernel then.
    offset = {"direct": 0, "jit": 1}[launch]

    def refused(*args, **kwargs):
        raise AssertionError(f"not the {launch} launch")

    if launch == "direct":  # checked now, then the JIT launch is taken away: every call below is direct
        assert fused_update._direct_launcher(torch.cuda.current_device(), dtype) is not None
        monkeypatch.setattr(fused_update, "_update_and_sum_squares", type("NoJit", (), {"__getitem__": refused})())
    else:
        monkeypatch.setattr(fused_update, "_direct_launcher", refused)
    pairs = [(torch.randn(n + offset, device="cuda", generator=make).to(dtype)[offset:],
              (torch.randn(n + offset, device="cuda", generator=make) * 0.01).to(dtype)[offset:])
             for n in (numel, 3 * 4096 + 16)]
    squares = sum(grad.double().square().sum().item() for _, grad in pairs)
    for apply in (0, 1):  # 0: the step's loss was not finite: no weight changes, the squares are summed still
        slots = fused_update.new_slots("cuda")
        for param, grad in pairs:  # two tensors into the same slots, as one step's matrices
            expected = param.clone().add_(grad, alpha=-0.37) if apply else param.clone()  # CUDA: fp32 maths, alpha
            fused_update.update_and_sum_squares(param, grad, -0.37, slots, torch.tensor(apply, dtype=torch.uint8,
                                                                                        device="cuda"))
            assert torch.equal(param, expected)
        assert slots.sum().item() == pytest.approx(squares, rel=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_kernel_is_launched_directly(dtype):
    # Triton's JIT launch costs ~25 us of CPU a call; this Triton's compiled kernels take the direct launch
    # (a Triton that launched them differently would fail its check and fall back, correct but slower).
    assert fused_update._direct_launcher(torch.cuda.current_device(), dtype) is not None


@needs_kernel
def test_tensors_the_kernel_does_not_take_go_to_the_pytorch_ops():
    weight = torch.zeros(4095, dtype=torch.bfloat16, device="cuda")  # not a multiple of 16 elements
    assert not fused_update.available(weight, weight)
    assert not fused_update.available(weight.float(), weight.float())
    square = torch.zeros(64, 64, dtype=torch.bfloat16, device="cuda")
    assert fused_update.available(square, square) and not fused_update.available(square.t(), square.t())


@needs_kernel
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # with decay LOMO takes the PyTorch ops
def test_lomo_trains_with_the_kernel_exactly_as_without_it(batch, weight_decay):
    batch = tuple(t.cuda() for t in batch)
    models = [tiny_model(dtype=torch.bfloat16).cuda() for _ in range(2)]
    fused, plain = (fast(m, lr=0.37, rule=SGD(weight_decay=weight_decay), fused_kernel=f)
                    for m, f in zip(models, (True, False)))
    assert uses_kernel(fused) == (weight_decay == 0.0) and not uses_kernel(plain)
    for _ in range(3):
        a, b = fused.step(loss_of(models[0], batch)), plain.step(loss_of(models[1], batch))
        assert a.loss == b.loss and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


@needs_kernel
def test_a_nonfinite_loss_is_caught_on_the_device_and_counted_when_read(batch):
    # The kernel reads the loss's finiteness on the device, so the step does not wait for the loss: it is
    # skipped (no weight moves) and the host learns it when it reads the loss or checks the step.
    model = tiny_model(dtype=torch.bfloat16).cuda()
    batch = tuple(t.cuda() for t in batch)
    before = [p.detach().clone() for p in model.parameters()]
    lomo = fast(model, lr=0.1, max_consecutive_skips=2)
    result = lomo.step(loss_of(model, batch) * float("nan"))
    assert result.loss_decides and isinstance(result._loss, tuple)  # not read by the step
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert result.grad_norm is None and result.skipped and "non-finite loss" in result.reason
    lomo.check_previous_step()  # one skip: counted, no error
    assert lomo.consecutive_skips == 1
    with pytest.raises(FloatingPointError, match="step 2: 2 bad steps in a row"):
        lomo.step(loss_of(model, batch) * float("inf"))
        lomo.check_previous_step()


@needs_kernel
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_kernel_s_norm_still_stops_training_on_a_nonfinite_gradient(batch, value):
    model = tiny_model(dtype=torch.bfloat16).cuda()
    inject(model, value)
    lomo = fast(model, lr=0.1)
    assert uses_kernel(lomo)
    result = lomo.step(loss_of(model, tuple(t.cuda() for t in batch)))
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    with pytest.raises(FloatingPointError, match="step 1: gradient norm"):
        lomo.check_previous_step()


def test_a_rule_that_is_no_axpy_leaves_the_kernel_idle(batch, kernel_on_the_cpu):
    # Weight decay makes SGD no axpy: the kernel claims nothing, so no pass may turn it on (it has no alpha).
    kernel_on_the_cpu(lambda param: True)
    models = [tiny_model(dtype=torch.bfloat16) for _ in range(2)]
    fused = fast(models[0], lr=0.1, rule=SGD(weight_decay=0.1))
    plain = LOMO(models[1], lr=0.1, rule=SGD(weight_decay=0.1))
    assert not uses_kernel(fused)
    for _ in range(2):
        a, b = fused.step(loss_of(models[0], batch)), plain.step(loss_of(models[1], batch))
        fused.check_previous_step()
        assert not a.skipped and a.loss == b.loss
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
