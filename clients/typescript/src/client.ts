/**
 * A thin typed wrapper over the generated services: the upload protocol (header, chunks, finish), create
 * with an idempotency key, watch that resumes after the last revision it saw, download that resumes after
 * the last byte, and typed errors (./errors.ts). Everything else is on `files`, `batches` and `usage`, the
 * generated Connect clients, with the same API key and transport.
 *
 * Transport: Connect's gRPC transport for Node.js (HTTP/2, binary protobuf), which runs unary,
 * client-streaming and server-streaming calls against any gRPC server.
 */

import { createHash, randomUUID } from "node:crypto";
import { open, stat } from "node:fs/promises";
import { basename } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { type CallOptions, type Client, Code, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { type Batch, BatchService, BatchStatus, type CreateBatchRequestSchema } from "./gen/batchgate/v1/batch_pb.js";
import {
  type File,
  FilePurpose,
  FileService,
  type UploadFileHeaderSchema,
  type UploadFileRequest,
  UploadFileRequestSchema,
} from "./gen/batchgate/v1/file_pb.js";
import { UsageService } from "./gen/batchgate/v1/usage_pb.js";
import { AdminService } from "./gen/batchgate/v1/admin_pb.js";
import { BatchgateError, toBatchgateError } from "./errors.js";

export const DEFAULT_ADDRESS = "127.0.0.1:50051";
/** 256 KiB: the server takes up to 2 MiB a chunk; this keeps memory small and the stream busy. */
export const DEFAULT_CHUNK_BYTES = 256 * 1024;
export const TERMINAL_STATUSES: ReadonlySet<BatchStatus> = new Set([
  BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED,
]);
/** Codes after which a watch or download opens its stream again, where it left off: a server restarting
 * or shutting down ends its streams with these (a caller's own abort is told apart by its signal). */
const RECONNECT_CODES: ReadonlySet<Code> = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Internal,
  Code.Canceled]);

export interface TlsOptions {
  /** PEM CA certificates to trust instead of the system's. */
  ca?: string | Buffer;
  /** PEM certificate and key for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name to check the server's certificate against (an IP address or a proxy in between). */
  serverName?: string;
}

export interface ClientOptions {
  /** host:port; default BATCHGATE_ADDRESS, else 127.0.0.1:50051. */
  address?: string;
  /** Sent as `authorization: Bearer <key>`; default BATCHGATE_API_KEY. */
  apiKey?: string;
  /** true: TLS with the system's CAs; an object: TLS with these. Default plaintext. */
  tls?: boolean | TlsOptions;
  /** Deadline of each unary call in milliseconds (streams have none unless given per call). */
  timeoutMs?: number;
  /** Use this transport instead of making one (tests, proxies, custom interceptors). */
  transport?: Transport;
}

export interface UploadOptions {
  /** The file name stored with the file; default the path's base name, else "upload.jsonl". */
  filename?: string;
  /** An idempotency key: the same upload sent again returns the first file. */
  requestId?: string;
  /** Delete the file this long after it was stored. */
  expiresAfterMs?: number;
  chunkBytes?: number;
}

export interface CreateBatchOptions {
  inputFileId: string;
  /** Default "": the file's own endpoint (each of them, for a file that mixes endpoints). */
  endpoint?: string;
  model?: string;
  provider?: string;
  /** A file model (a line's body.model) -> the model name, "provider/model" or deployment id its lines run on. */
  modelMap?: Record<string, string>;
  /** Cut the batch across every deployment of its model, by weight and free capacity. */
  spread?: boolean;
  completionWindow?: string;
  metadata?: Record<string, string>;
  /** An idempotency key; one is made up when none is given, so that a retried create never creates twice. */
  requestId?: string;
}

export interface ReconnectOptions {
  /** Stream reopenings allowed in a row without a message in between (default 20). */
  maxReconnects?: number;
  /** The first pause before reopening; it grows with each failure in a row, up to ten times (default 500). */
  reconnectDelayMs?: number;
  signal?: AbortSignal;
}

export interface WatchOptions extends ReconnectOptions {
  /** Resume: send only states after this revision. */
  startRevision?: bigint;
}

export type Content = Uint8Array | string | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

export class BatchgateClient {
  readonly files: Client<typeof FileService>;
  readonly batches: Client<typeof BatchService>;
  readonly usage: Client<typeof UsageService>;
  /** Keys and quotas: the master key only. */
  readonly admin: Client<typeof AdminService>;
  private readonly timeoutMs?: number;

