/**
 * The NBD transmission phase of one connection: parse 28-byte requests, validate them, dispatch
 * them to the {@linkcode BlockBackend} with many in flight, and send simple replies as they
 * complete, in any order.
 *
 * Ordering rules (why a request may wait before it reaches the backend):
 * - A request waits for every earlier in-flight WRITE, WRITE_ZEROES or TRIM that overlaps it, so
 *   overlapping writes reach the backend (and its journal) in the order the client sent them, and
 *   a read sees the data of a write the client sent before it.
 * - A FLUSH waits for every earlier in-flight write-like request, then calls `backend.flush()`:
 *   every write replied to before the FLUSH arrived is then durable, and so are the ones the
 *   client had pipelined ahead of it.
 *
 * Replies to requests that arrived together leave together: while the reader still holds
 * complete requests, replies collect in a batch, which is written as soon as the reader is about
 * to wait for the socket (or capacity), when it is full, and when a request completes while the
 * reader waits. A lone request (QD1) is therefore answered without delay. Payload and read
 * reply buffers come from a per-connection pool, so a busy connection allocates nothing per
 * request once warm.
 *
 * @example
 * ```ts ignore
 * const session = new TransmissionSession(conn, reader, { backend });
 * await session.run(); // returns after NBD_CMD_DISC, EOF or a protocol violation
 * ```
 *
 * @module
 */

import { assert } from "../_assert.ts";
import type { NbdLogger, NbdLogLevel } from "./_log.ts";
import { writeAll } from "../byte_sink.ts";
import type { SocketReader } from "./_socket.ts";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "./backend.ts";
import {
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_PAYLOAD_BYTES_MAX,
  NBD_REQUEST_HEADER_BYTES,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_BYTES,
  NBD_SIMPLE_REPLY_MAGIC,
  nbdCommandName,
  nbdErrorName,
} from "./constants.ts";

/** Requests of one connection that may be between header and reply at once. */
export const REQUESTS_IN_FLIGHT_MAX = 64;
/**
 * Buffer bytes (write payloads and read replies, counted by size class) one connection may hold
 * at once. It also bounds the connection's buffer pool, live and free buffers together. Requests
 * wait while the connection is over it, except the first: a single request of the largest
 * payload always fits.
 */
export const BYTES_IN_FLIGHT_MAX = 32 * 1024 * 1024;
/**
 * Read replies with up to this many data bytes are copied into the reply batch, so that replies
 * completed together leave in one write; larger read replies are written from their own buffer.
 */
const BATCHED_READ_BYTES_MAX = 16 * 1024;
/** Capacity of each of the two reply batch buffers. */
const REPLY_BATCH_BYTES = 256 * 1024;
/**
 * Batch bytes that read data may not use: room for the header of every request in flight, so
 * a header-only reply always fits in the batch and never needs a buffer of its own.
 */
const REPLY_BATCH_HEADER_RESERVE_BYTES = REQUESTS_IN_FLIGHT_MAX * NBD_SIMPLE_REPLY_BYTES;
/** A batch this full is written even while more requests are being read. */
const REPLY_BATCH_FULL_BYTES = REPLY_BATCH_BYTES - REPLY_BATCH_HEADER_RESERVE_BYTES -
  (NBD_SIMPLE_REPLY_BYTES + BATCHED_READ_BYTES_MAX);

/** The smallest pooled buffer class, 2^12 = 4 KiB: smaller payloads use it too. */
const BUFFER_CLASS_SHIFT_MIN = 12;
/** The largest pooled buffer class, 2^25 = 32 MiB: the NBD payload limit. */
const BUFFER_CLASS_SHIFT_MAX = 25;
/**
 * Bytes in front of the payload of every pooled buffer: a READ reply's header goes there, so a
 * large read reply leaves in one write without a copy.
 */
const BUFFER_HEADROOM_BYTES = NBD_SIMPLE_REPLY_BYTES;

/** The highest offset word that still keeps `high * 2^32 + low` a safe integer. */
const OFFSET_HIGH_SAFE_MAX = 0x1fffff;

// Backend options are shared constants rather than an object per request; backends only read
// them.
const WRITE_OPTIONS: readonly BackendWriteOptions[] = [
  Object.freeze({ fua: false }),
  Object.freeze({ fua: true }),
];
const ZERO_OPTIONS: readonly BackendZeroOptions[] = [
  Object.freeze({ fua: false, noHole: false }),
  Object.freeze({ fua: true, noHole: false }),
  Object.freeze({ fua: false, noHole: true }),
  Object.freeze({ fua: true, noHole: true }),
];

