/**
 * Device data for time-series bundles, as the Python runner (`edgerun/data.py`) reads it:
 *
 * - `.npz`: `x` (N, T, C) numeric windows, optional `y` (N,) label names, optional `channels`
 *   (C,) names (reordered to the manifest's channel order when given);
 * - `.csv`: one row per sample, a header naming every manifest channel (any order, extra
 *   columns ignored), optional `label` and `session` columns; windows of the manifest's length
 *   and stride are cut inside runs of one label and session.
 *
 * - tensor bundles (`input.modality == "tensor"`, a user's own model): an `.npz` whose `x` is
 *   the model's input (floats, or integer token ids), optional `y` label names.
 *
 * - image bundles (`input.modality == "image"`): an `.npz` of uint8 images, or decoded photos
 *   (`imagedata.ts`); text bundles: `text.ts`.
 */
import { RunnerError } from "./errors.js";
import { loadImageNpz, Skipped } from "./imagedata.js";
import { Manifest } from "./manifest.js";
import { asFloat32, asStrings, NdArray, parseNpz } from "./npy.js";
import { defaultRng } from "./rng.js";

/** Backbone input values: float32, or integer ids (int64 / int32 graphs). */
export type InputArray = Float32Array | BigInt64Array | Int32Array;

/** Raw windows `x` (`[n, window, channels]`, flat; tensor bundles: `[n, ...dims]`, float32 or
 * int64 ids) and optional label names. */
export interface Dataset {
  x: Float32Array | BigInt64Array;
  n: number;
  inner: number[];
  y: string[] | null;
  source: string;
  /** Text data: tokenizer, n_texts, truncated_texts, max_length (report fields). */
  info?: Record<string, unknown>;
  /** Files of a folder that could not be used (report `skipped`). */
  skipped?: Skipped[];
}

export function modality(m: Manifest): "timeseries" | "tensor" | "text" | "image" {
  const kind = m.input.modality ?? "timeseries";
  if (kind !== "timeseries" && kind !== "tensor" && kind !== "text" && kind !== "image") {
    throw new RunnerError(`this bundle's input.modality is '${kind}'; the TypeScript runner ` +
      "reads time-series, tensor, text and image bundles; update the runner or use the Python " +
      "runner (device_runners/run.py)");
  }
  return kind;
}

/** How validation windows are held out: `block` for time series, `random` otherwise. */
export function splitMode(m: Manifest): "block" | "random" {
  return modality(m) === "timeseries" ? "block" : "random";
}

const DTYPES = ["float32", "float16", "int64", "int32"];

interface TensorSpec {
  dims: number[]; dtype: string; dataDtype: string;
  norm: { mean: Float32Array; std: Float32Array; axis: number } | null;
}

/** Validated input of a tensor bundle (`edgerun/tensors.py` `spec`). */
export function tensorSpec(m: Manifest): TensorSpec {
  const inp = m.input;
  const dims = inp.shape.slice(1).map((d) => Number(d));
  const dtype = inp.dtype;
  const dataDtype = inp.data_dtype ?? inp.dtype;
  if (!DTYPES.includes(dtype) || !DTYPES.includes(dataDtype) ||
    dims.some((d) => !Number.isInteger(d) || d < 1)) {
    throw new RunnerError(`manifest input: dtype '${dtype}'/'${dataDtype}' (known: ` +
      `${JSON.stringify(DTYPES)}) with dims ${JSON.stringify(dims)} is not usable; re-export ` +
      "the bundle");
  }
  const n = (inp.preprocess ?? {}).normalize as { mean?: number[] | number; std?: number[] | number;
    axis?: number } | undefined;
  let norm: TensorSpec["norm"] = null;
  if (n !== undefined && n !== null) {
    const mean = Float32Array.from([n.mean ?? []].flat() as number[]);
    const std = Float32Array.from([n.std ?? []].flat() as number[]);
    const axis = Math.trunc(n.axis ?? 1);
    if (!(axis >= 1 && axis <= dims.length) || mean.length !== std.length || !mean.length ||
      !std.every((v) => v > 0) || !(mean.length === 1 || mean.length === dims[axis - 1])) {
      throw new RunnerError(`manifest normalisation (mean ${mean.length}, std ${std.length} ` +
        `values, axis ${axis}) does not fit input dims ${JSON.stringify(dims)}; re-export the bundle`);
    }
    norm = { mean, std, axis };
  }
  return { dims, dtype, dataDtype, norm };
}

