/**
 * Socket helpers shared by the handshake and transmission phases (private to `lib/nbd/`): a
 * buffered reader that hands out views of its buffer instead of copies, and a write-all loop.
 *
 * @module
 */

import { assert } from "../_assert.ts";

/**
 * Bytes of the reader's staging buffer. Deno's `Conn.read` returns at most about 64 KiB at a
 * time, so twice that lets one read land whole even when a partial request sits at the front.
 */
export const READ_BUFFER_BYTES = 128 * 1024;

/**
 * A payload remainder at least this long is read straight into its destination: copying it out
 * of the staging buffer would cost a memcpy per byte, while for shorter ones a read into the
 * staging buffer also picks up the requests that follow in the same syscall.
 */
const DIRECT_READ_BYTES_MIN = 16 * 1024;

/** The reader side of a connection, buffered. Not safe for concurrent callers. */
export class SocketReader {
  #conn: Deno.Conn;
  #buffer: Uint8Array;
  #view: DataView;
  #start = 0;
  #end = 0;

  /** Wraps `conn`; nothing else may read from it afterwards. */
  constructor(conn: Deno.Conn, capacityBytes: number = READ_BUFFER_BYTES) {
    this.#conn = conn;
    this.#buffer = new Uint8Array(capacityBytes);
    this.#view = new DataView(this.#buffer.buffer);
  }

  /** The staging buffer; offsets from {@linkcode SocketReader.consume} index into it. */
  get buffer(): Uint8Array {
    return this.#buffer;
  }

  /** A DataView over {@linkcode SocketReader.buffer}, for decoding headers in place. */
  get view(): DataView {
    return this.#view;
  }

  /** Bytes received and not yet consumed. */
  get bufferedBytes(): number {
    return this.#end - this.#start;
  }

  /**
   * Waits until at least `bytes` bytes are buffered. Returns false when the peer closed the
   * connection first (check {@linkcode SocketReader.bufferedBytes} to tell a clean end from a
   * truncated message).
   */
  async fill(bytes: number): Promise<boolean> {
    assert(bytes <= this.#buffer.length, `fill(${bytes}) exceeds the reader's buffer`);
    if (this.#end - this.#start >= bytes) return true;
    if (this.#buffer.length - this.#start < bytes) this.#compact();
    while (this.#end - this.#start < bytes) {
      const count = await this.#conn.read(this.#buffer.subarray(this.#end));
      if (count === null) return false;
      this.#end += count;
    }
    return true;
  }

  /** Consumes `bytes` buffered bytes and returns their offset in {@linkcode SocketReader.buffer}. */
  consume(bytes: number): number {
    assert(bytes <= this.#end - this.#start, "consume() beyond the buffered bytes");
    const offset = this.#start;
    this.#start += bytes;
    if (this.#start === this.#end) this.#start = this.#end = 0;
    return offset;
  }

  /**
   * Fills `destination` completely with the next bytes of the stream. Long remainders are read
   * straight into `destination` (no copy). Returns false when the peer closed the connection
   * before `destination` was full.
   */
  async readInto(destination: Uint8Array): Promise<boolean> {
    let filled = this.#copyBuffered(destination, 0);
    while (filled < destination.length) {
      const remaining = destination.length - filled;
      if (remaining >= DIRECT_READ_BYTES_MIN) {
        const count = await this.#conn.read(destination.subarray(filled));
        if (count === null) return false;
        filled += count;
      } else {
        if (!(await this.fill(remaining))) return false;
        filled = this.#copyBuffered(destination, filled);
      }
    }
    return true;
  }

  /**
   * Copies as many buffered bytes as fit into `destination`, consumes them, and returns their
   * count. Never waits: the synchronous path for a payload that arrived with its header.
   */
  takeBuffered(destination: Uint8Array): number {
    return this.#copyBuffered(destination, 0);
  }

  /** Reads and drops the next `bytes` bytes. Returns false when the peer closed first. */
  async skip(bytes: number): Promise<boolean> {
    let remaining = bytes;
    while (remaining > 0) {
      if (this.#end === this.#start && !(await this.fill(1))) return false;
      const count = Math.min(remaining, this.#end - this.#start);
      this.consume(count);
      remaining -= count;
    }
    return true;
  }

  #copyBuffered(destination: Uint8Array, filled: number): number {
    const count = Math.min(this.#end - this.#start, destination.length - filled);
    if (count === 0) return filled;
    destination.set(this.#buffer.subarray(this.#start, this.#start + count), filled);
    this.consume(count);
    return filled + count;
  }

  #compact(): void {
    this.#buffer.copyWithin(0, this.#start, this.#end);
    this.#end -= this.#start;
    this.#start = 0;
  }
}