/** Options of a {@linkcode TransmissionSession}. */
export interface TransmissionOptions {
  /** Where requests go. */
  backend: BlockBackend;
  /** Receives protocol events and backend errors. */
  logger?: NbdLogger;
  /** Names the connection in log events. */
  connectionId?: number;
}

/** One request from header to reply; recycled through a free list. */
class Request {
  type = 0;
  flags = 0;
  handleHigh = 0;
  handleLow = 0;
  offsetBytes = 0;
  lengthBytes = 0;
  /** Bytes charged against {@linkcode BYTES_IN_FLIGHT_MAX}. */
  chargedBytes = 0;
  /**
   * A pooled buffer (see {@linkcode BufferPool}). WRITE: the data, from the backend's call until
   * it settles. READ: the reply, header in the headroom, then the data the backend reads.
   */
  buffer: Uint8Array | null = null;
  /** The payload's bytes within {@linkcode Request.buffer}: the data of a WRITE or READ. */
  payload: Uint8Array | null = null;
  /** Earlier write-like requests this one still waits for. */
  waitCount = 0;
  /** Later requests waiting for this one (write-like requests only). */
  readonly dependents: Request[] = [];

  get writeLike(): boolean {
    return this.type === NBD_CMD_WRITE || this.type === NBD_CMD_WRITE_ZEROES ||
      this.type === NBD_CMD_TRIM;
  }
}

/** Serves transmission requests on one connection until the client leaves. */
export class TransmissionSession {
  #conn: Deno.Conn;
  #reader: SocketReader;
  #backend: BlockBackend;
  #logger?: NbdLogger;
  #connectionId?: number;

  /** Write-like requests that have not completed in the backend, in arrival order. */
  #writesPending: Request[] = [];
  #freeRequests: Request[] = [];
  #buffers = new BufferPool(BYTES_IN_FLIGHT_MAX);
  #requestsInFlight = 0;
  #bytesInFlight = 0;
  #capacityWaiter: PromiseWithResolvers<void> | null = null;
  #idleWaiter: PromiseWithResolvers<void> | null = null;

  #batchFilling = new Uint8Array(REPLY_BATCH_BYTES);
  #batchWriting = new Uint8Array(REPLY_BATCH_BYTES);
  #batchBytes = 0;
  /** Requests whose replies sit in the filling batch, to release once it is written. */
  #batchRequests = 0;
  #batchCharged = 0;
  #largeReplies: Request[] = [];
  #writing = false;
  /**
   * True while the read loop waits (for bytes, or for capacity) or has ended. Replies completed
   * while it is false stay in the batch: the loop is about to read more requests, and it flushes
   * the batch before it waits, so replies to pipelined requests share one write.
   */
  #readerWaiting = false;
  #flushQueued = false;
  /** Set once a reply write failed: the client is gone, further replies are dropped. */
  #broken = false;
  #shuttingDown = false;

  /** Prepares a session; `reader` must be the one the handshake used on `conn`. */
  constructor(conn: Deno.Conn, reader: SocketReader, options: TransmissionOptions) {
    this.#conn = conn;
    this.#reader = reader;
    this.#backend = options.backend;
    this.#logger = options.logger;
    this.#connectionId = options.connectionId;
  }

  /** Requests read and not yet fully replied to. */
  get requestsInFlight(): number {
    return this.#requestsInFlight;
  }

