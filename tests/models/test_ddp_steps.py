"""Multi-GPU fine-tuning as nnU-Net 2.8.1 runs it: every network family trains under DDP without
``find_unused_parameters`` (nnU-Net's wrapping), and every trainable parameter of every trainer's network gets a
gradient (a parameter without one makes DDP raise at the second iteration)."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from meddinov3_nnunet import trainers
from meddinov3_nnunet.models.decoder import ConvPath
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.network import ProjectedMedDINOv3Net, build_network
from meddinov3_nnunet.models.volumetric import build_volumetric_network
from meddinov3_nnunet.nnunet.finetune import FinetuneRecipe, build_optimizer

ENCODER = "vit_tiny16"
STEPS = 3
# an anisotropic plan's pyramid (depth pooled once), narrow: nnU-Net's default widths cost seconds per step here
SMALL_3D_PATH = ConvPath(widths=(8, 16, 16, 16), kernels=((1, 3, 3),) + ((3, 3, 3),) * 3,
                         strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)))
FAMILIES = {  # name -> (network factory, input shape (per rank), drop path as the trainers use it)
    "2d": (lambda: build_network(ENCODER, in_channels=1, num_classes=3, drop_path_rate=0.2), (2, 1, 32, 32)),
    "2d_skip": (lambda: build_network(ENCODER, in_channels=2, num_classes=3, drop_path_rate=0.2, image_skip=True),
                (2, 2, 32, 32)),
    "projected": (lambda: ProjectedMedDINOv3Net(build_encoder(ENCODER, drop_path_rate=0.2), 1, 3), (2, 1, 32, 32)),
    "hybrid": (lambda: build_network(ENCODER, in_channels=2, num_classes=3, drop_path_rate=0.2, decoder="hybrid"),
               (2, 2, 32, 32)),
    "hybrid_inject": (lambda: build_network(ENCODER, in_channels=1, num_classes=3, drop_path_rate=0.2,
                                            decoder="hybrid", token_injection=True), (2, 1, 32, 32)),
    "hybrid_deep_supervision": (lambda: deep_supervised(build_network(ENCODER, in_channels=1, num_classes=3,
                                                                      drop_path_rate=0.2, decoder="hybrid")),
                                (2, 1, 32, 32)),
    "3d": (lambda: build_volumetric_network(ENCODER, 1, 3, context=1, mix_slices=True, drop_path_rate=0.2),
           (1, 1, 3, 32, 32)),
    "3d_hybrid": (lambda: build_volumetric_network(ENCODER, 1, 3, context=1, drop_path_rate=0.2, decoder="hybrid",
                                                   conv_path=SMALL_3D_PATH), (1, 1, 4, 32, 32)),
}

# nnU-Net's deep-supervision weights under DDP without compile: 1/2 per level, the lowest 1e-6 instead of 0
DEEP_SUPERVISION_WEIGHTS = (1.0, 0.5, 0.25, 1e-6)


def deep_supervised(network):
    network.decoder.add_supervision_heads(3)
    network.decoder.deep_supervision = True
    return network


def nnunet_like_loss(output, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; on a deep-supervised output, of every level against the nearest-downsampled target."""
    if not isinstance(output, list):
        return F.cross_entropy(output, target)
    total = 0
    for weight, logits in zip(DEEP_SUPERVISION_WEIGHTS, output):
        small = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
        total = total + weight * F.cross_entropy(logits, small)
    return total / sum(DEEP_SUPERVISION_WEIGHTS)


def _ddp_steps(name: str, rank: int, world_size: int) -> None:
    """``STEPS`` training steps of family ``name`` wrapped as nnU-Net wraps it; asserts that the all-reduced
    gradients and the updated weights are the same on every rank."""
    factory, shape = FAMILIES[name]
    torch.manual_seed(0)  # the same start on every rank, as nnU-Net's ranks build the same network
    network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(factory())  # nnUNetTrainer.initialize, then DDP:
    ddp = DDP(network, device_ids=None)  # device_ids=[local_rank] on CUDA; never find_unused_parameters
    optimizer = build_optimizer(network, FinetuneRecipe())
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
    for _ in range(STEPS):
        data = torch.randn(shape, generator=generator)
        target = torch.randint(0, 3, (shape[0],) + shape[2:], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nnunet_like_loss(ddp(data), target).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 12.0)
        grads = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
        gathered = [torch.empty_like(grads) for _ in range(world_size)]
        dist.all_gather(gathered, grads)
        assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"{name}: gradients differ across ranks"
        optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in network.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    dist.all_gather(gathered, weights)
    assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"{name}: weights differ across ranks"


def _worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        for name in FAMILIES:
            try:
                _ddp_steps(name, rank, world_size)
                outcome = "ok"
            except Exception as error:  # both ranks fail alike (DDP checks at the start of each forward)
                outcome = f"{type(error).__name__}: {str(error)[:300]}"
            with open(os.path.join(result_dir, f"{name}.rank{rank}"), "w") as handle:
                handle.write(outcome)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_network_family_trains_under_ddp_as_nnunet_wraps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world_size = 2
    # spawn: fork is refused once this process has run autograd (any earlier test in the session)
    context = mp.start_processes(_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 120 s")
    outcomes = {name: [(tmp_path / f"{name}.rank{rank}").read_text() for rank in range(world_size)]
                for name in FAMILIES}
    assert outcomes == {name: ["ok"] * world_size for name in FAMILIES}


MEDDINOV3_TRAINERS = [name for name in trainers.TRAINER_NAMES
                      if issubclass(getattr(trainers, name), trainers.MedDINOv3Trainer)]


@pytest.mark.parametrize("name", MEDDINOV3_TRAINERS)
def test_every_trainable_parameter_of_every_trainer_network_gets_a_gradient(name, monkeypatch):
    trainer = getattr(trainers, name)
    # the encoder shrunk to the tiny preset on the class itself for this test (a subclass would stay registered as a
    # trainer for the rest of the session, e.g. in the trainer-name suggestions of the error messages)
    monkeypatch.setattr(trainer, "encoder_preset", ENCODER)
    torch.manual_seed(0)
    network = trainer.build_plain_network(2, 3).train()  # 2 channels: the channel adapters have parameters too
    three_d = hasattr(network, "slice_input")
    size = 2 * trainer.encoder_patch_size  # two tokens per side
    data = torch.randn((2, 2, 8, size, size) if three_d else (2, 2, size, size))  # depth 8: a 3D conv path's stride
    network(data).square().mean().backward()
    missing = [key for key, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without a gradient (DDP fails at the second iteration): {missing}"
    assert network.encoder.mask_token.requires_grad is False  # pretraining only; kept in the state dict
    assert "encoder.mask_token" in network.state_dict()
