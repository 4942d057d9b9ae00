/**
 * The log entry: one timestamped record of what happened to the device. One encoder and one
 * decoder, pure functions over `DataView`; the byte layout is documented in docs/FORMAT.md.
 *
 * ```text
 *  0  u32  magic "SLGE" (0x45 0x47 0x4c 0x53 stored as bytes "S" "L" "G" "E")
 *  4  u8   format version (1)
 *  5  u8   kind: 1 write, 2 zero, 3 trim, 4 flush, 5 mark
 *  6  u16  flags (none defined in version 1; must be 0)
 *  8  u64  seq
 * 16  i64  time, µs since the Unix epoch
 * 24  u64  offset in bytes on the device
 * 32  u32  length in bytes of the affected range (0 for flush and mark)
 * 36  u32  payload bytes that follow the header (write: = length; mark: name bytes; else 0)
 * 40  u32  CRC32C of the payload
 * 44  16×u8 reserved, zero
 * 60  u32  CRC32C of bytes 0..59
 * ```
 * All integers little-endian.
 *
 * @module
 */
import { assert, assertUint } from "../_assert.ts";
import { crc32c } from "../checksum.ts";

/** Size of an encoded entry header. */
export const ENTRY_HEADER_BYTES = 64;
/** The entry format version this code writes and reads. */
export const ENTRY_FORMAT_VERSION = 1;
/** The magic at the start of every entry header: the ASCII bytes "SLGE". */
export const ENTRY_MAGIC: Uint8Array = new Uint8Array([0x53, 0x4c, 0x47, 0x45]);
/** Largest payload one entry may carry: the NBD maximum request size (32 MiB). */
export const ENTRY_PAYLOAD_BYTES_MAX = 32 * 1024 * 1024;
/** Largest range a zero or trim entry may cover (u32 on the wire). */
export const ENTRY_RANGE_BYTES_MAX = 0xffff_ffff;
/** Longest mark name in UTF-8 bytes. */
export const MARK_NAME_BYTES_MAX = 255;

const MAGIC_U32 = new DataView(ENTRY_MAGIC.buffer).getUint32(0, true);
const HEADER_CRC_OFFSET = 60;

/** What an entry records. */
export type EntryKind = "write" | "zero" | "trim" | "flush" | "mark";

const KIND_CODES: Record<EntryKind, number> = { write: 1, zero: 2, trim: 3, flush: 4, mark: 5 };
const KINDS_BY_CODE: (EntryKind | undefined)[] = [
  undefined,
  "write",
  "zero",
  "trim",
  "flush",
  "mark",
];

/** The decoded fixed-size part of an entry. */
export interface EntryHeader {
  kind: EntryKind;
  seq: number;
  timeUs: number;
  offsetBytes: number;
  lengthBytes: number;
  payloadBytes: number;
  payloadCrc32c: number;
}

/** Total bytes an entry occupies in a segment. */
export function entryBytes(header: Pick<EntryHeader, "payloadBytes">): number {
  return ENTRY_HEADER_BYTES + header.payloadBytes;
}

/**
 * Encodes `header` into `target` at `targetOffset` (64 bytes) and computes the header checksum.
 * `header.payloadCrc32c` must already hold the payload's CRC32C.
 *
 * @example
 * ```ts
 * import { encodeEntryHeader, ENTRY_HEADER_BYTES } from "./entry.ts";
 * const bytes = new Uint8Array(ENTRY_HEADER_BYTES);
 * encodeEntryHeader({ kind: "flush", seq: 1, timeUs: 0, offsetBytes: 0, lengthBytes: 0,
 *   payloadBytes: 0, payloadCrc32c: 0 }, bytes);
 * ```
 */
export function encodeEntryHeader(header: EntryHeader, target: Uint8Array, targetOffset = 0): void {
  assertEntryHeader(header);
  assert(target.length - targetOffset >= ENTRY_HEADER_BYTES, "entry header target too small");
  const view = new DataView(target.buffer, target.byteOffset + targetOffset, ENTRY_HEADER_BYTES);
  view.setUint32(0, MAGIC_U32, true);
  view.setUint8(4, ENTRY_FORMAT_VERSION);
  view.setUint8(5, KIND_CODES[header.kind]);
  view.setUint16(6, 0, true);
  view.setBigUint64(8, BigInt(header.seq), true);
  view.setBigInt64(16, BigInt(header.timeUs), true);
  view.setBigUint64(24, BigInt(header.offsetBytes), true);
  view.setUint32(32, header.lengthBytes, true);
  view.setUint32(36, header.payloadBytes, true);
  view.setUint32(40, header.payloadCrc32c, true);
  for (let i = 44; i < HEADER_CRC_OFFSET; i++) view.setUint8(i, 0);
  const headerBytes = target.subarray(targetOffset, targetOffset + HEADER_CRC_OFFSET);
  view.setUint32(HEADER_CRC_OFFSET, crc32c(headerBytes), true);
}

/** Why a header could not be decoded. */
export type HeaderProblem =
  | "short"
  | "bad magic"
  | "bad header checksum"
  | "unsupported version"
  | "unknown kind"
  | "unknown flags"
  | "bad field";