  /**
   * Serves requests until NBD_CMD_DISC, end of stream, a socket error or a protocol violation
   * that leaves the stream unusable; then waits for the requests in flight to finish and their
   * replies to be sent. The caller closes the connection afterwards.
   */
  async run(): Promise<void> {
    try {
      await this.#readRequests();
    } catch (error) {
      // A read fails when the peer resets the connection or when shutdown() closed it.
      if (!this.#shuttingDown) this.#log("info", "Connection read failed", undefined, error);
    } finally {
      // Nothing reads any more: from now on every reply goes out as soon as it exists.
      this.#readerWaits();
    }
    await this.#whenIdle();
  }

  /**
   * Answers further requests with NBD_ESHUTDOWN, waits for those in flight, and resolves once
   * their replies are sent. The caller then closes the connection, which ends {@linkcode run}.
   */
  async shutdown(): Promise<void> {
    this.#shuttingDown = true;
    await this.#whenIdle();
  }

  async #readRequests(): Promise<void> {
    const reader = this.#reader;
    // Once shutting down, the request being read gets NBD_ESHUTDOWN and reading stops, so that
    // a client that keeps pipelining cannot hold the server's close() open.
    while (!this.#shuttingDown) {
      if (reader.bufferedBytes < NBD_REQUEST_HEADER_BYTES) {
        this.#readerWaits();
        const filled = await reader.fill(NBD_REQUEST_HEADER_BYTES);
        this.#readerWaiting = false;
        if (!filled) {
          const truncated = reader.bufferedBytes > 0;
          this.#log(truncated ? "warn" : "info", truncated ? "Truncated request" : "Client left");
          return;
        }
      }
      const request = this.#decodeRequest();
      if (request === null) return;
      // Synchronous (true) unless the request has to wait: requests already buffered are then
      // served without yielding, and their replies leave together.
      const received = this.#receive(request);
      if (received !== true && !(await received)) return;
    }
  }

