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
import { type SocketReader, writeAll } from "./_socket.ts";
import type { BlockBackend } from "./backend.ts";
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
/** Payload bytes (write data and read data) one connection may hold at once. */
export const BYTES_IN_FLIGHT_MAX = 64 * 1024 * 1024;
/**
 * Replies up to this size (headers, small reads) are copied into a shared batch buffer, so that
 * replies completed together leave in one write; larger read replies are written as they are.
 */
const BATCHED_REPLY_BYTES_MAX = 16 * 1024 + NBD_SIMPLE_REPLY_BYTES;
/** Capacity of each of the two reply batch buffers. */
const REPLY_BATCH_BYTES = 256 * 1024;

/** The highest offset word that still keeps `high * 2^32 + low` a safe integer. */
const OFFSET_HIGH_SAFE_MAX = 0x1fffff;

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
  /** WRITE: the data. READ: the reply, 16 header bytes then the data the backend reads. */
  buffer: Uint8Array | null = null;
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
    const view = reader.view;
    // Once shutting down, the request being read gets NBD_ESHUTDOWN and reading stops, so that
    // a client that keeps pipelining cannot hold the server's close() open.
    while (!this.#shuttingDown) {
      if (reader.bufferedBytes < NBD_REQUEST_HEADER_BYTES) {
        if (!(await reader.fill(NBD_REQUEST_HEADER_BYTES))) {
          const truncated = reader.bufferedBytes > 0;
          this.#log(truncated ? "warn" : "info", truncated ? "Truncated request" : "Client left");
          return;
        }
      }
      const at = reader.consume(NBD_REQUEST_HEADER_BYTES);
      const magic = view.getUint32(at);
      if (magic !== NBD_REQUEST_MAGIC) {
        this.#log("warn", `Closing connection: bad request magic 0x${magic.toString(16)}`);
        return;
      }
      const type = view.getUint16(at + 6);
      if (type === NBD_CMD_DISC) {
        this.#log("debug", "Client sent NBD_CMD_DISC", type);
        return;
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
      if (!(await this.#receive(request))) return;
    }
  }

  /** Validates, reads the payload of, and admits one request. False ends the connection. */
  async #receive(request: Request): Promise<boolean> {
    const error = this.#shuttingDown ? NBD_ESHUTDOWN : this.#validate(request);
    const isWrite = request.type === NBD_CMD_WRITE;
    if (error !== 0) {
      const { type, lengthBytes } = request;
      this.#log("debug", `Rejecting with ${nbdErrorName(error)}`, type);
      // Rejections count against the limits too: a client that never reads its replies must
      // not make the reply queue grow without bound.
      if (this.#atCapacity(0)) await this.#waitForCapacity(0);
      this.#charge(request, 0);
      this.#reply(request, error); // May recycle `request`: use the copies above from here on.
      if (!isWrite || lengthBytes === 0) return true;
      // A write's payload follows its header whatever the verdict. Past the payload limit the
      // length is not credible (4 GiB), so the stream cannot be resynchronised: hang up.
      if (lengthBytes > NBD_PAYLOAD_BYTES_MAX) {
        this.#log("warn", `Closing connection: write of ${lengthBytes} bytes`, type);
        return false;
      }
      return await this.#reader.skip(lengthBytes);
    }
    const payloadBytes = request.type === NBD_CMD_READ || isWrite ? request.lengthBytes : 0;
    if (this.#atCapacity(payloadBytes)) await this.#waitForCapacity(payloadBytes);
    if (isWrite && payloadBytes > 0) {
      // Read the payload straight into the buffer the backend keeps: no staging copy.
      const data = new Uint8Array(payloadBytes);
      if (!(await this.#reader.readInto(data))) {
        this.#log("warn", "Truncated write payload", NBD_CMD_WRITE);
        this.#recycle(request);
        return false;
      }
      request.buffer = data;
    }
    this.#charge(request, payloadBytes);
    this.#admit(request);
    return true;
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

  #atCapacity(payloadBytes: number): boolean {
    return this.#requestsInFlight >= REQUESTS_IN_FLIGHT_MAX ||
      (this.#requestsInFlight > 0 && this.#bytesInFlight + payloadBytes > BYTES_IN_FLIGHT_MAX);
  }

  /** Stops reading the socket while the connection is at its request or byte limit. */
  async #waitForCapacity(payloadBytes: number): Promise<void> {
    while (this.#atCapacity(payloadBytes)) {
      this.#capacityWaiter ??= Promise.withResolvers<void>();
      await this.#capacityWaiter.promise;
    }
  }

  #charge(request: Request, payloadBytes: number): void {
    request.chargedBytes = payloadBytes;
    this.#requestsInFlight++;
    this.#bytesInFlight += payloadBytes;
  }

  /** Queues the request behind the earlier writes it must follow, or dispatches it now. */
  #admit(request: Request): void {
    if (request.type === NBD_CMD_READ) {
      request.buffer = new Uint8Array(NBD_SIMPLE_REPLY_BYTES + request.lengthBytes);
    }
    const isFlush = request.type === NBD_CMD_FLUSH;
    const start = request.offsetBytes;
    const end = start + request.lengthBytes;
    for (const earlier of this.#writesPending) {
      const overlaps = earlier.offsetBytes < end &&
        start < earlier.offsetBytes + earlier.lengthBytes;
      if (isFlush || overlaps) {
        earlier.dependents.push(request);
        request.waitCount++;
      }
    }
    if (request.writeLike) this.#writesPending.push(request);
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
    const fua = (request.flags & NBD_CMD_FLAG_FUA) !== 0;
    // Zero-length requests are valid no-ops; the backend only ever sees non-empty ranges.
    if (lengthBytes === 0 && request.type !== NBD_CMD_FLUSH) return undefined;
    switch (request.type) {
      case NBD_CMD_READ:
        return backend.read(offsetBytes, request.buffer!.subarray(NBD_SIMPLE_REPLY_BYTES));
      case NBD_CMD_WRITE:
        return backend.write(offsetBytes, request.buffer!, { fua });
      case NBD_CMD_WRITE_ZEROES: {
        const noHole = (request.flags & NBD_CMD_FLAG_NO_HOLE) !== 0;
        return backend.zero(offsetBytes, lengthBytes, { fua, noHole });
      }
      case NBD_CMD_TRIM:
        return backend.trim(offsetBytes, lengthBytes, { fua });
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
    if (request.type === NBD_CMD_WRITE) request.buffer = null;
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
    const replyBytes = NBD_SIMPLE_REPLY_BYTES + (withData ? request.lengthBytes : 0);
    if (
      replyBytes <= BATCHED_REPLY_BYTES_MAX && this.#batchBytes + replyBytes <= REPLY_BATCH_BYTES
    ) {
      const batch = this.#batchFilling;
      const at = this.#batchBytes;
      writeReplyHeader(batch, at, error, request);
      if (withData) {
        batch.set(request.buffer!.subarray(NBD_SIMPLE_REPLY_BYTES), at + NBD_SIMPLE_REPLY_BYTES);
      }
      this.#batchBytes += replyBytes;
      this.#batchRequests++;
      this.#batchCharged += request.chargedBytes;
      this.#recycle(request);
    } else {
      if (!withData) request.buffer = new Uint8Array(NBD_SIMPLE_REPLY_BYTES);
      writeReplyHeader(request.buffer!, 0, error, request);
      this.#largeReplies.push(request);
    }
    if (!this.#writing) this.#writeReplies();
  }

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
          await writeAll(this.#conn, request.buffer!);
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

  #recycle(request: Request): void {
    request.buffer = null;
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
