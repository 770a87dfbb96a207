"use strict";
// The demo page: send an image to /api/predict and show it with its segments drawn here (a canvas at the image's
// size, opacity and highlighting done in the page), the overlay's labels as SVG text on top (sharp at any size,
// placed by the server so that none overlap), a legend that filters classes and a table whose rows and regions
// highlight each other.

const $ = (id) => document.getElementById(id);
// SVG elements are made in the namespace of the page's <svg> (no address written here: nothing is fetched)
const svgElement = (name) => document.createElementNS($("labels").namespaceURI, name);

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

// file: the image shown (kept for a task switch); rows: the table's entries; regions: each pixel's row (-1: none)
const state = { file: null, result: null, rows: [], regions: null, edges: null, only: null, hover: -1, jsonUrl: null };

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

function stem(name) {
  return name.replace(/\.[^.]*$/, "") || "image";
}

async function decodeRegions(url, width, height) {
  // regions_png: row + 1 in red + 256 x green
  const image = new Image();
  image.src = url;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const data = context.getImageData(0, 0, width, height).data;
  const regions = new Int32Array(width * height);
  for (let p = 0; p < regions.length; p++) regions[p] = data[4 * p] + 256 * data[4 * p + 1] - 1;
  // a pixel is on an outline when a 4-neighbour shows another row (or lies outside the picture)
  const edges = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = y * width + x, row = regions[p];
      if (row < 0) continue;
      edges[p] = (x === 0 || regions[p - 1] !== row || x === width - 1 || regions[p + 1] !== row ||
                  y === 0 || regions[p - width] !== row || y === height - 1 || regions[p + width] !== row) ? 1 : 0;
    }
  }
  return [regions, edges];
}

function visible(row) {
  return state.only === null || state.rows[row].label === state.only;
}

function drawRegions() {
  const { result, regions, edges } = state;
  if (!result || !regions) return;
  const canvas = $("regions");
  const context = canvas.getContext("2d");
  const picture = context.createImageData(result.width, result.height);
  const opacity = $("opacity").value / 100;
  for (let p = 0; p < regions.length; p++) {
    const row = regions[p];
    if (row < 0 || !visible(row)) continue;
    const color = state.rows[row].color;
    let alpha = opacity;
    if (state.hover >= 0) alpha = row === state.hover ? Math.max(0.85, opacity) : opacity * 0.3;
    if (edges[p] && (state.hover < 0 || row === state.hover)) alpha = 1;
    picture.data.set([color[0], color[1], color[2], Math.round(255 * alpha)], 4 * p);
  }
  context.putImageData(picture, 0, 0);
}

function drawLabels() {
  const { labels } = state.result;
  const svg = $("labels");
  svg.setAttribute("viewBox", `0 0 ${labels.canvas[0]} ${labels.canvas[1]}`);
  const pad = Math.max(2, Math.floor(labels.font_px / 6));
  const leaders = svgElement("g");
  const boxes = [];
  for (const placed of labels.placed) {
    const [x0, y0, x1, y1] = placed.box;
    const color = `rgb(${state.rows[placed.row].color.join(",")})`;
    if (placed.leader) {
      const line = svgElement("line");
      const end = [Math.min(Math.max(placed.anchor[0], x0), x1 - 1), Math.min(Math.max(placed.anchor[1], y0), y1 - 1)];
      line.setAttribute("class", "leader");
      line.dataset.row = placed.row;
      for (const [key, value] of [["x1", placed.anchor[0]], ["y1", placed.anchor[1]], ["x2", end[0]], ["y2", end[1]]]) {
        line.setAttribute(key, value);
      }
      leaders.append(line);
    }
    const group = svgElement("g");
    group.setAttribute("class", "label");
    group.dataset.row = placed.row;
    const rect = svgElement("rect");
    // 0.5 inside the box: the outline stays within the placed box, which keeps apart from the others
    for (const [key, value] of [["x", x0 + 0.5], ["y", y0 + 0.5], ["width", x1 - x0 - 1], ["height", y1 - y0 - 1]]) {
      rect.setAttribute(key, value);
    }
    rect.setAttribute("stroke", color);
    const text = svgElement("text");
    text.setAttribute("x", x0 + pad);
    text.setAttribute("y", (y0 + y1) / 2);
    text.setAttribute("font-size", labels.font_px);
    // the browser's font differs from the server's: fit the text to the box the layout reserved
    text.setAttribute("textLength", x1 - x0 - 2 * pad);
    text.setAttribute("lengthAdjust", "spacingAndGlyphs");
    text.textContent = placed.text;
    group.append(rect, text);
    boxes.push(group);
  }
  svg.replaceChildren(leaders, ...boxes);
  const leftOff = labels.left_off.map((entry) => entry.text);
  $("left-off").textContent = leftOff.length ? `not labelled on the picture (no room): ${leftOff.join(", ")}` : "";
}

