// The search page: asks /api/search for the motions that match a description and draws each
// one as an animated stick figure from the joint positions of /api/motion/ID (metres, y up,
// the subject facing +z at frame 0, its left on +x). No library: a canvas and fetch.
"use strict";

// Okabe-Ito colours, as in rehamot/motion/stick_figure.py: left and right limbs stay distinguishable
// with the common colour-vision deficiencies.
const COLOURS = {left: "#D55E00", right: "#0072B2", centre: "#333333", floor: "#D9D9D9",
                 path: "#009E73", background: "#FFFFFF", text: "#777777"};
const VIEW = {azimuth: 0.6, elevation: 0.3};  // radians: the camera stands front-left, a little above
const GRID = {step: 0.5, extent: 2.0};  // metres of floor drawn around the root
const SIMILAR_K = 6;
const MOTION_CACHE_SIZE = 200;

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), status: $("status"), hits: $("hits"), info: $("info"),
  detail: $("detail"), close: $("detail-close"), canvas: $("detail-canvas"), title: $("detail-title"),
  meta: $("detail-meta"), captions: $("detail-captions"), closest: $("detail-closest"), similar: $("similar"),
};

let info = null;  // /api/info: the skeleton to draw and the index's size
const motionCache = new Map();  // motion id -> Promise of /api/motion/ID
const animations = new Map();  // canvas -> {figure, frame}: what the animation loop draws
let searchSeq = 0;  // only the latest search and detail view may write to the page
let detailSeq = 0;

async function getJSON(url) {
  const response = await fetch(url);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: the status text says enough
  }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function loadMotion(id) {
  let promise = motionCache.get(id);
  if (!promise) {
    promise = getJSON(`/api/motion/${encodeURIComponent(id)}`);
    promise.catch(() => motionCache.delete(id));  // a failure is not remembered
    motionCache.set(id, promise);
    if (motionCache.size > MOTION_CACHE_SIZE) motionCache.delete(motionCache.keys().next().value);
  }
  return promise;
}

// ------------------------------------------------------------------------------ drawing

class StickFigure {
  constructor(motion, skeleton) {
    this.joints = motion.joints;
    this.fps = motion.fps || 20;
    this.skeleton = skeleton;
    this.start = performance.now();
    let top = -Infinity;
    let bottom = Infinity;
    for (const pose of this.joints) {
      for (const joint of pose) {
        top = Math.max(top, joint[1]);
        bottom = Math.min(bottom, joint[1]);
      }
    }
    this.floor = Math.min(0, bottom);  // a motion that sinks below y = 0 stands on its lowest point
    this.height = Math.max(top - this.floor, 1.0);  // one scale per motion: a crouch looks small
    const a = VIEW.azimuth;
    const e = VIEW.elevation;
    // A rotation (never a mirror): screen right, screen up, and the direction towards the camera.
    this.right = [Math.cos(a), 0, -Math.sin(a)];
    this.up = [-Math.sin(e) * Math.sin(a), Math.cos(e), -Math.sin(e) * Math.cos(a)];
    this.toward = [Math.cos(e) * Math.sin(a), Math.sin(e), Math.cos(e) * Math.cos(a)];
    this.side = new Map();
    skeleton.left.forEach((c) => this.side.set(c, COLOURS.left));
    skeleton.right.forEach((c) => this.side.set(c, COLOURS.right));
  }

  frameAt(now) {
    // (a frame callback's time may precede this figure's start: it is when the frame began)
    return Math.floor((Math.max(0, now - this.start) / 1000) * this.fps) % this.joints.length;
  }

  draw(canvas, frame) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    const pose = this.joints[frame];
    const [cx, , cz] = pose[0];  // the camera follows the root over the floor
    const scale = (h * 0.78) / this.height;
    const [r, u] = [this.right, this.up];
    const project = (x, y, z) => {
      const dx = x - cx;
      const dy = y - this.floor;
      const dz = z - cz;
      return [w / 2 + scale * (dx * r[0] + dz * r[2]), h * 0.88 - scale * (dx * u[0] + dy * u[1] + dz * u[2])];
    };
    const line = (points) => {
      ctx.beginPath();
      points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
    };