  /** Decodes the buffered request header; null ends the connection (NBD_CMD_DISC, bad magic). */
  #decodeRequest(): Request | null {
    const view = this.#reader.view;
    const at = this.#reader.consume(NBD_REQUEST_HEADER_BYTES);
    const magic = view.getUint32(at);
    if (magic !== NBD_REQUEST_MAGIC) {
      this.#log("warn", `Closing connection: bad request magic 0x${magic.toString(16)}`);
      return null;
    }
    const type = view.getUint16(at + 6);
    if (type === NBD_CMD_DISC) {
      this.#log("debug", "Client sent NBD_CMD_DISC", type);
      return null;
    }
    const request = this.#freeRequests.pop() ?? new Request();
    request.flags = view.getUint16(at + 4);
    request.type = type;
    request.handleHigh = view.getUint32(at + 8);
    request.handleLow = view.getUint32(at + 12);
    const offsetHigh = view.getUint32(at + 16);
    request.offsetBytes = offsetHigh > OFFSET_HIGH_SAFE_MAX
      ? Number.MAX_SAFE_INTEGER
      : offsetHigh * 0x1_0000_0000 + view.getUint32(at + 20);
    request.lengthBytes = view.getUint32(at + 24);
    return request;
  }

  /**
   * Validates, reads the payload of, and admits one request. Returns true when that was done
   * without waiting, else a promise; false ends the connection.
   */
  #receive(request: Request): boolean | Promise<boolean> {
    const error = this.#shuttingDown ? NBD_ESHUTDOWN : this.#validate(request);
    if (error !== 0) return this.#reject(request, error);
    const isWrite = request.type === NBD_CMD_WRITE;
    const payloadBytes = request.type === NBD_CMD_READ || isWrite ? request.lengthBytes : 0;
    const chargeBytes = payloadBytes === 0 ? 0 : bufferClassBytes(payloadBytes);
    if (this.#atCapacity(chargeBytes) || (isWrite && this.#reader.bufferedBytes < payloadBytes)) {
      return this.#receiveWaiting(request, payloadBytes, chargeBytes);
    }
    if (payloadBytes > 0) {
      this.#attachBuffer(request);
      if (isWrite) {
        const copied = this.#reader.takeBuffered(request.payload!);
        assert(copied === payloadBytes, "buffered write payload was not copied whole");
      }
    }
    this.#charge(request, chargeBytes);
    this.#admit(request);
    return true;
  }

  /** {@linkcode TransmissionSession.#receive} for a request that waits for capacity or payload. */
  async #receiveWaiting(
    request: Request,
    payloadBytes: number,
    chargeBytes: number,
  ): Promise<boolean> {
    this.#readerWaits();
    try {
      if (this.#atCapacity(chargeBytes)) await this.#waitForCapacity(chargeBytes);
      if (payloadBytes > 0) this.#attachBuffer(request);
      if (request.type === NBD_CMD_WRITE && payloadBytes > 0) {
        // Read the payload straight into the pooled buffer the backend gets: no staging copy.
        if (!(await this.#reader.readInto(request.payload!))) {
          this.#log("warn", "Truncated write payload", NBD_CMD_WRITE);
          this.#recycle(request);
          return false;
        }
      }
    } finally {
      this.#readerWaiting = false;
    }
    this.#charge(request, chargeBytes);
    this.#admit(request);
    return true;
  }

  /** Replies `error` to a request that must not reach the backend. False ends the connection. */
  async #reject(request: Request, error: number): Promise<boolean> {
    const { type, lengthBytes } = request;
    this.#log("debug", `Rejecting with ${nbdErrorName(error)}`, type);
    // Rejections count against the limits too: a client that never reads its replies must
    // not make the reply queue grow without bound.
    if (this.#atCapacity(0)) {
      this.#readerWaits();
      await this.#waitForCapacity(0);
      this.#readerWaiting = false;
    }
    this.#charge(request, 0);
    this.#reply(request, error); // May recycle `request`: use the copies above from here on.
    if (type !== NBD_CMD_WRITE || lengthBytes === 0) return true;
    // A write's payload follows its header whatever the verdict. Past the payload limit the
    // length is not credible (4 GiB), so the stream cannot be resynchronised: hang up.
    if (lengthBytes > NBD_PAYLOAD_BYTES_MAX) {
      this.#log("warn", `Closing connection: write of ${lengthBytes} bytes`, type);
      return false;
    }
    this.#readerWaits();
    try {
      return await this.#reader.skip(lengthBytes);
    } finally {
      this.#readerWaiting = false;
    }
  }

  /** Returns 0 when the request may reach the backend, else the NBD error to reply with. */
  #validate(request: Request): number {
    const { type, flags, offsetBytes, lengthBytes } = request;
    let flagsAllowed = NBD_CMD_FLAG_FUA; // The spec makes FUA valid on every command.
    if (type === NBD_CMD_WRITE_ZEROES) flagsAllowed |= NBD_CMD_FLAG_NO_HOLE;
    const known = type === NBD_CMD_READ || type === NBD_CMD_WRITE || type === NBD_CMD_FLUSH ||
      type === NBD_CMD_TRIM || type === NBD_CMD_WRITE_ZEROES;
    if (!known || (flags & ~flagsAllowed) !== 0) return NBD_EINVAL;
    if (type === NBD_CMD_FLUSH) return 0;
    if (type !== NBD_CMD_READ && this.#backend.readOnly) return NBD_EPERM;
    const hasPayload = type === NBD_CMD_READ || type === NBD_CMD_WRITE;
    if (hasPayload && lengthBytes > NBD_PAYLOAD_BYTES_MAX) return NBD_EINVAL;
    if (offsetBytes > this.#backend.sizeBytes - lengthBytes) {
      return type === NBD_CMD_WRITE ? NBD_ENOSPC : NBD_EINVAL;
    }
    return 0;
  }

  #atCapacity(chargeBytes: number): boolean {
    return this.#requestsInFlight >= REQUESTS_IN_FLIGHT_MAX ||
      (this.#requestsInFlight > 0 && this.#bytesInFlight + chargeBytes > BYTES_IN_FLIGHT_MAX);
  }

  /** Stops reading the socket while the connection is at its request or byte limit. */
  async #waitForCapacity(chargeBytes: number): Promise<void> {
    while (this.#atCapacity(chargeBytes)) {
      this.#capacityWaiter ??= Promise.withResolvers<void>();
      await this.#capacityWaiter.promise;
    }
  }

  #charge(request: Request, chargeBytes: number): void {
    request.chargedBytes = chargeBytes;
    this.#requestsInFlight++;
    this.#bytesInFlight += chargeBytes;
  }

  /** Queues the request behind the earlier writes it must follow, or dispatches it now. */
  #admit(request: Request): void {
    const isFlush = request.type === NBD_CMD_FLUSH;
    const start = request.offsetBytes;
    const end = start + request.lengthBytes;
    const writesPending = this.#writesPending;
    for (let i = 0; i < writesPending.length; i++) {
      const earlier = writesPending[i];
      const overlaps = earlier.offsetBytes < end &&
        start < earlier.offsetBytes + earlier.lengthBytes;
      if (isFlush || overlaps) {
        earlier.dependents.push(request);
        request.waitCount++;
      }
    }
    if (request.writeLike) writesPending.push(request);
    if (request.waitCount === 0) this.#dispatch(request);
  }

  async #dispatch(request: Request): Promise<void> {
    let error = 0;
    try {
      await this.#callBackend(request);
    } catch (cause) {
      error = NBD_EIO;
      this.#log("error", `Backend failed at offset ${request.offsetBytes}`, request.type, cause);
    }
    this.#complete(request, error);
  }

  #callBackend(request: Request): Promise<void> | undefined {
    const backend = this.#backend;
    const { offsetBytes, lengthBytes } = request;
    const fua = (request.flags & NBD_CMD_FLAG_FUA) !== 0 ? 1 : 0;
    // Zero-length requests are valid no-ops; the backend only ever sees non-empty ranges.
    if (lengthBytes === 0 && request.type !== NBD_CMD_FLUSH) return undefined;
    switch (request.type) {
      case NBD_CMD_READ:
        return backend.read(offsetBytes, request.payload!);
      case NBD_CMD_WRITE:
        return backend.write(offsetBytes, request.payload!, WRITE_OPTIONS[fua]);
      case NBD_CMD_WRITE_ZEROES: {
        const noHole = (request.flags & NBD_CMD_FLAG_NO_HOLE) !== 0 ? 2 : 0;
        return backend.zero(offsetBytes, lengthBytes, ZERO_OPTIONS[fua + noHole]);
      }
      case NBD_CMD_TRIM:
        return backend.trim(offsetBytes, lengthBytes, WRITE_OPTIONS[fua]);
      case NBD_CMD_FLUSH:
        return backend.flush();
    }
    assert(false, `dispatch of unvalidated command ${request.type}`);
  }

  /** The backend is done with `request`: release the requests that waited for it, reply. */
  #complete(request: Request, error: number): void {
    if (request.writeLike) {
      const index = this.#writesPending.indexOf(request);
      assert(index >= 0, "completed write missing from the pending list");
      this.#writesPending.splice(index, 1);
      const dependents = request.dependents;
      for (let i = 0; i < dependents.length; i++) {
        const dependent = dependents[i];
        assert(dependent.waitCount > 0, "dependent request was not waiting");
        if (--dependent.waitCount === 0) this.#dispatch(dependent);
      }
      dependents.length = 0;
    }
    // The backend's promise has settled, so it no longer holds the write's data (see
    // BlockBackend): the buffer can serve the next request while this reply waits.
    if (request.type === NBD_CMD_WRITE) this.#detachBuffer(request);
    this.#reply(request, error);
  }

  /** Queues the simple reply of `request`; the request is recycled once the reply is sent. */
  #reply(request: Request, error: number): void {
    if (this.#broken) {
      this.#release(1, request.chargedBytes);
      this.#recycle(request);
      return;
    }
    const withData = request.type === NBD_CMD_READ && error === 0 && request.lengthBytes > 0;
    const at = this.#batchBytes;
    const replyBytes = NBD_SIMPLE_REPLY_BYTES + (withData ? request.lengthBytes : 0);
    const fits = withData
      ? request.lengthBytes <= BATCHED_READ_BYTES_MAX &&
        at + replyBytes <= REPLY_BATCH_BYTES - REPLY_BATCH_HEADER_RESERVE_BYTES
      : at + replyBytes <= REPLY_BATCH_BYTES;
    // Header-only replies always fit: see REPLY_BATCH_HEADER_RESERVE_BYTES.
    assert(fits || withData, "reply batch has no room for a header");
    if (fits) {
      const batch = this.#batchFilling;
      writeReplyHeader(batch, at, error, request);
      if (withData) batch.set(request.payload!, at + NBD_SIMPLE_REPLY_BYTES);
      this.#batchBytes = at + replyBytes;
      this.#batchRequests++;
      this.#batchCharged += request.chargedBytes;
      this.#recycle(request);
    } else {
      writeReplyHeader(request.buffer!, 0, error, request);
      this.#largeReplies.push(request);
    }
    if (this.#readerWaiting || this.#batchBytes >= REPLY_BATCH_FULL_BYTES) this.#queueFlush();
  }

  /** The read loop is about to wait (or has ended): replies must not wait for it any more. */
  #readerWaits(): void {
    this.#readerWaiting = true;
    if (this.#batchBytes > 0 || this.#largeReplies.length > 0) this.#queueFlush();
  }

  /**
   * Writes the queued replies after the current microtasks: backend calls that completed
   * together then finish first, and their replies share the write.
   */
  #queueFlush(): void {
    // A running writer picks up whatever is queued once its current write is done.
    if (this.#flushQueued || this.#writing) return;
    this.#flushQueued = true;
    queueMicrotask(this.#flush);
  }

  #flush = (): void => {
    this.#flushQueued = false;
    if (this.#writing || (this.#batchBytes === 0 && this.#largeReplies.length === 0)) return;
    this.#writeReplies();
  };

  /** The one writer of the connection: whole replies, never interleaved, batched when queued. */
  async #writeReplies(): Promise<void> {
    this.#writing = true;
    // Requests whose replies are being written: released whether the write succeeds or fails.
    let requests = 0;
    let charged = 0;
    try {
      while (true) {
        if (this.#batchBytes > 0) {
          const batch = this.#batchFilling;
          const bytes = this.#batchBytes;
          requests = this.#batchRequests;
          charged = this.#batchCharged;
          this.#batchFilling = this.#batchWriting;
          this.#batchWriting = batch;
          this.#batchBytes = this.#batchRequests = this.#batchCharged = 0;
          await writeAll(this.#conn, batch.subarray(0, bytes));
        } else if (this.#largeReplies.length > 0) {
          const request = this.#largeReplies.shift()!;
          requests = 1;
          charged = request.chargedBytes;
          const replyBytes = BUFFER_HEADROOM_BYTES + request.lengthBytes;
          await writeAll(this.#conn, request.buffer!.subarray(0, replyBytes));
          this.#recycle(request);
        } else {
          break;
        }
        this.#release(requests, charged);
        requests = charged = 0;
      }
    } catch (error) {
      this.#log("info", "Reply write failed; dropping further replies", undefined, error);
      this.#broken = true;
      this.#dropQueuedReplies();
    } finally {
      this.#writing = false;
      this.#release(requests, charged);
    }
  }

  #dropQueuedReplies(): void {
    this.#release(this.#batchRequests, this.#batchCharged);
    this.#batchBytes = this.#batchRequests = this.#batchCharged = 0;
    for (const request of this.#largeReplies) {
      this.#release(1, request.chargedBytes);
      this.#recycle(request);
    }
    this.#largeReplies.length = 0;
  }

  #release(requests: number, chargedBytes: number): void {
    this.#requestsInFlight -= requests;
    this.#bytesInFlight -= chargedBytes;
    assert(this.#requestsInFlight >= 0 && this.#bytesInFlight >= 0, "in-flight counts negative");
    const waiter = this.#capacityWaiter;
    if (waiter !== null) {
      this.#capacityWaiter = null;
      waiter.resolve();
    }
    this.#checkIdle();
  }

  /** Gives `request` a pooled buffer for its payload of `lengthBytes`. */
  #attachBuffer(request: Request): void {
    const buffer = this.#buffers.take(request.lengthBytes);
    request.buffer = buffer;
    request.payload = buffer.subarray(
      BUFFER_HEADROOM_BYTES,
      BUFFER_HEADROOM_BYTES + request.lengthBytes,
    );
  }

  #detachBuffer(request: Request): void {
    if (request.buffer !== null) this.#buffers.give(request.buffer);
    request.buffer = request.payload = null;
  }

  #recycle(request: Request): void {
    this.#detachBuffer(request);
    request.waitCount = 0;
    if (this.#freeRequests.length < REQUESTS_IN_FLIGHT_MAX) this.#freeRequests.push(request);
  }

  #checkIdle(): void {
    if (this.#idleWaiter === null || this.#requestsInFlight > 0 || this.#writing) return;
    this.#idleWaiter.resolve();
    this.#idleWaiter = null;
  }

  /** Resolves once no request is in flight and no reply is being written. */
  #whenIdle(): Promise<void> {
    if (this.#requestsInFlight === 0 && !this.#writing) return Promise.resolve();
    this.#idleWaiter ??= Promise.withResolvers<void>();
    return this.#idleWaiter.promise;
  }

  #log(level: NbdLogLevel, message: string, command?: number, error?: unknown): void {
    this.#logger?.({
      level,
      message,
      connectionId: this.#connectionId,
      operation: command === undefined ? undefined : nbdCommandName(command),
      error,
    });
  }
}

