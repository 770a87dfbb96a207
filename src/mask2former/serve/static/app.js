"use strict";
// The demo page: upload an image to /api/predict and show the overlay, a legend and a table of the results.

const $ = (id) => document.getElementById(id);

// [title, value of a row (null: the class with its colour), right-aligned]
const COLUMNS = {
  panoptic: [["id", (r) => r.id, true], ["class", null], ["kind", (r) => (r.isthing ? "thing" : "stuff")],
             ["score", (r) => r.score.toFixed(3), true], ["area (px)", (r) => r.area, true]],
  instance: [["class", null], ["score", (r) => r.score.toFixed(3), true],
             ["box (x0, y0, x1, y1)", (r) => r.box.map((v) => v.toFixed(0)).join(", ")],
             ["area (px)", (r) => r.area, true]],
  semantic: [["class", null], ["kind", (r) => (r.isthing ? "thing" : "stuff")], ["area (px)", (r) => r.area, true],
             ["share", (r) => (100 * r.fraction).toFixed(1) + " %", true]],
};
const ROWS_KEY = { panoptic: "segments", instance: "instances", semantic: "classes" };

function swatch(color) {
  const span = document.createElement("span");
  span.className = "swatch";
  span.style.background = `rgb(${color.join(",")})`;
  return span;
}

function classCell(row) {
  const cell = document.createElement("td");
  cell.append(swatch(row.color), row.category);
  return cell;
}

function render(result) {
  $("overlay").src = result.overlay_png;
  const legend = $("legend");
  legend.replaceChildren(...result.legend.map((entry) => {
    const item = document.createElement("li");
    item.append(swatch(entry.color), entry.category);
    return item;
  }));
  const columns = COLUMNS[result.task];
  const rows = result[ROWS_KEY[result.task]];
  $("table-title").textContent = `${ROWS_KEY[result.task]} (${rows.length})`;
  const head = document.createElement("tr");
  head.append(...columns.map(([title]) => Object.assign(document.createElement("th"), { textContent: title })));
  $("segments").tHead.replaceChildren(head);
  $("segments").tBodies[0].replaceChildren(...rows.map((row) => {
    const line = document.createElement("tr");
    for (const [, value, numeric] of columns) {
      if (value === null) {
        line.append(classCell(row));
      } else {
        const cell = document.createElement("td");
        cell.textContent = value(row);
        if (numeric) cell.className = "number";
        line.append(cell);
      }
    }
    return line;
  }));
  $("result").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function segment(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) {
    showError("choose an image first");
    return;
  }
  const task = $("task").value;
  const params = new URLSearchParams({ task, legend: 0 });  // the legend is drawn as HTML beside the image
  if (task === "instance") params.set("score_threshold", $("threshold").value);
  showError("");
  $("run").disabled = true;
  document.body.dataset.state = "running";
  $("status").textContent = "running…";
  try {
    const response = await fetch(`/api/predict?${params}`, {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`${response.status}: ${body.error || response.statusText}`);
    render(body);
    $("status").textContent = `${body.width}×${body.height}, model ${body.inference_ms.toFixed(0)} ms`;
    document.body.dataset.state = "done";
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

function updateThreshold() {
  $("threshold-label").hidden = $("task").value !== "instance";
}

function size(value, unit, units) {
  for (const [scale, name] of units) if (value >= scale) return `${+(value / scale).toFixed(1)} ${name}`;
  return `${value} ${unit}`;
}

async function loadInfo() {
  try {
    const health = await (await fetch("/api/health")).json();
    const bytes = size(health.limits.max_upload_bytes, "B", [[1048576, "MB"], [1024, "kB"]]);
    const pixels = size(health.limits.max_pixels, "px", [[1e6, "MP"]]);
    $("model-info").textContent = `${health.num_classes} classes · ${health.device} · uploads up to ${bytes}, ${pixels}`;
  } catch (error) {
    $("model-info").textContent = "server not reachable";
  }
}

$("form").addEventListener("submit", segment);
$("task").addEventListener("change", updateThreshold);
updateThreshold();
loadInfo();
