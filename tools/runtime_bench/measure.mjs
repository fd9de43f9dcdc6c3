// One measurement of the TypeScript runner on one bundle, the same code in Node and in the
// browser (tools/runtime_bench: node_cell.mjs, bench.html): load (read + verify the files,
// create the runtime's sessions), self-test, adapt (features + training, as report.json times
// them). The caller passes the package, a function making the backend and the file readers.
//
// measure(E, {readFiles, readData, makeBackend, adapt}) -> {load_s, selftest_s, feature_s,
//   train_s, adapt_s, steps, steps_fused, epochs, step_ms, rolled_back, accuracy_after, selftest_err}
const now = () => performance.now() / 1000;

export async function measure(E, { readFiles, readData, makeBackend, adapt }) {
  const t0 = now();
  const bundle = await E.Bundle.fromFiles(await readFiles(), { source: "bench" });
  const backend = await makeBackend(bundle);
  const t1 = now();
  const err = Math.max(await E.selftestForward(bundle, backend),
    await E.selftestTrain(bundle, backend));
  const t2 = now();
  const [bytes, name] = await readData();
  const ds = await E.loadDataBytes(bytes, name, bundle);
  // the self-test ran above; adapt's own run of it is not adaptation time
  const r = await E.adapt(bundle, backend, ds, { ...adapt, skipSelftest: true });
  const rep = r.report;
  backend.delete?.(); // LiteRT.js: WASM memory is not garbage-collected
  return {
    load_s: t1 - t0, selftest_s: t2 - t1, feature_s: rep.feature_seconds,
    train_s: rep.train_seconds, adapt_s: rep.feature_seconds + rep.train_seconds,
    steps: rep.steps, steps_fused: rep.steps_fused, epochs: rep.history.length, step_ms: rep.step_ms,
    rolled_back: rep.rolled_back, accuracy_after: rep.accuracy_after, selftest_err: err,
    backend: `${backend.name} ${backend.version ?? ""}`.trim(),
  };
}
