"""The memory meter (models/memory.py) against real CPU tensors, the CPU allocator's measured peak and real CUDA
autocast (fake CUDA tensors run forward without a GPU)."""
import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.profiler import ProfilerActivity, profile

from meddinov3_nnunet.models.decoder import UpsampleStage
from meddinov3_nnunet.models.memory import (GIB, SavedTensors, cuda_rules, default_loss, estimate_step_memory,
                                            storage_key)
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.volumetric import build_volumetric_network


def tiny(**kwargs):
    return build_network("vit_tiny16", drop_path_rate=0.2, **kwargs)


def graph_saved_bytes(loss: torch.Tensor, exclude: set) -> int:
    """Bytes of the storages the autograd graph of ``loss`` holds in its nodes' saved tensors (walked, not hooked).
    0-dim int64 / float64 tensors are left out: Python numbers autograd wraps (host scalars it does not hand to
    hooks)."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()))
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                wrapped_number = isinstance(t, torch.Tensor) and not t.ndim and t.dtype in (torch.int64, torch.float64)
                if isinstance(t, torch.Tensor) and not wrapped_number and storage_key(t) not in exclude:
                    storages[storage_key(t)] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def real_step(network, batch, dtype):
    """forward + loss on real CPU tensors, counting the saved tensors; returns (loss, SavedTensors)."""
    network.autocast_dtypes = {"cpu": dtype}
    data, target = batch
    with SavedTensors(exclude=network) as saved:
        loss = default_loss(network(data), target)
    return loss, saved


def small_batch(channels=1, size=64):
    return torch.randn(2, channels, size, size), torch.randint(0, 2, (2, 1, size, size), dtype=torch.int16)


NETWORKS = {  # no in-place op on a view: a walk cannot see into the CopySlices node that wraps one
    "2d": (lambda: tiny(in_channels=2), (2, 2, 64, 64)),
    "projected": (lambda: tiny(decoder="projected"), (2, 1, 64, 64)),
    "3d": (lambda: build_volumetric_network("vit_tiny16", mix_slices=True, drop_path_rate=0.2), (1, 1, 4, 64, 64)),
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", NETWORKS)
def test_the_hook_count_equals_the_saved_tensors_of_the_graph(dtype, name):
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    network = build().train()
    target = torch.randint(0, 2, (shape[0], 1, *shape[2:]), dtype=torch.int16)
    loss, saved = real_step(network, (torch.randn(shape), target), dtype)
    assert saved.bytes > 1_000_000
    assert saved.bytes == graph_saved_bytes(loss, saved.excluded)


def measured_cpu_peak(step) -> int:
    """Peak of the CPU allocator's live bytes during ``step()``, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass  # the first profile of a process allocates profiler state: keep it out of the measured one
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_the_fake_step_equals_a_measured_cpu_step():
    """fp32 (CPU autocast off, so no dtype rules at play): the fake estimate's saved bytes are the real hook count,
    its peak the CPU allocator's measured peak (plus the weights and AdamW state the estimate adds, and the batch it
    allocates itself), to the byte."""
    torch.manual_seed(0)
    network = tiny().train()
    batch = small_batch()
    loss, saved = real_step(network, batch, None)
    loss.backward()
    network.zero_grad(set_to_none=True)

    def step():
        loss, _ = real_step(network, batch, None)
        loss.backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with more threads the CPU conv kernels add per-thread scratch buffers no tensor holds
    try:
        peak = measured_cpu_peak(step)
    finally:
        torch.set_num_threads(threads)
    estimate = estimate_step_memory(tiny, (1, 64, 64), 2, dtype=None)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    assert (estimate.parameters, estimate.optimizer) == (trainable, 8 * trainable)
    assert estimate.saved == saved.bytes
    batch_bytes = 2 * 64 * 64 * (4 + 2)  # fp32 images, int16 targets
    assert estimate.peak - estimate.weights - estimate.optimizer - batch_bytes == peak
    assert saved.bytes < peak < saved.bytes + 4 * trainable  # backward frees saved tensors as gradients come


def test_bf16_on_the_cpu_is_within_the_normalisation_statistics_of_a_real_step():
    """CPU bf16 autocast without CUDA's rules: the real step keeps the decoder's LayerNorm statistics in fp32 (its
    mixed-dtype kernel), the CPU meta kernel in bf16; that is the whole difference."""
    torch.manual_seed(0)
    network = tiny().train()
    _, saved = real_step(network, small_batch(), torch.bfloat16)
    estimate = estimate_step_memory(tiny, (1, 64, 64), 2, dtype=torch.bfloat16, use_cuda_rules=False)
    stage_pixels = 2 * sum(s ** 2 for s in (8, 16, 32, 64))  # batch 2, the four stages' output maps
    assert saved.bytes - estimate.saved == 2 * 2 * stage_pixels  # mean and rstd: 4 instead of 2 bytes a pixel


def fake_on(network: nn.Module, mode: FakeTensorMode, device: str) -> nn.Module:
    """A meta-built network with fake parameters on ``device``; attention unfused (fake CUDA cannot pick a fused
    kernel without a GPU), the same on both sides of the comparison."""
    for child in network.modules():
        for name, p in list(child._parameters.items()):
            if p is not None:
                child._parameters[name] = nn.Parameter(FakeTensor(mode, p.data.to("meta"), torch.device(device)),
                                                       p.requires_grad)
        for name, b in list(child._buffers.items()):
            if b is not None:
                child._buffers[name] = FakeTensor(mode, b.to("meta"), torch.device(device))
        if hasattr(child, "fused_attn"):
            child.fused_attn = False
    return network


