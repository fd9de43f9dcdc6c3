/**
 * The edgetl web page: pick a bundle folder, verify it (sha256, optional Ed25519) and run its
 * self-test, read a CSV sensor log (or .npz windows; for image bundles a folder of photos,
 * decoded by the browser and preprocessed as Pillow does), personalise the head with the
 * TypeScript runner and download head.npz and report.json, as the Python runner writes them.
 * The runtime follows the bundle's `target`: onnxruntime-web (WASM) for onnx bundles,
 * LiteRT.js (`@litertjs/core`, WASM, loaded when the first TFLite bundle is picked) for
 * tflite bundles. Everything runs in this page; nothing is sent anywhere.
 */
import * as ort from "onnxruntime-web";
import {
  adapt, Backend, Bundle, collectImages, Dataset, ImageDataLike, imageDataset, LiteRt,
  LiteRtBackend, loadDataBytes, OrtBackend, RunnerError, selftestForward, selftestTrain, Skipped,
  stateFiles,
} from "@edgetl/edgerun";

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page element #${id} is missing`);
  return el as T;
};

interface State {
  bundle?: Bundle;
  backend?: Backend;
  data?: Dataset;
  dataName?: string;
  trustKey?: string;
  busy: boolean;
}
const state: State = { busy: false };
const downloads = new Map<string, Blob>();

// Threads: ?threads=N, else up to 4 when the page is cross-origin isolated (COOP/COEP headers:
// `make web` sends them), else 1 (WASM threads need SharedArrayBuffer).
const asked = Number(new URLSearchParams(location.search).get("threads"));
const threads = Number.isInteger(asked) && asked > 0 ? asked
  : (globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
ort.env.wasm.numThreads = threads;
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.logLevel = "error";

const ortRuntime = `onnxruntime-web ${ort.env.versions.web ?? ""} (WebAssembly, ` +
  `${threads} thread${threads > 1 ? "s" : ""}${globalThis.crossOriginIsolated ? ", cross-origin isolated" : ""})`;

// LiteRT.js, loaded on first use: the module (through the import map; a variable specifier
// keeps its typings, which need WebGPU's, out of this page's build) and its WASM CPU build
// from dist/litert/wasm/ (build.mjs copies both from node_modules).
interface LiteRtModule extends LiteRt { loadLiteRt(path: string): Promise<unknown> }
let liteRt: Promise<{ lrt: LiteRtModule; version: string }> | undefined;
function loadLiteRtOnce(): Promise<{ lrt: LiteRtModule; version: string }> {
  liteRt ??= (async () => {
    const spec = "@litertjs/core";
    const lrt = await import(spec) as LiteRtModule;
    await lrt.loadLiteRt(new URL("./litert/wasm/", import.meta.url).href);
    const info = await (await fetch(new URL("./litert/version.json", import.meta.url))).json() as
      { version: string };
    return { lrt, version: info.version };
  })();
  liteRt.catch(() => { liteRt = undefined; });
  return liteRt;
}

async function backendFor(bundle: Bundle): Promise<Backend> {
  if (bundle.manifest.target !== "tflite") {
    $("runtime").textContent = `Runtime: ${ortRuntime}.`;
    return OrtBackend.create(ort, bundle, { name: "onnxruntime-web", threads });
  }
  const { lrt, version } = await loadLiteRtOnce();
  $("runtime").textContent = `Runtime: LiteRT.js ${version} (WebAssembly, CPU) for this TFLite bundle.`;
  return LiteRtBackend.create(lrt, bundle, { name: "litert.js", version });
}

function showError(e: unknown, during: string): void {
  const box = $("error");
  const msg = e instanceof RunnerError ? e.message
    : `unexpected error while ${during}: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`;
  box.textContent = `${during[0].toUpperCase()}${during.slice(1)} failed: ${msg}`;
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
  if (!(e instanceof RunnerError)) console.error(e);
}

function clearError(): void {
  $("error").hidden = true;
  $("error").textContent = "";
}

function fmt(x: unknown, digits = 3): string {
  return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(digits)) : String(x);
}

function list(el: HTMLElement, title: string, items: string[]): void {
  const p = document.createElement("div");
  p.textContent = title;
  const ul = document.createElement("ul");
  for (const t of items) {
    const li = document.createElement("li");
    li.textContent = t;
    ul.append(li);
  }
  el.append(p, ul);
}

