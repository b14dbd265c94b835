#!/usr/bin/env python
"""Sampler accuracy: the discretization error of each deterministic sampler, ours beside diffusers'.

    python bench/sampler_accuracy.py            # 5, 10, 20, 50 steps, about 20 s on 2 CPU cores
    python bench/sampler_accuracy.py --quick    # 5 and 20 steps

The model is the *ideal denoiser* of a known data distribution, so no training and no weights are
needed and every run gives the same numbers. The data x0 is an equal-weight mixture of K isotropic
Gaussians N(mu_k, s^2 I) in a 4x8x8 latent (fixed random means, small std s). Given
x_t = sqrt(a) x0 + sqrt(1 - a) eps (DDPM eq. 4, a = alpha_bar_t) the posterior is again a mixture:

    p(k | x_t)      = softmax_k( -|x_t - sqrt(a) mu_k|^2 / (2 (a s^2 + 1 - a)) )
    E[x0 | x_t, k]  = mu_k + sqrt(a) s^2 / (a s^2 + 1 - a) * (x_t - sqrt(a) mu_k)
    E[x0 | x_t]     = sum_k p(k | x_t) E[x0 | x_t, k]
    eps(x_t, t)     = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a),    v = sqrt(a) eps - sqrt(1 - a) E[x0 | x_t]

which is what a perfectly trained eps- or v-model outputs (the minimiser of the DDPM loss). Every
deterministic sampler integrates its probability-flow ODE, dx/dsigma = (x - D(x, sigma)) / sigma
in the variance-exploding view (Karras et al. 2022, eq. 3), D = E[x0 | x_t]. Model and our samplers
run in float64; diffusers' schedulers keep float32 tables (and Euler, Heun and DPM-Solver step in
float32), which is what the parity column measures.

Reference (`--reference ode`, the default): the exact solution of that ODE from x_T at the
sampler's own first noise level to its own end point (alpha_bar[0] for DDIM and PLMS, as the
original and diffusers' `set_alpha_to_one=False`; sigma 0 for the sigma-space samplers), by
classic Runge-Kutta 4 in log sigma with the same denoiser, converged to ~1e-9. A sampler's error
is then its discretization error alone. `--reference ddim1000` instead uses our DDIM with 1000
steps (eta 0) from x_T at t=999 (carried on to sigma 0 by the ODE for the sigma-space samplers):
that error also counts where a spacing starts ("leading" 5 steps start at t=801, which alone moves
the result by ~4%) and the 1000-step DDIM's own error (~1e-3). Both are printed for scale.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from machine import RESULTS, machine, write_section  # bench/machine.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.errors import InputError  # noqa: E402
from ldm.cli import run_cli  # noqa: E402
from ldm.diffusion.parameterization import model_target  # noqa: E402
from ldm.diffusion.schedule import NoiseSchedule  # noqa: E402
from ldm.samplers import plan, sample  # noqa: E402

LATENT_SHAPE = (4, 8, 8)
STEPS, QUICK_STEPS = (5, 10, 20, 50), (5, 20)
SCHEDULE = dict(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}  # ours -> diffusers' prediction_type
ODE_STEP = 0.02  # RK4 step in log sigma; half of it changes the reference by ~1e-9 relative
CLEAN_SIGMA = 1e-6  # "sigma 0" for the ODE: D(x, 1e-6) is x to ~1e-12 here
# Errors that differ by less than this fraction of the reference's RMS count as equal: diffusers
# steps in float32, which moves its error by ~1e-7 of the RMS where the algorithms are identical.
TIE = 1e-5


@dataclass(frozen=True)
class GaussianMixture:
    """x0 ~ (1/K) sum_k N(means[k], std^2 I); `posterior_mean` is the ideal denoiser E[x0 | x_t]."""

    means: torch.Tensor  # (K, C, H, W), float64
    std: float

    @classmethod
    def make(cls, *, components: int = 4, std: float = 0.5, seed: int = 0) -> "GaussianMixture":
        """Means drawn from N(0, I) with `seed`: data of about unit variance, like scaled SD latents."""
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.randn((components, *LATENT_SHAPE), generator=generator, dtype=torch.float64), std)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t (B, C, H, W) at alpha_bar (a scalar or one per sample); see the module docstring."""
        x = x_t.reshape(x_t.shape[0], -1)
        means = self.means.reshape(self.means.shape[0], -1)
        a = alpha_bar.reshape(-1, 1)
        var = a * self.std ** 2 + (1 - a)  # variance of x_t given the component
        sq_dist = x.pow(2).sum(1, keepdim=True) - 2 * a.sqrt() * (x @ means.T) + a * means.pow(2).sum(1)
        logits = -sq_dist / (2 * var)
        # log-sum-exp rather than softmax: float64 softmax is ~500x slower on some 2-thread CPU builds.
        weights = (logits - logits.logsumexp(1, keepdim=True)).exp()
        gain = a.sqrt() * self.std ** 2 / var
        # sum_k w_k (mu_k + gain (x - sqrt(a) mu_k)), using sum_k w_k = 1
        return ((1 - gain * a.sqrt()) * (weights @ means) + gain * x).reshape(x_t.shape)


