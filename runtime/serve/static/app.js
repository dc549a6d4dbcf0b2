// talkrt live client (protocol v1, docs/protocol.md): sends PCM s16le mono in 20 ms packets,
// draws each frame's JPEG and plays its PCM with WebAudio at t0 + pts, so picture and sound
// share one clock. window.talkrtStats exposes the counters (the browser test reads them).
"use strict";

const $ = (id) => document.getElementById(id);
const PACKET_S = 0.02;
const PLAYOUT_MARGIN_S = 0.15;  // a frame is shown this long after its arrival at the earliest
// A server started with --api-key: open the page as /?token=KEY; the key goes with every request
// (a header for fetch, the query for the WebSocket, which cannot carry headers).
const TOKEN = new URLSearchParams(location.search).get("token");
const AUTH = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

const stats = (window.talkrtStats = {
  state: "idle", framesReceived: 0, framesDrawn: 0, speakingFrames: 0,
  audioScheduled: 0, fps: 0, latencyMs: null, latenessMs: null, samplesSent: 0,
});

let ctx = null;        // one AudioContext: capture, decoding and playback
let session = null;    // the open session, see startSession
let liveOff = null;    // why this server has no live sessions (its /healthz says live: false), else null

function setState(state) {
  stats.state = state;
  $("state").textContent = state;
  const live = state === "live";
  $("interrupt").disabled = !live;
  $("stop").disabled = !live;
  $("mic").disabled = state !== "idle" || liveOff !== null;
  $("wav").disabled = state !== "idle" || liveOff !== null;
}

// A server whose model family makes jobs only (LatentSync) answers /healthz with live: false;
// the session buttons then stay off and the page says why. Polled until the models are loaded.
async function checkLive() {
  const r = await fetch("/healthz");
  if (r.status === 503) { setTimeout(checkLive, 2000); return; }
  if (!r.ok) return;
  const health = await r.json();
  if (health.live === false) {
    liveOff = `This server runs ${health.family} (${health.config}), which makes offline jobs only ` +
      "(POST /v1/jobs, docs/jobs.md): no live sessions.";
    $("live-off").textContent = liveOff;
    $("live-off").hidden = false;
    setState(stats.state);
  }
  stats.live = health.live;
}

async function audioContext() {
  if (!ctx) {
    ctx = new AudioContext();
    // The protocol accepts 8-48 kHz.
    if (ctx.sampleRate > 48000) { await ctx.close(); ctx = new AudioContext({ sampleRate: 48000 }); }
  }
  if (ctx.state === "suspended") await ctx.resume();
  return ctx;
}

// ---- avatars ------------------------------------------------------------------------------

async function loadAvatars(selectId) {
  const r = await fetch("/v1/avatars", { headers: AUTH });
  if (!r.ok) { $("upload-status").textContent = `avatars: HTTP ${r.status}`; return; }
  const { avatars } = await r.json();
  const select = $("avatar");
  select.replaceChildren();
  for (const a of avatars) {
    const opt = document.createElement("option");
    opt.value = a.id;
    opt.disabled = a.status !== "ready";
    opt.textContent = a.status === "ready" ? `${a.id} (${a.width}x${a.height}, ${a.frames} frames)` : `${a.id} (${a.status})`;
    select.append(opt);
  }
  if (selectId) select.value = selectId;
}

async function upload(file) {
  const status = $("upload-status");
  const form = new FormData();
  form.append("video", file, file.name);
  status.textContent = `uploading ${file.name}...`;
  const r = await fetch("/v1/avatars", { method: "POST", body: form, headers: AUTH });
  const body = await r.json();
  if (!r.ok) { status.textContent = `upload failed: ${(body.error && body.error.message) || r.status}`; return; }
  let info = body;
  while (info.status === "preparing") {
    status.textContent = `preparing ${info.id}...`;
    await new Promise((res) => setTimeout(res, 500));
    info = await (await fetch(`/v1/avatars/${info.id}`, { headers: AUTH })).json();
  }
  await loadAvatars(info.status === "ready" ? info.id : undefined);
  status.textContent = info.status === "ready" ? `${info.id} ready` : `${info.id} ${info.status}: ${info.error || ""}`;
}

