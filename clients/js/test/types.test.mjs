// The TypeScript declarations compile against a usage sample (strict mode): they match the API and
// reject misuse (see the @ts-expect-error lines in types/usage.ts).

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

test("streamhub.d.ts and react.d.ts type-check a usage sample", { timeout: 120_000 }, () => {
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const result = spawnSync(process.execPath, [tsc, "-p", path.join(here, "types")], { encoding: "utf8", timeout: 110_000 });
  assert.equal(result.status, 0, result.stdout + result.stderr);
});