def ideal_model_fn(mixture: GaussianMixture, alphas_cumprod: torch.Tensor, parameterization: str):
    """model_fn(x_t, t) -> the exact eps- or v-prediction of `mixture` at alpha_bar[t], in float64."""
    table = alphas_cumprod.double()

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.double()
        a = table[t.long()].reshape(-1, 1, 1, 1)
        x0 = mixture.posterior_mean(x, a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return model_target(x0, eps, a, parameterization)

    return model_fn


def solve_ode(mixture: GaussianMixture, x: torch.Tensor, sigma_start: float, sigma_end: float,
              step: float = ODE_STEP) -> torch.Tensor:
    """The probability-flow ODE from the VP latent x at sigma_start to the VP latent at sigma_end (0: clean).

    dx/d(log sigma) = x - D(x, sigma) for the VE state x_vp * sqrt(sigma^2 + 1) (Karras et al. 2022,
    eq. 3), integrated with classic RK4 in log sigma.
    """
    def slope(x_ve: torch.Tensor, log_sigma: float) -> torch.Tensor:
        alpha_bar = torch.tensor(1.0 / (math.exp(2 * log_sigma) + 1.0), dtype=torch.float64)
        return x_ve - mixture.posterior_mean(x_ve * alpha_bar.sqrt(), alpha_bar)

    start, stop = math.log(sigma_start), math.log(max(sigma_end, CLEAN_SIGMA))
    n = max(1, math.ceil((start - stop) / step))
    h = (stop - start) / n
    x = x * math.sqrt(sigma_start ** 2 + 1)
    for i in range(n):
        s = start + i * h
        k1 = slope(x, s)
        k2 = slope(x + h / 2 * k1, s + h / 2)
        k3 = slope(x + h / 2 * k2, s + h / 2)
        k4 = slope(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x / math.sqrt(sigma_end ** 2 + 1)


def diffusers_schedulers() -> dict[str, tuple[str, Callable]]:
    """our sampler name -> (diffusers scheduler, factory(prediction_type)), all "leading" with steps_offset 1."""
    try:
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
            HeunDiscreteScheduler,
            PNDMScheduler,
        )
    except ImportError as exc:
        raise InputError(f"this benchmark compares against diffusers, which does not import ({exc}); "
                         "pip install diffusers") from exc
    common = dict(**SCHEDULE, timestep_spacing="leading", steps_offset=1)
    dpm = dict(**common, algorithm_type="dpmsolver++", solver_order=2)
    return {
        "ddim": ("DDIMScheduler", lambda p: DDIMScheduler(**common, prediction_type=p, set_alpha_to_one=False,
                                                          clip_sample=False)),
        "plms": ("PNDMScheduler(skip_prk_steps)", lambda p: PNDMScheduler(
            **common, prediction_type=p, skip_prk_steps=True, set_alpha_to_one=False)),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", lambda p: DPMSolverMultistepScheduler(**dpm, prediction_type=p)),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler(karras)", lambda p: DPMSolverMultistepScheduler(
            **dpm, prediction_type=p, use_karras_sigmas=True)),
        "euler": ("EulerDiscreteScheduler", lambda p: EulerDiscreteScheduler(**common, prediction_type=p)),
        "heun": ("HeunDiscreteScheduler", lambda p: HeunDiscreteScheduler(**common, prediction_type=p)),
    }