// ---- the session --------------------------------------------------------------------------

function toS16(float32) {
  const out = new Int16Array(float32.length);
  for (let i = 0; i < float32.length; i++) {
    const v = Math.max(-1, Math.min(1, float32[i]));
    out[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
  }
  return out;
}

// Opens WS /v1/live; resolves with the session once the server answered "ready".
function startSession(sampleRate) {
  return new Promise((resolve, reject) => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "";
    const ws = new WebSocket(`${proto}//${location.host}/v1/live${query}`);
    ws.binaryType = "arraybuffer";
    const s = {
      ws, sampleRate, ready: null, readyAt: 0, t0: null, sendTimes: [], sentSamples: 0,
      speechSamples: 0, afterInterrupt: false, arrivals: [], stopCapture: () => {},
      packet: sampleRate * PACKET_S, pending: new Float32Array(0),
    };
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", avatar: $("avatar").value, sample_rate: sampleRate }));
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") { onFrame(s, ev.data); return; }
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") {
        s.ready = msg; s.readyAt = performance.now();
        $("screen").width = msg.width; $("screen").height = msg.height;
        resolve(s);
      } else if (msg.type === "error") {
        $("upload-status").textContent = `error ${msg.code}: ${msg.message}`;
        reject(new Error(msg.message));
      } else if (msg.type === "speech_dropped") {   // a failed server step: the session stays open, idle
        stats.speechDropped = (stats.speechDropped || 0) + 1;
        $("upload-status").textContent = `speech dropped from frame ${msg.index} (${msg.code}): ${msg.message}`;
      }
    };
    ws.onclose = () => { s.stopCapture(); if (session === s) { session = null; setState("idle"); } reject(new Error("closed")); };
    session = s;
  });
}

// Sends float samples in whole 20 ms packets, remembering when each sample position was sent.
function sendAudio(s, float32) {
  const joined = new Float32Array(s.pending.length + float32.length);
  joined.set(s.pending); joined.set(float32, s.pending.length);
  let i = 0;
  for (; i + s.packet <= joined.length; i += s.packet) {
    if (s.ws.readyState !== WebSocket.OPEN) return;
    s.ws.send(toS16(joined.subarray(i, i + s.packet)).buffer);
    s.sentSamples += s.packet;
    s.sendTimes.push([s.sentSamples, performance.now()]);
    if (s.sendTimes.length > 3000) s.sendTimes.shift();
  }
  s.pending = joined.slice(i);
  stats.samplesSent = s.sentSamples;
}

function sentAt(s, samplePos) {
  for (const [pos, t] of s.sendTimes) if (pos >= samplePos) return t;
  return null;
}

function onFrame(s, buf) {
  const now = performance.now();
  const view = new DataView(buf);
  const n = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const jpeg = new Blob([new Uint8Array(buf, 4 + n, header.jpeg_bytes)], { type: "image/jpeg" });
  const pcm = new Int16Array(buf.slice(4 + n + header.jpeg_bytes, 4 + n + header.jpeg_bytes + header.pcm_bytes));
  stats.framesReceived++;
  s.arrivals.push(now);
  while (s.arrivals.length && s.arrivals[0] < now - 1000) s.arrivals.shift();
  stats.fps = s.arrivals.length;
  stats.latenessMs = Math.round(now - s.readyAt - header.pts * 1000);

  // Speech latency: the speaking frames' PCM, concatenated, is every sample sent, in order;
  // after an interrupt the dropped audio is skipped at the first idle frame.
  let needSentAt = null;
  if (header.speaking && !s.afterInterrupt) {
    s.speechSamples += pcm.length;
    stats.speakingFrames++;
    needSentAt = sentAt(s, s.speechSamples);
  } else if (!header.speaking && s.afterInterrupt) {
    s.afterInterrupt = false;
    s.speechSamples = s.sentSamples;
  }

  // One clock for picture and sound: frame k plays at t0 + pts on the AudioContext's clock.
  if (s.t0 === null || s.t0 + header.pts < ctx.currentTime + 0.02) s.t0 = ctx.currentTime + PLAYOUT_MARGIN_S - header.pts;
  const at = s.t0 + header.pts;
  if (pcm.length) {
    const ab = ctx.createBuffer(1, pcm.length, s.sampleRate);
    const ch = ab.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = ctx.createBufferSource();
    src.buffer = ab;
    src.connect(ctx.destination);
    src.start(at);
    stats.audioScheduled++;
  }
  createImageBitmap(jpeg).then((bitmap) => {
    const draw = () => {
      $("screen").getContext("2d").drawImage(bitmap, 0, 0);
      bitmap.close();
      stats.framesDrawn++;
      if (needSentAt !== null) stats.latencyMs = Math.round(performance.now() - needSentAt);
      showStats();
    };
    setTimeout(draw, Math.max(0, (at - ctx.currentTime) * 1000));
  });
}

