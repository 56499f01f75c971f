// simvg page: describe the loaded model (GET /api/model), offer SynthRef examples (/static/examples.json), send the
// form to /api/ground and draw the returned boxes over the image.
// Boxes come in original-image pixels; they are placed in percent of the image size, so they follow any scaling.
// Labels are placed in pixels after layout, clamped to the image, so they never stick out of it.
// Every text from the server goes in through textContent (never HTML); the CSP forbids inline scripts and styles,
// and element.style (CSSOM) is not inline style.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#008080"];
const MIN_DISPLAY_WIDTH = 384;  // smaller images are enlarged by a whole factor (128 px -> 384 px), pixelated
const MAX_DISPLAY_HEIGHT = 0.7;  // of the window's height

const $ = (id) => document.getElementById(id);
const form = $("ground-form");
const imageInput = $("image");
const textInput = $("text");
const statusLine = $("status");
const warningList = $("warnings");
const stageFigure = $("stage-figure");
const stage = $("stage");
const preview = $("preview");
const boxesLayer = $("boxes");
const attentionFigure = $("attention-figure");
const attentionImage = $("attention-image");
const table = $("results");

let currentExample = null;  // the example whose image is in the form, while it is

function setStatus(message, isError = false) {
  statusLine.textContent = message;
  statusLine.className = isError ? "error" : "";
}

function setWarnings(warnings) {
  warningList.replaceChildren(...warnings.map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
  warningList.hidden = warnings.length === 0;
}

function clearResults() {
  boxesLayer.replaceChildren();
  table.tBodies[0].replaceChildren();
  table.hidden = true;
  setWarnings([]);
  attentionFigure.hidden = true;
  attentionImage.removeAttribute("src");
  $("stage-caption").textContent = "";
}

// ---- the model panel -------------------------------------------------------------------------------------------

function describeModel(model) {
  $("model-name").textContent = model.name;
  if (Number.isInteger(model.max_text_chars)) $("text").maxLength = model.max_text_chars;  // the server's limit
  $("model-task").textContent = model.task === "grec"
    ? "GREC: every object the expression names (zero, one or many boxes)"
    : model.task === "rec" ? "REC: the one object the expression names (one box)" : String(model.task);
  $("model-branch").textContent = model.branch === "token"
    ? "token (SimVG-TB: the object token's box, no decoder)" : "decoder (SimVG-DB: the decoder's box)";
  $("branch-default").textContent = `the model's default (${model.branch})`;
  const threshold = typeof model.score_threshold === "number" ? model.score_threshold.toFixed(2) : "?";
  $("model-threshold").textContent = model.task === "grec"
    ? `${threshold}: boxes scoring below it are dropped`
    : `${threshold} (GREC only: a REC model always gives its one box, whatever its score)`;
  $("model-input").textContent = `images resized to ${model.image_size} px, expressions cut to ${model.max_tokens} `
    + `tokens, a vocabulary of ${model.vocabulary_size} word pieces`;
  $("model-trained-on").textContent = model.trained_on || "not recorded";
  $("model-facts").hidden = false;
  $("model-synthetic").hidden = !model.synthetic_only;
  const words = Object.entries(model.known_words || {});
  if (words.length) {
    $("model-words").textContent = "Words it was trained on: "
      + words.map(([kind, list]) => `${kind}: ${list.join(", ")}`).join("; ")
      + ". Other words it can only spell out in fragments.";
    $("model-words").hidden = false;
  }
  $("model-status").textContent = "";
  $("model-status").hidden = true;
}

async function loadModel() {
  const panel = $("model");
  try {
    const response = await fetch("/api/model");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    describeModel(await response.json());
    panel.dataset.state = "ready";
  } catch (error) {
    $("model-status").textContent = "The server did not say which model is loaded (" + error.message + ").";
    panel.dataset.state = "error";
  }
}

// ---- examples ---------------------------------------------------------------------------------------------------

async function useExample(example, button) {
  // A file input cannot be given a path; a File put in through a DataTransfer is what a user's pick would be.
  const response = await fetch("/static/" + encodeURIComponent(example.image));
  if (!response.ok) {
    setStatus(`Example ${example.image}: ${response.status} ${response.statusText}`, true);
    return;
  }
  const blob = await response.blob();
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], example.image, { type: blob.type || "image/png" }));
  imageInput.files = transfer.files;
  textInput.value = example.text;
  for (const other of document.querySelectorAll(".example")) other.classList.toggle("chosen", other === button);
  showPreview(imageInput.files[0]);
  currentExample = example;
  setStatus("Example loaded: press Ground, or change the expression first.");
  document.body.dataset.state = "example";
  $("submit").focus();
}

