/**
 * Downloads one file with the TypeScript client for tests/integration/test_typescript_client.py: after the
 * first chunk it prints "first" and waits for a line on stdin (the test stops the server meanwhile and
 * starts it again), then reads the rest and prints the bytes and SHA-256 it got. Usage: node download.js FILE_ID
 */

import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import { BatchgateClient } from "../src/index.js";

const client = new BatchgateClient();
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const hash = createHash("sha256");
let bytes = 0;
for await (const chunk of client.iterFile(process.argv[2], 0n, { reconnectDelayMs: 200, maxReconnects: 100 })) {
  if (bytes === 0) {
    process.stdout.write("first\n");
    await lines.next();
  }
  bytes += chunk.byteLength;
  hash.update(chunk);
}
process.stdout.write(JSON.stringify({ bytes, sha256: hash.digest("hex") }) + "\n");
process.exit(0);