    ctx.fillStyle = COLOURS.background;
    ctx.fillRect(0, 0, w, h);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";

    // The floor grid is fixed in the world, so it slides under a walking figure.
    ctx.strokeStyle = COLOURS.floor;
    ctx.lineWidth = Math.max(1, h / 300);
    const {step, extent} = GRID;
    for (let g = Math.ceil((cx - extent) / step) * step; g <= cx + extent; g += step) {
      line([project(g, this.floor, cz - extent), project(g, this.floor, cz + extent)]);
    }
    for (let g = Math.ceil((cz - extent) / step) * step; g <= cz + extent; g += step) {
      line([project(cx - extent, this.floor, g), project(cx + extent, this.floor, g)]);
    }

    // The root's path so far, on the floor.
    if (frame > 0) {
      ctx.strokeStyle = COLOURS.path;
      ctx.lineWidth = Math.max(1, h / 200);
      line(this.joints.slice(0, frame + 1).map((p) => project(p[0][0], this.floor, p[0][2])));
    }

    // Bones, the chains farthest from the camera first.
    const t = this.toward;
    const chains = this.skeleton.chains.map((chain, i) => {
      const depth = chain.reduce((sum, j) => sum + pose[j][0] * t[0] + pose[j][1] * t[1] + pose[j][2] * t[2], 0);
      return {chain, i, depth: depth / chain.length};
    });
    chains.sort((a, b) => a.depth - b.depth);
    const width = Math.max(2, h / 60);
    for (const {chain, i} of chains) {
      const colour = this.side.get(i) || COLOURS.centre;
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      line(chain.map((j) => project(...pose[j])));
      if (!this.side.has(i)) {  // the spine ends at the head
        const [hx, hy] = project(...pose[chain[chain.length - 1]]);
        ctx.fillStyle = colour;
        ctx.beginPath();
        ctx.arc(hx, hy, width * 1.7, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }
}

function fitCanvas(canvas) {
  // Sharp on high-density screens: as many canvas pixels as device pixels.
  const ratio = window.devicePixelRatio || 1;
  const size = canvas.clientWidth;
  if (size > 0) {
    canvas.width = Math.round(size * ratio);
    canvas.height = Math.round((canvas.clientHeight || size) * ratio);
  }
}

function animate(canvas, motion) {
  if (!info || !info.skeleton) return;
  fitCanvas(canvas);
  const figure = new StickFigure(motion, info.skeleton);
  figure.draw(canvas, 0);
  animations.set(canvas, {figure, frame: 0});
}

function drawMessage(canvas, message) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = COLOURS.text;
  ctx.font = `${Math.round(canvas.height / 14)}px sans-serif`;
  ctx.textAlign = "center";
  ctx.fillText(message, canvas.width / 2, canvas.height / 2);
}

function tick(now) {
  for (const [canvas, item] of animations) {
    if (!canvas.isConnected) {
      animations.delete(canvas);  // its hit was replaced by a newer search
    } else if (canvas.offsetParent !== null) {  // not inside a closed dialog
      const frame = item.figure.frameAt(now);
      if (frame !== item.frame) {  // redraw at the motion's frame rate, not the screen's
        item.figure.draw(canvas, frame);
        item.frame = frame;
      }
    }
  }
  requestAnimationFrame(tick);
}

// ------------------------------------------------------------------------------ hits

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // never innerHTML: captions are data
  return node;
}

const NO_CAPTIONS = "no captions";  // a motion of a folder index has its id alone

function listCaptions(list, captions) {
  if (!captions.length) list.append(element("li", "none", NO_CAPTIONS));
  captions.forEach((text) => list.append(element("li", "", text)));
}