async function loadExamples() {
  const section = $("examples");
  let manifest;
  try {
    const response = await fetch("/static/examples.json");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    manifest = await response.json();
  } catch {
    section.dataset.state = "none";  // no examples: the page works without them
    return;
  }
  const list = $("example-list");
  for (const example of manifest.examples || []) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    const thumb = document.createElement("img");
    thumb.src = "/static/" + encodeURIComponent(example.image);
    thumb.alt = "";
    const caption = document.createElement("span");
    caption.textContent = example.text;
    button.append(thumb, caption);
    button.addEventListener("click", () => useExample(example, button));
    list.appendChild(button);
  }
  section.hidden = list.children.length === 0;
  section.dataset.state = "ready";
}

// ---- the image --------------------------------------------------------------------------------------------------

function hidePreview() {
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");  // no broken-image icon can remain
  preview.removeAttribute("data-file");
  stageFigure.hidden = true;
}

function showPreview(file) {
  clearResults();
  hidePreview();
  if (!file) return;
  preview.dataset.file = file.name;
  preview.src = URL.createObjectURL(file);
  // Shown once it has decoded (load), so a file the browser cannot show never appears as a broken image.
}

// The display width: a whole multiple of a small image's width (crisp pixels), within the page and the window.
function fitImage() {
  const width = preview.naturalWidth, height = preview.naturalHeight;
  if (!width || !height) return;
  const factor = width < MIN_DISPLAY_WIDTH ? Math.ceil(MIN_DISPLAY_WIDTH / width) : 1;
  const room = Math.max(1, $("views").clientWidth);
  const tallest = Math.max(MIN_DISPLAY_WIDTH, window.innerHeight * MAX_DISPLAY_HEIGHT);
  const shown = Math.min(width * factor, room, (tallest * width) / height);
  for (const img of [preview, attentionImage]) {
    img.style.width = Math.round(shown) + "px";
    img.classList.toggle("pixelated", shown > width);  // enlarged: keep the pixels square, not blurred
  }
  for (const figure of [stageFigure, attentionFigure]) figure.style.width = Math.round(shown) + "px";
  placeLabels();
}

preview.addEventListener("load", () => {
  stageFigure.hidden = false;
  fitImage();
});

preview.addEventListener("error", () => {
  if (!preview.getAttribute("src")) return;
  const name = preview.dataset.file || "the file";
  hidePreview();
  currentExample = null;
  setStatus(`${name}: not an image this browser can show (PNG, JPEG, GIF, WebP or BMP).`, true);
  document.body.dataset.state = "error";
});

imageInput.addEventListener("change", () => {
  currentExample = null;
  for (const button of document.querySelectorAll(".example")) button.classList.remove("chosen");
  setStatus("");
  showPreview(imageInput.files[0]);
});

window.addEventListener("resize", fitImage);

// ---- results ----------------------------------------------------------------------------------------------------

function placeBox(xyxy, size, className) {
  const [x1, y1, x2, y2] = xyxy;
  const box = document.createElement("div");
  box.className = className;
  box.style.left = (100 * x1 / size.width) + "%";
  box.style.top = (100 * y1 / size.height) + "%";
  box.style.width = (100 * (x2 - x1) / size.width) + "%";
  box.style.height = (100 * (y2 - y1) / size.height) + "%";
  boxesLayer.appendChild(box);
  return box;
}