async function loadTensorNpz(bytes: Uint8Array, m: Manifest, source: string): Promise<Dataset> {
  const s = tensorSpec(m);
  const z = await parseNpz(bytes, source);
  const xa = z.get("x");
  if (!xa) {
    throw new RunnerError(`${source}: expected an array 'x' of model inputs, found keys ` +
      `${JSON.stringify([...z.keys()])}`);
  }
  const shape = xa.shape;
  if (shape.length !== s.dims.length + 1 || shape.slice(1).some((d, i) => d !== s.dims[i])) {
    throw new RunnerError(`${source}: 'x' has shape (${shape.join(", ")}), the bundle takes ` +
      `(N, ${s.dims.join(", ")}) (${m.input.layout ?? ""}); reshape or resize the data to the ` +
      "model's input");
  }
  if (shape[0] === 0) throw new RunnerError(`${source} holds no samples`);
  const integer = s.dataDtype.startsWith("int");
  const kind = xa.dtype[1];
  let x: Float32Array | BigInt64Array;
  if (integer) {
    if (!"iu".includes(kind) || Array.isArray(xa.data)) {
      throw new RunnerError(`${source}: the model takes integer ids (${s.dataDtype}), 'x' is ` +
        `${xa.dtype}; save the token ids as integers`);
    }
    x = BigInt64Array.from(xa.data as ArrayLike<number | bigint>, (v) => BigInt(v));
    const [lo, hi] = s.dtype === "int32" ? [-(2n ** 31n), 2n ** 31n - 1n] : [-(2n ** 63n), 2n ** 63n - 1n];
    if (x.some((v) => v < lo || v > hi)) {
      throw new RunnerError(`${source}: ids outside ${s.dtype} range [${lo}, ${hi}]`);
    }
  } else {
    if (!"fiub".includes(kind) || Array.isArray(xa.data)) {
      throw new RunnerError(`${source}: 'x' must be numeric for this model (${s.dataDtype}), ` +
        `found dtype ${xa.dtype}`);
    }
    x = asFloat32(xa);
    const per = x.length / shape[0];
    let bad = 0;
    for (let i = 0; i < shape[0]; i++) {
      for (let k = i * per; k < (i + 1) * per; k++) if (!Number.isFinite(x[k])) { bad++; break; }
    }
    if (bad) {
      throw new RunnerError(`${source}: ${bad} sample(s) contain NaN or inf; clean or drop ` +
        "them before adapting");
    }
  }
  const y = npzLabels(z, source, shape[0], "samples");
  return { x, n: shape[0], inner: shape.slice(1), y, source };
}

export function checkLabelText(where: string, names: readonly string[]): void {
  names.forEach((v, i) => {
    const bad = Array.from(v).find((c) => c.charCodeAt(0) < 32 || c.charCodeAt(0) === 127);
    if (bad !== undefined) {
      throw new RunnerError(`${where}: label ${i + 1} ('${v.slice(0, 40)}') contains the ` +
        `control character ${JSON.stringify(bad)}; labels must be printable text`);
    }
  });
}

/** Windows from the bytes of an `.npz`. */
export async function loadNpz(bytes: Uint8Array, m: Manifest, source: string): Promise<Dataset> {
  if (modality(m) === "tensor") return loadTensorNpz(bytes, m, source);
  if (modality(m) === "image") return loadImageNpz(bytes, m, source);
  if (modality(m) === "text") {
    throw new RunnerError(`${source}: this bundle takes text: a .csv with a 'text' column (and ` +
      "'label' to adapt) or a .txt with one text per line");
  }
  const z = await parseNpz(bytes, source);
  const xa: NdArray | undefined = z.get("x");
  if (!xa) {
    throw new RunnerError(`${source}: expected an array 'x' of windows, found keys ` +
      `${JSON.stringify([...z.keys()])}`);
  }
  if (Array.isArray(xa.data)) {
    throw new RunnerError(`${source}: 'x' must be numeric, found dtype ${xa.dtype}`);
  }
  let x = asFloat32(xa, `${source}: 'x'`);
  const shape = xa.shape;
  const chA = z.get("channels");
  if (chA) {
    const ch = asStrings(chA, `${source}: 'channels'`);
    const want = m.input.channels ?? [];
    const miss = want.filter((c) => !ch.includes(c));
    if (miss.length) {
      throw new RunnerError(`${source}: channels ${JSON.stringify(miss)} missing; the bundle ` +
        `needs ${JSON.stringify(want)}, the file has ${JSON.stringify(ch)}`);
    }
    if (shape.length === 3 && shape[2] === ch.length) {
      const idx = want.map((c) => ch.indexOf(c));
      const [n, t, c] = shape;
      const out = new Float32Array(n * t * idx.length);
      for (let r = 0; r < n * t; r++) {
        for (let j = 0; j < idx.length; j++) out[r * idx.length + j] = x[r * c + idx[j]];
      }
      x = out;
      shape[2] = idx.length;
    }
  }
  let y: string[] | null = null;
  const ya = z.get("y");
  if (ya) {
    if (!Array.isArray(ya.data)) {
      throw new RunnerError(`${source}: 'y' must hold label names (a string array, e.g. ` +
        `np.array(['walking', ...])), found dtype ${ya.dtype}`);
    }
    if (ya.shape.length !== 1) {
      throw new RunnerError(`${source}: 'y' must be a 1-D array with one label name per ` +
        `window, found shape (${ya.shape.join(", ")})`);
    }
    y = ya.data;
  }
  const ds: Dataset = { x, n: shape[0] ?? 0, inner: shape.slice(1), y, source };
  validate(ds, shape, m);
  return ds;
}

