/**
 * {@linkcode ObjectStore} over the S3 API (`npm:@aws-sdk/client-s3`): AWS S3 and S3-compatible
 * stores (OpenStack Swift's s3api, Ceph RGW, MinIO). Endpoint, region and credentials come from
 * options or the usual `AWS_*` environment variables and profile files.
 *
 * @module
 */
import * as fs from "node:fs";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { FetchHttpHandler } from "@smithy/fetch-http-handler";
import { assert } from "../_assert.ts";
import { UsageError } from "../errors.ts";
import { readFully } from "../fd_io.ts";
import {
  type ByteRange,
  type ConditionalPutResult,
  type ObjectInfo,
  type ObjectStore,
  type PutCondition,
  type PutFileOptions,
  StoreError,
} from "./object_store.ts";
export { StoreError } from "./object_store.ts";
export { isS3Url, parseS3Url, type S3Location } from "./s3_url.ts";

/** Objects larger than this are uploaded in parts (multipart upload). */
export const MULTIPART_THRESHOLD_BYTES = 256 * 1024 * 1024;
/**
 * Objects up to this size go up from a buffer (the SDK may resend it); larger ones, up to the
 * multipart threshold, are streamed from the file in one PutObject: fewer requests than parts
 * (Swift assembles multipart objects at a cost) and no buffer of the object's size.
 */
export const BUFFERED_PUT_BYTES_MAX = 1024 * 1024;
/** The size of each part of a multipart upload (S3's minimum is 5 MiB). */
export const PART_BYTES = 8 * 1024 * 1024;
/** Parts of one multipart upload in flight at once (each holds a buffer of PART_BYTES). */
export const PARTS_IN_FLIGHT_MAX = 4;
/** S3 allows at most this many parts in one upload. */
const PARTS_MAX = 10_000;
/** Attempts of one request, with the SDK's exponential backoff between them. */
export const REQUEST_ATTEMPTS_MAX = 4;
/** A connection that is not up after this long fails (and is retried). */
const CONNECT_TIMEOUT_MS = 5_000;
/** A request with no progress for this long fails (and is retried). */
const REQUEST_TIMEOUT_MS = 60_000;

/** Connection settings of {@linkcode S3Store}; unset ones come from `AWS_*` and profile files. */
export interface S3StoreOptions {
  /** e.g. `http://127.0.0.1:8080`; default `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, or AWS. */
  endpoint?: string;
  /** Default `AWS_REGION`, `AWS_DEFAULT_REGION`, then `us-east-1`. */
  region?: string;
  /** Path-style addressing (`endpoint/bucket/key`); default: on when an endpoint is given. */
  forcePathStyle?: boolean;
  /** Default: the SDK's chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profile files, …). */
  credentials?: { accessKeyId: string; secretAccessKey: string };
  /** Attempts per request (default {@linkcode REQUEST_ATTEMPTS_MAX}). */
  attemptsMax?: number;
  /** Objects above this size go up in parts (default {@linkcode MULTIPART_THRESHOLD_BYTES}). */
  multipartThresholdBytes?: number;
  /** Part size of multipart uploads (default {@linkcode PART_BYTES}). */
  partBytes?: number;
}

/**
 * One bucket of an S3-compatible store. Keys given to its methods are full object keys.
 *
 * @example
 * ```ts
 * import { S3Store } from "./s3_store.ts";
 * const store = new S3Store("backups", { endpoint: "http://127.0.0.1:8080" });
 * await store.check();
 * await store.put("vm1/hello.txt", new TextEncoder().encode("hello"));
 * ```
 */
export class S3Store implements ObjectStore {
  readonly bucket: string;
  readonly endpoint: string;
  #client: S3Client;
  /** For streamed PutObject: one attempt, since a consumed stream cannot be sent again. */
  #streamClient: S3Client;
  /** For GETs into a caller's buffer: fetch-based, so replies can be read BYOB. */
  #readClient: S3Client;
  #multipartThresholdBytes: number;
  #partBytes: number;
  /** Whether the store does conditional writes: unknown until the first one. */
  #conditionalWrites: boolean | undefined;