  constructor(options: ClientOptions = {}) {
    const apiKey = options.apiKey ?? process.env.BATCHGATE_API_KEY;
    const transport = options.transport ?? makeTransport(options.address ?? process.env.BATCHGATE_ADDRESS ??
      DEFAULT_ADDRESS, options.tls, apiKey);
    this.files = createClient(FileService, transport);
    this.batches = createClient(BatchService, transport);
    this.usage = createClient(UsageService, transport);
    this.admin = createClient(AdminService, transport);
    this.timeoutMs = options.timeoutMs;
  }

  /**
   * Uploads a batch file: `content` is the bytes, a path to read (streamed), or chunks (iterable or async
   * iterable). Bytes and paths are sent with their size and SHA-256, which the server checks.
   */
  async uploadFile(content: Content, options: UploadOptions = {}): Promise<File> {
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    const header: MessageInitShape<typeof UploadFileHeaderSchema> = {
      filename: options.filename ?? (typeof content === "string" ? basename(content) : "upload.jsonl"),
      purpose: FilePurpose.BATCH,
      requestId: options.requestId ?? "",
    };
    if (options.expiresAfterMs !== undefined) header.expiresAfter = durationFromMs(options.expiresAfterMs);
    let chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>;
    if (content instanceof Uint8Array) {
      header.expectedBytes = BigInt(content.byteLength);
      header.expectedSha256 = createHash("sha256").update(content).digest("hex");
      chunks = slices(content, chunkBytes);
    } else if (typeof content === "string") {
      header.expectedBytes = BigInt((await stat(content)).size);
      header.expectedSha256 = await sha256OfFile(content, chunkBytes);
      chunks = readFileChunks(content, chunkBytes);
    } else {
      chunks = content;
    }
    const response = await this.unary(() => this.files.uploadFile(uploadMessages(header, chunks), this.callOptions()));
    return response.file!;
  }

  async getFile(fileId: string): Promise<File> {
    return (await this.unary(() => this.files.getFile({ fileId }, this.callOptions()))).file!;
  }

  async createBatch(options: CreateBatchOptions): Promise<Batch> {
    const request: MessageInitShape<typeof CreateBatchRequestSchema> = {
      inputFileId: options.inputFileId,
      endpoint: options.endpoint ?? "",
      completionWindow: options.completionWindow ?? "24h",
      metadata: options.metadata ?? {},
      model: options.model ?? "",
      provider: options.provider ?? "",
      requestId: options.requestId ?? randomUUID(),
      modelMap: options.modelMap ?? {},
      spread: options.spread ?? false,
    };
    return (await this.unary(() => this.batches.createBatch(request, this.callOptions()))).batch!;
  }

  async getBatch(batchId: string): Promise<Batch> {
    return (await this.unary(() => this.batches.getBatch({ batchId }, this.callOptions()))).batch!;
  }

  async cancelBatch(batchId: string): Promise<Batch> {
    return (await this.unary(() => this.batches.cancelBatch({ batchId }, this.callOptions()))).batch!;
  }

  /**
   * Every state of the batch until it ends (heartbeats are left out). A stream that drops is opened
   * again after the last revision seen, so no state comes twice and none is missed.
   */
  async *watch(batchId: string, options: WatchOptions = {}): AsyncGenerator<Batch> {
    let revision = options.startRevision ?? 0n;
    const events = resumable(() => this.batches.watchBatch({ batchId, startRevision: revision },
      { signal: options.signal }), options);
    for await (const event of events) {
      if (event.event.case !== "batch") continue;
      revision = event.event.value.revision;
      yield event.event.value;
      if (TERMINAL_STATUSES.has(event.event.value.status)) return;
    }
  }

  /** The batch's final state, once it has ended. */
  async wait(batchId: string, options: WatchOptions = {}): Promise<Batch> {
    let last: Batch | undefined;
    for await (const state of this.watch(batchId, options)) last = state;
    return last ?? this.getBatch(batchId);
  }

  /** The file's bytes from `offset`, chunk by chunk; a dropped stream resumes after the last byte received. */
  async *iterFile(fileId: string, offset = 0n, options: ReconnectOptions = {}): AsyncGenerator<Uint8Array> {
    const messages = resumable(() => this.files.downloadFile({ fileId, readOffset: offset },
      { signal: options.signal }), options);
    for await (const message of messages) {
      if (message.data.byteLength === 0) continue;
      offset = message.offset + BigInt(message.data.byteLength);
      yield message.data;
    }
  }

