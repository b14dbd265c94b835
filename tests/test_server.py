"""tools/serve.py against the real A1111 client (`webuiapi`) and raw HTTP: generation, models, progress,
interrupt and skip, embeddings, the queue, bad input of every kind, disconnecting clients, auth, flags and
shutdown."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

import ldm
from ldm.formats.loading import DEFAULT_MODEL
from ldm.text.tokenizer import _bpe

from helpers import REPO, write_default_model_lora
from live_server import start_server


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A models folder with a second checkpoint (the default model under another name), a LoRA folder and an
    embeddings folder: `zqxheart` (A1111 .pt) holds the default model's token vectors of "blue heart", so the
    name in a prompt must draw what those words draw; `wide` is an SD 1.x-width file the model must skip."""
    root = tmp_path_factory.mktemp("server")
    (root / "models").mkdir()
    shutil.copy(DEFAULT_MODEL, root / "models" / "emoji-copy.safetensors")
    (root / "lora").mkdir()
    write_default_model_lora(root / "lora" / "strong.safetensors", seed=3)
    (root / "embeddings").mkdir()
    write_a1111_embedding(root / "embeddings" / "zqxheart.pt", token_vectors("blue heart"))
    write_a1111_embedding(root / "embeddings" / "wide.pt", torch.randn(3, 768))
    return root


def token_vectors(text: str) -> torch.Tensor:
    """The default model's token embeddings of `text`: an embedding of them stands for those words."""
    encoder = ldm.load_model().text_encoder
    return encoder.model.token_embedding.weight[_bpe().encode(text)].detach().clone()


def write_a1111_embedding(path, vectors: torch.Tensor) -> None:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": path.stem, "step": 500, "sd_checkpoint": "c061b48d51", "sd_checkpoint_name": "default"}, path)


@pytest.fixture(scope="module")
def server(folders):
    with start_server("--models-dir", str(folders / "models"), "--lora-dir", str(folders / "lora"),
                      "--embeddings-dir", str(folders / "embeddings"), "--queue-size", "2",
                      "--outdir", str(folders / "out")) as live:
        yield live


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port, steps=8)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(server, route: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{server.api}/{route}", data=data, headers={"content-type": "application/json"},
                         timeout=120, **kwargs)


def test_webuiapi_txt2img_seeds_batches_and_metadata(api):
    """The A1111 client gets 32x32 PNGs with A1111's info (seeds k, k+1, ...), reproducible from the seed,
    each carrying our "parameters" text chunk."""
    result = api.txt2img(prompt="red apple", width=32, height=32, seed=5, batch_size=2, n_iter=2, cfg_scale=5)
    assert len(result.images) == 4 and all(im.size == (32, 32) for im in result.images)
    assert result.info["all_seeds"] == [5, 6, 7, 8] and result.info["seed"] == 5
    assert result.info["sampler_name"] == "Euler a" and len(result.info["infotexts"]) == 4
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert "Steps: 8, Sampler: Euler a, CFG scale: 5.0, Seed: 5, Size: 32x32" in result.info["infotexts"][0]
    assert result.parameters["prompt"] == "red apple"
    again = api.txt2img(prompt="red apple", width=32, height=32, seed=7, cfg_scale=5)
    # image k alone = image k of a batch, to the rounding of batched kernels (`generate`'s promise)
    assert np.abs(pixels(again.image) - pixels(result.images[2])).max() <= 2
    other = api.txt2img(prompt="red apple", width=32, height=32, seed=-1, cfg_scale=5)
    assert 0 <= other.info["seed"] < 2 ** 32


def test_webuiapi_defaults_work_on_the_small_default_model(api):
    """webuiapi sends 512x512 unless told: the 32 px model samples at its native size and upscales (info says
    so), in well under a second rather than minutes."""
    start = time.perf_counter()
    result = api.txt2img(prompt="red heart")
    assert result.image.size == (512, 512)
    assert result.info["extra_generation_params"] == {"sampled_width": 32, "sampled_height": 32}
    assert time.perf_counter() - start < 30