/**
 * Payload buffers of one connection, reused so that a stream of requests does not hand V8's
 * garbage collector gigabytes of short-lived ArrayBuffers (they are freed late, and RSS grows
 * meanwhile). Buffers come in power-of-two size classes from 4 KiB to 32 MiB, each with
 * {@linkcode BUFFER_HEADROOM_BYTES} in front; live and free buffers together stay within
 * `bytesMax` (by class size), free ones being dropped for the garbage collector beyond it.
 */
class BufferPool {
  /** Free buffers by class, index 0 for 2^BUFFER_CLASS_SHIFT_MIN bytes. */
  #free: Uint8Array[][] = [];
  #freeBytes = 0;
  #liveBytes = 0;
  #bytesMax: number;

  constructor(bytesMax: number) {
    assert(bytesMax >= 1 << BUFFER_CLASS_SHIFT_MAX, "buffer pool smaller than its largest class");
    this.#bytesMax = bytesMax;
    for (let shift = BUFFER_CLASS_SHIFT_MIN; shift <= BUFFER_CLASS_SHIFT_MAX; shift++) {
      this.#free.push([]);
    }
  }

  /** A buffer of {@linkcode BUFFER_HEADROOM_BYTES} plus at least `lengthBytes` bytes. */
  take(lengthBytes: number): Uint8Array {
    assert(
      lengthBytes > 0 && lengthBytes <= 1 << BUFFER_CLASS_SHIFT_MAX,
      `buffer of ${lengthBytes} bytes is outside the pool's classes`,
    );
    const classBytes = bufferClassBytes(lengthBytes);
    this.#liveBytes += classBytes;
    const buffer = this.#free[bufferClassIndex(classBytes)].pop();
    if (buffer !== undefined) {
      this.#freeBytes -= classBytes;
      return buffer;
    }
    this.#evict();
    return new Uint8Array(BUFFER_HEADROOM_BYTES + classBytes);
  }

