// onnx-explain's page: plain JS, no build step. Talks to the JSON API under v1/.
"use strict";

const CAM_METHODS = [
  "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "guided_gradcam",
  "scorecam", "ablationcam", "eigencam", "eigengradcam",
];
// Methods that take long enough to stream their progress (NDJSON events) into the bar.
const STREAMED_METHODS = [
  "occlusion", "smoothgrad", "integrated_gradients", "rise", "lime", "kernelshap", "scorecam",
];
const TOP_K = 5;
const OVERLAY_ALPHA = 0.5;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"),
  model: $("model"),
  dropzone: $("dropzone"),
  dropzoneText: $("dropzone-text"),
  file: $("file"),
  method: $("method"),
  target: $("target"),
  layer: $("layer"),
  run: $("run"),
  status: $("status"),
  progress: $("progress"),
  error: $("error"),
  image: $("image"),
  heatmap: $("heatmap"),
  overlay: $("overlay"),
  predictions: $("predictions"),
  timings: $("timings"),
};

const state = {
  imageData: null, // the file as a data: URL, sent as is (the service accepts the prefix)
  generation: 0, // bumped when the model or the image changes; stale answers are dropped
};

// --- the service -----------------------------------------------------------------------------

async function api(path, body) {
  const init = body === undefined
    ? {}
    : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error(`Cannot reach the service: ${err.message}`);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // not JSON: the status line will have to do
  }
  if (!response.ok) {
    const message = payload && payload.error && payload.error.message;
    throw new Error(message || `${response.status} ${response.statusText}`);
  }
  return payload;
}

// POST with "stream": true; `onProgress(done, total)` for each progress line, then the answer.
async function streamed(path, body, onProgress) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/x-ndjson" },
      body: JSON.stringify({ ...body, stream: true }),
    });
  } catch (err) {
    throw new Error(`Cannot reach the service: ${err.message}`);
  }
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    const message = payload && payload.error && payload.error.message;
    throw new Error(message || `${response.status} ${response.statusText}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines.filter((l) => l.trim())) {
      const event = JSON.parse(line);
      if (event.error) throw new Error(event.error.message);
      if (event.result) return event.result;
      onProgress(event.done, event.total);
    }
  }
  throw new Error("The service closed the stream before answering");
}

function showProgress(done, total) {
  ui.progress.hidden = false;
  ui.progress.max = total;
  ui.progress.value = done;
  ui.progress.dataset.done = String(done);
  ui.progress.dataset.total = String(total);
}

const modelPath = (name) => `v1/models/${encodeURIComponent(name)}`;

// --- messages --------------------------------------------------------------------------------

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

function setBusy(text) {
  ui.status.textContent = text;
  if (!text) ui.progress.hidden = true;
  ui.run.disabled = Boolean(text) || !ui.model.value || !state.imageData;
}

// --- colormap --------------------------------------------------------------------------------

// Jet, as OpenCV's COLORMAP_JET: dark blue (0) to dark red (255), interpolated between stops.
const JET_STOPS = [
  [0.0, [0, 0, 128]],
  [0.125, [0, 0, 255]],
  [0.375, [0, 255, 255]],
  [0.625, [255, 255, 0]],
  [0.875, [255, 0, 0]],
  [1.0, [128, 0, 0]],
];

const JET = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let v = 0; v < 256; v++) {
    const t = v / 255;
    let i = 0;
    while (i < JET_STOPS.length - 2 && t > JET_STOPS[i + 1][0]) i++;
    const [t0, c0] = JET_STOPS[i];
    const [t1, c1] = JET_STOPS[i + 1];
    const f = (t - t0) / (t1 - t0);
    for (let c = 0; c < 3; c++) lut[v * 3 + c] = Math.round(c0[c] + f * (c1[c] - c0[c]));
  }
  return lut;
})();

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("The browser could not decode the heatmap PNG."));
    img.src = src;
  });
}

// Draws the grayscale heatmap PNG recoloured through JET into `canvas`.
async function drawHeatmap(canvas, pngBase64) {
  const gray = await loadImage(`data:image/png;base64,${pngBase64}`);
  canvas.width = gray.naturalWidth;
  canvas.height = gray.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(gray, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const v = data[i] * 3;
    data[i] = JET[v];
    data[i + 1] = JET[v + 1];
    data[i + 2] = JET[v + 2];
    data[i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
}

// The image, then the coloured heatmap on top at OVERLAY_ALPHA, at the image's size.
function drawOverlay(canvas, image, heatmap) {
  const width = image.naturalWidth || heatmap.width;
  const height = image.naturalHeight || heatmap.height;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  if (image.naturalWidth) ctx.drawImage(image, 0, 0, width, height);
  ctx.globalAlpha = OVERLAY_ALPHA;
  ctx.drawImage(heatmap, 0, 0, width, height);
  ctx.globalAlpha = 1;
}

function clearCanvas(canvas) {
  canvas.width = 0;
  canvas.height = 0;
  delete canvas.dataset.ready;
}

// --- models ----------------------------------------------------------------------------------

async function loadModels() {
  try {
    const { models } = await api("v1/models");
    const ready = models.filter((m) => m.ready);
    if (!ready.length) {
      if (models.some((m) => m.state === "loading")) {
        ui.status.textContent = "Models are loading…";
        setTimeout(loadModels, 1000);
        return;
      }
      showError("No model is ready in this service's repository.");
      return;
    }
    ui.model.replaceChildren(...ready.map((m) => new Option(m.name, m.name)));
    ui.status.textContent = "";
    await modelChanged();
  } catch (err) {
    showError(err.message);
  }
}

async function modelChanged() {
  state.generation++;
  clearError();
  clearResults();
  const name = ui.model.value;
  ui.layer.replaceChildren(new Option("model default", ""));
  try {
    const info = await api(modelPath(name));
    if (name !== ui.model.value) return;
    for (const layer of info.layers) {
      const text = layer.name === info.default_layer ? `${layer.name} (default)` : layer.name;
      ui.layer.append(new Option(`${text} — ${layer.op_type} ${layer.shape.join("×")}`, layer.name));
    }
  } catch (err) {
    showError(err.message);
  }
  if (state.imageData) await predict();
  setBusy("");
}

// --- the image -------------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

async function imageChosen(file) {
  if (!file) return;
  state.generation++;
  clearError();
  clearResults();
  ui.dropzoneText.textContent = `${file.name} (drop or click to change)`;
  try {
    state.imageData = await readFile(file);
  } catch (err) {
    state.imageData = null;
    showError(err.message);
    return;
  }
  ui.image.hidden = false;
  ui.image.src = state.imageData;
  await predict();
}

function clearResults() {
  clearCanvas(ui.heatmap);
  clearCanvas(ui.overlay);
  ui.predictions.replaceChildren();
  ui.timings.textContent = "";
  ui.target.replaceChildren(new Option("choose an image first", ""));
  ui.target.disabled = true;
}

function showPredictions(predictions) {
  ui.predictions.replaceChildren(
    ...predictions.map((p) => {
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${(p.score * 100).toFixed(1)}%`;
      li.append(label, " ", score);
      return li;
    }),
  );
}