  constructor(bucket: string, options: S3StoreOptions = {}) {
    this.bucket = bucket;
    const endpoint = options.endpoint ?? envValue("AWS_ENDPOINT_URL_S3") ??
      envValue("AWS_ENDPOINT_URL");
    this.endpoint = endpoint ?? "AWS S3";
    this.#multipartThresholdBytes = options.multipartThresholdBytes ?? MULTIPART_THRESHOLD_BYTES;
    this.#partBytes = options.partBytes ?? PART_BYTES;
    assert(this.#partBytes >= 1 && this.#multipartThresholdBytes >= 1, "bad part sizes");
    if (endpoint !== undefined && !/^https?:\/\/[^/]+/.test(endpoint)) {
      throw new UsageError(
        `Invalid --s3-endpoint ${JSON.stringify(endpoint)}: expected http(s)://host[:port]`,
      );
    }
    const config = {
      endpoint,
      region: options.region ?? envValue("AWS_REGION") ?? envValue("AWS_DEFAULT_REGION") ??
        "us-east-1",
      forcePathStyle: options.forcePathStyle ?? endpoint !== undefined,
      credentials: options.credentials,
      // Swift's s3api (and other S3-compatible stores) answer 501 to the aws-chunked uploads
      // that the SDK's default checksums bring; send checksums only where the API requires one.
      requestChecksumCalculation: "WHEN_REQUIRED" as const,
      responseChecksumValidation: "WHEN_REQUIRED" as const,
      requestHandler: { connectionTimeout: CONNECT_TIMEOUT_MS, requestTimeout: REQUEST_TIMEOUT_MS },
    };
    this.#client = new S3Client({
      ...config,
      maxAttempts: options.attemptsMax ?? REQUEST_ATTEMPTS_MAX,
    });
    // Retries of a streamed upload are the caller's (ship retries the whole object).
    this.#streamClient = new S3Client({ ...config, maxAttempts: 1 });
    this.#readClient = new S3Client({
      ...config,
      maxAttempts: options.attemptsMax ?? REQUEST_ATTEMPTS_MAX,
      requestHandler: new FetchHttpHandler({ requestTimeout: REQUEST_TIMEOUT_MS }),
    });
  }

  describe(key: string): string {
    return `s3://${this.bucket}/${key}`;
  }

  /** Checks that the endpoint answers, the credentials are accepted and the bucket exists. */
  async check(): Promise<void> {
    try {
      await this.#client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    } catch (error) {
      throw this.#error("open", `s3://${this.bucket}`, error);
    }
  }

  async put(key: string, bytes: Uint8Array): Promise<void> {
    try {
      await this.#client.send(
        new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: bytes }),
      );
    } catch (error) {
      throw this.#error("upload", this.describe(key), error);
    }
  }

  async putConditional(
    key: string,
    bytes: Uint8Array,
    condition: PutCondition,
  ): Promise<ConditionalPutResult> {
    if (this.#conditionalWrites === false) return { outcome: "unsupported" };
    try {
      const reply = await this.#client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: bytes,
          IfNoneMatch: "ifNoneMatch" in condition ? condition.ifNoneMatch : undefined,
          IfMatch: "ifMatch" in condition ? condition.ifMatch : undefined,
        }),
      );
      this.#conditionalWrites = true;
      return { outcome: "stored", etag: reply.ETag ?? "" };
    } catch (error) {
      const status = statusOf(error);
      const name = (error as SdkFailure | undefined)?.name;
      // 412: the condition failed; 409: a concurrent conditional write won (retry decides).
      if (status === 412 || status === 409 || name === "PreconditionFailed") {
        return { outcome: "conflict" };
      }
      if (status === 501 || name === "NotImplemented") {
        this.#conditionalWrites = false;
        return { outcome: "unsupported" };
      }
      throw this.#error("upload", this.describe(key), error);
    }
  }

  async getWithEtag(key: string): Promise<{ bytes: Uint8Array; etag: string } | undefined> {
    try {
      const reply = await this.#client.send(
        new GetObjectCommand({ Bucket: this.bucket, Key: key }),
      );
      assert(reply.Body !== undefined, "GetObject returned no body");
      return { bytes: await reply.Body.transformToByteArray(), etag: reply.ETag ?? "" };
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.#error("download", this.describe(key), error);
    }
  }

  async putFile(key: string, path: string, options: PutFileOptions = {}): Promise<number> {
    const fd = fs.openSync(path, "r");
    try {
      const fileBytes = fs.fstatSync(fd).size;
      const sizeBytes = options.sizeBytes ?? fileBytes;
      assert(sizeBytes <= fileBytes, `${path} is ${fileBytes} bytes, fewer than ${sizeBytes}`);
      if (sizeBytes <= Math.min(BUFFERED_PUT_BYTES_MAX, this.#multipartThresholdBytes)) {
        const bytes = new Uint8Array(sizeBytes);
        readFully(fd, bytes, sizeBytes, 0);
        await this.put(key, bytes);
        options.onProgress?.(sizeBytes, sizeBytes);
        return sizeBytes;
      }
      if (sizeBytes <= this.#multipartThresholdBytes) {
        await this.#putStreamed(key, path, sizeBytes);
        options.onProgress?.(sizeBytes, sizeBytes);
        return sizeBytes;
      }
      await this.#putMultipart(key, fd, sizeBytes, options);
      return sizeBytes;
    } finally {
      fs.closeSync(fd);
    }
  }

  async #putStreamed(key: string, path: string, sizeBytes: number): Promise<void> {
    const body = fs.createReadStream(path, { start: 0, end: sizeBytes - 1 });
    try {
      await this.#streamClient.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: body,
          ContentLength: sizeBytes,
        }),
      );
    } catch (error) {
      throw this.#error("upload", this.describe(key), error);
    } finally {
      body.destroy();
    }
  }

  async #putMultipart(
    key: string,
    fd: number,
    sizeBytes: number,
    options: PutFileOptions,
  ): Promise<void> {
    const partBytes = Math.max(this.#partBytes, Math.ceil(sizeBytes / PARTS_MAX));
    let uploadId: string | undefined;
    try {
      const created = await this.#client.send(
        new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key }),
      );
      uploadId = created.UploadId;
      assert(uploadId !== undefined, "CreateMultipartUpload returned no UploadId");
      // Up to PARTS_IN_FLIGHT_MAX parts go up at once, each from a buffer of its own: memory stays
      // at that many parts whatever the object's size.
      const partCount = Math.ceil(sizeBytes / partBytes);
      const parts: { ETag: string | undefined; PartNumber: number }[] = new Array(partCount);
      let nextIndex = 0;
      let doneBytes = 0;
      let failed = false;
      const worker = async () => {
        const buffer = new Uint8Array(partBytes);
        while (nextIndex < partCount && !failed) {
          const index = nextIndex++;
          const offset = index * partBytes;
          const length = Math.min(partBytes, sizeBytes - offset);
          readFully(fd, buffer, length, offset);
          try {
            const part = await this.#client.send(
              new UploadPartCommand({
                Bucket: this.bucket,
                Key: key,
                UploadId: uploadId,
                PartNumber: index + 1,
                Body: buffer.subarray(0, length),
              }),
            );
            parts[index] = { ETag: part.ETag, PartNumber: index + 1 };
          } catch (error) {
            failed = true;
            throw error;
          }
          doneBytes += length;
          options.onProgress?.(doneBytes, sizeBytes);
        }
      };
      const workers = Math.min(PARTS_IN_FLIGHT_MAX, partCount);
      const outcomes = await Promise.allSettled(Array.from({ length: workers }, worker));
      const rejected = outcomes.find((outcome) => outcome.status === "rejected");
      if (rejected !== undefined) throw (rejected as PromiseRejectedResult).reason;
      await this.#client.send(
        new CompleteMultipartUploadCommand({
          Bucket: this.bucket,
          Key: key,
          UploadId: uploadId,
          MultipartUpload: { Parts: parts },
        }),
      );
    } catch (error) {
      if (uploadId !== undefined) {
        await this.#client.send(
          new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId }),
        ).catch(() => {/* the store expires abandoned uploads */});
      }
      throw this.#error("upload", this.describe(key), error);
    }
  }

  async get(key: string, range?: ByteRange, into?: Uint8Array): Promise<Uint8Array | undefined> {
    try {
      if (into !== undefined) return await this.#getInto(key, range, into);
      const reply = await this.#client.send(
        new GetObjectCommand({ Bucket: this.bucket, Key: key, Range: rangeHeader(range) }),
      );
      assert(reply.Body !== undefined, "GetObject returned no body");
      return await reply.Body.transformToByteArray();
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.#error("download", this.describe(key), error);
    }
  }

  /**
   * A GET through the fetch-based client, read with a BYOB reader straight into `into`: no
   * buffer per chunk. (The node:http client hands out a fresh chunk per read, which V8 frees only
   * at its next full collection: over a restore, 100+ MB of floating garbage.) The reads transfer
   * `into`'s buffer: the returned view is on the buffer to reuse.
   */
  async #getInto(
    key: string,
    range: ByteRange | undefined,
    into: Uint8Array,
  ): Promise<Uint8Array> {
    const reply = await this.#readClient.send(
      new GetObjectCommand({ Bucket: this.bucket, Key: key, Range: rangeHeader(range) }),
    );
    assert(reply.Body !== undefined, "GetObject returned no body");
    const body = reply.Body as unknown as ReadableStream<Uint8Array>;
    let buffer = into.buffer as ArrayBuffer;
    // `into` is detached by the first BYOB read: its extent is kept here.
    const start = into.byteOffset;
    const capacity = into.length;
    let position = 0;
    let reader: ReadableStreamBYOBReader | ReadableStreamDefaultReader<Uint8Array>;
    try {
      reader = body.getReader({ mode: "byob" });
    } catch {
      reader = body.getReader(); // not a byte stream: copy the chunks
    }
    try {
      while (position < capacity) {
        if (reader instanceof ReadableStreamBYOBReader) {
          const view = new Uint8Array(buffer, start + position, capacity - position);
          const { done, value } = await reader.read(view);
          if (value !== undefined) buffer = value.buffer as ArrayBuffer;
          if (done || value === undefined) break;
          position += value.length;
        } else {
          const { done, value } = await reader.read();
          if (done) break;
          const room = capacity - position;
          new Uint8Array(buffer, start + position, Math.min(room, value.length))
            .set(room < value.length ? value.subarray(0, room) : value);
          position += Math.min(room, value.length);
        }
      }
      // Full: a longer reply than asked for (the caller sees the extra byte); drop the rest.
      if (position === capacity) await reader.cancel().catch(() => {});
    } finally {
      reader.releaseLock();
    }
    return new Uint8Array(buffer, start, position);
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    try {
      const reply = await this.#client.send(
        new HeadObjectCommand({ Bucket: this.bucket, Key: key }),
      );
      return { key, sizeBytes: reply.ContentLength ?? 0 };
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw this.#error("look up", this.describe(key), error);
    }
  }

  async *list(prefix: string): AsyncGenerator<ObjectInfo> {
    let token: string | undefined;
    do {
      let reply;
      try {
        reply = await this.#client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: prefix,
            ContinuationToken: token,
          }),
        );
      } catch (error) {
        throw this.#error("list", this.describe(prefix), error);
      }
      for (const item of reply.Contents ?? []) {
        if (item.Key === undefined) continue;
        yield {
          key: item.Key,
          sizeBytes: item.Size ?? 0,
          lastModifiedMs: item.LastModified?.getTime(),
        };
      }
      token = reply.IsTruncated === true ? reply.NextContinuationToken : undefined;
    } while (token !== undefined);
  }

  async delete(key: string): Promise<void> {
    try {
      await this.#client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    } catch (error) {
      if (isNotFound(error)) return;
      throw this.#error("delete", this.describe(key), error);
    }
  }

  /** Closes the client's connections. */
  close(): void {
    this.#client.destroy();
    this.#streamClient.destroy();
    this.#readClient.destroy();
  }

  #error(action: string, what: string, error: unknown): Error {
    if (error instanceof StoreError || error instanceof UsageError) return error;
    const { reason, transient } = describeFailure(error, this.bucket, this.endpoint);
    return new StoreError(`Cannot ${action} ${what}: ${reason}`, { transient, cause: error });
  }
}