function resetAfter(step: "bundle" | "data"): void {
  if (step === "bundle") {
    state.bundle = undefined;
    if (state.backend instanceof LiteRtBackend) state.backend.delete(); // WASM memory, not GC'd
    state.backend = undefined;
    $("bundle-info").hidden = true;
    $("selftest").textContent = "";
    $("selftest").dataset.state = "idle";
    $<HTMLInputElement>("data-input").disabled = true;
    $<HTMLInputElement>("folder-input").disabled = true;
  }
  state.data = undefined;
  $("data-info").hidden = true;
  $<HTMLButtonElement>("personalise").disabled = true;
  $("result").hidden = true;
  $("result").dataset.state = "idle";
  $<HTMLProgressElement>("progress").value = 0;
  $("progress-text").textContent = "";
  downloads.clear();
  for (const id of ["download-head", "download-report", "download-rejected"]) {
    $<HTMLButtonElement>(id).disabled = true;
  }
  $("download-rejected").hidden = true;
}

/** The bundle's files by name: the folder holding manifest.json (the shallowest one). */
function bundleFiles(files: File[]): Map<string, File> {
  const path = relPath;
  const manifests = files.filter((f) => path(f).split("/").pop() === "manifest.json")
    .sort((a, b) => path(a).split("/").length - path(b).split("/").length);
  if (!manifests.length) {
    const names = files.slice(0, 8).map(path).join(", ") || "no files";
    throw new RunnerError(`the folder you picked has no manifest.json (found: ${names}` +
      `${files.length > 8 ? `, … ${files.length} files` : ""}); pick the bundle folder that ` +
      "`edgetl export` wrote (it holds manifest.json, the .onnx or .tflite graphs and the .npz files)");
  }
  const dir = path(manifests[0]).slice(0, -"manifest.json".length);
  const out = new Map<string, File>();
  for (const f of files) {
    const p = path(f);
    if (p.startsWith(dir) && !p.slice(dir.length).includes("/")) out.set(p.slice(dir.length), f);
  }
  return out;
}

async function loadBundle(files: File[]): Promise<void> {
  if (state.busy) return;
  state.busy = true;
  clearError();
  resetAfter("bundle");
  const st = $("selftest");
  try {
    const picked = bundleFiles(files);
    st.textContent = `Reading ${picked.size} files…`;
    const bytes = new Map<string, Uint8Array>();
    for (const [name, f] of picked) bytes.set(name, new Uint8Array(await f.arrayBuffer()));
    st.textContent = "Checking sha256 of every file…";
    const t0 = performance.now();
    const bundle = await Bundle.fromFiles(bytes, { trustKey: state.trustKey,
      source: "the picked folder" });
    const m = bundle.manifest;
    const info = $("bundle-info");
    info.replaceChildren();
    const head = document.createElement("p");
    head.className = "ok";
    head.id = "manifest-ok";
    head.textContent = `✓ ${m.name} v${m.version} (${m.target}, ${m.precision}, ` +
      `${m.input.modality ?? "timeseries"} input): ${Object.keys(m.files).length} files match ` +
      `their sha256${state.trustKey ? "; Ed25519 signature verified" : ""}`;
    info.append(head);
    const tr = m.trainable; // a tail bundle (--trainable SPEC): backbone tensors train too
    const trains = document.createElement("p");
    trains.id = "trains";
    trains.textContent = tr ? `Trains: the head and ${tr.params.length} backbone tensor(s) ` +
      `(--trainable ${tr.spec}; the backbone graph runs up to ${tr.cut.node})` : "Trains: the head";
    info.append(trains);
    list(info, `Labels: ${m.labels.join(", ")}`, Object.entries(m.files).map(([role, e]) =>
      `${e.path} (${role}) sha256 ${e.sha256.slice(0, 16)}… ✓`));
    info.hidden = false;
    st.textContent = "Running the self-test…";
    const backend = await backendFor(bundle);
    const fwd = await selftestForward(bundle, backend);
    const train = await selftestTrain(bundle, backend);
    st.dataset.state = "passed";
    st.textContent = `✓ Self-test passed: reference features and logits (max abs err ` +
      `${fwd.toPrecision(2)}) and train steps (${train.toPrecision(2)}) reproduced in ` +
      `${((performance.now() - t0) / 1000).toFixed(1)} s`;
    state.bundle = bundle;
    state.backend = backend;
    $<HTMLInputElement>("epochs").value = String(m.adapt.epochs);
    $<HTMLInputElement>("lr").value = String((m.optimizer.hparams as Record<string, unknown>).lr ?? "");
    $<HTMLInputElement>("data-input").disabled = false;
    $<HTMLInputElement>("folder-input").disabled = m.input.modality !== "image";
  } catch (e) {
    st.dataset.state = "failed";
    st.textContent = "✗ The bundle was not accepted (see above).";
    showError(e, "loading the bundle");
  } finally {
    state.busy = false;
  }
}

