/**
 * The object storage a logdir can live in (S3 and S3-compatible stores such as Swift, Ceph RGW,
 * MinIO): a flat namespace of immutable objects under string keys. The logdir code needs only
 * these few operations; {@linkcode S3Store} implements them.
 *
 * @module
 */

/** What {@linkcode ObjectStore.head} and {@linkcode ObjectStore.list} tell about an object. */
export interface ObjectInfo {
  /** The object's key (full, including any prefix). */
  key: string;
  sizeBytes: number;
  /** When the object was written, by the store's clock (listings only; undefined if unknown). */
  lastModifiedMs?: number;
}

/** A byte range of an object: `[offsetBytes, offsetBytes + lengthBytes)`. */
export interface ByteRange {
  offsetBytes: number;
  lengthBytes: number;
}

/** Options of {@linkcode ObjectStore.putFile}. */
export interface PutFileOptions {
  /** Store only this many bytes from the start of the file (default: the whole file). */
  sizeBytes?: number;
  /** Called after each part (or the whole object) is stored. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/** What the store should check before {@linkcode ObjectStore.putConditional} stores. */
export type PutCondition =
  /** Only when no object is under the key (`If-None-Match: *`). */
  | { ifNoneMatch: "*" }
  /** Only when the object's ETag is still this one (`If-Match`). */
  | { ifMatch: string };

/** How {@linkcode ObjectStore.putConditional} went. */
export type ConditionalPutResult =
  | { outcome: "stored"; etag: string }
  /** The condition did not hold: another writer got there first. */
  | { outcome: "conflict" }
  /** The store does not do conditional writes (e.g. Swift's s3api answers 501). */
  | { outcome: "unsupported" };

/** A flat store of immutable objects. Every method throws a one-line error naming the key. */
export interface ObjectStore {
  /** Checks that the store answers, accepts the credentials and holds the bucket. */
  check(): Promise<void>;
  /** A human-readable name of `key` for messages, e.g. `s3://bucket/prefix/manifest.json`. */
  describe(key: string): string;
  /** Stores `bytes` under `key`, replacing any object there. */
  put(key: string, bytes: Uint8Array): Promise<void>;
  /**
   * Stores the file at `path` (or its first `options.sizeBytes`) under `key`, in parts when it is
   * large, with bounded memory; returns the bytes stored.
   */
  putFile(key: string, path: string, options?: PutFileOptions): Promise<number>;
  /**
   * Stores `bytes` under `key` only when `condition` holds, atomically in the store (S3
   * conditional writes). Stores without them answer `unsupported` and store nothing.
   */
  putConditional(
    key: string,
    bytes: Uint8Array,
    condition: PutCondition,
  ): Promise<ConditionalPutResult>;
  /** The whole object with its ETag, or undefined when there is no such object. */
  getWithEtag(key: string): Promise<{ bytes: Uint8Array; etag: string } | undefined>;
  /**
   * The whole object, or a range of it; undefined when there is no such object. With `into`, the
   * bytes are read into that buffer (no allocation per call, so memory stays flat over many
   * ranged reads); the store may transfer `into`'s ArrayBuffer while reading, so the returned view
   * is on the buffer to use next. A reply longer than `into` fills it and stops, so the caller
   * sees more bytes than it asked for when `into` has room for one more.
   */
  get(key: string, range?: ByteRange, into?: Uint8Array): Promise<Uint8Array | undefined>;
  /** The object's size, or undefined when there is no such object. */
  head(key: string): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncGenerator<ObjectInfo>;
  /** Removes the object (no error when it is already gone). */
  delete(key: string): Promise<void>;
  /** Releases connections; the store is not used after. */
  close(): void;
}

/** A failed object-storage operation. Exit code 1 (I/O, network). */
export class StoreError extends Error {
  override name = "StoreError";
  /** True for failures worth retrying later: 5xx, throttling, timeouts, refused connections. */
  transient: boolean;
  constructor(message: string, options: { transient: boolean; cause?: unknown }) {
    super(message, { cause: options.cause });
    this.transient = options.transient;
  }
}