  /** The whole file, checked against its recorded size and SHA-256. */
  async downloadFile(fileId: string): Promise<Uint8Array> {
    const record = await this.getFile(fileId);
    const parts: Uint8Array[] = [];
    for await (const chunk of this.iterFile(fileId)) parts.push(chunk);
    const data = Buffer.concat(parts);
    const digest = createHash("sha256").update(data).digest("hex");
    if (BigInt(data.byteLength) !== record.bytes || digest !== record.sha256) {
      throw new Error(`download of ${fileId} is ${data.byteLength} bytes hashing to ${digest}; the server recorded` +
        ` ${record.bytes} bytes hashing to ${record.sha256}`);
    }
    return data;
  }

  private callOptions(): CallOptions {
    return this.timeoutMs === undefined ? {} : { timeoutMs: this.timeoutMs };
  }

  private async unary<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      throw toBatchgateError(err);
    }
  }
}

/**
 * The messages of the streams `open` makes, until one ends. A stream that fails with a reconnect code is
 * opened again after a pause; `open` reads the caller's progress (a revision, an offset), so the new
 * stream starts where the last one stopped. Typed errors for everything else.
 */
async function* resumable<T>(open: () => AsyncIterable<T>, options: ReconnectOptions): AsyncGenerator<T> {
  let failures = 0;
  for (;;) {
    try {
      for await (const item of open()) {
        failures = 0;
        yield item;
      }
      return;
    } catch (err) {
      const typed = toBatchgateError(err);
      const resumable = RECONNECT_CODES.has(typed.grpcCode) || isCutMidMessage(typed);
      if (!resumable || failures >= (options.maxReconnects ?? 20) || options.signal?.aborted) {
        throw typed;
      }
      failures += 1;
      await new Promise((resolve) => setTimeout(resolve, (options.reconnectDelayMs ?? 500) * Math.min(failures, 10)));
    }
  }
}

/** A stream the connection cut in the middle of a message: the transport itself reports it as
 * INVALID_ARGUMENT "protocol error: incomplete envelope", with no ErrorInfo, since no server said it.
 * The server's own INVALID_ARGUMENT always carries its reason, so the two are told apart. */
function isCutMidMessage(err: BatchgateError): boolean {
  return err.grpcCode === Code.InvalidArgument && err.reason === "" && /incomplete envelope/i.test(err.message);
}

function makeTransport(address: string, tls: ClientOptions["tls"], apiKey: string | undefined): Transport {
  const interceptors: Interceptor[] = [];
  if (apiKey) {
    interceptors.push((next) => (request) => {
      request.header.set("authorization", `Bearer ${apiKey}`);
      return next(request);
    });
  }
  const options = typeof tls === "object" ? tls : {};
  return createGrpcTransport({
    baseUrl: `${tls ? "https" : "http"}://${address}`,
    interceptors,
    nodeOptions: tls ? { ca: options.ca, cert: options.cert, key: options.key, servername: options.serverName } : {},
  });
}

/** The upload protocol: the header, every non-empty chunk, then the finish message that commits the file. */
async function* uploadMessages(header: MessageInitShape<typeof UploadFileHeaderSchema>,
  chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): AsyncGenerator<UploadFileRequest> {
  yield create(UploadFileRequestSchema, { payload: { case: "header", value: header } });
  for await (const chunk of chunks) {
    if (chunk.byteLength > 0) yield create(UploadFileRequestSchema, { payload: { case: "chunk", value: chunk } });
  }
  yield create(UploadFileRequestSchema, { payload: { case: "finish", value: {} } });
}

function* slices(data: Uint8Array, size: number): Generator<Uint8Array> {
  for (let at = 0; at < data.byteLength; at += size) yield data.subarray(at, at + size);
}

async function* readFileChunks(path: string, size: number): AsyncGenerator<Uint8Array> {
  const handle = await open(path);
  try {
    for (;;) {
      const buffer = Buffer.allocUnsafe(size);
      const { bytesRead } = await handle.read(buffer, 0, size, null);
      if (bytesRead === 0) return;
      yield buffer.subarray(0, bytesRead);
    }
  } finally {
    await handle.close();
  }
}

async function sha256OfFile(path: string, size: number): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of readFileChunks(path, size)) hash.update(chunk);
  return hash.digest("hex");
}