/** Python's `float()` of a CSV cell (surrounding whitespace, `_` separators, inf/nan). */
export function pyFloat(s: string): number {
  const t = s.trim().toLowerCase();
  if (/^[+-]?(inf|infinity)$/.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
  if (/^[+-]?nan$/.test(t)) return NaN;
  if (!/^[+-]?((\d(_?\d)*)(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)(e[+-]?\d(_?\d)*)?$/.test(t)) {
    throw new SyntaxError(s);
  }
  return Number(t.replace(/_/g, ""));
}

/** Rows of a CSV text (RFC 4180 quoting, as Python's csv.reader with the default dialect). */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let cell = "";
  let quoted = false;
  let i = 0;
  let any = false;
  while (i < text.length) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') { cell += '"'; i += 2; continue; }
        quoted = false; i++; continue;
      }
      cell += c; i++; continue;
    }
    if (c === '"' && cell === "") { quoted = true; any = true; i++; continue; }
    if (c === ",") { row.push(cell); cell = ""; any = true; i++; continue; }
    if (c === "\r" || c === "\n") {
      if (any || cell !== "") row.push(cell);
      rows.push(row);
      row = []; cell = ""; any = false;
      i += c === "\r" && text[i + 1] === "\n" ? 2 : 1;
      continue;
    }
    cell += c; any = true; i++;
  }
  if (any || cell !== "") { row.push(cell); rows.push(row); }
  return rows;
}

/** `(start, run)` of every window of `win` samples inside a run of equal keys. */
export function windowStarts(keys: readonly string[], win: number, stride: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let start = 0;
  for (let i = 1; i <= keys.length; i++) {
    if (i === keys.length || keys[i] !== keys[start]) {
      for (let s = start; s <= i - win; s += stride) out.push([s, start]);
      start = i;
    }
  }
  return out;
}

