"""The noise process, with no weights: schedules, the forward process, parameterizations, the training loss.

    latent x0 -> q(x_t | x0) (`process.py`) -> denoiser output -> target per parameterization
    (`parameterization.py`) -> loss (`loss.py`); every table comes from a `NoiseSchedule` (`schedule.py`).
"""
from ldm.diffusion.loss import diffusion_loss, min_snr_weight
from ldm.diffusion.parameterization import (
                                            PARAMETERIZATIONS,
                                            ModelFn,
                                            check_parameterization,
                                            eps_from_x0,
                                            model_target,
                                            predict_eps,
                                            predict_x0,
                                            x0_from_eps,
)
from ldm.diffusion.process import extract, noise_to_level, noise_to_sigma, q_posterior, q_sample
from ldm.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule

__all__ = ["BETA_SCHEDULES", "PARAMETERIZATIONS", "ModelFn", "NoiseSchedule", "check_parameterization",
           "diffusion_loss", "eps_from_x0", "extract", "min_snr_weight", "model_target", "noise_to_level",
           "noise_to_sigma", "predict_eps", "predict_x0", "q_posterior", "q_sample", "x0_from_eps"]