@contextlib.contextmanager
def cuda_autocast(dtype):
    """CUDA autocast switched on directly (``torch.autocast`` refuses it without a GPU)."""
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])


def fake_forward_saved(build, shape, device, rules, dtype=torch.bfloat16) -> int:
    with torch.device("meta"):
        network = build()
    network.train()
    network.autocast_dtypes = None  # the autocast context below
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_on(network, mode, device)
    with mode:
        x = torch.empty(shape, device=device)
        autocast = cuda_autocast(dtype) if device == "cuda" else torch.autocast("cpu", dtype=dtype)
        with SavedTensors(exclude=network) as saved, autocast, rules():
            network(x)
    return saved.bytes


@pytest.mark.parametrize("decoder,image_skip", [("aggregation", False), ("aggregation", True), ("hybrid", False)])
def test_cuda_rules_give_what_real_cuda_autocast_saves(decoder, image_skip):
    """Saved bytes under real CUDA autocast (fake CUDA tensors) and under CPU autocast + `cuda_rules` agree, up to the
    bf16 copies of the decoder LayerNorms' affine parameters that only CUDA makes (CPU's kernel takes them in
    fp32); CPU autocast alone keeps much less than CUDA does."""
    def build():
        return build_network("vit_tiny16", in_channels=1, decoder=decoder, image_skip=image_skip)

    shape = (2, 1, 64, 64)
    cuda = fake_forward_saved(build, shape, "cuda", contextlib.nullcontext)
    emulated = fake_forward_saved(build, shape, "cpu", cuda_rules)
    plain_cpu = fake_forward_saved(build, shape, "cpu", contextlib.nullcontext)
    affine_copies = sum(2 * 2 * m[1].weight.numel() for m in build().modules() if isinstance(m, UpsampleStage))
    assert cuda - emulated == affine_copies
    assert cuda - plain_cpu > 50_000


def test_cuda_rules_under_fp16():
    """fp16 (GPUs without bf16): the same as real CUDA autocast to the byte (the decoder keeps CUDA's fp32 norm); CPU
    autocast alone refuses the MedDINOv3 flavour's bf16 RoPE angles in a concatenation, CUDA's promotes them."""
    def build():
        return build_network("vit_tiny16", in_channels=1)

    shape = (2, 1, 64, 64)
    cuda = fake_forward_saved(build, shape, "cuda", contextlib.nullcontext, torch.float16)
    assert fake_forward_saved(build, shape, "cpu", cuda_rules, torch.float16) == cuda
    assert cuda > fake_forward_saved(build, shape, "cuda", contextlib.nullcontext) + 200_000  # bf16: norm in bf16
    with pytest.raises(RuntimeError, match="Unexpected floating ScalarType"):
        fake_forward_saved(build, shape, "cpu", contextlib.nullcontext, torch.float16)


def test_the_decoder_keeps_bf16_maps_under_cuda_autocast():
    """Under CUDA bf16 autocast the upsampling stages' norm and GELU run in bf16 (CUDA autocast alone would run them,
    and keep their inputs, in fp32); fake CUDA's LayerNorm also refuses fp32 affine parameters with bf16 input, as
    the CUDA kernel does, so this runs the cast the stage needs."""
    stage = UpsampleStage(64, 32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        stage = fake_on(UpsampleStage(64, 32), mode, "cuda")
    with mode:
        x = torch.empty(2, 64, 16, 16, device="cuda", requires_grad=True)
        with SavedTensors(exclude=stage) as saved, cuda_autocast(torch.bfloat16):
            y = stage(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 32, 32, 32)
    pixels = 2 * 32 * 32
    # input (bf16 copy) + weight copy + conv output (norm input) + mean, rstd (fp32) + GELU input (norm output)
    assert saved.bytes == 2 * 64 * 16 * 16 * 2 + 64 * 128 * 2 + pixels * 32 * 2 + 2 * pixels * 4 + pixels * 32 * 2 \
        + 2 * 32 * 2


def test_activation_checkpointing_lowers_saved_bytes_and_peak():
    eager = estimate_step_memory(tiny, (1, 128, 128), 4)
    checkpointed = estimate_step_memory(tiny, (1, 128, 128), 4, checkpointing=True)
    assert checkpointed.saved < eager.saved / 2
    assert checkpointed.peak < eager.peak
    assert (checkpointed.weights, checkpointed.optimizer) == (eager.weights, eager.optimizer)


def test_vit_b_at_896_is_about_3_gib_per_image_and_grows_with_the_batch():
    """ViT-B, bf16, 896²: about 3.4 GiB kept for backward for one image; drop path (rate 0.2, DINOv3's batch-subset
    form) runs each encoder branch on 3 of 4 images of a batch of 4."""
    def vit_b():
        return build_network("vit_b16", drop_path_rate=0.2)

    one = estimate_step_memory(vit_b, (1, 896, 896), 1)
    four = estimate_step_memory(vit_b, (1, 896, 896), 4)
    assert 3.2 * GIB < one.saved < 3.5 * GIB
    assert 3.2 * one.saved < four.saved < 3.6 * one.saved
    assert one.peak < four.peak < one.peak + 4 * one.saved
    assert one.weights + one.gradients + one.optimizer == pytest.approx(16 * one.parameters, rel=0.01)
