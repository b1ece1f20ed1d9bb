// The test page of clients/js/react.js (tests/integration/test_react_hooks.py), built with
// REACT=18 or REACT=19 (default 19): "react" and "react-dom" (and their subpaths) resolve to
// this app's react18/react-dom18 (npm aliases) or react/react-dom, for the app and for
// react.js alike. "@pgbridge/client" and "@pgbridge/client/react" are the sources in
// PGBRIDGE_CLIENT_JS (default ../../../clients/js: the app may be built from a copy elsewhere).
// A development build: React's StrictMode mounts, unmounts and mounts every effect again.
import { fileURLToPath } from "node:url";
import path from "node:path";
import { defineConfig } from "vite";

const here = path.dirname(fileURLToPath(import.meta.url));
const client = path.resolve(process.env.PGBRIDGE_CLIENT_JS ?? path.join(here, "../../../clients/js"));
const version = process.env.REACT ?? "19";
if (version !== "18" && version !== "19") throw new Error(`REACT must be 18 or 19, not ${version}`);
const suffix = version === "18" ? "18" : "";
const modules = path.join(here, "node_modules");

export default defineConfig({
  root: here,
  base: "./",
  mode: "development",
  define: { "process.env.NODE_ENV": JSON.stringify("development"),
    __REACT_EXPECTED__: JSON.stringify(version) },
  esbuild: { jsx: "automatic" },
  resolve: {
    alias: [
      { find: /^react-dom(\/.*)?$/, replacement: path.join(modules, `react-dom${suffix}`) + "$1" },
      { find: /^react(\/.*)?$/, replacement: path.join(modules, `react${suffix}`) + "$1" },
      { find: /^@pgbridge\/client\/react$/, replacement: path.join(client, "react.js") },
      { find: /^@pgbridge\/client$/, replacement: path.join(client, "pgbridge.js") },
    ],
  },
  build: { outDir: process.env.OUT_DIR ?? path.join(here, "dist"), emptyOutDir: true,
    minify: false, sourcemap: false },
  logLevel: "warn",
});