def test_every_listed_sampler_and_the_karras_scheduler_run(api, server):
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "Heun"} <= set(names)
    for name in names:
        result = api.txt2img(prompt="red apple", width=32, height=32, seed=1, steps=3, sampler_name=name)
        assert result.info["sampler_name"] == (name + " Karras" if name == "DPM++ 2M" else name)
    karras = api.txt2img(prompt="red apple", width=32, height=32, seed=1, steps=3, sampler_name="DPM++ 2M",
                         scheduler="Karras")
    automatic = api.txt2img(prompt="red apple", width=32, height=32, seed=1, steps=3, sampler_name="DPM++ 2M")
    plain = api.txt2img(prompt="red apple", width=32, height=32, seed=1, steps=3, sampler_name="DPM++ 2M",
                        scheduler="Uniform")
    # A1111 >= 1.9: DPM++ 2M's automatic schedule is Karras
    assert karras.info["sampler_name"] == automatic.info["sampler_name"] == "DPM++ 2M Karras"
    assert np.array_equal(pixels(karras.image), pixels(automatic.image))
    assert plain.info["sampler_name"] == "DPM++ 2M" and not np.array_equal(pixels(karras.image), pixels(plain.image))
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "uniform", "karras"]


def test_webuiapi_img2img_and_inpainting(api):
    """img2img keeps the init image's layout at low strength; the mask keeps its black part exactly."""
    init = api.txt2img(prompt="red heart", width=32, height=32, seed=2).image.convert("RGB")
    low = api.img2img(images=[init], prompt="red heart", denoising_strength=0.3, width=32, height=32, seed=3)
    assert low.image.size == (32, 32) and low.info["denoising_strength"] == 0.3
    assert "Denoising strength: 0.3" in low.info["infotexts"][0]
    assert np.abs(pixels(low.image) - pixels(init)).mean() < np.abs(pixels(low.image) - 128).mean()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))  # repaint the right half
    painted = api.img2img(images=[init], mask_image=mask, prompt="grinning face", denoising_strength=1.0,
                          width=32, height=32, seed=4)
    out = pixels(painted.image)
    assert np.array_equal(out[:, :16], pixels(init)[:, :16]) and not np.array_equal(out[:, 16:], pixels(init)[:, 16:])


def test_options_models_and_switching(api, server):
    """sd-models lists the default model and the folder's; POST options switches sd_model_checkpoint (as
    webuiapi's util_set_model does) and override_settings switches for one request only."""
    short = hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()[:10]  # A1111's title: name [sha256[:10]]
    titles = api.util_get_model_names()
    assert any(t.startswith("default.safetensors") for t in titles)
    assert "emoji-copy.safetensors" in titles  # not hashed until loaded, as in A1111
    assert api.util_get_current_model().startswith(f"default.safetensors [{short}]")
    result = api.txt2img(prompt="red apple", width=32, height=32, seed=1,
                         override_settings={"sd_model_checkpoint": "emoji-copy", "CLIP_stop_at_last_layers": 2})
    assert result.info["sd_model_name"] == "emoji-copy" and result.info["ignored_settings"] == ["CLIP_stop_at_last_layers"]
    assert api.util_get_current_model().startswith("default.safetensors")  # restored afterwards
    api.util_set_model("emoji-copy.safetensors")
    assert api.get_options()["sd_model_checkpoint"] == f"emoji-copy.safetensors [{short}]"
    api.util_set_model(f"default.safetensors [{short}]")
    assert api.util_get_current_model().startswith("default.safetensors")
    response = post(server, "options", {"sd_model_checkpoint": "no-such-model"})
    assert response.status_code == 422 and response.json()["detail"].startswith("sd_model_checkpoint: no model")