/** Windows from a CSV sensor log (text). */
export function loadCsv(text: string, m: Manifest, source: string): Dataset {
  if (modality(m) === "image") {
    throw new RunnerError(`${source}: this bundle takes images: a folder with one sub-folder of PNG/JPEG files per label, or an .npz with uint8 'x' and label 'y'`);
  }
  if (modality(m) !== "timeseries") {
    throw new RunnerError(`${source}: this bundle takes model inputs as an .npz with 'x' (N, ` +
      `${m.input.shape.slice(1).join(", ")}) and label names 'y'`);
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const want = [...(m.input.channels ?? [])];
  const rows = parseCsv(text);
  if (!rows.length) {
    throw new RunnerError(`${source} is empty; expected a header row ` +
      `${JSON.stringify([...want, "label"])}`);
  }
  const header = rows[0].map((h) => h.trim());
  const miss = want.filter((c) => !header.includes(c));
  if (miss.length) {
    throw new RunnerError(`${source}: header lacks channel column(s) ${JSON.stringify(miss)}; ` +
      `expected ${JSON.stringify(want)} (+ optional 'label', 'session'), found ` +
      `${JSON.stringify(header)}`);
  }
  const cols = want.map((c) => header.indexOf(c));
  const li = header.indexOf("label");
  const si = header.indexOf("session");
  const sig: number[] = [];
  const labels: string[] = [];
  const sessions: string[] = [];
  for (let r = 1; r < rows.length; r++) {
    const row = rows[r];
    if (!row.length) continue;
    try {
      for (const i of cols) {
        if (i >= row.length) throw new SyntaxError("missing");
        sig.push(pyFloat(row[i]));
      }
    } catch {
      throw new RunnerError(`${source}:${r + 1}: expected ${want.length} numeric channel ` +
        `values, found ${JSON.stringify(row)}`);
    }
    labels.push(li >= 0 && li < row.length ? row[li].trim() : "");
    sessions.push(si >= 0 && si < row.length ? row[si].trim() : "");
  }
  const n = labels.length;
  if (!n) throw new RunnerError(`${source} has a header but no samples`);
  const c = want.length;
  const f32 = Float32Array.from(sig);
  for (let k = 0; k < f32.length; k++) {
    if (!Number.isFinite(f32[k])) {
      throw new RunnerError(`${source}:${Math.floor(k / c) + 2}: non-finite sensor value ` +
        "(NaN/inf); clean or drop those samples before adapting");
    }
  }
  const win = m.input.window ?? 0;
  const stride = m.input.stride ?? 1;
  const keys = labels.map((l, i) => JSON.stringify([l, sessions[i]]));
  const starts = windowStarts(keys, win, stride);
  if (!starts.length) {
    throw new RunnerError(`${source}: no run of ${win} samples with one label; windows are ` +
      `${win} samples (${(win / (m.input.sample_rate_hz ?? 1)).toFixed(2)} s at ` +
      `${m.input.sample_rate_hz} Hz)`);
  }
  const hasLabel = li >= 0;
  const keep = starts.filter(([, run]) => !hasLabel || labels[run] !== "");
  const x = new Float32Array(keep.length * win * c);
  keep.forEach(([s], j) => x.set(f32.subarray(s * c, (s + win) * c), j * win * c));
  const ds: Dataset = { x, n: keep.length, inner: [win, c],
    y: hasLabel ? keep.map(([, run]) => labels[run]) : null, source };
  validate(ds, [keep.length, win, c], m);
  return ds;
}

function validate(ds: Dataset, shape: number[], m: Manifest): void {
  const t = m.input.window ?? 0;
  const c = (m.input.channels ?? []).length;
  if (shape.length !== 3 || shape[1] !== t || shape[2] !== c) {
    throw new RunnerError(`${ds.source}: windows have shape (${shape.join(", ")}), the bundle ` +
      `expects (N, ${t}, ${c}) = ${t} samples at ${m.input.sample_rate_hz} Hz x channels ` +
      `${JSON.stringify(m.input.channels)}; re-window/resample the recording (or pass the raw ` +
      ".csv log)");
  }
  if (ds.n === 0) throw new RunnerError(`${ds.source} holds no windows`);
  const per = t * c;
  let bad = 0;
  for (let i = 0; i < ds.n; i++) {
    for (let k = i * per; k < (i + 1) * per; k++) {
      if (!Number.isFinite(ds.x[k])) { bad++; break; }
    }
  }
  if (bad) {
    throw new RunnerError(`${ds.source}: ${bad} window(s) contain NaN or inf; clean or drop ` +
      "them before adapting");
  }
  if (ds.y) {
    if (ds.y.length !== ds.n) {
      throw new RunnerError(`${ds.source}: ${ds.n} windows but ${ds.y.length} labels`);
    }
    if (ds.y.some((l) => !l)) {
      throw new RunnerError(`${ds.source}: empty label names; every window needs a label`);
    }
    checkLabelText(ds.source, ds.y);
  }
}

/**
 * Raw data -> what the backbone takes, as the Python runner computes it (float32 operations
 * in numpy's order): time series normalised per channel; tensor inputs normalised along the
 * manifest's axis and cast to the graph's dtype (int64 / int32 ids pass through).
 */
export function preprocess(x: Float32Array | BigInt64Array, m: Manifest): InputArray {
  if (modality(m) === "text") return x; // token ids and masks pass through
  if (modality(m) === "image") { // the loaders already give float32 NCHW model input
    if (!(x instanceof Float32Array)) throw new RunnerError("image input must be float32");
    return x;
  }
  if (modality(m) === "tensor") {
    const s = tensorSpec(m);
    let v: Float32Array | BigInt64Array = x;
    if (s.norm) {
      const f = x instanceof BigInt64Array ? Float32Array.from(x, (b) => Number(b)) : x;
      const { mean, std, axis } = s.norm;
      const inner = s.dims.slice(axis).reduce((a, b) => a * b, 1);
      const c = s.dims[axis - 1];
      const out = new Float32Array(f.length);
      for (let i = 0; i < f.length; i++) {
        const j = mean.length === 1 ? 0 : Math.floor(i / inner) % c;
        out[i] = Math.fround(f[i] - mean[j]) / std[j];
      }
      v = out;
    }
    if (s.dtype === "float32" || s.dtype === "float16") {
      if (s.dtype === "float16") {
        throw new RunnerError("float16 graph inputs are not supported by the TypeScript runner; " +
          "re-export the bundle with a float32 input");
      }
      return v instanceof Float32Array ? v : Float32Array.from(v, (b) => Number(b));
    }
    const ids = v instanceof BigInt64Array ? v : BigInt64Array.from(v, (f) => BigInt(Math.trunc(f)));
    return s.dtype === "int32" ? Int32Array.from(ids, (b) => Number(b)) : ids;
  }
  if (!(x instanceof Float32Array)) throw new RunnerError("time-series windows must be float32");
  const norm = (m.input.preprocess ?? {}).normalize as { mean: number[]; std: number[] } | undefined;
  if (!norm) return x;
  const mean = Float32Array.from(norm.mean);
  const std = Float32Array.from(norm.std);
  const c = mean.length;
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    out[i] = Math.fround(x[i] - mean[i % c]) / std[i % c];
  }
  return out;
}