async function loadData(file: File): Promise<void> {
  if (state.busy) return;
  if (!state.bundle) {
    showError(new RunnerError("pick the bundle first (step 1); the data is read with its manifest"),
      "reading the data");
    return;
  }
  state.busy = true;
  clearError();
  resetAfter("data");
  try {
    const ds = await loadDataBytes(new Uint8Array(await file.arrayBuffer()), file.name, state.bundle);
    if (!ds.y) {
      throw new RunnerError(`${file.name} has no labels (no 'label' column or 'y' array); ` +
        "personalising needs labelled data: add a label column");
    }
    showData(ds, file.name, state.bundle);
  } catch (e) {
    showError(e, "reading the data");
  } finally {
    state.busy = false;
  }
}

function showData(ds: Dataset, name: string, bundle: Bundle): void {
  const y = ds.y as string[];
  const counts = new Map<string, number>();
  for (const l of y) counts.set(l, (counts.get(l) ?? 0) + 1);
  const info = $("data-info");
  info.replaceChildren();
  const known = new Set(bundle.manifest.labels);
  const noun = bundle.manifest.input.modality === "image" ? "images" : "windows";
  list(info, `✓ ${name}: ${ds.n} ${noun}`, [...counts].map(([l, c]) =>
    `${l}: ${c}${known.has(l) ? "" : " (new label: it will be imprinted)"}`));
  const skipped = ds.skipped ?? [];
  if (skipped.length) {
    list(info, `Skipped ${skipped.length} file(s), as the Python runner does:`,
      skipped.slice(0, 20).map((s) => `${s.path}: ${s.reason}`));
  }
  info.hidden = false;
  state.data = ds;
  state.dataName = name;
  $<HTMLButtonElement>("personalise").disabled = false;
}

/**
 * One photo -> RGBA pixels as stored: no colour-space conversion, no premultiplication (the
 * canvas still stores premultiplied alpha: pixels with 0 < alpha < 255 may round differently
 * from Pillow, which drops alpha; opaque images are exact).
 */
async function decodeImage(blob: Blob): Promise<ImageDataLike> {
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none",
    premultiplyAlpha: "none", imageOrientation: "from-image" });
  try {
    const canvas = new OffscreenCanvas(bmp.width, bmp.height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    if (!ctx) throw new Error("no 2d canvas context");
    ctx.drawImage(bmp, 0, 0);
    return ctx.getImageData(0, 0, bmp.width, bmp.height, { colorSpace: "srgb" });
  } finally {
    bmp.close();
  }
}
// for the console and the tests: the page's own decoder
(globalThis as unknown as { edgetl: unknown }).edgetl = { decodeImage };

const relPath = (f: File) => (f as File & { relPath?: string }).relPath || f.webkitRelativePath || f.name;

/** A folder of photos `root/<label>/**` -> the image dataset, files skipped as by run.py. */
async function loadFolder(files: File[]): Promise<void> {
  if (state.busy) return;
  const bundle = state.bundle;
  if (!bundle || bundle.manifest.input.modality !== "image") {
    showError(new RunnerError(bundle ? "this bundle does not take images; pick its data file " +
      "(a .csv log or .npz windows)" : "pick the bundle first (step 1); the photos are read " +
      "with its manifest"), "reading the photos");
    return;
  }
  state.busy = true;
  clearError();
  resetAfter("data");
  const bar = $<HTMLProgressElement>("progress");
  const text = $("progress-text");
  try {
    const byPath = new Map(files.map((f) => [relPath(f), f]));
    const paths = [...byPath.keys()];
    const root = paths.length ? paths[0].split("/")[0] : "";
    if (!paths.some((p) => p.split("/").filter(Boolean).length >= 2)) {
      throw new RunnerError(`pick (or drop) the folder of photos itself (${root || "photos"}/` +
        "<label>/<image>.png), not single files");
    }
    const [todo, skipped] = collectImages(paths);
    const images: Array<{ image: ImageDataLike; label: string }> = [];
    const failed: Skipped[] = [];
    let translucent = 0;
    bar.max = Math.max(todo.length, 1);
    for (const [i, [p, label]] of todo.entries()) {
      const f = byPath.get(p) as File;
      if (f.size === 0) {
        failed.push({ path: p, reason: "empty file (0 bytes)" });
      } else {
        try {
          const image = await decodeImage(f);
          images.push({ image, label });
          for (let k = 3; k < image.data.length; k += 4) {
            if (image.data[k] !== 255) { translucent++; break; }
          }
        } catch (e) {
          failed.push({ path: p, reason: `unreadable image (the browser could not decode it: ` +
            `${e instanceof Error ? e.message : String(e)})` });
        }
      }
      bar.value = i + 1;
      if (i % 16 === 15 || i === todo.length - 1) {
        text.textContent = `Decoding photos: ${i + 1}/${todo.length}`;
        await new Promise((r) => setTimeout(r, 0)); // let the browser draw the bar
      }
    }
    const ds = imageDataset(images, bundle.manifest, root, [...skipped, ...failed]);
    text.textContent = `Decoded ${images.length} photos` +
      (failed.length ? `; ${failed.length} could not be used` : "") +
      (translucent ? `; ${translucent} have transparent pixels, whose colours the browser's ` +
        "canvas rounds (the Python runner keeps them exactly; flatten them for identical results)"
        : "");
    showData(ds, root, bundle);
  } catch (e) {
    showError(e, "reading the photos");
  } finally {
    state.busy = false;
  }
}

