// The report's only script: the sample-grid slider and the attention explorer. No libraries.
"use strict";

function bytes(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function setupGrids() {
  const slider = document.getElementById("grid-slider");
  if (!slider) return;
  const grids = JSON.parse(document.getElementById("grid-data").textContent);
  slider.addEventListener("input", () => {
    const grid = grids[Number(slider.value)];
    document.getElementById("grid-image").src = grid.uri;
    document.getElementById("grid-step").textContent = "step " + grid.step;
  });
}

function setupExplorer() {
  const holder = document.getElementById("explorer-data");
  if (!holder) return;
  const data = JSON.parse(holder.textContent);
  const lut = bytes(data.lut);
  const select = document.getElementById("subject");
  const layersDiv = document.getElementById("layers");
  const readout = document.getElementById("query-readout");
  const SIZE = 256;
  let current = null;

  data.subjects.forEach((s, i) => {
    const option = document.createElement("option");
    option.value = i;
    option.textContent = s.label;
    select.appendChild(option);
  });

  function rowOf(layer, x, y, resolution) {
    // image pixel -> feature cell -> nearest kept query point -> its row
    const [h, w] = layer.feature, s = layer.stride, [qh, qw] = layer.queries;
    const fx = Math.floor(x * w / resolution), fy = Math.floor(y * h / resolution);
    const qx = Math.min(qw - 1, Math.floor(fx / s)), qy = Math.min(qh - 1, Math.floor(fy / s));
    const index = qy * qw + qx;
    const m = layer.keys[0] * layer.keys[1];
    return { index, values: layer.bytes.subarray(index * m, (index + 1) * m),
             cx: (qx * s + Math.floor(s / 2) + 0.5) * resolution / w, cy: (qy * s + Math.floor(s / 2) + 0.5) * resolution / h };
  }

  function draw(panel, query) {
    const ctx = panel.canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, SIZE, SIZE);
    ctx.drawImage(current.image, 0, 0, SIZE, SIZE);
    if (!query) return;
    const layer = panel.layer, [kh, kw] = layer.keys;
    const row = rowOf(layer, query.x, query.y, current.resolution);
    const pixels = panel.heat.getContext("2d").createImageData(kw, kh);
    for (let i = 0; i < row.values.length; i++) {
      const v = row.values[i];
      pixels.data.set([lut[3 * v], lut[3 * v + 1], lut[3 * v + 2], Math.round(v * 0.8)], 4 * i);
    }
    panel.heat.getContext("2d").putImageData(pixels, 0, 0);
    ctx.drawImage(panel.heat, 0, 0, SIZE, SIZE);
    const scale = SIZE / current.resolution;
    ctx.strokeStyle = "#00e5ff";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(row.cx * scale, row.cy * scale, 5, 0, 2 * Math.PI);
    ctx.stroke();
    panel.info.textContent = "max weight " + layer.peak[row.index].toPrecision(3);
    panel.canvas.dataset.row = String(row.index);
  }

  function hover(event) {
    const rect = event.target.getBoundingClientRect();
    const r = current.resolution;
    const x = Math.min(r - 1, Math.max(0, Math.floor((event.clientX - rect.left) / rect.width * r)));
    const y = Math.min(r - 1, Math.max(0, Math.floor((event.clientY - rect.top) / rect.height * r)));
    current.panels.forEach((p) => draw(p, { x, y }));
    readout.textContent = "pixel (" + x + ", " + y + ")";
    layersDiv.dataset.query = x + "," + y;
  }

  function show(i) {
    const subject = data.subjects[i];
    const image = new Image();
    layersDiv.textContent = "";
    delete layersDiv.dataset.query;
    readout.textContent = "";
    current = { image, resolution: 0, panels: [] };
    subject.layers.forEach((layer) => {
      layer.bytes = layer.bytes || bytes(layer.rows);
      const div = document.createElement("div");
      div.className = "layer";
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = SIZE;
      canvas.addEventListener("mousemove", hover);
      const title = document.createElement("p");
      title.textContent = subject.network + " " + layer.name + " (" + layer.feature.join("x") + ", gamma " + layer.gamma + ")";
      const info = document.createElement("p");
      info.className = "meta";
      div.append(title, canvas, info);
      layersDiv.appendChild(div);
      const heat = document.createElement("canvas");
      [heat.width, heat.height] = [layer.keys[1], layer.keys[0]];
      current.panels.push({ canvas, layer, heat, info });
    });
    image.onload = () => {
      current.resolution = image.naturalWidth;
      current.panels.forEach((p) => draw(p, null));
      layersDiv.dataset.ready = "true";
    };
    layersDiv.dataset.ready = "false";
    image.src = subject.png;
  }

  select.addEventListener("change", () => show(Number(select.value)));
  show(0);
}

setupGrids();
setupExplorer();
