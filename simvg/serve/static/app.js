// simvg page: send the form to /api/ground and draw the returned boxes over the image.
// Boxes come in original-image pixels; they are placed in percent of the image size, so they follow any scaling.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#008080"];
const form = document.getElementById("ground-form");
const statusLine = document.getElementById("status");
const stage = document.getElementById("stage");
const preview = document.getElementById("preview");
const boxesLayer = document.getElementById("boxes");
const table = document.getElementById("results");

function setStatus(message, isError = false) {
  statusLine.textContent = message;
  statusLine.className = isError ? "error" : "";
}

function clearResults() {
  boxesLayer.replaceChildren();
  table.tBodies[0].replaceChildren();
  table.hidden = true;
}

document.getElementById("image").addEventListener("change", (event) => {
  const file = event.target.files[0];
  clearResults();
  setStatus("");
  if (!file) { stage.hidden = true; return; }
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  stage.hidden = false;
});

function drawBox(entry, index, result) {
  const [x1, y1, x2, y2] = entry.box;
  const { width, height } = result.image_size;
  const box = document.createElement("div");
  box.className = "box" + (y1 / height < 0.08 ? " top" : "");
  box.style.setProperty("--colour", COLOURS[index % COLOURS.length]);
  box.style.left = (100 * x1 / width) + "%";
  box.style.top = (100 * y1 / height) + "%";
  box.style.width = (100 * (x2 - x1) / width) + "%";
  box.style.height = (100 * (y2 - y1) / height) + "%";
  const label = document.createElement("span");
  label.className = "box-label";
  label.textContent = `${result.text.slice(0, 40)} ${entry.score.toFixed(2)}`;  // textContent: never HTML
  box.appendChild(label);
  boxesLayer.appendChild(box);

  const row = table.tBodies[0].insertRow();
  row.className = "result";
  for (const value of [index + 1, entry.score.toFixed(3), entry.box.map((v) => v.toFixed(1)).join(", ")]) {
    row.insertCell().textContent = value;
  }
}

function render(result) {
  clearResults();
  result.boxes.forEach((entry, index) => drawBox(entry, index, result));
  table.hidden = result.boxes.length === 0;
  let message = result.no_target ? "No target: nothing in the image matches the expression."
    : `${result.boxes.length} box${result.boxes.length === 1 ? "" : "es"} (${result.branch} branch, ${result.elapsed_ms} ms)`;
  if (result.warnings.length) message += " Note: " + result.warnings.join("; ");
  setStatus(message);
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