function numberField(id: string, integer: boolean): number | undefined {
  const el = $<HTMLInputElement>(id);
  if (el.value.trim() === "") return undefined;
  const x = Number(el.value);
  if (!Number.isFinite(x) || x < 0 || (integer && !Number.isInteger(x))) {
    throw new RunnerError(`${el.labels?.[0]?.textContent?.trim() ?? id} must be a ` +
      `${integer ? "whole number" : "number"} >= 0, got '${el.value}'`);
  }
  return x;
}

function offer(name: string, bytes: Uint8Array | string, type: string, id: string): void {
  downloads.set(name, new Blob([bytes as BlobPart], { type }));
  const b = $<HTMLButtonElement>(id);
  b.disabled = false;
  b.hidden = false;
}

async function personalise(): Promise<void> {
  const { bundle, backend, data } = state;
  if (state.busy || !bundle || !backend || !data) return;
  state.busy = true;
  clearError();
  resetAfter("data");
  state.data = data;
  $("data-info").hidden = false;
  const bar = $<HTMLProgressElement>("progress");
  const text = $("progress-text");
  try {
    const epochs = numberField("epochs", true);
    const seed = numberField("seed", true) ?? 0;
    const lr = numberField("lr", false);
    const t0 = performance.now();
    bar.max = Math.max(epochs ?? bundle.manifest.adapt.epochs, 1);
    text.textContent = "Self-test, then backbone features of every window…";
    await new Promise((r) => setTimeout(r, 0));
    const r = await adapt(bundle, backend, data, { epochs, seed, lr, startedAt: t0,
      onEpoch: async (h, n) => {
        bar.max = Math.max(n, 1);
        bar.value = h.epoch;
        text.textContent = `epoch ${h.epoch}/${n}: train loss ${fmt(h.loss, 4)}, validation ` +
          `loss ${fmt(h.val_loss, 4)}, validation accuracy ${fmt(h.val_accuracy)}`;
        await new Promise((res) => setTimeout(res, 0)); // let the browser draw the bar
      } });
    const rep = r.report;
    const base = state.dataName ?? data.source;
    const files = stateFiles(bundle, r, base);
    rep.data = base;
    rep.checkpoint = "head.npz";
    rep.checkpoint_written = files.head !== null;
    rep.total_seconds = (performance.now() - t0) / 1000;
    bar.value = bar.max;
    text.textContent += ` — done in ${(rep.total_seconds as number).toPrecision(2)} s (${rep.steps} steps, ` +
      (bundle.manifest.target === "tflite" ? "LiteRT.js)"
        : `${threads} WASM thread${threads > 1 ? "s" : ""})`);
    const gate = rep.gate as Record<string, unknown>;
    $("acc-before").textContent = fmt(rep.accuracy_before);
    $("acc-after").textContent = fmt(rep.accuracy_after);
    const d = $("decision");
    d.className = rep.rolled_back ? "rolled-back" : "kept";
    d.textContent = (rep.rolled_back ? "The gate kept the current head: " : "The gate kept the new head: ") +
      String(gate.reason);
    const body = $("gate").querySelector("tbody") as HTMLElement;
    // the replay check (bundles with a replay set): what the server's windows say of both heads
    const replay = Object.entries((rep.replay ?? {}) as Record<string, unknown>)
      .map(([k, v]): [string, unknown] => [`replay.${k}`, v]);
    body.replaceChildren(...[...Object.entries(gate), ...replay].map(([k, v]) => {
      const tr = document.createElement("tr");
      const a = document.createElement("td");
      const b = document.createElement("td");
      a.textContent = k;
      b.textContent = typeof v === "number" ? String(Number(v.toPrecision(4))) : JSON.stringify(v);
      tr.append(a, b);
      return tr;
    }));
    if (files.head) offer("head.npz", files.head, "application/octet-stream", "download-head");
    if (files.rejected) offer("head.rejected.npz", files.rejected, "application/octet-stream", "download-rejected");
    offer("report.json", JSON.stringify(rep, null, 2), "application/json", "download-report");
    $("result").hidden = false;
    $("result").dataset.state = "done";
  } catch (e) {
    text.textContent = "";
    showError(e, "personalising");
  } finally {
    state.busy = false;
    $<HTMLButtonElement>("personalise").disabled = !state.data; // again, with other settings
  }
}

