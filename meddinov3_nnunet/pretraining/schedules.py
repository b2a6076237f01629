"""The per-step schedules of a stage (DINOv3's ``linear_warmup_cosine_decay``) and their application to the
optimiser's parameter groups."""
from __future__ import annotations

import dataclasses

import torch
from lightly.utils.scheduler import cosine_schedule

from .config import lr_scale


def schedule_value(schedule, step: int, total: int) -> float:
    """DINOv3's ``linear_warmup_cosine_decay`` at ``step``: linear from start to peak over the warm-up, then
    lightly's `cosine_schedule` from peak to end over ``cosine_iterations`` (default: the remaining steps),
    then constant at end."""
    warmup = min(schedule.warmup_iterations, total)
    if step < warmup:
        return schedule.start + (schedule.peak - schedule.start) * step / warmup
    cosine = total - warmup if schedule.cosine_iterations is None else schedule.cosine_iterations
    if step - warmup >= cosine:
        return schedule.end
    return cosine_schedule(min(step - warmup, max(cosine - 1, 0)), cosine, schedule.peak, schedule.end)


def schedules_at(optim, step: int) -> dict:
    """Every scheduled value at ``step``: lr (peak and end scaled by ``optim.lr_scaling_rule``; the last layer's
    lr is 0 while frozen), weight decay, teacher momentum and teacher temperature."""
    total = optim.iterations
    scale = lr_scale(optim)
    lr = schedule_value(dataclasses.replace(optim.lr, peak=optim.lr.peak * scale, end=optim.lr.end * scale),
                        step, total)
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