function drawBox(entry, index, result) {
  const colour = COLOURS[index % COLOURS.length];
  const box = placeBox(entry.box, result.image_size, "box");
  box.style.setProperty("--colour", colour);

  // The label is the layer's child, not the box's: placeLabels keeps it inside the image wherever the box is.
  const label = document.createElement("span");
  label.className = "box-label";
  label.style.setProperty("--colour", colour);
  label.dataset.box = String(index);
  const text = document.createElement("span");
  text.className = "label-text";
  text.textContent = result.text;
  const numbers = document.createElement("span");
  numbers.className = "label-score";
  numbers.textContent = " " + entry.score.toFixed(2)
    + (typeof entry.confidence === "number" ? ` \u00b7 conf ${entry.confidence.toFixed(2)}` : "");
  label.append(text, numbers);
  boxesLayer.appendChild(label);

  const row = table.tBodies[0].insertRow();
  row.className = "result";
  const cells = [index + 1, entry.score.toFixed(3)];
  if (typeof entry.confidence === "number") cells.push(entry.confidence.toFixed(3));
  else if (result.boxes.some((b) => typeof b.confidence === "number")) cells.push("");
  cells.push(entry.box.map((v) => v.toFixed(1)).join(", "));
  for (const value of cells) row.insertCell().textContent = value;
}

// Each label sits just above its box, or inside the box's top when there is no room above; it is moved left to fit
// and never wider than the image (the expression is cut with an ellipsis, the numbers stay).
function placeLabels() {
  const layer = boxesLayer.getBoundingClientRect();
  const boxes = boxesLayer.querySelectorAll(".box");
  for (const label of boxesLayer.querySelectorAll(".box-label")) {
    const box = boxes[Number(label.dataset.box)];
    if (!box) continue;
    label.style.maxWidth = layer.width + "px";
    const rect = box.getBoundingClientRect();
    const width = label.offsetWidth, height = label.offsetHeight;
    const left = Math.min(Math.max(rect.left - layer.left, 0), Math.max(layer.width - width, 0));
    let top = rect.top - layer.top - height;
    if (top < 0) top = Math.min(Math.max(rect.top - layer.top, 0), Math.max(layer.height - height, 0));
    label.style.left = left + "px";
    label.style.top = top + "px";
  }
}

function showAttention(result) {
  const maps = result.attention;
  if (!$("attention").checked || !maps || typeof maps !== "object") return;
  const branch = typeof maps[result.branch] === "string" ? result.branch : Object.keys(maps).find(
    (key) => typeof maps[key] === "string");
  if (!branch || !maps[branch].startsWith("data:image/")) return;
  attentionImage.src = maps[branch];
  $("attention-caption").textContent = branch === "token"
    ? "Where the model looked: the object token's attention over the image (last encoder layer, token branch)"
    : "Where the model looked: the decoder query's attention over the image (decoder branch)";
  attentionFigure.hidden = false;
  fitImage();
}

function render(result) {
  clearResults();
  result.boxes.forEach((entry, index) => drawBox(entry, index, result));
  const confidence = result.boxes.some((entry) => typeof entry.confidence === "number");
  $("confidence-head").hidden = !confidence;
  table.hidden = result.boxes.length === 0;
  if (currentExample && currentExample.text === result.text && Array.isArray(currentExample.truth)) {
    placeBox(currentExample.truth, result.image_size, "truth");
    $("stage-caption").textContent = "Dashed: where the example's object really is.";
  }
  placeLabels();
  showAttention(result);
  setStatus(result.no_target ? "No target: nothing in the image matches the expression."
    : `${result.boxes.length} box${result.boxes.length === 1 ? "" : "es"} (${result.branch} branch, `
      + `${result.elapsed_ms} ms)`);
  setWarnings(result.warnings || []);
  document.body.dataset.state = "done";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  document.body.dataset.state = "busy";
  setStatus("Grounding\u2026");
  let response;
  try {
    response = await fetch("/api/ground", { method: "POST", body: new FormData(form) });
  } catch (error) {
    setStatus("Network error: " + error.message, true);
    document.body.dataset.state = "error";
    return;
  }
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) {
    clearResults();
    setStatus(body.error || `${response.status} ${response.statusText}`, true);
    document.body.dataset.state = "error";
    return;
  }
  render(body);
});

new ResizeObserver(placeLabels).observe(boxesLayer);
loadModel();
loadExamples();