def test_progress_and_interrupt(api, server):
    """/progress reports steps, ETA and a live preview while a job runs; /interrupt stops it at the next step
    and the request returns the batch's latest estimate, as A1111 does."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=api.txt2img(
        prompt="red apple", width=32, height=32, seed=1, steps=100, n_iter=8, sampler_name="DDIM")))
    thread.start()
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 5 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 100 * 8 and seen["eta_relative"] > 0
    assert seen["state"]["job_count"] >= 1
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size == (32, 32)
    assert api.interrupt() == {}
    thread.join(60)
    interrupted = result["r"]
    assert interrupted.info["interrupted"] is True and 1 <= len(interrupted.images) < 8
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["state"]["interrupted"] is True


def test_skip_ends_the_batch_being_sampled_and_goes_on(api, server):
    """/skip (A1111's): the batch being sampled returns its latest estimate, the next batches run in full, and the
    request is not marked interrupted."""
    result = {}
    request = dict(prompt="red apple", width=32, height=32, seed=11, steps=150, sampler_name="DDIM", cfg_scale=5)
    thread = threading.Thread(target=lambda: result.update(r=api.txt2img(n_iter=3, **request)))
    thread.start()
    deadline = time.monotonic() + 30
    progress = f"{server.api}/progress?skip_current_image=true"
    while time.monotonic() < deadline and requests.get(progress, timeout=10).json()["state"]["sampling_step"] < 3:
        time.sleep(0.02)
    api.skip()
    thread.join(120)
    skipped = result["r"]
    assert len(skipped.images) == 3 and skipped.info["interrupted"] is False
    assert skipped.info["all_seeds"] == [11, 12, 13]
    full = [api.txt2img(**{**request, "seed": seed}).image for seed in (11, 12)]
    assert np.array_equal(pixels(skipped.images[1]), pixels(full[1]))  # the next batch ran all its steps
    assert np.abs(pixels(skipped.images[0]) - pixels(full[0])).mean() > 5  # the first stopped early
    assert api.get_progress()["state"]["skipped"] is False
    post(server, "skip", {})  # with nothing running: nothing happens, as in A1111
    assert api.txt2img(**{**request, "seed": 11, "steps": 8}).image.size == (32, 32)


def test_embeddings_listed_applied_and_refreshed(api, server, folders):
    """GET /embeddings in A1111's layout (loaded and skipped, with width, vector count and the .pt's training
    record); a name in the prompt draws its vectors; a file added to the folder is read before the next
    generation; refresh-embeddings rereads at once."""
    listed = api.get_embeddings()
    assert listed["loaded"] == {"zqxheart": {"step": 500, "sd_checkpoint": "c061b48d51",
                                             "sd_checkpoint_name": "default", "shape": 256, "vectors": 2}}
    assert list(listed["skipped"]) == ["wide"] and listed["skipped"]["wide"]["shape"] == 768
    named = api.txt2img(prompt="zqxheart", width=32, height=32, seed=4, cfg_scale=5)
    words = api.txt2img(prompt="blue heart", width=32, height=32, seed=4, cfg_scale=5)
    plain = api.txt2img(prompt="zqxapple", width=32, height=32, seed=4, cfg_scale=5)
    assert np.array_equal(pixels(named.image), pixels(words.image))
    digest = hashlib.sha256((folders / "embeddings" / "zqxheart.pt").read_bytes()).hexdigest()[:10]
    assert f'TI hashes: "zqxheart: {digest}"' in named.info["infotexts"][0]
    assert "TI hashes" not in words.info["infotexts"][0]
    assert not np.array_equal(pixels(named.image), pixels(plain.image))
    added = folders / "embeddings" / "zqxapple.safetensors"
    from safetensors.torch import save_file
    save_file({"emb_params": token_vectors("red apple")}, added)
    try:
        apple = api.txt2img(prompt="zqxapple", width=32, height=32, seed=4, cfg_scale=5)
        assert np.array_equal(pixels(apple.image), pixels(api.txt2img(prompt="red apple", width=32, height=32,
                                                                         seed=4, cfg_scale=5).image))
        assert api.get_embeddings()["loaded"]["zqxapple"]["step"] is None
    finally:
        added.unlink()
    assert post(server, "refresh-embeddings", {}).status_code == 200
    assert set(api.get_embeddings()["loaded"]) == {"zqxheart"}


def test_cmd_flags_report_the_command_line(api, server, folders):
    flags = api.get_cmd_flags()
    assert flags["embeddings_dir"] == str(folders / "embeddings") and flags["lora_dir"] == str(folders / "lora")
    assert flags["ckpt_dir"] == flags["models_dir"] == str(folders / "models")
    assert flags["port"] == server.port and flags["api"] is True and flags["queue_size"] == 2
    assert flags["api_auth"] is None


def test_png_info_reads_our_parameters(api):
    """webuiapi's png_info (which re-encodes the image with its text chunks) gets A1111's parse of our text."""
    image = api.txt2img(prompt="red, apple", negative_prompt="blurry", width=32, height=32, seed=11).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"]
    parsed = info.parameters
    assert parsed["Prompt"] == "red, apple" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Steps"], parsed["Seed"], parsed["Size-1"], parsed["Sampler"]) == (8, 11, 32, "Euler a")
    assert "ldm" in info.json["items"]


def test_loras_listed_and_applied_from_the_prompt(api, server):
    assert [lora["name"] for lora in api.get_loras()] == ["strong"]
    plain = api.txt2img(prompt="red apple", width=32, height=32, seed=1)
    tagged = api.txt2img(prompt="red apple <lora:strong:1>", width=32, height=32, seed=1)
    assert "Lora hashes: \"strong: " in tagged.info["infotexts"][0]
    assert not np.array_equal(pixels(plain.image), pixels(tagged.image))
    again = api.txt2img(prompt="red apple", width=32, height=32, seed=1)
    assert np.array_equal(pixels(again.image), pixels(plain.image))  # unmerged exactly for the next request
    response = post(server, "txt2img", {"prompt": "x <lora:missing:1>", "width": 32, "height": 32})
    assert response.status_code == 422 and response.json()["detail"].startswith("prompt: <lora:missing>")


BAD = [  # (route, body, status, start of the one-line detail)
    ("txt2img", '{"prompt": "x",', 400, "body: not valid JSON"),
    ("txt2img", "[1, 2]", 422, "body: Input should be a valid dictionary"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"width": 33}, 422, "width: 33 is not a multiple of 16"),
    ("txt2img", {"width": 4096, "height": 4096}, 422, "width x height: 4096x4096 is more than"),
    ("txt2img", {"steps": 100000}, 422, "steps: must be from 1 to 150"),
    ("txt2img", {"sampler_name": "LMS Karras"}, 422, "sampler_name: unknown sampler 'LMS Karras'"),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Karras"}, 422, "scheduler: 'Karras' is available"),
    ("txt2img", {"batch_size": 10, "n_iter": 10}, 422, "batch_size x n_iter: 100 images"),
    ("txt2img", {"cfg_scale": "nan"}, 422, "cfg_scale: must be a number"),
    ("txt2img", {"seed": -5}, 422, "seed: must be -1"),
    ("txt2img", {"enable_hr": True}, 422, "enable_hr: the hires fix"),
    ("img2img", {"init_images": []}, 422, "init_images: empty"),
    ("img2img", {"init_images": ["not base64!!"]}, 422, "init_images[0]: not valid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not an image").decode()]}, 422,
     "init_images[0]: not an image"),
    ("img2img", {"init_images": ["data:image/png;base64,"]}, 422, "init_images[0]: empty"),
    ("img2img", {"init_images": [png_b64(Image.new("RGB", (32, 32)))], "mask": png_b64(Image.new("L", (16, 16)))},
     422, "mask: 16x16, but init_images[0] is 32x32"),
    ("img2img", {"init_images": [png_b64(Image.new("RGB", (32, 32)))], "denoising_strength": 0}, 422,
     "denoising_strength: must be in (0, 1]"),
    ("png-info", {"image": 5}, 422, "image: missing"),
    ("options", {"ldm_max_steps": -1}, 422, "ldm_max_steps: must be a positive number"),
]


@pytest.mark.parametrize("route, body, status, detail", BAD, ids=[f"{r}-{d.split(':')[0]}" for r, _, _, d in BAD])
def test_bad_input_is_one_line_naming_the_field(server, route, body, status, detail):
    response = post(server, route, body)
    assert response.status_code == status, response.text
    message = response.json()["detail"]
    assert message.startswith(detail) and "\n" not in message and "Traceback" not in response.text


def test_the_worker_survives_bad_input_and_huge_bodies(server, api):
    """A body declared at 200 MB is refused from its header (413) before it is read; the worker goes on."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {200 << 20}\r\n\r\n".encode() + b"x" * 100)
        reply = b""
        while b"limit" not in reply and (chunk := s.recv(65536)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "more than the server's limit" in reply
    assert api.txt2img(prompt="red apple", width=32, height=32, seed=1).image.size == (32, 32)
    assert "Traceback" not in server.text()


def test_full_queue_answers_503_with_retry_after_and_loses_nothing(server):
    """queue-size 2: of 8 simultaneous long requests, one runs, two wait, the rest get 503 + Retry-After; every
    request gets exactly one answer, and every 200 has its own seed's image."""
    answers: dict[int, requests.Response] = {}

    def call(k: int) -> None:
        answers[k] = post(server, "txt2img", {"prompt": "red apple", "width": 32, "height": 32, "steps": 60,
                                              "seed": 100 + k})

    threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 8
    codes = sorted(r.status_code for r in answers.values())
    assert set(codes) == {200, 503} and 3 <= codes.count(200) <= 7, codes
    for k, response in answers.items():
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1 and "queue is full" in response.json()["detail"]
        else:
            assert json.loads(response.json()["info"])["all_seeds"] == [100 + k]


def test_a_client_that_disconnects_is_dropped_from_the_queue(server, api):
    """A queued request whose client hangs up never runs; the running one is interrupted; the server goes on."""
    completed = api.get_progress()["state"]["job_no"]
    body = json.dumps({"prompt": "red apple", "width": 32, "height": 32, "steps": 150, "n_iter": 4})
    sockets = []
    for _ in range(2):  # the first runs, the second waits; then both clients hang up
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        sockets.append(s)
        time.sleep(0.5)
    for s in sockets:
        s.close()
    deadline = time.monotonic() + 30
    while api.get_progress()["state"]["job_count"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.get_progress()["state"]["job_count"] == 0
    assert api.get_progress()["state"]["job_no"] == completed + 1  # the waiting one never ran
    assert "dropped queued txt2img" in server.text()
    assert api.txt2img(prompt="red apple", width=32, height=32, seed=1).image.size == (32, 32)


def test_save_images_writes_numbered_pngs(server, folders):
    response = post(server, "txt2img", {"prompt": "red apple", "width": 32, "height": 32, "save_images": True,
                                        "send_images": False, "batch_size": 2, "seed": 1})
    assert response.status_code == 200 and response.json()["images"] == []
    written = sorted((folders / "out" / "samples").glob("*.png"))
    assert [p.name for p in written] == ["00000.png", "00001.png"]
    assert "Seed: 2" in Image.open(written[1]).info["parameters"]


def test_api_auth_and_page(tmp_path):
    """--api-auth guards the API and the page (401 with a Basic challenge); webuiapi logs in with it."""
    with start_server("--api-auth", "me:secret,other:pw") as live:
        response = requests.get(f"{live.api}/options", timeout=10)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(live.url + "/", auth=("me", "wrong"), timeout=10).status_code == 401
        page = requests.get(live.url + "/", auth=("me", "secret"), timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        api = webuiapi.WebUIApi(port=live.port, username="other", password="pw", steps=4)
        assert api.txt2img(prompt="red apple", width=32, height=32).image.size == (32, 32)
        assert requests.get(live.url + "/docs", auth=("me", "secret"), timeout=10).status_code == 200
        flags = requests.get(f"{live.api}/cmd-flags", auth=("me", "secret"), timeout=10)
        assert flags.json()["api_auth"] == "(set)" and "secret" not in flags.text  # never the password


def test_sigterm_interrupts_the_running_job_and_exits_cleanly():
    with start_server() as live:
        answer = {}
        body = {"prompt": "red apple", "width": 32, "height": 32, "steps": 150, "n_iter": 16}
        thread = threading.Thread(target=lambda: answer.update(r=post(live, "txt2img", body)))
        thread.start()
        time.sleep(2)
        start = time.monotonic()
        live.process.terminate()
        assert live.process.wait(30) == 0
        assert time.monotonic() - start < 15
        thread.join(30)
        assert "stopped" in live.text() and "Traceback" not in live.text()
        assert answer["r"].status_code == 200 and json.loads(answer["r"].json()["info"])["interrupted"] is True


def test_listen_without_auth_warns_and_a_busy_port_is_one_line():
    with start_server("--listen") as live:
        assert "anyone on the network can use this server" in live.text()
        busy = subprocess.run([sys.executable, str(REPO / "tools" / "serve.py"), "--port", str(live.port)],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{live.port}")
