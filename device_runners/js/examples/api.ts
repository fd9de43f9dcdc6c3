// The README's API example, type-checked (`tsc -p tsconfig.examples.json`): a page or app
// that picks its runtime (here onnxruntime-web; onnxruntime-node's module type-checks too).
import * as ortWeb from "onnxruntime-web";
import * as ortNode from "onnxruntime-node";
import { adapt, Bundle, infer, loadCsv, Ort, OrtBackend, selftest } from "../src/index.js";

export async function personalise(files: Record<string, Uint8Array>, pemText: string,
  csvText: string, useNode = false): Promise<Uint8Array> {
  const ort: Ort = useNode ? ortNode : ortWeb;
  const bundle = await Bundle.fromFiles(files, { trustKey: pemText }); // schema, sha256, Ed25519
  const backend = await OrtBackend.create(ort, bundle);
  await selftest(bundle, backend);
  const ds = loadCsv(csvText, bundle.manifest, "log.csv");
  const { report, kept } = await adapt(bundle, backend, ds, {
    seed: 0, onEpoch: (h, epochs) => console.log(h.epoch, "/", epochs, h.val_loss) });
  console.log(report.gate);
  const res = await infer(bundle, backend, ds, kept);
  console.log(res.accuracy);
  return kept.toNpz(bundle); // the head.npz the Python runner reads
}
