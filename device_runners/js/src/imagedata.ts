/**
 * Image datasets, as the Python runner reads them (`edgerun/images.py`):
 *
 * - `.npz`: `x` uint8 images `(N, H, W)` or `(N, H, W, 3|4)` of any size, optional `y` label
 *   names (`load_image_npz`);
 * - a folder of photos `root/<label>/**\/*.png|jpg|jpeg` (`load_image_folder`): this module
 *   orders the files and skips what the Python runner skips (`collectImages`); decoding is the
 *   caller's (the web page: `createImageBitmap`), which hands over RGBA pixels
 *   (`imageDataset`). Node has no image decoder here: the CLI takes `.npz` images.
 */
import { checkLabelText, Dataset, npzLabels } from "./data.js";
import { RunnerError } from "./errors.js";
import { imagesToInput, inputDims, manifestImageSpec, normalizeInto, imageBytes, Pixels } from "./image.js";
import { Manifest } from "./manifest.js";
import { parseNpz } from "./npy.js";

export const IMAGE_EXTS = [".png", ".jpg", ".jpeg"];

/** A file the runner could not use, as in the report's `skipped` list. */
export interface Skipped { path: string; reason: string }

/** Python's string order (code points, not UTF-16 units). */
export function pyCompare(a: string, b: string): number {
  const x = Array.from(a, (c) => c.codePointAt(0) as number);
  const y = Array.from(b, (c) => c.codePointAt(0) as number);
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

interface Dir { files: string[]; dirs: Map<string, Dir> }

/**
 * `collect_images` on relative paths `root/<label>/.../<file>` (a folder picked in a browser:
 * `webkitRelativePath`): `[files [path, label] in the Python runner's order, skipped]`. Hidden
 * files and folders are ignored; files directly in `root` and other extensions are skipped.
 */
export function collectImages(paths: readonly string[]): [Array<[string, string]>, Skipped[]] {
  const top: Dir = { files: [], dirs: new Map() };
  let root = "";
  for (const p of paths) {
    const parts = p.split("/").filter((s) => s !== "");
    if (parts.length < 2) continue;
    root = parts[0];
    let d = top;
    for (const name of parts.slice(1, -1)) {
      if (!d.dirs.has(name)) d.dirs.set(name, { files: [], dirs: new Map() });
      d = d.dirs.get(name) as Dir;
    }
    d.files.push(parts[parts.length - 1]);
  }
  const files: Array<[string, string]> = [];
  const skipped: Skipped[] = [];
  const names = [...top.files, ...top.dirs.keys()].sort(pyCompare);
  for (const name of names) {
    const path = `${root}/${name}`;
    if (name.startsWith(".")) continue;
    const sub = top.dirs.get(name);
    if (!sub) {
      skipped.push({ path, reason: `not inside a label folder; put images in ${root}/<label>/${name}` });
      continue;
    }
    const walk = (dir: Dir, at: string) => { // os.walk, top-down, sorted
      for (const fn of [...dir.files].sort(pyCompare)) {
        if (fn.startsWith(".")) continue;
        const dot = fn.lastIndexOf(".");
        const ext = dot > 0 ? fn.slice(dot).toLowerCase() : "";
        if (!IMAGE_EXTS.includes(ext)) {
          skipped.push({ path: `${at}/${fn}`, reason: `not an image file (expected ${IMAGE_EXTS.join(", ")})` });
        } else {
          files.push([`${at}/${fn}`, name]);
        }
      }
      for (const d of [...dir.dirs.keys()].sort(pyCompare)) {
        if (!d.startsWith(".")) walk(dir.dirs.get(d) as Dir, `${at}/${d}`);
      }
    };
    walk(sub, path);
  }
  return [files, skipped];
}

/** Decoded RGBA pixels (a browser's `ImageData`). */
export interface ImageDataLike { width: number; height: number; data: Uint8ClampedArray | Uint8Array }

/**
 * Labelled decoded images -> the dataset the Python runner builds from the same folder:
 * converted, resized and normalised as the manifest says. `skipped`: files that could not be
 * used (collected, then undecodable), reported as the Python runner does.
 */
export function imageDataset(images: ReadonlyArray<{ image: ImageDataLike; label: string }>,
  m: Manifest, source: string, skipped: Skipped[] = []): Dataset {
  const spec = manifestImageSpec(m);
  if (!images.length) {
    const why = skipped.slice(0, 3).map((s) => `${s.path}: ${s.reason}`).join("; ");
    throw new RunnerError(`${source} holds no usable image; expected one sub-folder per label ` +
      `with ${IMAGE_EXTS.join("/")} files (${source}/<label>/<image>.png)` +
      (skipped.length ? `; skipped ${skipped.length}, e.g. ${why}` : ""));
  }
  const inner = inputDims(spec);
  const per = inner.reduce((a, b) => a * b, 1);
  const x = new Float32Array(images.length * per);
  images.forEach(({ image }, i) => {
    const px: Pixels = { width: image.width, height: image.height, channels: 4, data: image.data };
    if (image.data.length !== image.width * image.height * 4) {
      throw new RunnerError(`${source}: image ${i + 1} has ${image.data.length} bytes, expected ` +
        `RGBA ${image.width}x${image.height}x4`);
    }
    normalizeInto(imageBytes(px, spec), spec, x, i * per);
  });
  const y = images.map((v) => v.label);
  checkLabelText(source, y);
  return { x, n: images.length, inner, y, source, skipped };
}

/** `load_image_npz`: `x` uint8 (N, H, W) or (N, H, W, 3|4), optional `y` label names. */
export async function loadImageNpz(bytes: Uint8Array, m: Manifest, source: string): Promise<Dataset> {
  const spec = manifestImageSpec(m);
  const z = await parseNpz(bytes, source);
  const xa = z.get("x");
  if (!xa) {
    throw new RunnerError(`${source}: expected an array 'x' of images, found keys ` +
      `${JSON.stringify([...z.keys()])}`);
  }
  const s = xa.shape;
  if (xa.dtype.slice(1) !== "u1" || !(s.length === 3 || (s.length === 4 && (s[3] === 3 || s[3] === 4)))) {
    throw new RunnerError(`${source}: 'x' must be uint8 images (N, H, W) or (N, H, W, 3|4) with ` +
      `values 0..255, found ${xa.dtype} (${s.join(", ")}); convert with ` +
      "np.clip(img, 0, 255).astype(np.uint8)");
  }
  if (s[0] === 0 || s[1] === 0 || s[2] === 0) {
    throw new RunnerError(`${source}: 'x' holds no images (shape (${s.join(", ")}))`);
  }
  const y = npzLabels(z, source, s[0], "images");
  const x = imagesToInput(xa.data as Uint8Array, s, spec);
  return { x, n: s[0], inner: inputDims(spec), y, source, skipped: [] };
}
