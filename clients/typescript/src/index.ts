export * from "./client.js";
export * from "./errors.js";
export { ErrorReason } from "./gen/batchgate/v1/error_reason_pb.js";
export { type Batch, BatchStatus, BatchService, CostStatus } from "./gen/batchgate/v1/batch_pb.js";
export { type File, FilePurpose, FileService } from "./gen/batchgate/v1/file_pb.js";
export { UsageGroupBy, UsageService } from "./gen/batchgate/v1/usage_pb.js";
