"""Start-up: what a command imports before its first step. `--help` of every tool loads no torch and no other
heavy package; the default model's txt2img run loads none of the packages it does not use (open_clip,
webdataset, torchvision, tensorboard, diffusers); `import ldm` is light and its names still work. And the
light stand-ins that make this so (the choices lists, the CLIP tokenizer, the small text tower) equal what
they stand in for. Seconds are measured by bench/startup.py, not here: these tests check module sets.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
# Never needed to answer --help: torch and everything that imports it, and the web stack.
HEAVY = {"torch", "webdataset", "open_clip", "tensorboard", "torchvision", "diffusers", "transformers", "timm",
         "uvicorn", "fastapi"}
# Imported by nothing the default model's text-to-image needs.
UNUSED_BY_DEFAULT_MODEL = {"webdataset", "open_clip", "torchvision", "tensorboard", "diffusers", "transformers",
                           "timm", "uvicorn", "fastapi"}

RUN_TOOL = """
import json, runpy, sys
sys.argv = {argv!r}
code = 0
try:
    runpy.run_path({tool!r}, run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("\\nMODULES " + json.dumps([code, sorted(sys.modules)]))
"""


def run_tool(tool: str, *args: str) -> tuple[int, set[str], str]:
    """(exit code, modules imported, stdout) of `tools/TOOL ARGS` in a fresh interpreter."""
    path = str(REPO / "tools" / tool)
    script = RUN_TOOL.format(argv=[path, *args], tool=path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert "\nMODULES " in result.stdout, result.stderr
    output, line = result.stdout.rsplit("\nMODULES ", 1)
    code, modules = json.loads(line)
    return code, set(modules), output


def packages(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_before_any_heavy_import(tool):
    code, modules, output = run_tool(tool, "--help")
    modules = packages(modules)
    assert code == 0 and output.startswith("usage:")
    assert not modules & HEAVY, f"{tool} --help imported {sorted(modules & HEAVY)}"


def test_a_bad_flag_is_refused_before_torch_loads():
    code, modules, _ = run_tool("txt2img.py", "--prompt", "x", "--steps", "0")
    assert code == 2 and "torch" not in packages(modules)


def test_default_model_txt2img_imports_only_what_it_uses(tmp_path):
    code, modules, output = run_tool("txt2img.py", "--prompt", "red apple", "--steps", "2", "--outdir", str(tmp_path))
    assert code == 0 and (tmp_path / "samples" / "00000.png").is_file(), output
    unused = packages(modules) & UNUSED_BY_DEFAULT_MODEL
    assert "torch" in modules and not unused, sorted(unused)
    # torch._dynamo (and sympy with it): over 1 s of CPU; loading initialises no meta parameters (common.checkpoint)
    assert "torch._dynamo" not in modules and "sympy" not in modules


def test_import_ldm_is_light_and_its_names_load_on_first_use():
    out = python("""
import sys
import ldm
print("torch" in sys.modules)
print(ldm.InputError.__module__, "torch" in sys.modules)
model_class = ldm.LatentDiffusion          # the first heavy name loads the package as the eager one did
print(all(hasattr(model_class, name) for name in ("generate", "load_lora", "unload_loras", "loras")))
print(ldm.load_model.__module__, ldm.samplers.__name__, ldm.formats.loading.__name__, ldm.training.__name__)
try:
    ldm.no_such_name
except AttributeError as exc:
    print("AttributeError", exc)
""").splitlines()
    assert out[:3] == ["False", "common.errors False", "True"]
    assert out[3] == "ldm.formats.loading ldm.samplers ldm.formats.loading ldm.training"
    assert out[4].startswith("AttributeError")


def test_a_module_imported_first_still_gets_the_add_ons_from_the_package():
    # `from ldm.model import ...` alone attaches nothing (as before: then the package had loaded them); the
    # package's attributes, any of them, load the add-ons (ldm.pipeline: generate, ldm.lora: load_lora).
    out = python("""
from ldm.model import LatentDiffusion
import ldm
ldm.formats
print(hasattr(LatentDiffusion, "generate"), hasattr(LatentDiffusion, "load_lora"))
""")
    assert out.split() == ["True", "True"]


def test_generation_flags_do_not_load_torch():
    out = python("""
import argparse, sys
from ldm.cli import HelpFormatter, pick_device
from ldm.cli.flags import add_generation_args
p = argparse.ArgumentParser(formatter_class=HelpFormatter)
add_generation_args(p, outdir="x")
p.format_help()
print("torch" in sys.modules, pick_device("cpu"), "torch" in sys.modules)
""")
    assert out.split() == ["False", "cpu", "True"]


def test_each_choices_list_is_its_registrys_names():
    from common.choices import ATTENTION_BACKENDS, SAMPLER_NAMES, TIMESTEP_SPACINGS
    from ldm import samplers
    from ldm.cli import generate
    from ldm.cli.flags import add_generation_args
    from ldm.denoisers import attention
    from ldm.samplers.discretization import SPACINGS

    assert tuple(samplers.SAMPLERS) == SAMPLER_NAMES and tuple(SPACINGS) == TIMESTEP_SPACINGS
    assert attention.BACKENDS is ATTENTION_BACKENDS
    assert generate.add_generation_args is add_generation_args  # still importable from where it was


def test_serve_help_shows_the_servers_limits():
    from ldm.server.jobs import Limits

    _, _, output = run_tool("serve.py", "--help")
    text = " ".join(output.split())
    for flag, name in (("--max-pixels", "max_pixels"), ("--max-steps", "max_steps"), ("--max-images", "max_images"),
                       ("--native-scale-limit", "native_scale_limit")):
        after = text.split(f"{flag} {name.upper()} ", 1)[1]
        assert f"(default: {getattr(Limits, name)})" in after.split(" --", 1)[0], flag


# --- the stand-ins equal what they stand in for ----------------------------------------------------------

def test_clip_bpe_equals_open_clips_tokenizer():
    import random
    import string

    from open_clip.tokenizer import SimpleTokenizer

    from ldm.text.bpe import CLIPBPE

    ours, theirs = CLIPBPE(), SimpleTokenizer()
    assert ours.encoder == theirs.encoder and ours.bpe_ranks == theirs.bpe_ranks
    texts = ["red apple", "", "  A photo of   a CAT!!  ", "flag: Japan", "<start_of_text>hi<end_of_text>",
             "naïve café &amp; crème brûlée", "日本語のテキスト", "emoji 😀🍎🇯🇵", "it's we'll they'd I'M", "x" * 300,
             "Ã©tÃ© mojibake", "&lt;b&gt;bold&lt;/b&gt;", "tab\tnew\nline", "(masterpiece:1.2), [blurry]", "12 3.14"]
    rng = random.Random(0)
    alphabet = string.printable + "éüßçñ中文😀🍎—…’"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_small_text_tower_equals_open_clips(quick_gelu):
    from ldm.text.encoders import OpenCLIPTextEncoder, SmallTextEncoder
    from ldm.text.tokenizer import VOCAB_SIZE

    sizes = {"width": 64, "layers": 2, "heads": 4, "context_length": 24}
    torch.manual_seed(0)
    ours = SmallTextEncoder(quick_gelu=quick_gelu, **sizes)
    after_ours = torch.rand(4)
    torch.manual_seed(0)
    theirs = OpenCLIPTextEncoder({**sizes, "vocab_size": VOCAB_SIZE}, quick_gelu=quick_gelu, layer="last",
                                 trainable=True)
    assert torch.equal(after_ours, torch.rand(4))  # the same random numbers drawn in building them
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = ours.tokenize(["red apple", "", "a photo of a cat"])
    ours(tokens).square().mean().backward()  # training mode, as the default model trained
    theirs(tokens).square().mean().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad():
        assert torch.equal(ours.eval()(tokens), theirs.eval()(tokens))


def test_empty_parameters_skips_only_the_initialisation_of_meta_parameters():
    from common.checkpoint import empty_parameters

    with empty_parameters():
        layer = torch.nn.Linear(4, 4)  # its init runs on a meta weight: skipped
        real = torch.nn.init.normal_(torch.zeros(3))  # a real tensor's still runs
        buffer = torch.zeros(2).fill_(3.0)
    assert layer.weight.is_meta and layer.bias.is_meta
    assert real.abs().sum() > 0 and buffer.tolist() == [3.0, 3.0]


def test_generation_commands_end_without_the_final_collection():
    out = python("""
import atexit, gc
from ldm.cli import end_without_final_collection
end_without_final_collection()
end_without_final_collection()
print(gc.get_freeze_count() == 0)
atexit._run_exitfuncs()  # what the interpreter runs at exit, before its last collections
print(gc.get_freeze_count() > 0)
""")
    assert out.split() == ["True", "True"]
    for tool in ("txt2img.py", "img2img.py"):
        assert "end_without_final_collection()" in (REPO / "tools" / tool).read_text()
