/** Head parameters: load (bundle or checkpoint), imprint new classes, write `head.npz`. */
import { Bundle } from "./bundle.js";
import { checkLabelText } from "./data.js";
import { RunnerError } from "./errors.js";
import { asFloat32, asStrings, NdArray, parseNpz, writeNpz } from "./npy.js";
import { F32 } from "./backend.js";

export const FORMAT = "edgerun.head/1";

export function checkFinite(params: Map<string, F32>, where: string,
  fix = "start from the bundle's head (drop --head) or re-adapt"): void {
  for (const [name, v] of params) {
    let bad = 0;
    for (const x of v.data) if (!Number.isFinite(x)) bad++;
    if (bad) {
      throw new RunnerError(`${where}: head parameter '${name}' holds ${bad} non-finite ` +
        `value(s) (NaN/inf) of ${v.data.length}; the head is damaged: ${fix}`);
    }
  }
}

function checkLabels(labels: string[], params: Map<string, F32>, classParams: string[],
  where: string, capacity?: number): void {
  if (new Set(labels).size !== labels.length) {
    const dup = [...new Set(labels.filter((l, i) => labels.indexOf(l) !== i))].sort();
    throw new RunnerError(`${where}: duplicate labels ${JSON.stringify(dup.slice(0, 10))}; ` +
      "every class row needs its own name");
  }
  checkLabelText(where, labels);
  const [wn, bn] = classParams;
  const w = params.get(wn);
  const b = params.get(bn);
  if (!w || !b) {
    throw new RunnerError(`${where}: the class parameters ${JSON.stringify(classParams)} are missing`);
  }
  const rows = w.dims.length ? w.dims[0] : 0;
  if (w.dims.length !== 2 || b.dims.length !== 1 || b.dims[0] !== rows) {
    throw new RunnerError(`${where}: class parameters ${wn} (${w.dims}) and ${bn} (${b.dims}) ` +
      "are not (rows, E) and (rows,)");
  }
  if (labels.length > rows) {
    throw new RunnerError(`${where}: ${labels.length} labels but the head has ${rows} class ` +
      "rows; the bundle or head is damaged, re-export it");
  }
  if (capacity && rows !== capacity) {
    throw new RunnerError(`${where}: the head has ${rows} class rows but the manifest's ` +
      `head.capacity is ${capacity}; re-export the bundle`);
  }
}

const copy = (v: F32): F32 => ({ data: v.data.slice(), dims: [...v.dims] });

/** Named head parameters plus the label of every logit. */
export class Head {
  params: Map<string, F32>;
  labels: string[];
  meta: Record<string, unknown>;

  constructor(params: Map<string, F32>, labels: string[], meta: Record<string, unknown> = {}) {
    this.params = params;
    this.labels = [...labels];
    this.meta = { ...meta };
  }

  copy(): Head {
    return new Head(new Map([...this.params].map(([k, v]) => [k, copy(v)])), this.labels, this.meta);
  }

  /** The server-trained head shipped in the bundle. */
  static async fromBundle(bundle: Bundle): Promise<Head> {
    const m = bundle.manifest;
    const entry = m.files[m.head.init_file];
    const z = await parseNpz(bundle.file(m.head.init_file), entry?.path ?? m.head.init_file);
    const params = new Map<string, F32>();
    for (const p of m.head.params) {
      const a = z.get(p.name);
      if (!a) throw new RunnerError(`bundle file ${entry?.path}: no parameter '${p.name}'; re-export the bundle`);
      params.set(p.name, { data: asFloat32(a, p.name).slice(), dims: a.shape });
    }
    const where = `bundle file ${entry?.path}`;
    checkFinite(params, where, "re-export or re-download the bundle");
    checkLabels([...m.labels], params, m.head.class_params, `${where} with manifest labels`,
      m.head.capacity);
    return new Head(params, m.labels, { source: "bundle" });
  }

