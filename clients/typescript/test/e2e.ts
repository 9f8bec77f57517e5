/**
 * The TypeScript client against a real server, driven by tests/integration/test_typescript_client.py:
 * upload (bytes and a path), create, watch (and resume), download, typed errors. Reads BATCHGATE_ADDRESS and
 * BATCHGATE_API_KEY; prints one JSON report on stdout for the test to check.
 */

import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import {
  BatchgateClient,
  BatchgateError,
  BatchStatus,
  ErrorReason,
  InvalidArgumentError,
  NotFoundError,
  toBatchgateError,
} from "../src/index.js";
import { UploadFileRequestSchema } from "../src/gen/batchgate/v1/file_pb.js";

const ENDPOINT = "/v1/chat/completions";
const encoder = new TextEncoder();

function requestLine(customId: string, text: string): string {
  return JSON.stringify({
    custom_id: customId, method: "POST", url: ENDPOINT,
    body: { model: "simulated", messages: [{ role: "user", content: text }] },
  });
}

function describe(err: unknown) {
  if (!(err instanceof BatchgateError)) throw err;
  return {
    type: err.constructor.name, code: err.code, reason: err.reason, reasonEnum: err.reasonEnum,
    reasonName: err.reasonEnum === undefined ? null : ErrorReason[err.reasonEnum], domain: err.domain,
    metadata: err.metadata, lines: err.lines, violations: err.violations, message: err.message,
  };
}

async function expectError(call: () => Promise<unknown>) {
  try {
    await call();
  } catch (err) {
    return describe(err);
  }
  throw new Error("the call succeeded; it should have failed");
}

async function main() {
  const client = new BatchgateClient({ timeoutMs: 30_000 });
  const count = Number(process.env.E2E_REQUESTS ?? 5);
  const lines = Array.from({ length: count }, (_, i) => requestLine(`req-${i}`, `question ${i}`));
  const content = encoder.encode(lines.join("\n") + "\n");

  // Upload bytes, in small chunks so the client stream carries several messages.
  const file = await client.uploadFile(content, { filename: "requests.jsonl", chunkBytes: 64 });
  // Upload from a path (streamed from disk, size and sha256 sent ahead).
  const dir = await mkdtemp(join(tmpdir(), "batchgate-ts-"));
  await writeFile(join(dir, "from-disk.jsonl"), content);
  const fromDisk = await client.uploadFile(join(dir, "from-disk.jsonl"));

  const batch = await client.createBatch({ inputFileId: file.id, endpoint: ENDPOINT, model: "simulated" });
  const states: { status: string; revision: string; completed: string }[] = [];
  let final = batch;
  for await (const state of client.watch(batch.id)) {
    states.push({ status: BatchStatus[state.status], revision: String(state.revision),
      completed: String(state.requestCounts?.completed ?? 0) });
    final = state;
  }
  // Resume from a revision already seen: only later states come.
  const resumeFrom = BigInt(states[0].revision);
  const resumed: string[] = [];
  for await (const state of client.watch(batch.id, { startRevision: resumeFrom })) resumed.push(String(state.revision));

  const output = new TextDecoder().decode(await client.downloadFile(final.outputFileId));
  const results = output.trim().split("\n").map((line) => JSON.parse(line));

  // A bad batch file: the error names its reason and the lines at fault.
  const bad = encoder.encode([requestLine("ok-1", "fine"), "{not json", JSON.stringify({ method: "POST" })].join("\n") + "\n");
  const badFile = await expectError(() => client.uploadFile(bad, { filename: "bad.jsonl" }));
  const missing = await expectError(() => client.getFile("file-does-not-exist"));
  // The generated client itself, with an upload that never sends its finish message.
  const unfinished = await expectError(async () => {
    try {
      await client.files.uploadFile((async function* () {
        yield create(UploadFileRequestSchema, { payload: { case: "header", value: { filename: "cut.jsonl", purpose: 1 } } });
        yield create(UploadFileRequestSchema, { payload: { case: "chunk", value: content } });
      })());
    } catch (err) {
      throw toBatchgateError(err);
    }
  });

  // CreateBatch's routing fields: no endpoint (the file's own), a deployment id as model_map target, spread.
  const mapped = await client.createBatch({ inputFileId: file.id, modelMap: { simulated: "builtin-simulated" },
    spread: true, requestId: "ts-mapped" });
  const reused = await expectError(() => client.createBatch({ inputFileId: file.id,
    modelMap: { simulated: "builtin-simulated" }, requestId: "ts-mapped" }));
  const unmapped = await expectError(() => client.createBatch({ inputFileId: file.id,
    modelMap: { simulated: "no-such-model" } }));

  const report = {
    file: { id: file.id, bytes: String(file.bytes), lineCount: String(file.lineCount), sha256: file.sha256 },
    fromDisk: { id: fromDisk.id, bytes: String(fromDisk.bytes), sha256: fromDisk.sha256 },
    batch: { id: batch.id, finalStatus: BatchStatus[final.status], outputFileId: final.outputFileId },
    states, resumeFrom: String(resumeFrom), resumed,
    results: results.map((r) => ({ customId: r.custom_id, content: r.response?.body?.choices?.[0]?.message?.content })),
    badFile, missing, unfinished,
    mapped: { model: mapped.model, endpoint: mapped.endpoint, provider: mapped.provider }, reused, unmapped,
    typed: {
      badFileIsInvalidArgument: badFile.type === InvalidArgumentError.name,
      missingIsNotFound: missing.type === NotFoundError.name,
    },
  };
  process.stdout.write(JSON.stringify(report) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
});
