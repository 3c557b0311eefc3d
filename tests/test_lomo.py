"""LOMO against independent references: torch.optim.SGD, clip_grad_norm_, clip_grad_value_, and the
guarantees of the fused update (one gradient alive at a time, nothing non-finite reaches a weight)."""
import copy
import math

import pytest
import torch

import gram_norm
import speedups

from conftest import inject, loss_of, sgd_reference, tiny_model
from lomo import LOMO, SGD, DynamicLossScaler
from fused_update import TorchAxpy, VectorGroup
from step_result import DeferredGuard, Unchecked


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_value_and_norm_clipping_together_match_the_two_torch_utilities(batch):
    model, reference = tiny_model(), tiny_model()
    norm = LOMO(model, lr=0.3, clip_grad_value=2e-3, clip_grad_norm=0.05).step(loss_of(model, batch)).grad_norm
    expected = sgd_reference(reference, batch, lr=0.3, clip_value=2e-3, clip_norm=0.05)  # value first, then norm
    assert expected[0] > 0.05 and norm == pytest.approx(expected[0], rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_bad_learning_rate_at_step_time_is_refused(batch):
    model = tiny_model()
    lomo = LOMO(model, lr=0.1)
    for lr in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=f"learning rate {lr} must be a finite number >= 0"):
            lomo.step(loss_of(model, batch), lr)
    assert lomo.step_count == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_step_equals_torch_sgd_bit_for_bit(batch, weight_decay):
    model, reference = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=0.3, rule=SGD(weight_decay=weight_decay))
    for _ in range(3):
        result = lomo.step(loss_of(model, batch))
        assert not result.skipped and result.grad_norm > 0
    sgd_reference(reference, batch, lr=0.3, weight_decay=weight_decay, steps=3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(weights(model)[0], weights(tiny_model())[0])  # the weights did move


def test_tied_embeddings_are_updated_once_like_sgd(batch):
    model, reference = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    LOMO(model, lr=0.3).step(loss_of(model, batch))
    sgd_reference(reference, batch, lr=0.3)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_global_norm_clipping_matches_clip_grad_norm(batch):
    model, reference = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=0.3, rule=SGD(weight_decay=0.01), clip_grad_norm=0.5)
    reported = [lomo.step(loss_of(model, batch)).grad_norm for _ in range(2)]
    expected = sgd_reference(reference, batch, lr=0.3, weight_decay=0.01, clip_norm=0.5, steps=2)
    assert all(n > 0.5 for n in expected)  # clipping was active, so the test can tell
    assert reported == pytest.approx(expected, rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_value_clipping_matches_clip_grad_value(batch):
    model, reference = tiny_model(), tiny_model()
    LOMO(model, lr=0.3, clip_grad_value=1e-3).step(loss_of(model, batch))
    sgd_reference(reference, batch, lr=0.3, clip_value=1e-3)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_only_one_gradient_is_alive_during_backward(batch, clip, attached):
    model = tiny_model()
    params = list(model.parameters())
    matrices, vectors = [p for p in params if p.dim() > 1], [p for p in params if p.dim() == 1]
    alive, alive_numel = [], []

    def count_alive(_):
        alive.append(sum(p.grad is not None for p in matrices))
        alive_numel.append(sum(p.grad.numel() for p in params if p.grad is not None))

    for p in matrices:  # registered before LOMO's hooks, so each runs just before LOMO frees the gradient
        p.register_post_accumulate_grad_hook(count_alive)
    lomo = (speedups.apply if attached else LOMO)(model, lr=0.1, clip_grad_norm=clip)
    lomo.step(loss_of(model, batch))
    passes = 2 if clip else 1
    assert len(vectors) == 2 * 2 + 1 and all(p.grad is None for p in params)
    if not attached:  # the reference: every parameter has a hook, and each hook sees one gradient alive
        assert alive == [1] * (passes * len(matrices))
        assert max(alive_numel) <= max(p.numel() for p in matrices)
        return
    # Attached: in the norm pass the linear layers give their norm from Grams (gram_norm.py) and have no
    # gradient at all; every other hook sees exactly one matrix gradient alive. The vectors have no hook
    # (fused_update.VectorGroup): theirs wait for the end of the pass, so at most the largest matrix's gradient
    # and all the vectors' are alive together.
    grams = [e for e in lomo.extensions if isinstance(e, gram_norm.GramNorms)]
    gram_layers = len(grams[0].layers) if grams else 0
    assert gram_layers == (2 * 7 + 1 if clip else 0)  # 7 per block and the head (whose forward is used here)
    if not clip:
        assert alive == [1] * len(matrices)
    else:
        assert sorted(alive) == [0] * gram_layers + [1] * (2 * len(matrices) - gram_layers)
    assert max(alive_numel) <= max(p.numel() for p in matrices) + sum(p.numel() for p in vectors)
    assert len(alive) == passes * len(matrices)


def test_backward_outside_step_leaves_weights_and_grads_to_the_caller(batch):
    model = tiny_model()
    before = weights(model)
    LOMO(model, lr=0.1)
    loss_of(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_fp16_overflow_skips_step_halves_scale_and_keeps_weights(batch):
    model = tiny_model(dtype=torch.float16)
    lomo = LOMO(model, lr=0.1)
    assert lomo.loss_scaler is not None and lomo.loss_scaler.scale == 2.0**16
    before = weights(model)
    handle = inject(model, float("inf"))
    result = lomo.step(loss_of(model, batch))
    assert result.skipped and "overflow" in result.reason and result.loss_scale == 2.0**16
    assert lomo.loss_scaler.scale == 2.0**15
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # bit-identical: pass 1 saw the overflow before any update
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    result = lomo.step(loss_of(model, batch))
    assert not result.skipped and result.loss_scale == 2.0**15
    assert not torch.equal(next(model.parameters()), before[0])


def test_fp16_step_matches_fp32_sgd_on_the_same_weights(batch):
    """Loss scaling is undone exactly: an fp16 LOMO step moves weights as fp32 SGD does, up to fp16 rounding."""
    model = tiny_model(dtype=torch.float16)
    reference = copy.deepcopy(model).float()
    LOMO(model, lr=0.5).step(loss_of(model, batch))
    sgd_reference(reference, batch, lr=0.5)
    for p, q, p0 in zip(model.parameters(), reference.parameters(), tiny_model(dtype=torch.float16).parameters()):
        start = p0.detach().float()
        ours, theirs = (p.detach().float() - start).flatten(), (q.detach() - start).flatten()
        # Matrices hold small values, where fp16 resolves updates finely; norm weights sit at 1.0, where
        # fp16's spacing (2**-10) is a sizeable part of an update, hence the looser bound there.
        close = 0.999 if p.ndim == 2 else 0.85
        assert torch.cosine_similarity(ours, theirs, dim=0) > close
        assert abs(float(ours.norm() / theirs.norm()) - 1) < (0.01 if p.ndim == 2 else 0.2)


def test_loss_scale_grows_after_clean_window_and_state_round_trips(batch):
    model = tiny_model(dtype=torch.float16)
    lomo = LOMO(model, lr=0.01, loss_scaler=DynamicLossScaler(init_scale=256.0, growth_interval=3))
    scales = [lomo.step(loss_of(model, batch)).loss_scale for _ in range(4)]
    assert scales == [256.0, 256.0, 256.0, 512.0]
    state = lomo.state_dict()
    other = LOMO(tiny_model(dtype=torch.float16), lr=0.01, loss_scaler=DynamicLossScaler())
    other.load_state_dict(state)
    assert other.state_dict() == state and other.loss_scaler.scale == 512.0


def test_loss_scale_floor_is_a_clear_error():
    scaler = DynamicLossScaler(init_scale=2.0, min_scale=1.0)
    scaler.update(overflow=True, step=1)
    assert scaler.scale == 1.0
    with pytest.raises(FloatingPointError, match="step 2: fp16 gradients overflow even at the minimum loss scale"):
        scaler.update(overflow=True, step=2)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_loss_never_reaches_weights(batch, dtype, clip, device):
    # (On a GPU the one-pass check reads the loss from a host copy made without waiting, at the first update.)
    model = tiny_model(dtype=dtype).to(device)
    batch = tuple(t.to(device) for t in batch)
    before = weights(model)
    result = LOMO(model, lr=0.1, clip_grad_norm=clip).step(loss_of(model, batch) * float("nan"))
    assert result.skipped and "non-finite loss" in result.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_with_clipping_and_stops_training_without(batch, dtype, value):
    # With clipping the norm pass sees it first and no weight moves at all.
    model = tiny_model(dtype=dtype)
    before = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    inject(model, value)
    result = LOMO(model, lr=0.1, clip_grad_norm=1.0).step(loss_of(model, batch))
    assert result.skipped and "non-finite gradient norm" in result.reason
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # One pass: the norm is known only after the update, so training stops, saying how to go on: when asked
    # (train.py asks after every step), or else when the next step begins, before any of its weights moves.
    # The reference guard reads the norm at the end of the step and raises there.
    model = tiny_model(dtype=dtype)
    inject(model, value)
    with pytest.raises(FloatingPointError, match="step 1: gradient norm .* with a finite loss .*--clip-grad-norm"):
        LOMO(model, lr=0.1, rule=SGD(weight_decay=0.1)).step(loss_of(model, batch))
    for ask in (True, False):  # the deferred guard: when asked, or when the next step begins
        model = tiny_model(dtype=dtype)
        inject(model, value)
        lomo = LOMO(model, lr=0.1, rule=SGD(weight_decay=0.1), guard=DeferredGuard())
        result = lomo.step(loss_of(model, batch))
        assert not result.skipped and not math.isfinite(result.grad_norm) and math.isfinite(result.loss)
        after_step_1 = weights(model)
        with pytest.raises(FloatingPointError, match="step 1: gradient norm .* with a finite loss .*--clip-grad-norm"):
            lomo.check_previous_step() if ask else lomo.step(loss_of(model, batch))
        unchanged = (torch.allclose(p, q, rtol=0, atol=0, equal_nan=True)
                     for p, q in zip(model.parameters(), after_step_1))
        assert all(unchanged)
        assert all(p.grad is None for p in model.parameters())
        lomo.check_previous_step()  # reported once: a caller that goes on is not stopped again for it


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_checks_the_step_is_sgd_and_the_loss_is_read_only_when_asked(batch, weight_decay):
    model, reference = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=0.3, rule=SGD(weight_decay=weight_decay), guard=Unchecked())
    for step in range(3):
        with torch.no_grad():
            expected_loss = float(loss_of(model, batch))
        result = lomo.step(loss_of(model, batch))
        assert isinstance(result._loss, tuple)  # a copy on its way, not read yet: the step did not wait for it
        assert result.loss == expected_loss and isinstance(result._loss, float)
        assert result.grad_norm is None and not result.skipped and result.step == step + 1
    sgd_reference(reference, batch, lr=0.3, weight_decay=weight_decay, steps=3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_without_checks_a_nan_loss_reaches_the_weights_and_a_norm_pass_still_checks(batch):
    # What check_finite=False gives up (train.py stops on such a loss, after this step).
    model = tiny_model()
    result = LOMO(model, lr=0.1, guard=Unchecked()).step(loss_of(model, batch) * float("nan"))
    assert not result.skipped and result.loss != result.loss
    assert not all(p.isfinite().all() for p in model.parameters())
    # With clipping by norm the norm pass is the check, whatever check_finite says.
    model = tiny_model()
    before = weights(model)
    result = LOMO(model, lr=0.1, clip_grad_norm=1.0, guard=Unchecked()).step(loss_of(model, batch) * float("nan"))
    assert result.skipped and "non-finite loss" in result.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("clip_value", [None, 0.01])
def test_one_pass_step_reports_the_gradient_norm_of_clip_grad_norm_(batch, clip_value):
    model, reference = tiny_model(), tiny_model()
    loss_of(reference, batch).backward()
    grads = [p.grad for p in reference.parameters()]
    if clip_value:
        torch.nn.utils.clip_grad_value_(reference.parameters(), clip_value)
    expected = float(torch.nn.utils.get_total_norm(grads)) if hasattr(torch.nn.utils, "get_total_norm") else \
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    result = LOMO(model, lr=0.1, clip_grad_value=clip_value).step(loss_of(model, batch))
    assert result.grad_norm == pytest.approx(expected, rel=1e-5)  # the reference guard read it
    model = tiny_model()
    result = LOMO(model, lr=0.1, clip_grad_value=clip_value, guard=DeferredGuard()).step(loss_of(model, batch))
    assert isinstance(result._grad_norm, tuple)  # still a copy on its way: the step did not wait for it
    assert result.grad_norm == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU matter")
@pytest.mark.parametrize("check_finite", [True, False])
def test_a_one_pass_step_on_a_gpu_never_waits_for_the_whole_gpu(batch, check_finite):
    # PyTorch's sync debug mode raises on every call that waits for the GPU's queue (.item(), a blocking copy,
    # a stream sync). A checked step only waits for its loss's copy, through an event (not one of those); and
    # reading a step's loss and norm once the next step is queued (as train.py does) waits for copies only.
    model = tiny_model(dtype=torch.bfloat16).cuda()
    batch = tuple(t.cuda() for t in batch)
    lomo = speedups.apply(model, lr=0.1, check_finite=check_finite)
    lomo.step(loss_of(model, batch))  # the first step, with its one-time allocations, outside the check
    read = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        previous = None
        for _ in range(3):
            result = lomo.step(loss_of(model, batch))
            if previous is not None:
                read.append((previous.loss, previous.grad_norm))
            previous = result
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(read) == 2 and all(math.isfinite(loss) for loss, _ in read)
    assert all((norm is not None and norm > 0) == check_finite for _, norm in read)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_many_bad_steps_in_a_row_stop_training_naming_the_step(batch, device):
    # (On a GPU the kernel skips a step with a non-finite loss on the device; check_previous_step counts it.)
    model = tiny_model(dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
    batch = tuple(t.to(device) for t in batch)
    lomo = LOMO(model, lr=0.1, max_consecutive_skips=3)
    for factor in (float("nan"), 1.0, float("nan"), float("nan")):  # a good step resets the count
        lomo.step(loss_of(model, batch) * factor)
        lomo.check_previous_step()
    with pytest.raises(FloatingPointError, match="step 5: 3 bad steps in a row"):
        lomo.step(loss_of(model, batch) * float("nan"))
        lomo.check_previous_step()


@pytest.mark.parametrize("make, message", [
    (lambda: LOMO(tiny_model(), lr=-1.0), "lr=-1.0"),
    (lambda: LOMO(tiny_model(), lr=0.1, rule=SGD(weight_decay=float("nan"))), "weight_decay=nan"),
    (lambda: LOMO(tiny_model(), lr=0.1, clip_grad_norm=0.0), "clip_grad_norm=0.0"),
    (lambda: LOMO(tiny_model(), lr=0.1, clip_grad_value=-2.0), "clip_grad_value=-2.0"),
    (lambda: speedups.apply(tiny_model(), lr=0.1, clip_grad_norm=1.0, branch_grads_gpu_gib=-1.0),
     "branch-grads-gpu-gib=-1.0"),
    (lambda: speedups.apply(tiny_model(), lr=0.1, clip_grad_norm=1.0, branch_grads_gpu_gib=float("inf"),
                            activation_checkpointing=True), "branch-grads-gpu-gib=inf"),
    (lambda: speedups.apply(tiny_model(), lr=0.1, weight_decay=0.1, rule=SGD()), "weight decay is a rule's"),
])
def test_bad_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["reference", "torch-axpy"])
def test_low_precision_update_is_fp32_maths_rounded_once(batch, dtype, device, path):
    """w_new = dtype(fp32(w) - lr * fp32(g)), bit for bit, the gradient being plain autograd's. The reference
    unscales the fp32 gradient first; fused_update.TorchAxpy folds 1 / scale into alpha (one rounding fewer)."""
    model, reference = tiny_model(dtype=dtype).to(device), tiny_model(dtype=dtype).to(device)
    batch = tuple(t.to(device) for t in batch)
    lomo = LOMO(model, lr=0.37, fast_paths=[TorchAxpy()] if path == "torch-axpy" else ())
    scale = lomo.loss_scaler.scale if lomo.loss_scaler else 1.0
    lomo.step(loss_of(model, batch))
    (loss_of(reference, batch) * scale).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        # fp16: the loss scale is undone inside the same fp32 expression (alpha = -lr / scale)
        expected = q.detach().float().add(q.grad.float(), alpha=-0.37 / scale).to(dtype)
        assert torch.equal(p, expected)
        # (norm weights sit at 1.0, where bf16's spacing can swallow a small update: no master weights)
        assert p.ndim == 1 or not torch.equal(p, q)


@pytest.mark.parametrize("backend, device, rtol, atol", [
    ("aot_eager", "cpu", 1e-5, 1e-6),
    pytest.param("inductor", "cuda", 1e-4, 1e-5,
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_compiled_blocks_train_like_eager_ones(batch, clip, backend, device, rtol, atol):
    # --compile: the same LOMO steps (hooks, checkpointing, the retained graph of the clipping pass)
    # through torch.compile'd blocks. aot_eager runs the compiled forward and backward graphs without
    # generating kernels, so this checks the wiring on the CPU in seconds; on a GPU, inductor's CUDA kernels
    # (the recomputation traces fast_layers' SwiGLU Function, whose backward writes into the tensors it saved), in fp32:
    # equal up to the rounding of fused kernels.
    batch = tuple(t.to(device) for t in batch)
    eager, compiled = tiny_model().to(device), tiny_model().to(device)
    norms = []
    for model in (eager, compiled):
        lomo = speedups.apply(model, lr=0.3, clip_grad_norm=clip, activation_checkpointing=True,
                              compile=model is compiled, compile_backend=backend)
        norms.append([lomo.step(loss_of(model, batch)).grad_norm for _ in range(2)])
    assert all(block._compiled_call_impl is not None for block in compiled.layers)
    assert norms[1] == pytest.approx(norms[0], rel=rtol)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(compiled.layers[0].attention.wq.weight.cpu(), tiny_model().layers[0].attention.wq.weight)


def test_value_clipping_does_not_hide_an_fp16_overflow(batch):
    # Clamping turns inf into clip_value; with loss scaling the overflow must still skip and halve the scale.
    model = tiny_model(dtype=torch.float16)
    before = weights(model)
    inject(model, float("inf"))
    lomo = LOMO(model, lr=0.1, clip_grad_value=0.01)
    result = lomo.step(loss_of(model, batch))
    assert result.skipped and "overflow" in result.reason and lomo.loss_scaler.scale == 2.0**15
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_float64_step_equals_torch_sgd(batch):
    model, reference = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
    LOMO(model, lr=0.3).step(loss_of(model, batch))
    sgd_reference(reference, batch, lr=0.3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_an_error_inside_backward_leaves_no_gradient_for_the_next_step(batch):
    model = tiny_model()
    lomo = LOMO(model, lr=0.1)

    def fail(grad):
        raise RuntimeError("stopped inside backward")

    # Backward reaches block 0's output after block 1 and the final norm: some vectors (norm weights,
    # applied after the pass) have gradients by then.
    def on_output(module, inputs, output):
        output.register_hook(fail)

    handle = model.layers[0].register_forward_hook(on_output)
    with pytest.raises(RuntimeError, match="stopped inside backward"):
        lomo.step(loss_of(model, batch))
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    assert not lomo.step(loss_of(model, batch)).skipped  # no "already has a .grad" refusal


ATTACHMENTS = {  # each of lomo.py's attachments that runs on the CPU, alone
    "vector-group": dict(fast_paths=[VectorGroup()]),
    "torch-axpy": dict(fast_paths=[TorchAxpy()]),
    "deferred-guard": dict(guard=DeferredGuard()),
}


@pytest.mark.parametrize("attachment", list(ATTACHMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_an_attachment_on_and_off_trains_the_same_weights(batch, attachment, dtype, clip):
    # Bit for bit where both run the same operations: every attachment without clipping (the vectors' updates
    # are the same ops after backward as in a hook; TorchAxpy's alpha is -lr, whose product with an exact fp32
    # copy of the gradient is the reference's; the deferred guard only reads later). With clipping the vectors'
    # norms join the global norm in another order and TorchAxpy folds the clip factor into alpha: the clip
    # factors differ in the last fp32 bits, and a weight by at most one ulp of its dtype after rounding.
    models = [tiny_model(dtype=dtype) for _ in range(2)]
    plain = LOMO(models[0], lr=0.3, clip_grad_norm=clip)
    attached = LOMO(models[1], lr=0.3, clip_grad_norm=clip, **ATTACHMENTS[attachment])
    for step in range(3):
        tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(step))
        a = plain.step(loss_of(models[0], (tokens[:, :-1], tokens[:, 1:])))
        b = attached.step(loss_of(models[1], (tokens[:, :-1], tokens[:, 1:])))
        assert not a.skipped and not b.skipped and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    exact = clip is None or attachment == "deferred-guard" or (attachment == "torch-axpy" and dtype == torch.float32)
    ulp = torch.finfo(dtype).eps
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=2 * ulp, atol=1e-6, msg=lambda m: f"{name}: {m}")
