"""The names the command lines offer as choices, as plain data: `--help` and the flag checks read them
before torch or any model code loads (`tests/test_startup.py` holds every tool's `--help` to that).

Each list has its one home here. The module that implements the names imports its list from here
(`ldm.denoisers.attention.BACKENDS` is `ATTENTION_BACKENDS`) or checks its registry against it
(`ldm.samplers.SAMPLERS`, `ldm.samplers.discretization.SPACINGS`): a sampler or spacing added there
is added here too, in the same order.
"""

# ldm.samplers.SAMPLERS, in its order: the --sampler choices
SAMPLER_NAMES = ("ddim", "plms", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "heun")
# ldm.samplers.discretization.SPACINGS (diffusers' names, and sgm's): the --timestep-spacing choices
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "sgm")
# ldm.denoisers.attention's kernels: the --attention choices
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
