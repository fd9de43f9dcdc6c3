// Node module hook for tests/test_js_runner.py: the React Native example
// (device_runners/js/examples/react-native.ts) imports "onnxruntime-react-native", which needs
// a React Native app; in Node it gets onnxruntime-node, the same onnxruntime-common API.
export async function resolve(spec, ctx, next) {
  return next(spec === "onnxruntime-react-native" ? "onnxruntime-node" : spec, ctx);
}