function hitCard(hit) {
  const card = element("li", "hit");
  card.dataset.motionId = hit.motion_id;
  card.tabIndex = 0;
  card.setAttribute("role", "button");
  card.setAttribute("aria-label", `rank ${hit.rank}: motion ${hit.motion_id}, score ${hit.score.toFixed(3)}`);
  const canvas = element("canvas", "figure");
  canvas.width = canvas.height = 240;
  const meta = element("div", "meta");
  meta.append(element("span", "rank", `#${hit.rank}`), element("span", "id", hit.motion_id),
              element("span", "score", hit.score.toFixed(3)));
  const captions = element("ul", "captions");
  listCaptions(captions, hit.captions);
  card.title = hit.captions.join("\n") || NO_CAPTIONS;  // every caption, whole, on hover
  card.append(canvas, meta, captions);
  if (hit.captions.length > 2) card.append(element("p", "more", `+${hit.captions.length - 2} more`));
  card.addEventListener("click", () => openDetail(hit.motion_id));
  card.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openDetail(hit.motion_id);
    }
  });
  loadMotion(hit.motion_id).then(
    (motion) => {
      animate(canvas, motion);
      card.classList.add("loaded");
    },
    (err) => {
      drawMessage(canvas, err.message.slice(0, 40));
      card.classList.add("failed");
    },
  );
  return card;
}

function renderHits(list, hits) {
  list.replaceChildren(...hits.map(hitCard));
}

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

async function runSearch(text) {
  const q = text.trim();
  els.q.value = text;
  document.title = q ? `${q} · rehamot` : "rehamot · motion search";
  const seq = ++searchSeq;
  if (!q) {
    els.hits.replaceChildren();
    setStatus(info ? `Describe a motion to search ${info.num_motions} ${info.split || ""} motions.` : "");
    return;
  }
  setStatus("Searching…");
  const started = performance.now();
  const k = new URLSearchParams(window.location.search).get("k");
  try {
    const result = await getJSON(`/api/search?q=${encodeURIComponent(q)}${k ? `&k=${encodeURIComponent(k)}` : ""}`);
    if (seq !== searchSeq) return;
    renderHits(els.hits, result.hits);
    setStatus(`${result.hits.length} motions for “${result.query}” · ${Math.round(performance.now() - started)} ms`);
  } catch (err) {
    if (seq !== searchSeq) return;
    els.hits.replaceChildren();
    setStatus(err.message, true);
  }
}

// ------------------------------------------------------------------------------ one motion

async function openDetail(id) {
  const seq = ++detailSeq;
  els.detail.dataset.motionId = id;
  els.title.textContent = `Motion ${id}`;
  els.meta.textContent = "Loading…";
  els.captions.replaceChildren();
  els.closest.replaceChildren();
  els.similar.replaceChildren();
  animations.delete(els.canvas);
  if (!els.detail.open) els.detail.showModal();
  els.detail.scrollTop = 0;
  try {
    const [motion, similar] = await Promise.all([
      loadMotion(id), getJSON(`/api/similar/${encodeURIComponent(id)}?k=${SIMILAR_K}`)]);
    if (seq !== detailSeq) return;
    const frames = motion.joints.length;
    els.meta.textContent = `${frames} frames · ${(frames / motion.fps).toFixed(1)} s at ${motion.fps} fps`;
    listCaptions(els.captions, motion.captions);
    for (const hit of similar.captions) {
      const item = element("li", hit.motion_id === id ? "own" : "");
      item.append(element("span", "score", hit.score.toFixed(3)), element("span", "", hit.text));
      if (hit.motion_id === id) item.append(element("span", "mark", "✓ its own"));
      els.closest.append(item);
    }
    renderHits(els.similar, similar.motions);
    animate(els.canvas, motion);
  } catch (err) {
    if (seq === detailSeq) els.meta.textContent = err.message;
  }
}

// ------------------------------------------------------------------------------ start

function queryOfLocation() {
  return new URLSearchParams(window.location.search).get("q") || "";
}

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const q = els.q.value.trim();
  window.history.pushState(null, "", q ? `/?q=${encodeURIComponent(q)}` : "/");  // a link to share
  runSearch(els.q.value);
});
window.addEventListener("popstate", () => runSearch(queryOfLocation()));
els.close.addEventListener("click", () => els.detail.close());
els.detail.addEventListener("click", (event) => {
  if (event.target === els.detail) els.detail.close();  // a click on the backdrop
});

(async () => {
  try {
    info = await getJSON("/api/info");
    els.info.textContent = `${info.num_motions} ${info.split || ""} motions` +
      (info.corpus ? ` of ${info.corpus}` : "") + (info.layout ? ` · ${info.layout} skeleton at ${info.fps} fps` : "");
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  requestAnimationFrame(tick);
  runSearch(queryOfLocation());
})();
