/**
 * Image preprocessing as the Python runner does it (`edgerun/images.py`, Pillow 13): convert
 * to the manifest's mode, resize with its filter, scale to float32 / 255, normalise per channel,
 * lay out NCHW. Bit for bit: the conversions use Pillow's integer formulas (`Convert.c`), the
 * resize is a port of Pillow's `Image.resize(size, filter)` on 8-bit images (`Resample.c`:
 * separable passes with fixed-point coefficients; `Geometry.c`'s affine scaling for nearest),
 * and the float32 operations run in numpy's order.
 *
 * Pixels come in interleaved (`channels` 1, 3 or 4 bytes per pixel): an `.npz`'s uint8 images,
 * or the RGBA bytes a browser decodes (`ImageData`).
 */
import { RunnerError } from "./errors.js";
import { Manifest } from "./manifest.js";

export const RESAMPLE = ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] as const;
export type Resample = (typeof RESAMPLE)[number];
const CHANNELS: Record<string, number> = { L: 1, RGB: 3 };

/** `manifest.input.image`, validated (`edgerun.images.image_spec`). */
export interface ImageSpec {
  height: number; width: number; mode: "RGB" | "L"; resample: Resample;
  mean: number[]; std: number[];
}

/** Interleaved 8-bit pixels, row-major: `data[(y * width + x) * channels + c]`. */
export interface Pixels {
  width: number; height: number; channels: number;
  data: Uint8Array | Uint8ClampedArray;
}

/** Validate `manifest.input.image` (or the image spec itself), as the Python runner does. */
export function imageSpec(spec: Record<string, unknown>): ImageSpec {
  const s = (spec.image ?? spec) as Record<string, unknown>;
  const found = JSON.stringify(s);
  const num = (v: unknown) => (typeof v === "number" ? v : typeof v === "string" && v.trim() ?
    Number(v) : NaN);
  const h = Math.trunc(num(s.height));
  const w = Math.trunc(num(s.width));
  const mean = Array.isArray(s.mean) ? s.mean.map(num) : null;
  const std = Array.isArray(s.std) ? s.std.map(num) : null;
  if (!Number.isFinite(h) || !Number.isFinite(w) || typeof s.mode !== "string" || !mean ||
    !std || mean.some((v) => !Number.isFinite(v)) || std.some((v) => !Number.isFinite(v))) {
    throw new RunnerError("manifest input.image must hold height, width, mode, mean, std; " +
      `found ${found}. Re-export the bundle`);
  }
  const mode = s.mode;
  const resample = String(s.resample ?? "bilinear");
  if (!(mode in CHANNELS)) {
    throw new RunnerError(`manifest image mode '${mode}' is not supported; expected 'RGB' or 'L'`);
  }
  const c = CHANNELS[mode];
  if (mean.length !== c || std.length !== c || Math.min(...std) <= 0 || h < 1 || w < 1) {
    throw new RunnerError(`manifest image spec: mode ${mode} needs ${c} mean and ${c} std ` +
      `value(s) (std > 0) and a positive size; found ${found}`);
  }
  if (!(RESAMPLE as readonly string[]).includes(resample)) {
    throw new RunnerError(`manifest image resample '${resample}' unknown; expected one of ` +
      `${JSON.stringify(RESAMPLE)}`);
  }
  return { height: h, width: w, mode: mode as "RGB" | "L", resample: resample as Resample,
    mean, std };
}

/** The spec of an image bundle; other bundles are refused. */
export function manifestImageSpec(m: Manifest): ImageSpec {
  const kind = m.input.modality ?? "timeseries";
  if (kind !== "image") {
    throw new RunnerError(`this bundle's input is '${kind}', not images; pass an .npz/.csv of ` +
      "windows instead");
  }
  return imageSpec(m.input as unknown as Record<string, unknown>);
}

/**
 * Pillow's `convert(mode)` for 8-bit L / RGB / RGBA sources: RGB(A) -> L with ITU-R 601-2 in
 * Pillow's integer form, L -> RGB repeats the grey, alpha is dropped (not composited).
 */
