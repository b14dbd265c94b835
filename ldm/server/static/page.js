/*
 * latent-diffusion-kit web page: text-to-image and image-to-image against the
 * AUTOMATIC1111-compatible API served by tools/serve.py (plain JS, no build step).
 *
 * Routes used:
 *   GET  /sdapi/v1/options     model title, native size, size multiple, limits
 *   GET  /sdapi/v1/samplers    the sampler <select>
 *   POST /sdapi/v1/txt2img     generate (no init image chosen)
 *   POST /sdapi/v1/img2img     generate from the chosen init image (data URL) and denoising strength
 *   GET  /sdapi/v1/progress?skip_current_image=true   polled every 300 ms while a request runs
 *   POST /sdapi/v1/interrupt   the Interrupt button
 * Results go to the top of #gallery with their A1111 parameters text (info.infotexts) and seed;
 * server errors ({"detail": ...}) go to #error. Ctrl+Enter (Cmd+Enter) generates.
 */
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
const MIN_DISPLAY_PX = 192;  // small images are scaled up (pixelated) to at least this width
let initImage = null;        // data URL of the chosen init image, or null for txt2img
let running = false;
let runId = 0;               // bumps per request, so a stale progress poll stops itself

/* Fetch JSON; on a non-2xx answer throw an Error carrying the server's one-line `detail`. */
async function api(path, body) {
  const opts = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error(`Cannot reach the server (${e.message}).`);
  }
  const data = await res.json().catch(() => null);
  if (res.ok) return data;
  let detail = data && data.detail !== undefined ? data.detail : res.statusText;
  if (Array.isArray(detail)) {  // FastAPI validation list: [{loc, msg}, ...]
    detail = detail.map((d) => `${(d.loc || []).filter((l) => l !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  if (res.status === 503) {
    const after = res.headers.get("Retry-After");
    detail = `The server's queue is full; retry ${after ? `in ${after} s` : "shortly"}. (${detail})`;
  }
  throw new Error(String(detail || `HTTP ${res.status}`));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

/* A number field's value as a number, or the raw text when it does not parse (the server reports it). */
function num(id) {
  const raw = $(id).value.trim();
  return raw !== "" && Number.isFinite(Number(raw)) ? Number(raw) : raw;
}

/* Fill the model name, size defaults/step and the sampler list from the server. */
async function loadSettings() {
  try {
    const [options, samplers] = await Promise.all([api("/sdapi/v1/options"), api("/sdapi/v1/samplers")]);
    $("model").textContent = options.sd_model_checkpoint || "(unknown)";
    const multiple = options.ldm_size_multiple || 8;
    for (const [id, key] of [["width", "ldm_default_width"], ["height", "ldm_default_height"]]) {
      $(id).step = $(id).min = multiple;
      if (options[key]) $(id).value = options[key];
    }
    if (options.ldm_max_steps) $("steps").max = options.ldm_max_steps;
    if (options.ldm_max_images) $("batch_size").max = options.ldm_max_images;
    const select = $("sampler");
    select.replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
    const preferred = samplers.find((s) => s.name === "Euler a");
    if (preferred) select.value = preferred.name;
  } catch (e) {
    showError(`Could not load the server's settings: ${e.message}`);
  }
}

/* Poll progress while a request runs: bar value, "Step x/y", ETA. */
async function pollProgress(id) {
  if (id !== runId) return;
  try {
    const p = await api("/sdapi/v1/progress?skip_current_image=true");
    if (id !== runId) return;
    const s = p.state || {};
    $("progress").value = p.progress || 0;
    const parts = [];
    if (s.sampling_steps) parts.push(`Step ${s.sampling_step}/${s.sampling_steps}`);
    if (s.job_count > 1) parts.push(`${s.job_count} jobs`);
    if (p.eta_relative > 0) parts.push(`ETA ${p.eta_relative.toFixed(1)} s`);
    $("progress_text").textContent = parts.join(" · ") || (p.textinfo || "Waiting…");
  } catch (e) { /* a missed poll is harmless; the next one retries */ }
  if (id === runId) setTimeout(pollProgress, POLL_MS, id);
}

/* One gallery card: the image (scaled up and pixelated when small), seed, download link, parameters. */
function resultCard(b64, infotext, seed, index) {
  const fig = document.createElement("figure");
  fig.className = "card";
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = infotext.split("\n")[0] || "generated image";
  img.addEventListener("load", () => {
    const w = img.naturalWidth;
    const scale = w < MIN_DISPLAY_PX ? Math.ceil(MIN_DISPLAY_PX / w) : 1;
    img.classList.toggle("pixelated", scale > 1);
    fig.style.setProperty("--w", `${w * scale}px`);
  });
  const caption = document.createElement("figcaption");
  const meta = document.createElement("div");
  meta.className = "meta";
  const seedText = document.createElement("span");
  seedText.className = "seed";
  seedText.textContent = `Seed ${seed}`;
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `${seed}-${index}.png`;
  link.textContent = "Save";
  meta.append(seedText, link);
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = infotext;
  caption.append(meta, params);
  fig.append(img, caption);
  return fig;
}

/* Send the form to txt2img (or img2img when an init image is chosen) and show the results. */
async function generate() {
  if (running) return;
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: num("width"), height: num("height"), steps: num("steps"),
    sampler_name: $("sampler").value, cfg_scale: num("cfg_scale"), seed: num("seed"),
    batch_size: num("batch_size"), n_iter: 1,
  };
  let route = "/sdapi/v1/txt2img";
  if (initImage) {
    route = "/sdapi/v1/img2img";
    body.init_images = [initImage];
    body.denoising_strength = Number($("denoising_strength").value);
  }
  running = true;
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("progress_text").textContent = "Starting…";
  const started = performance.now();
  const id = ++runId;
  setTimeout(pollProgress, POLL_MS, id);
  try {
    const result = await api(route, body);
    const info = typeof result.info === "string" ? JSON.parse(result.info) : (result.info || {});
    const seeds = info.all_seeds || [];
    const texts = info.infotexts || [];
    const cards = (result.images || []).map((b64, i) => resultCard(b64, texts[i] || "", seeds[i] ?? info.seed, i));
    const empty = $("gallery").querySelector(".empty");
    if (empty) empty.remove();
    $("gallery").prepend(...cards);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("progress").value = 1;
    const stopped = info.interrupted ? " (interrupted)" : "";
    $("progress_text").textContent = `${cards.length} image${cards.length === 1 ? "" : "s"} in ${seconds} s${stopped}`;
  } catch (e) {
    showError(e.message);
    $("progress").value = 0;
    $("progress_text").textContent = "";
  } finally {
    runId++;
    running = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

/* Read a chosen init image as a data URL (img2img); clearing it returns to txt2img. */
function chooseInitImage() {
  const file = $("init_image").files[0];
  if (!file) return clearInitImage();
  const reader = new FileReader();
  reader.onload = () => {
    initImage = reader.result;
    $("init_preview").src = initImage;
    $("init_preview").hidden = $("init_clear").hidden = false;
  };
  reader.onerror = () => showError(`Could not read ${file.name}.`);
  reader.readAsDataURL(file);
}

function clearInitImage() {
  initImage = null;
  $("init_image").value = "";
  $("init_preview").removeAttribute("src");
  $("init_preview").hidden = $("init_clear").hidden = true;
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
$("interrupt").addEventListener("click", () => {
  api("/sdapi/v1/interrupt", {}).catch((e) => showError(e.message));
  $("progress_text").textContent = "Interrupting…";
});
$("init_image").addEventListener("change", chooseInitImage);
$("init_clear").addEventListener("click", clearInitImage);
$("denoising_strength").addEventListener("input", (e) => {
  $("denoising_value").textContent = Number(e.target.value).toFixed(2);
});
loadSettings();