function applyFilter() {
  $("legend").classList.toggle("filtered", state.only !== null);
  for (const button of $("legend").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.label) === state.only));
  }
  for (const line of $("segments").tBodies[0].rows) line.classList.toggle("dimmed", !visible(Number(line.dataset.row)));
  for (const element of $("labels").querySelectorAll("[data-row]")) {
    element.style.display = visible(Number(element.dataset.row)) ? "" : "none";
  }
  drawRegions();
}

function setHover(row, fromPicture) {
  if (row === state.hover) return;
  state.hover = row;
  for (const line of $("segments").tBodies[0].rows) {
    const active = Number(line.dataset.row) === row;
    line.classList.toggle("active", active);
    if (active && fromPicture) line.scrollIntoView({ block: "nearest" });
  }
  for (const group of $("labels").querySelectorAll(".label")) {
    group.classList.toggle("active", Number(group.dataset.row) === row);
  }
  drawRegions();
}

function rowAt(event) {
  const canvas = $("regions"), box = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * state.result.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * state.result.height);
  if (x < 0 || y < 0 || x >= state.result.width || y >= state.result.height) return -1;
  const row = state.regions[y * state.result.width + x];
  return row >= 0 && visible(row) ? row : -1;
}

async function render(result) {
  state.result = result;
  state.rows = result[ROWS_KEY[result.task]];
  state.hover = -1;
  if (state.only !== null && !state.rows.some((row) => row.label === state.only)) state.only = null;
  [state.regions, state.edges] = await decodeRegions(result.regions_png, result.width, result.height);
  $("stage").style.aspectRatio = `${result.width} / ${result.height}`;
  // the whole picture in view: at most 75 % of the window's height
  $("stage").parentElement.style.maxWidth = `calc(75vh * ${result.width / result.height})`;
  $("regions").width = result.width;
  $("regions").height = result.height;
  drawLabels();
  $("legend").replaceChildren(...result.legend.map((entry) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.label = entry.label;
    button.append(swatch(entry.color), entry.category);
    button.addEventListener("click", () => {
      state.only = state.only === entry.label ? null : entry.label;
      applyFilter();
    });
    item.append(button);
    return item;
  }));
  const columns = COLUMNS[result.task];
  $("table-title").textContent = `${ROWS_KEY[result.task]} (${state.rows.length})`;
  const head = document.createElement("tr");
  head.append(...columns.map(([title]) => Object.assign(document.createElement("th"), { textContent: title })));
  $("segments").tHead.replaceChildren(head);
  $("segments").tBodies[0].replaceChildren(...state.rows.map((row, index) => {
    const line = document.createElement("tr");
    line.dataset.row = index;
    line.tabIndex = 0;  // keyboard: focusing a row highlights its region
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
    for (const type of ["mouseenter", "focus"]) line.addEventListener(type, () => setHover(index, false));
    for (const type of ["mouseleave", "blur"]) line.addEventListener(type, () => setHover(-1, false));
    return line;
  }));
  const name = `${stem(state.file.name)}_${result.task}`;
  $("download-png").href = result.overlay_png;
  $("download-png").download = `${name}.png`;
  if (state.jsonUrl) URL.revokeObjectURL(state.jsonUrl);
  state.jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(result.record, null, 1)], { type: "application/json" }));
  $("download-json").href = state.jsonUrl;
  $("download-json").download = `${name}.json`;
  applyFilter();
  $("result").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function segment() {
  const file = state.file;
  if (!file) {
    showError("choose, drop or paste an image first");
    return;
  }
  const task = $("task").value;
  // the page draws regions and labels itself (layers); the PNG with its legend is for the download
  const params = new URLSearchParams({ task, layers: 1, record: file.name || "pasted.png" });
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
    await render(body);
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

function useFile(file) {
  if (!file) return;
  state.file = file;
  if ($("photo").src.startsWith("blob:")) URL.revokeObjectURL($("photo").src);
  $("photo").src = URL.createObjectURL(file);
  segment();
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

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  segment();
});
$("file").addEventListener("change", () => useFile($("file").files[0]));
$("task").addEventListener("change", () => {
  updateThreshold();
  if (state.file) segment();  // the same image again, no new upload needed
});
$("threshold").addEventListener("change", () => {
  if (state.file && $("task").value === "instance") segment();
});
$("opacity").addEventListener("input", drawRegions);
$("regions").addEventListener("mousemove", (event) => setHover(rowAt(event), true));
$("regions").addEventListener("mouseleave", () => setHover(-1, false));
// drag-and-drop anywhere on the page, and paste
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
document.addEventListener("dragleave", () => $("drop").classList.remove("over"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  useFile([...event.dataTransfer.files].find((file) => file.type.startsWith("image/")));
});
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((entry) => entry.kind === "file" && entry.type.startsWith("image/"));
  if (item) useFile(item.getAsFile());
});
updateThreshold();
loadInfo();
