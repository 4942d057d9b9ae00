/**
 * The ship wire format: length-prefixed frames with a checksum, one encoder and one reader.
 *
 * ```text
 *  0  u32  body length in bytes (big-endian), at most the reader's limit
 *  4  u8   frame type (FRAME_TYPES)
 *  5  …    body: JSON (control frames) or binary (ENTRIES, BASE_CHUNK, LEVEL_CHUNK)
 *  n  u32  CRC32C of the type byte and the body (big-endian)
 * ```
 * The layout and every frame's body are documented in docs/PROTOCOL.md.
 *
 * @module
 */
import * as zlib from "node:zlib";
import { assert } from "../_assert.ts";
export { type ByteSink, closeQuietly, writeAll } from "../byte_sink.ts";
export { crc32cHex } from "../checksum.ts";
import { crc32c, crc32cCombine } from "../checksum.ts";
import { decodeEntryHeader, ENTRY_HEADER_BYTES } from "../format/entry.ts";

/** Version of the ship protocol this code speaks (sent in both hellos). */
export const PROTOCOL_VERSION = 1;
/** Bytes before a frame's body: length (4) and type (1). */
export const FRAME_HEAD_BYTES = 5;
/** Bytes after a frame's body: its CRC32C. */
export const FRAME_TAIL_BYTES = 4;
/** Largest body any frame may carry: one maximal entry (32 MiB payload + header) with room. */
export const FRAME_BYTES_MAX = 33 * 1024 * 1024;
/** Largest body of a control frame (JSON), and of any frame before the handshake completes. */
export const CONTROL_BYTES_MAX = 64 * 1024;
/** Largest body of a STATE_BEGIN frame (it lists levels and compacted marks). */
export const STATE_BEGIN_BYTES_MAX = 4 * 1024 * 1024;
/** Target size of an ENTRIES frame; a frame holds more only when one entry is larger. */
export const ENTRIES_FRAME_BYTES = 4 * 1024 * 1024;
/** Raw bytes of one BASE_CHUNK or LEVEL_CHUNK before compression. */
export const CHUNK_RAW_BYTES_MAX = 1024 * 1024;
/** Bytes of the reader's staging buffer; larger bodies get a buffer of their own. */
const READ_BUFFER_BYTES = 256 * 1024;
/** Bodies up to this size reuse one grown buffer; larger ones (rare) are allocated per frame. */
const REUSED_BODY_BYTES_MAX = ENTRIES_FRAME_BYTES + 64 * 1024;

/** Every frame type and its code on the wire. */
export const FRAME_TYPES = {
  SERVER_HELLO: 1,
  CLIENT_HELLO: 2,
  WELCOME: 3,
  ERROR: 4,
  STATE_BEGIN: 5,
  BASE_CHUNK: 6,
  BASE_END: 7,
  LEVEL_BEGIN: 8,
  LEVEL_CHUNK: 9,
  LEVEL_END: 10,
  STATE_END: 11,
  ENTRIES: 12,
  ACK: 13,
  PING: 14,
  BYE: 15,
} as const;

/** A frame type's name, as logs print it. */
export type FrameTypeName = keyof typeof FRAME_TYPES;
/** A frame type's code. */
export type FrameType = (typeof FRAME_TYPES)[FrameTypeName];

const NAMES_BY_CODE = new Map<number, FrameTypeName>(
  Object.entries(FRAME_TYPES).map(([name, code]) => [code, name as FrameTypeName]),
);

/** The name of frame type `code` (`ENTRIES`), or `unknown(0x2a)`. */
export function frameTypeName(code: number): string {
  return NAMES_BY_CODE.get(code) ?? `unknown(0x${code.toString(16).padStart(2, "0")})`;
}

/** The peer sent something that is not a valid frame or not valid at this point. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/** CRC32C of the type byte followed by the body. */
export function frameChecksum(type: number, body: Uint8Array): number {
  return crc32cCombine(crc32c(Uint8Array.of(type)), crc32c(body), body.length);
}