def run_diffusers(scheduler, model_fn, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The standard diffusers pipeline loop around `scheduler`, with the same model_fn and x_T as ours."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(round(float(t))), dtype=torch.long)
        output = model_fn(scheduler.scale_model_input(x, t), t_batch)
        x = scheduler.step(output, t, x).prev_sample
    return x.double()


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def no_worse(ours: float, theirs: float, ref_rms: float) -> bool:
    return ours <= theirs + TIE * ref_rms


def format_table(rows: list[dict], steps_list: tuple[int, ...]) -> str:
    """Three lines per (parameterization, sampler): ours, diffusers, max |ours - diffusers|."""
    lines = ["| param | sampler | run | " + " | ".join(f"{s} steps" for s in steps_list) + " | ours <= diffusers |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in steps_list) + " | --- |"]
    for r in rows:
        worse = [s for s, c in zip(steps_list, r["cells"]) if not no_worse(c["ours"], c["theirs"], c["ref_rms"])]
        verdict = "yes, at every step count" if not worse else "NO at " + ", ".join(map(str, worse)) + " steps"
        cell = lambda c, key: f"{c[key]:.2e} ({c[key] / c['ref_rms']:.1e})"  # noqa: E731
        lines.append(f"| {r['param']} | {r['sampler']} | ours | "
                     + " | ".join(cell(c, "ours") for c in r["cells"]) + f" | {verdict} |")
        lines.append(f"| | | diffusers {r['diffusers']} | "
                     + " | ".join(cell(c, "theirs") for c in r["cells"]) + " | |")
        lines.append("| | | max abs(ours - diffusers) | "
                     + " | ".join(f"{c['parity']:.1e}" for c in r["cells"]) + " | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"only {', '.join(map(str, QUICK_STEPS))} steps (default: {', '.join(map(str, STEPS))})")
    p.add_argument("--reference", choices=("ode", "ddim1000"), default="ode",
                   help="exact ODE solution from each sampler's own start, or our 1000-step DDIM from t=999 "
                        "(default: ode)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per solve (default: 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of x_T; the mixture's means always use seed 0 (default: 0)")
    p.add_argument("--out", default=str(RESULTS),
                   help="where the Markdown results go; '' writes nothing (default: bench/RESULTS.md)")
    args = p.parse_args()
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    schedulers = diffusers_schedulers()
    import diffusers

    started = time.perf_counter()
    steps_list = QUICK_STEPS if args.quick else STEPS
    schedule = NoiseSchedule.make("scaled_linear", SCHEDULE["num_train_timesteps"], SCHEDULE["beta_start"],
                                  SCHEDULE["beta_end"])
    all_sigmas = schedule.sigmas  # sigma at each training timestep, from the float32 alpha_bar table
    sigma_first, sigma_last = all_sigmas[-1].item(), all_sigmas[0].item()
    mixture = GaussianMixture.make()
    x_T = torch.randn((args.batch_size, *LATENT_SHAPE), generator=torch.Generator().manual_seed(args.seed),
                      dtype=torch.float64)
    bar = tqdm(total=len(PARAMETERIZATIONS) * len(schedulers) * len(steps_list) + 2, desc="sampler accuracy",
               dynamic_ncols=True)

    # Scale: how good is the ODE reference, and how far is the 1000-step DDIM from it.
    exact_full = solve_ode(mixture, x_T, sigma_first, sigma_last)
    exact_clean = solve_ode(mixture, x_T, sigma_first, 0.0)
    ode_floor = rms(solve_ode(mixture, x_T, sigma_first, 0.0, step=ODE_STEP / 2) - exact_clean) / rms(exact_clean)
    bar.update()
    ddim1000 = {p: sample(ideal_model_fn(mixture, schedule.alphas_cumprod, p), x_T, schedule, sampler="ddim",
                          steps=1000, parameterization=p) for p in PARAMETERIZATIONS}
    ddim1000_error = {p: rms(x - exact_full) / rms(exact_full) for p, x in ddim1000.items()}
    bar.update()

    ode_cache: dict = {}  # (sigma_start, sigma_end) or a parameterization -> solution

    def reference(sampler: str, steps: int, parameterization: str) -> torch.Tensor:
        steps_plan = plan(sampler, schedule, steps)
        # DDIM and PLMS end at alpha_bar[0] (sigma_last), the sigma-space samplers at sigma 0.
        sigma_start, sigma_end = steps_plan.sigmas[0].item(), steps_plan.sigmas[-1].item()
        if args.reference == "ddim1000":
            if sigma_end:
                return ddim1000[parameterization]
            if parameterization not in ode_cache:
                ode_cache[parameterization] = solve_ode(mixture, ddim1000[parameterization], sigma_last, 0.0)
            return ode_cache[parameterization]
        if (sigma_start, sigma_end) not in ode_cache:
            ode_cache[sigma_start, sigma_end] = solve_ode(mixture, x_T, sigma_start, sigma_end)
        return ode_cache[sigma_start, sigma_end]

    rows = []
    for ours_p, diffusers_p in PARAMETERIZATIONS.items():
        model_fn = ideal_model_fn(mixture, schedule.alphas_cumprod, ours_p)
        for name, (diffusers_name, make_scheduler) in schedulers.items():
            row = dict(param=ours_p, sampler=name, diffusers=diffusers_name, cells=[])
            for steps in steps_list:
                target = reference(name, steps, ours_p)
                ours = sample(model_fn, x_T, schedule, sampler=name, steps=steps, parameterization=ours_p)
                theirs = run_diffusers(make_scheduler(diffusers_p), model_fn, x_T, steps)
                row["cells"].append(dict(ours=rms(ours - target), theirs=rms(theirs - target),
                                         parity=(ours - theirs).abs().max().item(), ref_rms=rms(target)))
                bar.update()
            rows.append(row)
    bar.close()

    table = format_table(rows, steps_list)
    failures = [f"{r['param']}/{r['sampler']} at {s} steps ({c['ours']:.6e} vs {c['theirs']:.6e})"
                for r in rows for s, c in zip(steps_list, r["cells"])
                if not no_worse(c["ours"], c["theirs"], c["ref_rms"])]
    verdict = ("Verdict: ours <= diffusers at every step count, for every sampler and parameterization "
               f"(ties within {TIE:.0e} of the reference RMS count as equal)." if not failures else
               f"Verdict: ours is worse than diffusers in {len(failures)} cell(s): {'; '.join(failures)}.")
    if args.reference == "ode":
        about = (f"Reference: exact probability-flow ODE solution (RK4 in log sigma, converged to {ode_floor:.0e} "
                 "relative) from x_T at each sampler's own first noise level to its end point.")
    else:
        about = ("Reference: our DDIM, 1000 steps, eta 0, from x_T at t=999 (carried on to sigma 0 by the ODE "
                 "for the sigma-space samplers).")
    about += (" For scale, the 1000-step DDIM is "
              + ", ".join(f"{ddim1000_error[p]:.1e} ({p})" for p in PARAMETERIZATIONS)
              + " (relative) from the exact solution.")
    print(table, "", about, verdict, sep="\n")
    if args.out:
        command = "python bench/sampler_accuracy.py" + (" --quick" if args.quick else "") + \
            (" --reference ddim1000" if args.reference == "ddim1000" else "")
        text = [
            "## Sampler accuracy: ours vs diffusers on the ideal denoiser of a Gaussian mixture", "",
            f"- command: `{command}` (batch {args.batch_size}, seed {args.seed}), "
            f"{time.perf_counter() - started:.0f} s",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine()}",
            f"- python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
            f"- model: ideal denoiser of a {len(mixture.means)}-component Gaussian mixture in "
            f"{'x'.join(map(str, LATENT_SHAPE))} (means ~ N(0, I), component std {mixture.std}); "
            "schedule scaled_linear 0.00085..0.012, 1000 steps; float64 (diffusers: float32 inside)",
            "- cells: RMS error to the reference (in brackets: relative to the reference's RMS); "
            "see bench/README.md", "", table, "", about, "", verdict, "",
        ]
        write_section("sampler_accuracy" + (" ddim1000" if args.reference == "ddim1000" else ""),
                      "\n".join(text), args.out)


if __name__ == "__main__":
    run_cli(main)