/** Indices `[train, val]` with `frac` of every class (>= 2 windows) in validation: the last
 * windows of each class in recording order (`block`, the one window before them dropped) or a
 * seeded shuffle per class (`random`); `edgerun/data.py` `stratified_split`. */
export function stratifiedSplit(y: readonly number[], frac: number, seed: number,
  mode: "block" | "random" = "block"): [number[], number[]] {
  return stratifiedFolds(y, frac, seed, mode, 1)[0];
}

/** `folds` splits `[train, val]`, the first `stratifiedSplit`'s: fold `j` validates on the
 * `j`-th block of `frac` of every class counted back from its end (`edgerun/data.py`
 * `stratified_folds`). */
export function stratifiedFolds(y: readonly number[], frac: number, seed: number,
  mode: "block" | "random" = "block", folds = 1): [number[], number[]][] {
  const rng = defaultRng(seed);
  const out: [number[], number[]][] = Array.from({ length: folds }, () => [[], []]);
  for (const c of [...new Set(y)].sort((a, b) => a - b)) {
    let idx = y.flatMap((v, i) => (v === c ? [i] : []));
    if (mode === "random") idx = rng.permutation(idx);
    const n = idx.length;
    const nVal = n < 2 ? 0 : Math.min(n - 1, Math.max(1, Math.floor(frac * n + 0.5)));
    const gap = mode === "block" ? 1 : 0;
    out.forEach(([tr, va], j) => {
      const hi = n - j * nVal;
      const lo = Math.max(0, hi - nVal);
      const before = lo - gap >= 1 ? lo - gap : (j === 0 ? lo : 0);
      const train = [...idx.slice(0, before), ...idx.slice(Math.min(n, hi + gap))];
      if (j && (hi < 1 || !train.length)) { // no room for this block: every window trains
        tr.push(...idx);
        return;
      }
      va.push(...idx.slice(lo, hi));
      tr.push(...train);
    });
  }
  return out.map(([tr, va]) => [tr.sort((a, b) => a - b), va.sort((a, b) => a - b)]);
}

/** An npz's optional `y`: `n` label names, checked (`what`: "samples", "images"); null when
 * absent. */
export function npzLabels(z: Map<string, NdArray>, source: string, n: number,
  what: string): string[] | null {
  const ya = z.get("y");
  if (!ya) return null;
  if (!Array.isArray(ya.data) || ya.shape.length !== 1) {
    throw new RunnerError(`${source}: 'y' must be a 1-D array of label names (e.g. ` +
      `np.array(['cat', ...])), found ${ya.dtype} (${ya.shape.join(", ")})`);
  }
  if (ya.data.length !== n) {
    throw new RunnerError(`${source}: ${n} ${what} but ${ya.data.length} labels`);
  }
  if (ya.data.some((v) => !v)) {
    throw new RunnerError(`${source}: empty label names; every one of the ${what} needs a label`);
  }
  checkLabelText(source, ya.data);
  return ya.data;
}
