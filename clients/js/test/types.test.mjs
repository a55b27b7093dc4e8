// allspark.d.ts against an app's use of the module (types-check.ts), with the
// TypeScript compiler in strict mode.  Needs no server.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const TSC = join(ROOT, "node_modules", "typescript", "bin", "tsc");

test("allspark.d.ts type-checks an app's use of the client (tsc --strict)", {
  skip: existsSync(TSC) ? false : "typescript is not installed (npm ci in clients/js)",
}, async () => {
  const args = [TSC, "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext",
    "--moduleResolution", "nodenext", "--lib", "es2022,dom", join("test", "types-check.ts")];
  const { code, output } = await new Promise((resolve) => {
    execFile(process.execPath, args, { cwd: ROOT, timeout: 120_000 }, (error, stdout, stderr) => {
      resolve({ code: error ? (error.code ?? 1) : 0, output: stdout + stderr });
    });
  });
  assert.equal(code, 0, output);
});
