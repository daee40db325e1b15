// Bundle the dashboard: copy its sources and the chart library (uPlot, from node_modules) into
// dist/, which the coordinator serves and the Python package ships. No network, no bundler:
// uPlot ships a ready IIFE build. Run: npm ci && npm run build:dashboard (at the repo root,
// whose package.json holds every JS dependency of the project).
import { copyFileSync, mkdirSync, readdirSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist", "dashboard");
mkdirSync(out, { recursive: true });
for (const f of readdirSync(join(here, "dashboard"))) copyFileSync(join(here, "dashboard", f), join(out, f));
const lib = join(here, "..", "..", "node_modules", "uplot", "dist");
if (!existsSync(lib)) {
  console.error("node_modules/uplot missing: run `npm ci` at the repo root first");
  process.exit(1);
}
copyFileSync(join(lib, "uPlot.iife.min.js"), join(out, "uPlot.iife.min.js"));
copyFileSync(join(lib, "uPlot.min.css"), join(out, "uPlot.min.css"));
console.log(`dashboard built into ${out}`);