export function convert(img: Pixels, mode: "RGB" | "L"): Pixels {
  const { width, height, channels: c, data } = img;
  if (c !== 1 && c !== 3 && c !== 4) {
    throw new RunnerError(`images must have 1, 3 or 4 channels (L, RGB, RGBA), found ${c}`);
  }
  const n = width * height;
  if (mode === "L") {
    if (c === 1) return img;
    const out = new Uint8Array(n);
    for (let i = 0, p = 0; i < n; i++, p += c) {
      out[i] = (data[p] * 19595 + data[p + 1] * 38470 + data[p + 2] * 7471 + 0x8000) >>> 16;
    }
    return { width, height, channels: 1, data: out };
  }
  if (c === 3) return img;
  const out = new Uint8Array(n * 3);
  for (let i = 0, p = 0; i < n; i++, p += c) {
    out[3 * i] = data[p];
    out[3 * i + 1] = data[c === 1 ? p : p + 1];
    out[3 * i + 2] = data[c === 1 ? p : p + 2];
  }
  return { width, height, channels: 3, data: out };
}

// ---- Pillow's filters (Resample.c), in the same double arithmetic ----

type Filter = { f: (x: number) => number; support: number };
const sinc = (x: number) => (x === 0 ? 1 : Math.sin(x * Math.PI) / (x * Math.PI));
const F054 = Math.fround(0.54); // C's 0.54f and 0.46f, promoted to double
const F046 = Math.fround(0.46);
const FILTERS: Record<Exclude<Resample, "nearest">, Filter> = {
  box: { f: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0), support: 0.5 },
  bilinear: { f: (x) => { x = Math.abs(x); return x < 1 ? 1 - x : 0; }, support: 1 },
  hamming: {
    f: (x) => {
      x = Math.abs(x);
      if (x === 0) return 1;
      if (x >= 1) return 0;
      x = x * Math.PI;
      return (Math.sin(x) / x) * (F054 + F046 * Math.cos(x));
    }, support: 1 },
  bicubic: {
    f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    }, support: 2 },
  lanczos: { f: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0), support: 3 },
};

const PRECISION_BITS = 32 - 8 - 2;

/** `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, first input and int32
 * weights (fixed point, 22 fractional bits). */