function envValue(name: string): string | undefined {
  const value = Deno.env.get(name);
  return value === undefined || value === "" ? undefined : value;
}

function rangeHeader(range: ByteRange | undefined): string | undefined {
  if (range === undefined) return undefined;
  assert(range.lengthBytes >= 1, "empty range");
  return `bytes=${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1}`;
}

interface SdkFailure {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  $fault?: string;
}

function statusOf(error: unknown): number | undefined {
  return (error as SdkFailure | undefined)?.$metadata?.httpStatusCode;
}

function isNotFound(error: unknown): boolean {
  const name = (error as SdkFailure | undefined)?.name;
  return name === "NoSuchKey" || name === "NotFound" || statusOf(error) === 404;
}

const NETWORK_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
]);

/** Turns an SDK or network error into one line of reason, and whether retrying may help. */
function describeFailure(
  error: unknown,
  bucket: string,
  endpoint: string,
): { reason: string; transient: boolean } {
  const failure = (error ?? {}) as SdkFailure;
  const status = statusOf(error);
  // A HEAD has no body, so the SDK cannot name the error: name it by its status.
  const name = failure.name === undefined || failure.name === "Unknown"
    ? (status === undefined ? "Error" : `HTTP ${status}`)
    : failure.name;
  const message = oneLine(failure.message ?? String(error));
  const code = failure.code ?? /\b(E[A-Z]{3,})\b/.exec(message)?.[1];
  if (name === "NoSuchBucket" || (name === "NotFound" && status === 404)) {
    return { reason: `bucket ${bucket} does not exist at ${endpoint}`, transient: false };
  }
  if (
    status === 403 || name === "InvalidAccessKeyId" || name === "SignatureDoesNotMatch" ||
    name === "AccessDenied"
  ) {
    return {
      reason: `access denied by ${endpoint} (${name}): check the credentials ` +
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the profile)",
      transient: false,
    };
  }
  if (name === "CredentialsProviderError") {
    return {
      reason: `no credentials (${message}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`,
      transient: false,
    };
  }
  if (code !== undefined && NETWORK_CODES.has(code)) {
    return { reason: `cannot reach ${endpoint} (${code})`, transient: true };
  }
  if (name === "TimeoutError" || name === "RequestTimeout" || /timed? ?out/i.test(message)) {
    return { reason: `${endpoint} timed out (${message})`, transient: true };
  }
  const transient = status === undefined || status >= 500 || status === 429;
  return {
    reason: `${name}${
      status === undefined || name.startsWith("HTTP") ? "" : ` (HTTP ${status})`
    }: ${message}`,
    transient,
  };
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, " ").trim().slice(0, 300);
}
