/**
 * Device data from a file's bytes and name, as the Python runner reads them (no Node APIs:
 * the CLI reads the file from disk, the web page from the file the user dropped).
 */
import { Bundle } from "./bundle.js";
import { Dataset, loadCsv, loadNpz } from "./data.js";
import { RunnerError } from "./errors.js";
import { loadTexts } from "./text.js";

function utf8(bytes: Uint8Array, name: string): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new RunnerError(`${name} is not UTF-8 text; re-save it as UTF-8`);
  }
}

/** `.npz` windows, a `.csv` sensor log, or (text bundles) a `.csv`/`.txt` of texts. */
export async function loadDataBytes(bytes: Uint8Array, name: string, bundle: Bundle): Promise<Dataset> {
  const m = bundle.manifest;
  const dot = name.lastIndexOf(".");
  const ext = dot > name.lastIndexOf("/") + 1 ? name.slice(dot).toLowerCase() : "";
  if (m.input.modality === "text") return loadTexts(utf8(bytes, name), bundle, name);
  if (ext === ".npz") return loadNpz(bytes, m, name);
  if (m.input.modality === "image") {
    throw new RunnerError(`${name}: this bundle takes images: a folder with one sub-folder of PNG/JPEG files per label, or an .npz with uint8 'x' and label 'y' (a folder: the web page, or ` +
      "device_runners/run.py; this runner decodes no image files in Node)");
  }
  if (ext === ".csv") return loadCsv(utf8(bytes, name), m, name);
  throw new RunnerError(`${name}: unknown data format '${ext || "(no extension)"}'; expected .npz ` +
    "(x, y arrays) or .csv (one sensor sample per row)");
}
