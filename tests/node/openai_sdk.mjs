// The official openai npm package against batchgate's HTTP API, unchanged but for baseURL and apiKey.
// Run by tests/integration/test_http_node.py: BATCHGATE_BASE_URL, BATCHGATE_API_KEY, BATCHGATE_SLOW_MODEL.
// Prints one JSON object with what it saw; any failure exits non-zero with the error.
import OpenAI, { toFile } from "openai";

const client = new OpenAI({ baseURL: process.env.BATCHGATE_BASE_URL, apiKey: process.env.BATCHGATE_API_KEY,
                            maxRetries: 0 });
const line = (i, model) => JSON.stringify({ custom_id: `req-${i}`, method: "POST", url: "/v1/chat/completions",
                                            body: { model, messages: [{ role: "user", content: `hello ${i}` }] } });
const content = [0, 1, 2].map((i) => line(i, process.env.BATCHGATE_SLOW_MODEL)).join("\n") + "\n";

const seen = {};
const files = [];
for (const name of ["a.jsonl", "b.jsonl", "c.jsonl"]) {
  files.push(await client.files.create({ file: await toFile(Buffer.from(content), name), purpose: "batch" }));
}
seen.created = files.map((f) => [f.object, f.purpose, f.status, f.bytes === Buffer.byteLength(content)]);
seen.retrieved = (await client.files.retrieve(files[0].id)).filename;
const listed = [];
for await (const f of client.files.list({ limit: 2 })) listed.push(f.id);  // follows `after`
seen.listed_newest_first = JSON.stringify(listed) === JSON.stringify(files.map((f) => f.id).reverse());
seen.content_matches = (await (await client.files.content(files[0].id)).text()) === content;

const batch = await client.batches.create({ input_file_id: files[0].id, endpoint: "/v1/chat/completions",
                                            completion_window: "24h", metadata: { from: "node" } });
seen.batch = [batch.object, batch.status, batch.metadata.from];
seen.batch_retrieved = (await client.batches.retrieve(batch.id)).id === batch.id;
seen.batch_listed = (await client.batches.list({ limit: 10 })).data.map((b) => b.id).includes(batch.id);
seen.cancelled = (await client.batches.cancel(batch.id)).status;

const deleted = await client.files.delete(files[2].id);
seen.deleted = [deleted.deleted, deleted.id === files[2].id];
try {
  await client.files.retrieve(files[2].id);
  seen.not_found = "no error";
} catch (err) {
  seen.not_found = [err instanceof OpenAI.NotFoundError, err.status, err.code, err.message.includes(files[2].id)];
}
try {
  await client.files.create({ file: await toFile(Buffer.from("{broken\n"), "bad.jsonl"), purpose: "batch" });
  seen.invalid = "no error";
} catch (err) {
  seen.invalid = [err instanceof OpenAI.BadRequestError, err.status, err.code, err.param, err.error?.line ?? null];
}
try {
  await new OpenAI({ baseURL: process.env.BATCHGATE_BASE_URL, apiKey: "bg-wrong", maxRetries: 0 }).files.list();
  seen.unauthenticated = "no error";
} catch (err) {
  seen.unauthenticated = [err instanceof OpenAI.AuthenticationError, err.status, err.code];
}
console.log(JSON.stringify(seen));