/** The result of {@linkcode decodeEntryHeader}: a header, or the reason there is none. */
export type DecodedHeader = { ok: true; header: EntryHeader } | {
  ok: false;
  problem: HeaderProblem;
};

/**
 * Decodes the entry header at `sourceOffset` of `source`, checking magic, header checksum,
 * version, kind and field consistency. Never throws on bad bytes: it names the problem.
 */
export function decodeEntryHeader(source: Uint8Array, sourceOffset = 0): DecodedHeader {
  if (source.length - sourceOffset < ENTRY_HEADER_BYTES) return { ok: false, problem: "short" };
  const view = new DataView(source.buffer, source.byteOffset + sourceOffset, ENTRY_HEADER_BYTES);
  if (view.getUint32(0, true) !== MAGIC_U32) return { ok: false, problem: "bad magic" };
  const headerBytes = source.subarray(sourceOffset, sourceOffset + HEADER_CRC_OFFSET);
  if (crc32c(headerBytes) !== view.getUint32(HEADER_CRC_OFFSET, true)) {
    return { ok: false, problem: "bad header checksum" };
  }
  if (view.getUint8(4) !== ENTRY_FORMAT_VERSION) {
    return { ok: false, problem: "unsupported version" };
  }
  const kind = KINDS_BY_CODE[view.getUint8(5)];
  if (kind === undefined) return { ok: false, problem: "unknown kind" };
  if (view.getUint16(6, true) !== 0) return { ok: false, problem: "unknown flags" };
  const seq = view.getBigUint64(8, true);
  const timeUs = view.getBigInt64(16, true);
  const offsetBytes = view.getBigUint64(24, true);
  if (seq > BigInt(Number.MAX_SAFE_INTEGER) || offsetBytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    return { ok: false, problem: "bad field" };
  }
  if (timeUs > BigInt(Number.MAX_SAFE_INTEGER) || timeUs < BigInt(Number.MIN_SAFE_INTEGER)) {
    return { ok: false, problem: "bad field" };
  }
  const header: EntryHeader = {
    kind,
    seq: Number(seq),
    timeUs: Number(timeUs),
    offsetBytes: Number(offsetBytes),
    lengthBytes: view.getUint32(32, true),
    payloadBytes: view.getUint32(36, true),
    payloadCrc32c: view.getUint32(40, true),
  };
  if (entryHeaderProblem(header) !== undefined) return { ok: false, problem: "bad field" };
  return { ok: true, header };
}

/** Builds the header of an entry whose payload is `payload`, computing the payload checksum. */
export function makeEntryHeader(
  fields: Omit<EntryHeader, "payloadBytes" | "payloadCrc32c">,
  payload?: Uint8Array,
): EntryHeader {
  const payloadBytes = payload?.length ?? 0;
  return {
    ...fields,
    payloadBytes,
    payloadCrc32c: payloadBytes === 0 ? 0 : crc32c(payload!),
  };
}

/** Returns true when `payload` matches the header's payload length and checksum. */
export function payloadMatches(header: EntryHeader, payload: Uint8Array): boolean {
  if (payload.length !== header.payloadBytes) return false;
  if (header.payloadBytes === 0) return header.payloadCrc32c === 0;
  return crc32c(payload) === header.payloadCrc32c;
}

function assertEntryHeader(header: EntryHeader): void {
  const problem = entryHeaderProblem(header);
  assert(problem === undefined, `invalid entry header: ${problem}`);
}

/** Field rules shared by the encoder (as assertions) and the decoder (as "bad field"). */
function entryHeaderProblem(header: EntryHeader): string | undefined {
  for (const field of ["seq", "offsetBytes", "lengthBytes", "payloadBytes"] as const) {
    try {
      assertUint(header[field], field);
    } catch {
      return `${field} out of range`;
    }
  }
  if (!Number.isSafeInteger(header.timeUs)) return "timeUs out of range";
  if (header.seq < 1) return "seq must start at 1";
  if (header.lengthBytes > ENTRY_RANGE_BYTES_MAX) return "lengthBytes over u32";
  switch (header.kind) {
    case "write":
      if (header.payloadBytes !== header.lengthBytes) return "write payload must equal length";
      if (header.lengthBytes === 0 || header.lengthBytes > ENTRY_PAYLOAD_BYTES_MAX) {
        return "write length out of range";
      }
      return undefined;
    case "zero":
    case "trim":
      if (header.payloadBytes !== 0) return `${header.kind} has no payload`;
      return header.lengthBytes === 0 ? `${header.kind} length must be positive` : undefined;
    case "flush":
      if (header.payloadBytes !== 0 || header.lengthBytes !== 0) return "flush has no range";
      return header.offsetBytes === 0 ? undefined : "flush has no offset";
    case "mark":
      if (header.lengthBytes !== 0 || header.offsetBytes !== 0) return "mark has no range";
      if (header.payloadBytes === 0 || header.payloadBytes > MARK_NAME_BYTES_MAX) {
        return "mark name length out of range";
      }
      return undefined;
  }
}