async function predict() {
  if (!ui.model.value) return;
  const generation = state.generation;
  setBusy("Classifying…");
  try {
    const answer = await api(`${modelPath(ui.model.value)}/predict`, {
      image: state.imageData,
      top_k: TOP_K,
    });
    if (generation !== state.generation) return;
    showPredictions(answer.predictions);
    ui.target.replaceChildren(
      ...answer.predictions.map(
        (p, i) => new Option(`${p.label} (${(p.score * 100).toFixed(1)}%)`, String(p.index), i === 0, i === 0),
      ),
    );
    ui.target.disabled = false;
  } catch (err) {
    if (generation === state.generation) showError(err.message);
  } finally {
    if (generation === state.generation) setBusy("");
  }
}

// --- explain ---------------------------------------------------------------------------------

function methodParams(method) {
  const params = {};
  const number = (id) => {
    const value = $(id).valueAsNumber;
    return Number.isFinite(value) ? value : undefined;
  };
  if (CAM_METHODS.includes(method) && ui.layer.value) params.layer = ui.layer.value;
  if (method === "occlusion") {
    params.window = number("window");
    params.stride = number("stride");
  }
  if (method === "smoothgrad") {
    params.samples = number("samples");
    params.noise = number("noise");
  }
  if (method === "integrated_gradients") {
    params.steps = number("steps");
    params.baseline = $("baseline").value;
  }
  for (const key of Object.keys(params)) if (params[key] === undefined) delete params[key];
  return params;
}

function showMethodParams() {
  for (const fieldset of document.querySelectorAll("fieldset.params")) {
    fieldset.hidden = !fieldset.dataset.methods.split(" ").includes(ui.method.value);
  }
}

async function explain(event) {
  event.preventDefault();
  if (!state.imageData || !ui.model.value) return;
  const generation = state.generation;
  const method = ui.method.value;
  const body = {
    image: state.imageData,
    method,
    top_k: 1,
    params: methodParams(method),
    output: { format: "png", size: "input" },
  };
  if (ui.target.value !== "") body.targets = [Number(ui.target.value)];
  clearError();
  clearCanvas(ui.heatmap);
  clearCanvas(ui.overlay);
  setBusy(`Running ${method}…`);
  try {
    const path = `${modelPath(ui.model.value)}/explain`;
    const answer = STREAMED_METHODS.includes(method)
      ? await streamed(path, body, (done, total) => {
        if (generation === state.generation) showProgress(done, total);
      })
      : await api(path, body);
    if (generation !== state.generation) return;
    const [explanation] = answer.explanations;
    await drawHeatmap(ui.heatmap, explanation.heatmap.data);
    await ui.image.decode().catch(() => undefined);
    drawOverlay(ui.overlay, ui.image, ui.heatmap);
    ui.heatmap.dataset.ready = "true";
    ui.overlay.dataset.ready = "true";
    ui.heatmap.title = `${method} for ${explanation.label}`;
    const total = answer.timings_ms && answer.timings_ms.total;
    ui.timings.textContent =
      `${method} for “${explanation.label}”` + (total ? ` in ${Math.round(total)} ms` : "");
  } catch (err) {
    if (generation === state.generation) showError(err.message);
  } finally {
    if (generation === state.generation) setBusy("");
  }
}

// --- wiring ----------------------------------------------------------------------------------

ui.model.addEventListener("change", modelChanged);
ui.method.addEventListener("change", showMethodParams);
ui.file.addEventListener("change", () => imageChosen(ui.file.files[0]));
ui.form.addEventListener("submit", explain);
ui.image.addEventListener("error", () => {
  ui.image.hidden = true;
});

for (const name of ["dragenter", "dragover"]) {
  ui.dropzone.addEventListener(name, (event) => {
    event.preventDefault();
    ui.dropzone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  ui.dropzone.addEventListener(name, () => ui.dropzone.classList.remove("dragging"));
}
ui.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  const [file] = event.dataTransfer.files;
  imageChosen(file);
});

showMethodParams();
loadModels();