/** CRC32C of each frame type's code byte alone: where a combined frame checksum starts. */
const TYPE_CRC32C: readonly number[] = Array.from(
  { length: 256 },
  (_, t) => crc32c(Uint8Array.of(t)),
);

/**
 * The checksum of an ENTRIES frame read once: the CRC32C of every entry's header and of its
 * payload, from the bytes, combined into the frame's (crc32cCombine is O(log n) and reads nothing),
 * along with the payload CRCs, so the receiver checks each entry against its header without
 * reading the payloads a second time. Undefined when the body does not split into whole entries
 * with valid headers: the caller then checksums the frame the plain way, so a damaged frame is
 * still reported as a bad checksum first.
 */
function entriesChecksum(
  type: number,
  body: Uint8Array,
  payloadCrc32c: number[],
): number | undefined {
  let frameCrc32c = TYPE_CRC32C[type];
  let position = 0;
  payloadCrc32c.length = 0;
  while (position < body.length) {
    const decoded = decodeEntryHeader(body, position);
    if (!decoded.ok) return undefined;
    const payloadStart = position + ENTRY_HEADER_BYTES;
    const end = payloadStart + decoded.header.payloadBytes;
    if (end > body.length) return undefined;
    const payloadCrc = crc32c(body.subarray(payloadStart, end));
    frameCrc32c = crc32cCombine(
      crc32cCombine(frameCrc32c, crc32c(body.subarray(position, payloadStart)), ENTRY_HEADER_BYTES),
      payloadCrc,
      end - payloadStart,
    );
    payloadCrc32c.push(payloadCrc);
    position = end;
  }
  return frameCrc32c;
}

/**
 * Encodes one frame.
 *
 * @example
 * ```ts
 * import { encodeFrame, FRAME_TYPES } from "./wire.ts";
 * const frame = encodeFrame(FRAME_TYPES.PING, new TextEncoder().encode("{}"));
 * ```
 */
export function encodeFrame(type: FrameType, body: Uint8Array): Uint8Array {
  assert(body.length <= FRAME_BYTES_MAX, `frame body of ${body.length} bytes over the limit`);
  const frame = new Uint8Array(FRAME_HEAD_BYTES + body.length + FRAME_TAIL_BYTES);
  const view = new DataView(frame.buffer);
  view.setUint32(0, body.length);
  view.setUint8(4, type);
  frame.set(body, FRAME_HEAD_BYTES);
  view.setUint32(FRAME_HEAD_BYTES + body.length, frameChecksum(type, body));
  return frame;
}

/**
 * The head (length, type) and tail (checksum) of a frame whose body is written as it is, from
 * where it lies (ENTRIES straight from the sender's read buffer). The checksum is combined from the
 * body's CRC32C, which the caller computed from the bytes, so the body is not read again.
 */
export function frameEnvelope(
  type: FrameType,
  bodyBytes: number,
  bodyCrc32c: number,
): { head: Uint8Array; tail: Uint8Array } {
  assert(bodyBytes <= FRAME_BYTES_MAX, `frame body of ${bodyBytes} bytes over the limit`);
  const head = new Uint8Array(FRAME_HEAD_BYTES);
  const headView = new DataView(head.buffer);
  headView.setUint32(0, bodyBytes);
  headView.setUint8(4, type);
  const tail = new Uint8Array(FRAME_TAIL_BYTES);
  new DataView(tail.buffer).setUint32(0, crc32cCombine(TYPE_CRC32C[type], bodyCrc32c, bodyBytes));
  return { head, tail };
}

/** Encodes a control frame whose body is `value` as JSON. */
export function encodeJsonFrame(type: FrameType, value: unknown): Uint8Array {
  return encodeFrame(type, new TextEncoder().encode(JSON.stringify(value)));
}

