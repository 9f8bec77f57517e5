/**
 * Watches one batch with the TypeScript client and prints a JSON line per state as it arrives, for
 * tests/integration/test_typescript_client.py, which restarts the server in the middle: the watch must
 * come back after the last revision it saw and see the batch to its end. Usage: node watch.js BATCH_ID
 */

import { BatchgateClient, BatchStatus } from "../src/index.js";

const client = new BatchgateClient();
for await (const state of client.watch(process.argv[2], { reconnectDelayMs: 200, maxReconnects: 100 })) {
  process.stdout.write(JSON.stringify({ revision: String(state.revision), status: BatchStatus[state.status],
    completed: String(state.requestCounts?.completed ?? 0) }) + "\n");
}