function showStats() {
  $("fps").textContent = stats.fps;
  $("latency").textContent = stats.latencyMs ?? "-";
  $("lateness").textContent = stats.latenessMs ?? "-";
  $("drawn").textContent = stats.framesDrawn;
  $("speaking").textContent = stats.speakingFrames;
}

async function speakMicrophone() {
  setState("connecting");
  try {
    const ac = await audioContext();
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    const s = await startSession(ac.sampleRate);
    const source = ac.createMediaStreamSource(stream);
    // ScriptProcessor: no extra module file; its output goes through a muted gain so it runs.
    const proc = ac.createScriptProcessor(1024, 1, 1);
    const mute = ac.createGain();
    mute.gain.value = 0;
    proc.onaudioprocess = (ev) => sendAudio(s, ev.inputBuffer.getChannelData(0));
    source.connect(proc); proc.connect(mute); mute.connect(ac.destination);
    s.stopCapture = () => { proc.disconnect(); source.disconnect(); stream.getTracks().forEach((t) => t.stop()); };
    setState("live");
  } catch (err) {
    $("upload-status").textContent = `microphone session failed: ${err.message}`;
    if (session) session.ws.close();
    setState("idle");
  }
}

async function playWav(file) {
  setState("connecting");
  try {
    const ac = await audioContext();
    // decodeAudioData resamples to the context's rate; the first channel is sent.
    const decoded = await ac.decodeAudioData(await file.arrayBuffer());
    const samples = decoded.getChannelData(0);
    const s = await startSession(ac.sampleRate);
    setState("live");
    const begin = performance.now();
    let pos = 0;
    const timer = setInterval(() => {
      // Real time: send every packet whose start time has passed.
      const due = Math.min(samples.length, Math.floor(((performance.now() - begin) / 1000 + PACKET_S) * ac.sampleRate));
      if (due > pos) { sendAudio(s, samples.subarray(pos, due)); pos = due; }
      if (pos >= samples.length) {
        clearInterval(timer);
        if (s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify({ type: "end" }));
      }
    }, PACKET_S * 1000);
    s.stopCapture = () => clearInterval(timer);
  } catch (err) {
    $("upload-status").textContent = `WAV session failed: ${err.message}`;
    if (session) session.ws.close();
    setState("idle");
  }
}

$("refresh").onclick = () => loadAvatars($("avatar").value);
$("upload").onchange = (ev) => ev.target.files[0] && upload(ev.target.files[0]);
$("mic").onclick = speakMicrophone;
$("wav").onchange = (ev) => { if (ev.target.files[0]) playWav(ev.target.files[0]); ev.target.value = ""; };
$("interrupt").onclick = () => {
  if (!session) return;
  session.ws.send(JSON.stringify({ type: "interrupt" }));
  session.afterInterrupt = true;
  session.pending = new Float32Array(0);
};
$("stop").onclick = () => {
  if (!session) return;
  session.stopCapture();
  session.ws.send(JSON.stringify({ type: "stop" }));
};
setState("idle");
loadAvatars();
checkLive();
