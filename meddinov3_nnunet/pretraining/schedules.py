"""The per-step schedules of a stage (DINOv3's ``linear_warmup_cosine_decay``) and their application to the
optimiser's parameter groups."""
from __future__ import annotations

import torch
from lightly.utils.scheduler import cosine_schedule


def schedule_value(schedule, step: int, total: int) -> float:
    """DINOv3's ``linear_warmup_cosine_decay`` at ``step``: linear from start to peak over the warm-up, then
    lightly's `cosine_schedule` from peak to end over the remaining steps."""
    warmup = min(schedule.warmup_iterations, total)
    if step < warmup:
        return schedule.start + (schedule.peak - schedule.start) * step / warmup
    remaining = total - warmup
    return cosine_schedule(min(step - warmup, max(remaining - 1, 0)), remaining, schedule.peak, schedule.end)


def schedules_at(optim, step: int) -> dict:
    """Every scheduled value at ``step``: lr (and the last layer's, 0 while frozen), weight decay, teacher
    momentum and teacher temperature."""
    total = optim.iterations
    lr = schedule_value(optim.lr, step, total)
    return {
        "lr": lr,
        "last_layer_lr": 0.0 if step < optim.freeze_last_layer_iterations else lr,
        "weight_decay": schedule_value(optim.weight_decay, step, total),
        "momentum": schedule_value(optim.momentum, step, total),
        "teacher_temp": schedule_value(optim.teacher_temp, step, total),
    }


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict) -> None:
    """Sets each group's lr and weight decay from ``values`` times the group's multipliers."""
    for group in optimizer.param_groups:
        base = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]