  /** Returns a buffer from {@linkcode BufferPool.take}; the caller must not use it afterwards. */
  give(buffer: Uint8Array): void {
    const classBytes = buffer.length - BUFFER_HEADROOM_BYTES;
    assert(
      bufferClassBytes(classBytes) === classBytes && classBytes <= 1 << BUFFER_CLASS_SHIFT_MAX,
      `buffer of ${buffer.length} bytes was not taken from the pool`,
    );
    this.#liveBytes -= classBytes;
    assert(this.#liveBytes >= 0, "buffer pool got back more than it handed out");
    if (this.#liveBytes + this.#freeBytes + classBytes > this.#bytesMax) return;
    this.#free[bufferClassIndex(classBytes)].push(buffer);
    this.#freeBytes += classBytes;
  }

  /** Drops free buffers, largest first, until live and free ones fit the limit again. */
  #evict(): void {
    for (let index = this.#free.length - 1; index >= 0; index--) {
      const free = this.#free[index];
      while (this.#liveBytes + this.#freeBytes > this.#bytesMax && free.length > 0) {
        free.pop();
        this.#freeBytes -= 1 << (BUFFER_CLASS_SHIFT_MIN + index);
      }
    }
  }
}

/** The pooled buffer class (a power of two, at least 4 KiB) that holds `lengthBytes`. */
function bufferClassBytes(lengthBytes: number): number {
  if (lengthBytes <= 1 << BUFFER_CLASS_SHIFT_MIN) return 1 << BUFFER_CLASS_SHIFT_MIN;
  return 2 ** (32 - Math.clz32(lengthBytes - 1));
}

function bufferClassIndex(classBytes: number): number {
  return 31 - Math.clz32(classBytes) - BUFFER_CLASS_SHIFT_MIN;
}

function writeReplyHeader(target: Uint8Array, at: number, error: number, request: Request): void {
  // Byte-wise big-endian stores: cheaper than a DataView per reply on the hot path.
  writeUint32(target, at, NBD_SIMPLE_REPLY_MAGIC);
  writeUint32(target, at + 4, error);
  writeUint32(target, at + 8, request.handleHigh);
  writeUint32(target, at + 12, request.handleLow);
}

function writeUint32(target: Uint8Array, at: number, value: number): void {
  target[at] = value >>> 24;
  target[at + 1] = (value >>> 16) & 0xff;
  target[at + 2] = (value >>> 8) & 0xff;
  target[at + 3] = value & 0xff;
}
