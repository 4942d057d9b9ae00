/**
 * The small interface the NBD protocol code calls. The protocol never touches files: `watch`
 * passes the log-assisted disk, `serve` a read-only view of the past, tests an in-memory disk.
 *
 * @module
 */

/** Options of a write-like request. */
export interface BackendWriteOptions {
  /** NBD_CMD_FLAG_FUA: the reply waits until this request's data is durable. */
  fua?: boolean;
}

/** Options of a write-zeroes request. */
export interface BackendZeroOptions extends BackendWriteOptions {
  /** NBD_CMD_FLAG_NO_HOLE: the range must stay allocated (the client asked for no punched hole). */
  noHole?: boolean;
}

/**
 * A block device as the NBD server sees it. Offsets and lengths are validated by the server
 * before a call: every call is within `[0, sizeBytes)`.
 *
 * Buffers are lent, not given: the `buffer` of {@linkcode BlockBackend.read} and the `data` of
 * {@linkcode BlockBackend.write} belong to the server's buffer pool, and the server reuses them
 * for other requests as soon as the call's promise settles (resolved or rejected). A backend
 * must not read, write or keep a reference to them after that; one that needs the bytes later
 * (a write-back cache, say) copies them before settling. Options objects are shared between
 * calls and frozen.
 */
export interface BlockBackend {
  /** The export size in bytes. */
  readonly sizeBytes: number;
  /** True when writes must be refused with EPERM. */
  readonly readOnly: boolean;
  /** True when a flush on one connection makes writes of every connection durable. */
  readonly canMultiConn: boolean;
  /** Reads `buffer.length` bytes at `offsetBytes` into `buffer` (lent until the promise settles). */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void>;
  /**
   * Writes `data` at `offsetBytes`. The promise resolves once the write is visible to reads;
   * `data` is lent until the promise settles.
   */
  write(offsetBytes: number, data: Uint8Array, options?: BackendWriteOptions): Promise<void>;
  /** Writes zeroes over the range. */
  zero(offsetBytes: number, lengthBytes: number, options?: BackendZeroOptions): Promise<void>;
  /** Discards the range; it reads back as zeroes afterwards. */
  trim(offsetBytes: number, lengthBytes: number, options?: BackendWriteOptions): Promise<void>;
  /** Makes every write completed before the call durable. */
  flush(): Promise<void>;
}