function coeffs(inSize: number, outSize: number, filter: Filter):
  { ksize: number; bounds: Int32Array; kk: Int32Array } {
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = 0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let ww = 0;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    k.fill(0);
    for (let x = 0; x < xmax; x++) {
      const w = filter.f((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) if (ww !== 0) k[x] /= ww;
    for (let x = 0; x < ksize; x++) {
      const v = k[x] * (1 << PRECISION_BITS);
      kk[xx * ksize + x] = Math.trunc(k[x] < 0 ? -0.5 + v : 0.5 + v);
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (ss: number) => { const v = ss >> PRECISION_BITS; return v < 0 ? 0 : v > 255 ? 255 : v; };

/** One separable pass along x (`horizontal`) or y, every channel alike. */
function pass(img: Pixels, outSize: number, filter: Filter, horizontal: boolean): Pixels {
  const { width, height, channels: c, data } = img;
  const { ksize, bounds, kk } = coeffs(horizontal ? width : height, outSize, filter);
  const ow = horizontal ? outSize : width;
  const oh = horizontal ? height : outSize;
  const out = new Uint8Array(ow * oh * c);
  const half = 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < oh; yy++) {
    for (let xx = 0; xx < ow; xx++) {
      const j = horizontal ? xx : yy;
      const min = bounds[2 * j];
      const len = bounds[2 * j + 1];
      const kb = j * ksize;
      for (let ch = 0; ch < c; ch++) {
        let ss = half;
        if (horizontal) {
          const row = (yy * width + min) * c + ch;
          for (let t = 0; t < len; t++) ss += data[row + t * c] * kk[kb + t];
        } else {
          const col = (min * width + xx) * c + ch;
          for (let t = 0; t < len; t++) ss += data[col + t * width * c] * kk[kb + t];
        }
        out[(yy * ow + xx) * c + ch] = clip8(ss);
      }
    }
  }
  return { width: ow, height: oh, channels: c, data: out };
}

/** Pillow's nearest resize: `ImagingScaleAffine` (source centres accumulated in doubles). */
function nearest(img: Pixels, w: number, h: number): Pixels {
  const { width, height, channels: c, data } = img;
  const out = new Uint8Array(w * h * c);
  const a0 = width / w;
  const a4 = height / h;
  const coord = (v: number) => (v < 0 ? -1 : Math.trunc(v));
  const xintab = new Int32Array(w);
  let xmin = w;
  let xmax = 0;
  let xo = 0 + a0 * 0.5;
  for (let x = 0; x < w; x++) {
    const xin = coord(xo);
    if (xin >= 0 && xin < width) {
      xmax = x + 1;
      if (x < xmin) xmin = x;
      xintab[x] = xin;
    }
    xo += a0;
  }
  let yo = 0 + a4 * 0.5;
  for (let y = 0; y < h; y++) {
    const yi = coord(yo);
    if (yi >= 0 && yi < height) {
      for (let x = xmin; x < xmax; x++) {
        const s = (yi * width + xintab[x]) * c;
        const d = (y * w + x) * c;
        for (let ch = 0; ch < c; ch++) out[d + ch] = data[s + ch];
      }
    }
    yo += a4;
  }
  return { width: w, height: h, channels: c, data: out };
}

/**
 * Pillow 13's `Image.resize((w, h), filter)` of an 8-bit L or RGB image (no `box`, no
 * `reducing_gap`). The two passes run horizontal first unless the height shrinks by more than
 * twice what the width does (Pillow 13's `ImagingResampleInner`; Pillow <= 12 always ran the
 * horizontal pass first, which differs by a grey level or so on such resizes).
 */
export function resize(img: Pixels, w: number, h: number, filter: Resample): Pixels {
  if (!(Number.isInteger(w) && Number.isInteger(h) && w >= 1 && h >= 1)) {
    throw new RunnerError(`resize: width and height must be positive integers, got ${w}x${h}`);
  }
  if (img.channels === 4) {
    throw new RunnerError("resize: convert RGBA images to RGB or L first (Pillow resizes RGBA " +
      "premultiplied; the runner never does)");
  }
  if (img.width === w && img.height === h) return { ...img, data: Uint8Array.from(img.data) };
  if (filter === "nearest") return nearest(img, w, h);
  const f = FILTERS[filter];
  if (!f) {
    throw new RunnerError(`resize: unknown filter '${filter}'; expected one of ` +
      `${JSON.stringify(RESAMPLE)}`);
  }
  const needH = w !== img.width;
  const needV = h !== img.height;
  const horizontalFirst = !(img.height - h > 0 && img.height - h > (img.width - w) * 2);
  let out = img;
  if (horizontalFirst) {
    if (needH) out = pass(out, w, f, true);
    if (needV) out = pass(out, h, f, false);
  } else {
    if (needV) out = pass(out, h, f, false);
    if (needH) out = pass(out, w, f, true);
  }
  return out;
}

/** Convert and resize one image: uint8 (H, W, C) before normalisation (`image_bytes`). */
export function imageBytes(img: Pixels, spec: ImageSpec): Pixels {
  const conv = convert(img, spec.mode);
  return conv.width === spec.width && conv.height === spec.height
    ? conv : resize(conv, spec.width, spec.height, spec.resample);
}

/** Bytes (H, W, C) -> float32 (C, H, W) into `out` at `offset`: `(u8 / 255 - mean) / std`
 * in float32, numpy's order. */
export function normalizeInto(u8: Pixels, spec: ImageSpec, out: Float32Array, offset: number): void {
  const { width, height, channels: c, data } = u8;
  const f255 = Math.fround(255);
  const mean = Float32Array.from(spec.mean);
  const std = Float32Array.from(spec.std);
  const plane = width * height;
  for (let ch = 0; ch < c; ch++) {
    for (let i = 0; i < plane; i++) {
      const v = Math.fround(data[i * c + ch] / f255);
      out[offset + ch * plane + i] = Math.fround(Math.fround(v - mean[ch]) / std[ch]);
    }
  }
}

/** One image (any size; 1, 3 or 4 channels) -> float32 (C, H, W) for the backbone. */
export function preprocessImage(img: Pixels, spec: ImageSpec): Float32Array {
  const out = new Float32Array(CHANNELS[spec.mode] * spec.height * spec.width);
  normalizeInto(imageBytes(img, spec), spec, out, 0);
  return out;
}

/** uint8 images `(N, H, W)` or `(N, H, W, 3|4)` (flat) -> float32 `(N, C, H, W)` (flat). */
export function imagesToInput(data: Uint8Array, shape: readonly number[], spec: ImageSpec): Float32Array {
  const [n, h, w] = shape;
  const c = shape.length === 3 ? 1 : shape[3];
  const per = CHANNELS[spec.mode] * spec.height * spec.width;
  const out = new Float32Array(n * per);
  const size = h * w * c;
  for (let i = 0; i < n; i++) {
    const img = { width: w, height: h, channels: c, data: data.subarray(i * size, (i + 1) * size) };
    normalizeInto(imageBytes(img, spec), spec, out, i * per);
  }
  return out;
}

/** `[C, H, W]` of the backbone's input. */
export function inputDims(spec: ImageSpec): number[] {
  return [CHANNELS[spec.mode], spec.height, spec.width];
}
