// modalmesh web UI: vanilla JS over the gateway's REST API (same origin, no build step).
// Chat: POST /v1/chat/completions with stream=true, read as SSE from a ReadableStream.
// Models: GET /v1/models. Training: /v1/training/jobs (list, submit, get, cancel).
// Every API call carries the key from the "API key" field (localStorage) as a Bearer token.
"use strict";

(() => {
  const KEY_STORAGE = "modalmesh.apiKey";
  const POLL_MS = 1500;

  // File kinds the API takes, by extension: [modality, part type, format or media type].
  const FILE_KINDS = {
    png: ["image", "image_url", "image/png"], jpg: ["image", "image_url", "image/jpeg"],
    jpeg: ["image", "image_url", "image/jpeg"], gif: ["image", "image_url", "image/gif"],
    webp: ["image", "image_url", "image/webp"], bmp: ["image", "image_url", "image/bmp"],
    mp4: ["video", "video_url", "video/mp4"], mov: ["video", "video_url", "video/quicktime"],
    webm: ["video", "video_url", "video/webm"], mkv: ["video", "video_url", "video/x-matroska"],
    avi: ["video", "video_url", "video/x-msvideo"],
    wav: ["audio", "input_audio", "wav"], mp3: ["audio", "input_audio", "mp3"],
    flac: ["audio", "input_audio", "flac"], ogg: ["audio", "input_audio", "ogg"],
    npy: ["event", "input_event", "npy"], npz: ["event", "input_event", "npz"],
  };
  const ACCEPTED_TEXT = "an image (png, jpg, gif, webp, bmp), a video (mp4, mov, webm, mkv, avi), " +
    "audio (wav, mp3, flac, ogg) or an event file (npy, npz)";

  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  };

  const state = {
    history: [],      // sent turns: {role, content, views} (views: one per media part, in order)
    pending: [],      // attachments for the next message: {name, modality, part, previewUrl}
    controller: null, // AbortController of the reply in flight
    jobPoints: new Map(), // job id -> [[step, loss], ...] gathered while polling
    pollTimer: null,
  };

  // ---- API --------------------------------------------------------------------------------
  function apiHeaders(extra = {}) {
    const headers = { ...extra };
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function apiError(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON: keep the status line */ }
    const error = new Error(message);
    error.status = response.status;
    return error;
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: apiHeaders(options.headers) });
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  function showBanner(message) {
    const banner = $("#banner");
    banner.textContent = message || "";
    banner.hidden = !message;
  }

  // ---- Models -----------------------------------------------------------------------------
  async function loadModels() {
    const select = $("#model");
    const previous = select.value || localStorage.getItem("modalmesh.model");
    try {
      const list = await api("/v1/models");
      select.replaceChildren(...list.data.map((m) => el("option", {
        value: m.id,
        text: m.parent ? `${m.id} (adapter version of ${m.parent})` : `${m.id} (current)`,
      })));
      if (previous && list.data.some((m) => m.id === previous)) select.value = previous;
      showBanner("");
    } catch (e) {
      showBanner(`Could not list models: ${e.message}` + (e.status === 401 ? " (set the API key)" : ""));
    }
  }

  // ---- Attachments ------------------------------------------------------------------------
  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  function kindOf(name) {
    const ext = (name.split(".").pop() || "").toLowerCase();
    return name.includes(".") ? FILE_KINDS[ext] : undefined;
  }

  // The content part for a file (or null with an error shown when its type is not taken).
  async function partFor(blob, name) {
    const kind = kindOf(name);
    if (!kind) {
      showUploadError(`Unsupported file type: "${name}". Attach ${ACCEPTED_TEXT}.`);
      return null;
    }
    const [modality, type, fmt] = kind;
    const dataUrl = await readAsDataURL(blob);
    const b64 = dataUrl.slice(dataUrl.indexOf(",") + 1);
    let part;
    if (type === "image_url" || type === "video_url") {
      part = { type, [type]: { url: `data:${fmt};base64,${b64}` } };
    } else {
      part = { type, [type]: { data: b64, format: fmt } };
    }
    return { name, modality, part, previewUrl: URL.createObjectURL(blob) };
  }

  function showUploadError(message) {
    const note = $("#upload-error");
    note.textContent = message || "";
    note.hidden = !message;
  }

  async function addFiles(files) {
    showUploadError("");
    for (const file of files) {
      const item = await partFor(file, file.name);
      if (item) state.pending.push(item);
    }
    renderAttachments();
  }

  function renderAttachments() {
    $("#attachments").replaceChildren(...state.pending.map((item, i) => {
      const remove = el("button", { type: "button", title: "remove", text: "×" });
      remove.onclick = () => { state.pending.splice(i, 1); renderAttachments(); };
      return el("span", { class: "chip", "data-modality": item.modality }, `${item.modality}: ${item.name}`, remove);
    }));
  }

  // ---- Microphone: MediaRecorder -> WebAudio decode -> PCM WAV ------------------------------
  // A 16-bit PCM mono WAV of `samples` (Float32Array in [-1, 1]) at `rate` Hz.
  function encodeWav(samples, rate) {
    const buffer = new ArrayBuffer(44 + samples.length * 2);
    const view = new DataView(buffer);
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
    view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true);
    view.setUint16(32, 2, true); view.setUint16(34, 16, true);
    text(36, "data"); view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return new Blob([buffer], { type: "audio/wav" });
  }

  function mixdown(audioBuffer) {
    const out = new Float32Array(audioBuffer.length);
    for (let c = 0; c < audioBuffer.numberOfChannels; c++) {
      const data = audioBuffer.getChannelData(c);
      for (let i = 0; i < data.length; i++) out[i] += data[i] / audioBuffer.numberOfChannels;
    }
    return out;
  }

  let recorder = null;
  async function toggleRecording() {
    const button = $("#record");
    if (recorder) { recorder.stop(); return; }
    showUploadError("");
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      showUploadError(`Microphone not available: ${e.message}`);
      return;
    }
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (ev) => chunks.push(ev.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      recorder = null;
      button.textContent = "Record";
      button.classList.remove("recording");
      try {
        const ctx = new AudioContext();
        const decoded = await ctx.decodeAudioData(await new Blob(chunks).arrayBuffer());
        const wav = encodeWav(mixdown(decoded), decoded.sampleRate);
        ctx.close();
        const item = await partFor(wav, `recording-${new Date().toISOString().slice(11, 19)}.wav`);
        if (item) { state.pending.push(item); renderAttachments(); }
      } catch (e) {
        showUploadError(`Could not decode the recording: ${e.message}`);
      }
    };
    recorder.start();
    button.textContent = "Stop recording";
    button.classList.add("recording");
  }

  // ---- Messages ---------------------------------------------------------------------------
  function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

  // A video player with a timeline bar under it, for timestamp marks.
  function videoView(src) {
    const video = el("video", { src, controls: "", preload: "metadata" });
    const timeline = el("div", { class: "timeline", title: "times the model pointed at" });
    const view = { kind: "video", video, timeline, marks: [] };
    video.addEventListener("loadedmetadata", () => layoutMarks(view));
    return { node: el("div", { class: "media-in" }, video, timeline), view };
  }

  function inputView(item) {
    if (item.modality === "image") return { node: el("img", { src: item.previewUrl, alt: item.name }), view: { kind: "image" } };
    if (item.modality === "video") return videoView(item.previewUrl);
    if (item.modality === "audio") return { node: el("audio", { src: item.previewUrl, controls: "" }), view: { kind: "audio" } };
    return { node: el("div", { class: "chip", text: `event file: ${item.name}` }), view: { kind: "event" } };
  }

  function addMessage(role) {
    const node = el("div", { class: `message ${role}` });
    const text = el("div", { class: "text" });
    node.append(el("div", { class: "media-in" }), text);
    $("#messages").append(node);
    scrollDown();
    return { node, text, media: node.firstChild };
  }

  function duration(view) {
    const d = view.video.duration;
    if (Number.isFinite(d) && d > 0) return d;
    return Math.max(1, ...view.marks.map((m) => m.seconds)) * 1.1; // until the metadata is in
  }

  function layoutMarks(view) {
    const total = duration(view);
    for (const mark of view.marks) {
      mark.node.style.left = `${Math.min(100, (100 * mark.seconds) / total)}%`;
    }
  }

  // Put E.T. Chat timestamps ({media_index, frame, seconds, char_offset}) on the timelines of
  // the request's videos (media_index counts the request's media parts in order, all kinds).
  function addTimestamps(views, timestamps) {
    for (const ts of timestamps || []) {
      const view = views[ts.media_index];
      if (!view || view.kind !== "video") continue;
      const node = el("button", {
        type: "button", class: "mark", title: `${ts.seconds.toFixed(2)} s (frame ${ts.frame})`,
        "data-seconds": String(ts.seconds), "data-frame": String(ts.frame),
      });
      node.onclick = () => { view.video.currentTime = ts.seconds; view.video.pause(); };
      view.timeline.append(node);
      view.marks.push({ seconds: ts.seconds, node });
      layoutMarks(view);
    }
  }

  function errorNote(message) { return el("div", { class: "error-note", text: message }); }

  // One generated media entry (delta.media / message.media) as an element.
  function mediaNode(entry) {
    if (entry.type === "error") {
      const e = entry.error || {};
      return errorNote(`${entry.modality} could not be generated: ${e.message || "unknown error"}` +
        (e.code ? ` (${e.code})` : ""));
    }
    if (entry.type === "image_url") return el("img", { src: entry.image_url.url, alt: "generated image" });
    if (entry.type === "input_audio") {
      const fmt = entry.input_audio.format || "wav";
      return el("audio", { controls: "", src: `data:audio/${fmt};base64,${entry.input_audio.data}` });
    }
    if (entry.type === "video_url") {
      const url = entry.video_url.url;
      if (url.startsWith("data:image/")) return el("img", { src: url, alt: "generated clip" }); // GIF
      return el("video", { controls: "", loop: "", src: url });
    }
    return errorNote(`unknown media entry type ${JSON.stringify(entry.type)}`);
  }

  // Apply one parsed SSE payload (a chat.completion.chunk, or an error body) to `reply`.
  function applyChunk(reply, chunk) {
    if (chunk.error) {
      reply.node.append(errorNote(chunk.error.message || JSON.stringify(chunk.error)));
      reply.failed = true;
      return;
    }
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (delta.content) {
        reply.content += delta.content;
        reply.text.textContent = reply.content;
        reply.deltas += 1;
        reply.node.dataset.deltas = String(reply.deltas);
      }
      if (delta.timestamps) addTimestamps(reply.views, delta.timestamps);
      for (const entry of delta.media || []) reply.out.append(mediaNode(entry));
      if (choice.finish_reason) reply.node.dataset.finish = choice.finish_reason;
    }
    if (chunk.system_fingerprint) reply.meta.textContent = `served by ${chunk.system_fingerprint}`;
  }

  // Read an SSE body, calling onData with each `data:` payload.
  async function readSSE(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }

  function requestBody() {
    const body = { model: $("#model").value || undefined, stream: true, messages: [] };
    const maxTokens = parseInt($("#max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const modalities = [...document.querySelectorAll("input[name=modality]:checked")].map((c) => c.value);
    if (modalities.length) body.modalities = ["text", ...modalities];
    body.messages = state.history.map((m) => ({ role: m.role, content: m.content }));
    return body;
  }

  async function send(event) {
    if (event) event.preventDefault();
    if (state.controller) return;
    const prompt = $("#prompt").value.trim();
    if (!prompt && !state.pending.length) return;
    showUploadError("");

    const user = addMessage("user");
    const views = [];
    for (const item of state.pending) {
      const { node, view } = inputView(item);
      user.media.append(node);
      views.push(view);
    }
    user.text.textContent = prompt;
    const content = [...state.pending.map((item) => item.part)];
    if (prompt) content.push({ type: "text", text: prompt });
    const turn = { role: "user", content, views };
    state.history.push(turn);
    state.pending = [];
    renderAttachments();
    $("#prompt").value = "";

    const reply = addMessage("assistant");
    Object.assign(reply, {
      content: "", deltas: 0, failed: false,
      views: state.history.flatMap((m) => m.views || []),
      out: el("div", { class: "media-out" }), meta: el("div", { class: "meta" }),
    });
    reply.node.append(reply.out, reply.meta);
    reply.node.dataset.state = "streaming";
    state.controller = new AbortController();
    $("#stop").disabled = false;
    $("#send").disabled = true;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: apiHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(requestBody()),
        signal: state.controller.signal,
      });
      if (!response.ok) throw await apiError(response);
      await readSSE(response, (chunk) => { applyChunk(reply, chunk); scrollDown(); });
      if (reply.failed) throw new Error("the reply failed after it started");
      state.history.push({ role: "assistant", content: reply.content, views: [] });
      reply.node.dataset.state = "done";
    } catch (e) {
      // The refused turn leaves the conversation, so that the next request works.
      state.history.splice(state.history.indexOf(turn), 1);
      if (e.name === "AbortError") {
        reply.node.append(el("div", { class: "meta", text: "stopped" }));
        reply.node.dataset.state = "stopped";
      } else {
        if (!reply.failed) reply.node.append(errorNote(e.message));
        reply.node.dataset.state = "error";
      }
    } finally {
      state.controller = null;
      $("#stop").disabled = true;
      $("#send").disabled = false;
      scrollDown();
    }
  }

  // ---- Training -------------------------------------------------------------------------
  // A small YAML subset for job files: nested block mappings, "- " lists, flow {..} / [..]
  // values, quoted or plain scalars, # comments. Anything else: send JSON.
  function parseYaml(text) {
    const lines = text.split("\n").map((l) => l.replace(/\s+#.*$|^#.*$/, "")).filter((l) => l.trim());
    let i = 0;
    const indentOf = (l) => l.length - l.trimStart().length;
    const scalar = (s) => {
      s = s.trim();
      if (s.startsWith("{") || s.startsWith("[")) return flow(s);
      if (/^".*"$|^'.*'$/.test(s)) return s.slice(1, -1);
      if (s === "true" || s === "false") return s === "true";
      if (s === "null" || s === "~" || s === "") return null;
      if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(s)) return Number(s);
      return s;
    };
    const flow = (s) => { // {a: 1, b: [x, y]} -> JSON
      const json = s.replace(/([{,]\s*)([A-Za-z_][\w.-]*)\s*:/g, '$1"$2":')
        .replace(/:\s*([A-Za-z_/.][^,}\]]*?)\s*(?=[,}\]])/g, (m, v) => (/^(true|false|null)$/.test(v) ? `: ${v}` : `: "${v}"`))
        .replace(/([[,]\s*)([A-Za-z_/.][^,\]"]*?)\s*(?=[,\]])/g, '$1"$2"');
      return JSON.parse(json);
    };
    const block = (indent) => {
      if (lines[i].trimStart().startsWith("- ")) {
        const list = [];
        while (i < lines.length && indentOf(lines[i]) === indent && lines[i].trimStart().startsWith("- ")) {
          const rest = lines[i].trimStart().slice(2);
          if (/^[\w.-]+\s*:(\s|$)/.test(rest)) { // "- key: value" starts a mapping item
            lines[i] = " ".repeat(indent + 2) + rest;
            list.push(block(indent + 2));
          } else { list.push(scalar(rest)); i += 1; }
        }
        return list;
      }
      const map = {};
      while (i < lines.length && indentOf(lines[i]) === indent) {
        const m = /^\s*([\w.-]+)\s*:(.*)$/.exec(lines[i]);
        if (!m) throw new Error(`YAML line ${i + 1}: expected "key: value", got ${JSON.stringify(lines[i].trim())}`);
        i += 1;
        if (m[2].trim()) map[m[1]] = scalar(m[2]);
        else if (i < lines.length && indentOf(lines[i]) > indent) map[m[1]] = block(indentOf(lines[i]));
        else map[m[1]] = null;
      }
      return map;
    };
    const out = lines.length ? block(indentOf(lines[0])) : {};
    if (i < lines.length) throw new Error(`YAML line ${i + 1}: unexpected indentation`);
    return out;
  }

  function parseJob(text) {
    try { return JSON.parse(text); } catch (jsonError) {
      try { return parseYaml(text); } catch (yamlError) {
        throw new Error(`the job is neither JSON (${jsonError.message}) nor simple YAML (${yamlError.message})`);
      }
    }
  }

  async function submitJob(event) {
    event.preventDefault();
    const note = $("#job-error");
    note.hidden = true;
    try {
      const job = parseJob($("#job-spec").value);
      await api("/v1/training/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(job),
      });
      await refreshJobs();
    } catch (e) {
      note.textContent = `Not submitted: ${e.message}`;
      note.hidden = false;
    }
  }

  // An inline SVG line plot of [[step, loss], ...].
  function lossPlot(points) {
    const W = 220, H = 60, P = 4;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "loss");
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.dataset.points = String(points.length);
    if (!points.length) return svg;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => P + ((x - x0) / (x1 - x0 || 1)) * (W - 2 * P);
    const sy = (y) => H - P - ((y - y0) / (y1 - y0 || 1)) * (H - 2 * P);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `loss ${ys[0].toFixed(4)} -> ${ys[ys.length - 1].toFixed(4)} over steps ${x0}-${x1}`;
    svg.append(title, line);
    return svg;
  }

  // The record's loss_history is the whole run (thinned past 512 points); the latest progress
  // point is added when it is newer. Without a history, the points gathered while polling.
  function recordPoint(job) {
    const valid = (q) => Array.isArray(q) && Number.isFinite(q[0]) && Number.isFinite(q[1]);
    const history = Array.isArray(job.loss_history) ? job.loss_history.filter(valid) : [];
    const points = history.length ? history.map((q) => [q[0], q[1]]) : state.jobPoints.get(job.id) || [];
    const p = job.progress || {};
    const step = p.step, loss = p.loss;
    if (Number.isFinite(step) && Number.isFinite(loss) && (!points.length || points[points.length - 1][0] < step)) {
      points.push([step, loss]);
    }
    state.jobPoints.set(job.id, points);
  }

  const FINISHED = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

  function jobRow(job) {
    recordPoint(job);
    const p = job.progress || {};
    const spec = job.spec || {};
    const total = p.total_steps || 0;
    const bar = el("progress", { max: String(total || 1), value: String(p.step || 0) });
    const cancel = el("button", { type: "button", class: "cancel", text: "Cancel" });
    cancel.disabled = FINISHED.has(job.state) || job.state === "CANCELLING";
    cancel.onclick = async () => {
      try { await api(`/v1/training/jobs/${job.id}`, { method: "DELETE" }); } catch (e) { showBanner(e.message); }
      refreshJobs();
    };
    const published = job.published ? el("div", { class: "meta", text: `published ${job.published.ref || ""}` }) : null;
    const error = job.error ? el("div", { class: "job-error", text: job.error }) : null;
    return el("tr", { "data-job": job.id, "data-state": job.state },
      el("td", {}, el("code", { text: job.id.slice(0, 8) }), el("div", { class: "meta", text: `${spec.preset || "?"} ${spec.stage || ""}` })),
      el("td", { class: "state", text: job.state }),
      el("td", {}, bar, el("div", { class: "meta steps", text: `${p.step || 0} / ${total || "?"}` }), published, error),
      el("td", {}, lossPlot(state.jobPoints.get(job.id) || []),
        el("div", { class: "meta", text: typeof p.loss === "number" ? `loss ${p.loss.toFixed(4)}` : "" })),
      el("td", {}, cancel));
  }

  async function refreshJobs() {
    try {
      const list = await api("/v1/training/jobs?limit=50");
      $("#jobs tbody").replaceChildren(...list.data.map(jobRow));
      showBanner("");
    } catch (e) {
      showBanner(e.status === 404 ? "Training is not enabled on this gateway (it needs a Redis URL)." : `Jobs: ${e.message}`);
    }
  }

  function showTab(name) {
    for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
    $("#panel-chat").hidden = name !== "chat";
    $("#panel-training").hidden = name !== "training";
    clearInterval(state.pollTimer);
    state.pollTimer = null;
    if (name === "training") {
      refreshJobs();
      state.pollTimer = setInterval(refreshJobs, POLL_MS);
    }
  }

  // ---- Wiring -----------------------------------------------------------------------------
  function init() {
    const key = $("#api-key");
    key.value = localStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("change", () => {
      if (key.value) localStorage.setItem(KEY_STORAGE, key.value); else localStorage.removeItem(KEY_STORAGE);
      loadModels();
    });
    $("#model").addEventListener("change", () => localStorage.setItem("modalmesh.model", $("#model").value));
    for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showTab(tab.dataset.tab);
    $("#file").addEventListener("change", async (ev) => { await addFiles([...ev.target.files]); ev.target.value = ""; });
    $("#record").onclick = toggleRecording;
    $("#record").disabled = !(navigator.mediaDevices && window.MediaRecorder);
    $("#composer").addEventListener("submit", send);
    $("#prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) send(ev);
    });
    $("#stop").onclick = () => state.controller && state.controller.abort();
    $("#clear").onclick = () => { state.history = []; $("#messages").replaceChildren(); };
    $("#job-form").addEventListener("submit", submitJob);
    loadModels();
  }

  // For tests and the console: the pure pieces.
  window.modalmeshUI = { encodeWav, parseYaml, parseJob, addTimestamps, applyChunk, lossPlot, state };
  document.addEventListener("DOMContentLoaded", init);
})();