function download(name: string): void {
  const blob = downloads.get(name);
  if (!blob) return;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

/** Every file under a dropped folder (or the dropped files), with their relative paths. */
async function droppedFiles(dt: DataTransfer): Promise<File[]> {
  const out: File[] = [];
  const walk = async (entry: FileSystemEntry, prefix: string): Promise<void> => {
    if (entry.isFile) {
      const f = await new Promise<File>((res, rej) => (entry as FileSystemFileEntry).file(res, rej));
      Object.defineProperty(f, "relPath", { value: prefix + entry.name });
      out.push(f);
    } else if (entry.isDirectory) {
      const reader = (entry as FileSystemDirectoryEntry).createReader();
      for (;;) { // readEntries returns at most 100 entries per call
        const batch = await new Promise<FileSystemEntry[]>((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e, `${prefix}${entry.name}/`);
      }
    }
  };
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry()).filter((e): e is FileSystemEntry => !!e);
  if (!entries.length) return [...dt.files]; // no entry API (or files made by a script)
  for (const e of entries) await walk(e, "");
  return out;
}

function dropZone(id: string, onFiles: (files: File[]) => void): void {
  const z = $(id);
  z.addEventListener("dragover", (ev) => { ev.preventDefault(); z.classList.add("over"); });
  z.addEventListener("dragleave", () => z.classList.remove("over"));
  z.addEventListener("drop", (ev) => {
    ev.preventDefault();
    z.classList.remove("over");
    if (ev.dataTransfer) droppedFiles(ev.dataTransfer).then(onFiles, (e) => showError(e, "reading the dropped files"));
  });
}

$("runtime").textContent = `Runtime: ${ortRuntime}; TFLite bundles run on LiteRT.js.`;
$("bundle-input").addEventListener("change", (ev) => {
  const files = [...((ev.target as HTMLInputElement).files ?? [])];
  if (files.length) void loadBundle(files);
});
$("trust-input").addEventListener("change", async (ev) => {
  const f = (ev.target as HTMLInputElement).files?.[0];
  state.trustKey = f ? await f.text() : undefined;
  const picked = [...($<HTMLInputElement>("bundle-input").files ?? [])];
  if (picked.length) void loadBundle(picked); // re-check the bundle with the key
});
$("data-input").addEventListener("change", (ev) => {
  const f = (ev.target as HTMLInputElement).files?.[0];
  if (f) void loadData(f);
});
$("folder-input").addEventListener("change", (ev) => {
  const files = [...((ev.target as HTMLInputElement).files ?? [])];
  if (files.length) void loadFolder(files);
});
dropZone("bundle-drop", (files) => void loadBundle(files));
dropZone("data-drop", (files) => {
  if (files.some((f) => relPath(f).includes("/"))) {
    void loadFolder(files); // a dropped folder of photos
  } else if (files.length !== 1) {
    showError(new RunnerError(`drop one data file (a .csv or .npz), not ${files.length}`), "reading the data");
  } else {
    void loadData(files[0]);
  }
});
$("personalise").addEventListener("click", () => void personalise());
$("download-head").addEventListener("click", () => download("head.npz"));
$("download-report").addEventListener("click", () => download("report.json"));
$("download-rejected").addEventListener("click", () => download("head.rejected.npz"));
document.body.dataset.ready = "1";
