/**
 * Typed errors: a failed call rejects with a BatchgateError (a subclass chosen by its gRPC code) carrying
 * what the server put in the google.rpc.Status of the `grpc-status-details-bin` trailer: ErrorInfo's
 * reason, domain and metadata, BadRequest's field violations (`line 12` for a batch file line) and
 * RetryInfo's delay. `reason` is the string the server sent; `reasonEnum` is its ErrorReason value, or
 * undefined for a reason this client does not know yet (a newer server).
 */

import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorReason } from "./gen/batchgate/v1/error_reason_pb.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** ErrorInfo.domain of every batchgate error. */
export const DOMAIN = "batchgate.dev";
/** ErrorInfo metadata: how many field violations the server left out to bound the error's size. */
export const OMITTED_VIOLATIONS = "omitted_violations";

export interface Violation {
  field: string;
  description: string;
  /** The JSONL line a batch file problem is on (`field` "line 12"), else undefined. */
  line?: number;
}

/** gRPC's own names of the status codes ("INVALID_ARGUMENT"), by number. */
const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Code).filter(([, v]) => typeof v === "number")
    .map(([name, v]) => [v, name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()]),
);
CODE_NAMES[0] = "OK";

export class BatchgateError extends Error {
  /** gRPC status code name, e.g. "INVALID_ARGUMENT". */
  readonly code: string;
  /** gRPC status code number (Connect's Code is the same numbering). */
  readonly grpcCode: Code;
  /** ErrorInfo.reason, e.g. "INVALID_BATCH_FILE"; "" when the status had no ErrorInfo. */
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Record<string, string>;
  readonly violations: Violation[];
  /** RetryInfo.retry_delay in milliseconds, when the server sent one. */
  readonly retryDelayMs?: number;
  /** The status message as the server wrote it. */
  readonly rawMessage: string;

  constructor(readonly cause: ConnectError) {
    const infos = cause.findDetails(ErrorInfoSchema);
    const info = infos[0];
    const code = CODE_NAMES[cause.code] ?? String(cause.code);
    super(`${code}${info ? ` ${info.reason}` : ""}: ${cause.rawMessage}`);
    this.name = new.target.name;
    this.code = code;
    this.grpcCode = cause.code;
    this.rawMessage = cause.rawMessage;
    this.reason = info?.reason ?? "";
    this.domain = info?.domain ?? "";
    this.metadata = { ...(info?.metadata ?? {}) };
    this.violations = cause.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations).map((v) => {
      const match = /^line (\d+)$/.exec(v.field);
      return { field: v.field, description: v.description, ...(match ? { line: Number(match[1]) } : {}) };
    });
    const retry = cause.findDetails(RetryInfoSchema)[0]?.retryDelay;
    if (retry) this.retryDelayMs = Number(retry.seconds) * 1000 + retry.nanos / 1e6;
  }

  /** `reason` as an ErrorReason value; undefined when there is none or this client does not know it. */
  get reasonEnum(): ErrorReason | undefined {
    const value = (ErrorReason as unknown as Record<string, number | undefined>)[this.reason];
    return typeof value === "number" && value !== ErrorReason.ERROR_REASON_UNSPECIFIED ? value : undefined;
  }

  /** The JSONL line numbers the violations name, in order. */
  get lines(): number[] {
    return this.violations.flatMap((v) => (v.line === undefined ? [] : [v.line]));
  }

  get omittedViolations(): number {
    return Number(this.metadata[OMITTED_VIOLATIONS] ?? 0);
  }

  /** True when this error's reason is `reason` (an ErrorReason value or its name). */
  is(reason: ErrorReason | string): boolean {
    return this.reason === (typeof reason === "number" ? ErrorReason[reason] : reason);
  }
}

export class InvalidArgumentError extends BatchgateError {}
export class NotFoundError extends BatchgateError {}
export class FailedPreconditionError extends BatchgateError {}
export class UnauthenticatedError extends BatchgateError {}
export class PermissionDeniedError extends BatchgateError {}
export class ResourceExhaustedError extends BatchgateError {}
export class DeadlineExceededError extends BatchgateError {}
export class UnavailableError extends BatchgateError {}
export class CancelledError extends BatchgateError {}
export class InternalError extends BatchgateError {}

const BY_CODE: Partial<Record<Code, new (cause: ConnectError) => BatchgateError>> = {
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.NotFound]: NotFoundError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.Unauthenticated]: UnauthenticatedError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.Unavailable]: UnavailableError,
  [Code.Canceled]: CancelledError,
  [Code.Internal]: InternalError,
};

/** The typed error of anything a call threw (a ConnectError, or whatever else it was). */
export function toBatchgateError(err: unknown): BatchgateError {
  if (err instanceof BatchgateError) return err;
  const cause = ConnectError.from(err);
  return new (BY_CODE[cause.code] ?? BatchgateError)(cause);
}