  /** A checkpoint (`head.npz` of either runner), checked against the bundle. */
  static async load(bytes: Uint8Array, bundle: Bundle, path = "head.npz"): Promise<Head> {
    const z = await parseNpz(bytes, path);
    const metaA = z.get("__meta__");
    const labA = z.get("__labels__");
    if (!metaA || !labA) {
      throw new RunnerError(`${path} is not a readable head checkpoint (no __meta__/__labels__)`);
    }
    let meta: unknown;
    try { meta = JSON.parse(asStrings(metaA)[0]); } catch {
      throw new RunnerError(`${path} is not a readable head checkpoint (bad __meta__)`);
    }
    if (typeof meta !== "object" || meta === null || Array.isArray(meta)) {
      throw new RunnerError(`${path} is not a readable head checkpoint (bad __meta__)`);
    }
    const md = meta as Record<string, unknown>;
    if (md.format !== FORMAT) {
      throw new RunnerError(`${path}: expected format '${FORMAT}', found ${JSON.stringify(md.format)}`);
    }
    const want = bundle.manifest.files.backbone.sha256;
    if (md.backbone_sha256 !== want) {
      throw new RunnerError(`${path} was trained on another backbone (sha256 ` +
        `${String(md.backbone_sha256).slice(0, 12)}…, bundle has ${want.slice(0, 12)}…); start ` +
        "from the bundle's head instead (drop --head)");
    }
    const params = new Map<string, F32>();
    for (const [k, a] of z) {
      if (!k.startsWith("__")) params.set(k, { data: asFloat32(a, k).slice(), dims: a.shape });
    }
    const names = bundle.manifest.head.params.map((p) => p.name).sort();
    const have = [...params.keys()].sort();
    if (JSON.stringify(have) !== JSON.stringify(names)) {
      throw new RunnerError(`${path}: parameters ${JSON.stringify(have)} do not match the ` +
        `bundle's ${JSON.stringify(names)}`);
    }
    checkFinite(params, path);
    const labels = asStrings(labA, `${path}: __labels__`);
    checkLabels(labels, params, bundle.manifest.head.class_params, path);
    return new Head(params, labels, md);
  }

  /** `head.npz` bytes in the Python runner's format (`__meta__`, `__labels__`, parameters). */
  toNpz(bundle: Bundle, extra: Record<string, unknown> = {}): Uint8Array {
    checkFinite(this.params, "refusing to write a head checkpoint");
    const meta = { ...this.meta, ...extra, format: FORMAT,
      backbone_sha256: bundle.manifest.files.backbone.sha256, saved_unix: Date.now() / 1000 };
    const arrays: Array<[string, NdArray]> = [
      ["__meta__", { dtype: "<U", shape: [], data: [JSON.stringify(meta)] }],
      ["__labels__", { dtype: "<U", shape: [this.labels.length], data: this.labels }],
    ];
    for (const [k, v] of this.params) arrays.push([k, { dtype: "<f4", shape: v.dims, data: v.data }]);
    return writeNpz(arrays);
  }

  rows(classParams: string[]): number {
    return (this.params.get(classParams[0]) as F32).dims[0];
  }

  /**
   * Weight imprinting: one row per new class, its mean embedding rescaled to the mean norm
   * of the rows in use, bias their mean bias (`edgerun.head.Head.add_classes`).
   */
  addClasses(names: string[], embeddings: Map<string, Float32Array[]>, classParams: string[],
    grow = true, normalise = false): void {
    const [wn, bn] = classParams;
    const w = this.params.get(wn) as F32;
    const b = this.params.get(bn) as F32;
    const used = this.labels.length;
    const e = w.dims[1];
    const norm = (v: ArrayLike<number>) => Math.sqrt(Array.from(v).reduce((s, x) => s + x * x, 0));
    let scale = 1;
    let bias = 0;
    if (used) {
      scale = 0; bias = 0;
      for (let r = 0; r < used; r++) {
        scale += norm(w.data.subarray(r * e, (r + 1) * e));
        bias += b.data[r];
      }
      scale = Math.fround(Math.fround(scale) / used);
      bias = Math.fround(Math.fround(bias) / used);
    }
    const rows = new Float32Array(names.length * e);
    names.forEach((name, j) => {
      const vs = embeddings.get(name) ?? [];
      const mu = new Float64Array(e);
      for (const v0 of vs) {
        const nv = normalise ? norm(v0) + 1e-12 : 1;
        for (let d = 0; d < e; d++) mu[d] += Math.fround(v0[d] / nv);
      }
      for (let d = 0; d < e; d++) mu[d] = Math.fround(mu[d] / vs.length);
      const nm = norm(mu) + 1e-12;
      for (let d = 0; d < e; d++) rows[j * e + d] = (mu[d] / nm) * scale;
    });
    if (grow) {
      const nw = new Float32Array((w.dims[0] + names.length) * e);
      nw.set(w.data.subarray(0, used * e));
      nw.set(rows, used * e);
      nw.set(w.data.subarray(used * e), (used + names.length) * e);
      const nb = new Float32Array(b.dims[0] + names.length);
      nb.set(b.data.subarray(0, used));
      nb.fill(bias, used, used + names.length);
      nb.set(b.data.subarray(used), used + names.length);
      this.params.set(wn, { data: nw, dims: [w.dims[0] + names.length, e] });
      this.params.set(bn, { data: nb, dims: [b.dims[0] + names.length] });
    } else {
      if (used + names.length > w.dims[0]) {
        throw new RunnerError(`this head has ${w.dims[0]} class rows, ${used} in use: no room ` +
          `for ${names.length} new label(s) ${JSON.stringify(names)}`);
      }
      const nw = w.data.slice();
      const nb = b.data.slice();
      nw.set(rows, used * e);
      nb.fill(bias, used, used + names.length);
      this.params.set(wn, { data: nw, dims: [...w.dims] });
      this.params.set(bn, { data: nb, dims: [...b.dims] });
    }
    this.labels.push(...names);
  }
}