/** Parses a control frame's JSON body into an object, or throws {@linkcode ProtocolError}. */
export function decodeJsonBody(frame: Frame): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(frame.body));
  } catch (error) {
    throw new ProtocolError(
      `Bad ${frameTypeName(frame.type)} frame: body is not JSON (${(error as Error).message})`,
    );
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`Bad ${frameTypeName(frame.type)} frame: body is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/**
 * Builds frames in one reused buffer (ENTRIES batches): `begin`, `append` pieces, `finish`.
 * The bytes `finish` returns stay valid until the next `begin`.
 */
export class FrameBuilder {
  #buffer: Uint8Array;
  #length = 0;
  #type: FrameType | undefined;

  constructor(capacityBytes = ENTRIES_FRAME_BYTES + 64 * 1024) {
    this.#buffer = new Uint8Array(capacityBytes);
  }

  /** Body bytes appended since {@linkcode FrameBuilder.begin}. */
  get bodyBytes(): number {
    return this.#length - FRAME_HEAD_BYTES;
  }

  /** Starts a frame of `type`. */
  begin(type: FrameType): void {
    this.#type = type;
    this.#length = FRAME_HEAD_BYTES;
  }

  /** Reserves `bytes` at the end of the body and returns them for the caller to fill. */
  reserve(bytes: number): Uint8Array {
    assert(this.#type !== undefined, "reserve() before begin()");
    assert(this.bodyBytes + bytes <= FRAME_BYTES_MAX, "frame body over FRAME_BYTES_MAX");
    const needed = this.#length + bytes + FRAME_TAIL_BYTES;
    if (needed > this.#buffer.length) {
      const grown = new Uint8Array(Math.max(needed, this.#buffer.length * 2));
      grown.set(this.#buffer.subarray(0, this.#length));
      this.#buffer = grown;
    }
    const slot = this.#buffer.subarray(this.#length, this.#length + bytes);
    this.#length += bytes;
    return slot;
  }

  /** Appends `bytes` to the body. */
  append(bytes: Uint8Array): void {
    this.reserve(bytes.length).set(bytes);
  }

  /** Writes the length and checksum and returns the whole frame. */
  finish(): Uint8Array {
    assert(this.#type !== undefined, "finish() before begin()");
    const view = new DataView(this.#buffer.buffer, this.#buffer.byteOffset);
    const bodyBytes = this.bodyBytes;
    view.setUint32(0, bodyBytes);
    view.setUint8(4, this.#type);
    const body = this.#buffer.subarray(FRAME_HEAD_BYTES, this.#length);
    view.setUint32(this.#length, frameChecksum(this.#type, body));
    const frame = this.#buffer.subarray(0, this.#length + FRAME_TAIL_BYTES);
    this.#type = undefined;
    return frame;
  }
}

/** One decoded frame. `body` is valid only until the next {@linkcode FrameReader.read}. */
export interface Frame {
  type: number;
  body: Uint8Array;
  /**
   * ENTRIES frames whose body splits into whole entries: the CRC32C of each entry's payload,
   * computed from the bytes received while checking the frame (valid as long as `body`).
   */
  payloadCrc32c?: readonly number[];
}

/** What a {@linkcode FrameReader} reads from: a TCP or TLS connection, or a test double. */
export interface ByteSource {
  read(target: Uint8Array): Promise<number | null>;
}

/**
 * Reads frames from a connection, enforcing a body size limit before reading a body and checking
 * every frame's checksum. Not safe for concurrent callers.
 */
export class FrameReader {
  #source: ByteSource;
  #buffer = new Uint8Array(READ_BUFFER_BYTES);
  #start = 0;
  #end = 0;
  #body: Uint8Array = new Uint8Array(0);
  #payloadCrc32c: number[] = [];
  /** Largest body accepted; see {@linkcode FrameReader.frameBytesMax}. */
  frameBytesMax: number;
  /** Bytes received so far (for stats). */
  receivedBytes = 0;

  constructor(source: ByteSource, options: { frameBytesMax?: number } = {}) {
    this.#source = source;
    this.frameBytesMax = options.frameBytesMax ?? FRAME_BYTES_MAX;
    assert(this.frameBytesMax <= FRAME_BYTES_MAX, "frameBytesMax over FRAME_BYTES_MAX");
  }

  /**
   * Reads the next frame. Returns undefined when the peer closed the connection between frames;
   * throws {@linkcode ProtocolError} on a truncated frame, an oversized length or a bad checksum.
   */
  async read(): Promise<Frame | undefined> {
    if (!(await this.#fill(FRAME_HEAD_BYTES))) {
      if (this.#end === this.#start) return undefined;
      throw new ProtocolError(
        `Truncated frame: connection closed after ${
          this.#end - this.#start
        } bytes of a frame header`,
      );
    }
    const view = new DataView(this.#buffer.buffer, this.#start, FRAME_HEAD_BYTES);
    const bodyBytes = view.getUint32(0);
    const type = view.getUint8(4);
    if (bodyBytes > this.frameBytesMax) {
      throw new ProtocolError(
        `${
          frameTypeName(type)
        } frame announces ${bodyBytes} bytes, over the limit of ${this.frameBytesMax} bytes`,
      );
    }
    this.#start += FRAME_HEAD_BYTES;
    const restBytes = bodyBytes + FRAME_TAIL_BYTES;
    let body: Uint8Array;
    let tail: DataView;
    if (restBytes <= this.#buffer.length) {
      if (!(await this.#fill(restBytes))) this.#truncated(type, bodyBytes);
      body = this.#buffer.subarray(this.#start, this.#start + bodyBytes);
      tail = new DataView(this.#buffer.buffer, this.#start + bodyBytes, FRAME_TAIL_BYTES);
      this.#start += restBytes;
    } else {
      const whole = this.#bodyBuffer(restBytes);
      if (!(await this.#readInto(whole))) this.#truncated(type, bodyBytes);
      body = whole.subarray(0, bodyBytes);
      tail = new DataView(whole.buffer, whole.byteOffset + bodyBytes, FRAME_TAIL_BYTES);
    }
    const expected = tail.getUint32(0);
    const combined = type === FRAME_TYPES.ENTRIES
      ? entriesChecksum(type, body, this.#payloadCrc32c)
      : undefined;
    const actual = combined ?? frameChecksum(type, body);
    if (expected !== actual) {
      throw new ProtocolError(
        `Bad checksum on a ${frameTypeName(type)} frame of ${bodyBytes} bytes (crc32c 0x${
          actual.toString(16)
        }, the frame says 0x${expected.toString(16)})`,
      );
    }
    if (combined === undefined) return { type, body };
    return { type, body, payloadCrc32c: this.#payloadCrc32c };
  }

  #truncated(type: number, bodyBytes: number): never {
    throw new ProtocolError(
      `Truncated frame: connection closed inside a ${
        frameTypeName(type)
      } frame of ${bodyBytes} bytes`,
    );
  }

  #bodyBuffer(bytes: number): Uint8Array {
    if (bytes > REUSED_BODY_BYTES_MAX) return new Uint8Array(bytes);
    if (this.#body.length < bytes) this.#body = new Uint8Array(REUSED_BODY_BYTES_MAX);
    return this.#body.subarray(0, bytes);
  }

  async #fill(bytes: number): Promise<boolean> {
    if (this.#end - this.#start >= bytes) return true;
    if (this.#buffer.length - this.#start < bytes) {
      this.#buffer.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    while (this.#end - this.#start < bytes) {
      const count = await this.#source.read(this.#buffer.subarray(this.#end));
      if (count === null) return false;
      this.receivedBytes += count;
      this.#end += count;
    }
    return true;
  }

  async #readInto(target: Uint8Array): Promise<boolean> {
    const buffered = Math.min(this.#end - this.#start, target.length);
    target.set(this.#buffer.subarray(this.#start, this.#start + buffered));
    this.#start += buffered;
    if (this.#start === this.#end) this.#start = this.#end = 0;
    let filled = buffered;
    while (filled < target.length) {
      const count = await this.#source.read(target.subarray(filled));
      if (count === null) return false;
      this.receivedBytes += count;
      filled += count;
    }
    return true;
  }
}

/** The body of an ERROR frame. */
export interface ErrorBody {
  /** Machine-readable reason; see {@linkcode ErrorCode}. */
  code: ErrorCode;
  /** A sentence for people, naming the host, file or limit involved. */
  message: string;
  /** What to do about it, when there is something to do. */
  hint?: string;
}

/** Why a peer ended the session. */
export type ErrorCode =
  | "version"
  | "auth"
  | "host"
  | "identity"
  | "busy"
  | "protocol"
  | "integrity"
  | "limit"
  | "shutdown"
  | "internal";

const ERROR_CODES: ReadonlySet<string> = new Set([
  "version",
  "auth",
  "host",
  "identity",
  "busy",
  "protocol",
  "integrity",
  "limit",
  "shutdown",
  "internal",
]);

/** Decodes an ERROR frame's body (unknown codes become "internal"). */
export function decodeErrorBody(frame: Frame): ErrorBody {
  const body = decodeJsonBody(frame);
  const code = typeof body.code === "string" && ERROR_CODES.has(body.code)
    ? body.code as ErrorCode
    : "internal";
  const message = typeof body.message === "string" ? body.message.slice(0, 2000) : "(no message)";
  const hint = typeof body.hint === "string" ? body.hint.slice(0, 2000) : undefined;
  return { code, message, hint };
}

/** The body of a BASE_CHUNK or LEVEL_CHUNK: where the bytes go and their zstd compression. */
export interface ChunkBody {
  offsetBytes: number;
  rawBytes: number;
  compressed: Uint8Array;
}

const CHUNK_HEAD_BYTES = 12;

/** Encodes a chunk body: `u64 offset | u32 raw length | zstd bytes` (big-endian). */
export function encodeChunkBody(chunk: ChunkBody): Uint8Array {
  const body = new Uint8Array(CHUNK_HEAD_BYTES + chunk.compressed.length);
  const view = new DataView(body.buffer);
  view.setBigUint64(0, BigInt(chunk.offsetBytes));
  view.setUint32(8, chunk.rawBytes);
  body.set(chunk.compressed, CHUNK_HEAD_BYTES);
  return body;
}

/** Decodes a chunk body, or throws {@linkcode ProtocolError}. */
export function decodeChunkBody(frame: Frame): ChunkBody {
  if (frame.body.length < CHUNK_HEAD_BYTES) {
    throw new ProtocolError(`Bad ${frameTypeName(frame.type)} frame: ${frame.body.length} bytes`);
  }
  const view = new DataView(frame.body.buffer, frame.body.byteOffset, CHUNK_HEAD_BYTES);
  const offset = view.getBigUint64(0);
  const rawBytes = view.getUint32(8);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER) || rawBytes > CHUNK_RAW_BYTES_MAX) {
    throw new ProtocolError(
      `Bad ${frameTypeName(frame.type)} frame: offset ${offset} or length ${rawBytes} out of range`,
    );
  }
  return {
    offsetBytes: Number(offset),
    rawBytes,
    compressed: frame.body.subarray(CHUNK_HEAD_BYTES),
  };
}

/** Compresses one chunk for the wire (zstd, fast level: the link, not the CPU, is the limit). */
export function compressChunk(raw: Uint8Array): Uint8Array {
  const compressed = zlib.zstdCompressSync(raw, {
    params: { [zlib.constants.ZSTD_c_compressionLevel]: 1 },
  });
  return new Uint8Array(compressed.buffer, compressed.byteOffset, compressed.byteLength);
}

/**
 * Decompresses a chunk, refusing output other than exactly `chunk.rawBytes` (a frame that
 * inflates past its announced size is an attack or a bug, and is never buffered whole).
 */
export function decompressChunk(chunk: ChunkBody, what: string): Uint8Array {
  let raw: Uint8Array;
  try {
    raw = zlib.zstdDecompressSync(chunk.compressed, { maxOutputLength: chunk.rawBytes });
  } catch (error) {
    throw new ProtocolError(
      `Bad ${what} at offset ${chunk.offsetBytes}: ${(error as Error).message}`,
    );
  }
  if (raw.length !== chunk.rawBytes) {
    throw new ProtocolError(
      `Bad ${what} at offset ${chunk.offsetBytes}: ${raw.length} bytes, the frame says ${chunk.rawBytes}`,
    );
  }
  return new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
}
