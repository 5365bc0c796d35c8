"""Flow matching: objective, timestep schedules and the guided Euler sampler."""

from mirage_jax.diffusion.flow import (
    apply_drops,
    draw_drops,
    draw_noise,
    drop_conditions,
    fixed_draws,
    flow_matching_loss,
    loss_weight,
    model_inputs,
)
from mirage_jax.diffusion.sampler import euler_sample, guided_velocity, sample
from mirage_jax.diffusion.schedules import linear_quadratic_schedule, model_timestep, sample_timesteps

__all__ = [
    "apply_drops", "draw_drops", "draw_noise", "drop_conditions", "euler_sample", "fixed_draws", "flow_matching_loss",
    "guided_velocity", "linear_quadratic_schedule", "loss_weight", "model_inputs", "model_timestep", "sample",
    "sample_timesteps",
]
