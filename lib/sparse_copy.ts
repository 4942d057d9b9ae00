/**
 * Copying images block by block: all-zero blocks become holes in regular files, and a CRC32C of
 * every byte (holes read as zeroes) comes out of the same pass.
 *
 * @module
 */
import { Crc32cStream } from "./checksum.ts";
import type { Device } from "./device.ts";
import { readFully, writeFully } from "./format/segment.ts";

/** Bytes read per step of a copy. */
export const COPY_CHUNK_BYTES = 1024 * 1024;
/** Granularity at which zeroes are detected and left as holes. */
export const HOLE_BLOCK_BYTES = 4096;

/** Returns true when every byte of `bytes` is zero. */
export function isAllZero(bytes: Uint8Array): boolean {
  const words = bytes.byteOffset % 8 === 0 ? Math.floor(bytes.length / 8) : 0;
  const view = new BigUint64Array(bytes.buffer, bytes.byteOffset, words);
  for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
  for (let i = words * 8; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Where a copy reads from: a device or a file descriptor with a size. */
export interface CopySource {
  sizeBytes: number;
  readInto(offsetBytes: number, target: Uint8Array): void;
}

/** Where a copy writes to. */
export interface CopyTarget {
  /** A regular file whose unwritten ranges already read as zeroes (fresh and truncated). */
  holesAreZero: boolean;
  write(offsetBytes: number, data: Uint8Array): void;
}

/** Result of {@linkcode copyImage}. */
export interface CopyResult {
  /** Bytes that held data (written). */
  dataBytes: number;
  /** CRC32C of the whole source. */
  crc32c: string;
}

/**
 * Copies `source` to `target`, skipping all-zero blocks when the target's holes read as zeroes.
 * Calls `onProgress` after every chunk.
 */
export async function copyImage(
  source: CopySource,
  target: CopyTarget,
  onProgress?: (doneBytes: number, totalBytes: number) => void,
): Promise<CopyResult> {
  const chunk = new Uint8Array(COPY_CHUNK_BYTES);
  const crc = new Crc32cStream();
  await crc.init();
  let dataBytes = 0;
  for (let offset = 0; offset < source.sizeBytes; offset += COPY_CHUNK_BYTES) {
    const length = Math.min(COPY_CHUNK_BYTES, source.sizeBytes - offset);
    const bytes = chunk.subarray(0, length);
    source.readInto(offset, bytes);
    crc.update(bytes);
    dataBytes += writeNonZeroRuns(bytes, offset, target);
    onProgress?.(offset + length, source.sizeBytes);
    // Let timers and signals run between chunks of a long copy.
    if ((offset / COPY_CHUNK_BYTES) % 64 === 63) await new Promise((r) => setTimeout(r, 0));
  }
  return { dataBytes, crc32c: crc.digestHex() };
}

/** Writes the runs of non-zero blocks of `bytes` (all of it when holes are not zero). */
function writeNonZeroRuns(bytes: Uint8Array, offsetBytes: number, target: CopyTarget): number {
  if (!target.holesAreZero) {
    target.write(offsetBytes, bytes);
    return bytes.length;
  }
  let written = 0;
  let runStart = -1;
  // One step past the last block, even a partial one, so that a run reaching the end is written.
  for (let block = 0; block < bytes.length + HOLE_BLOCK_BYTES; block += HOLE_BLOCK_BYTES) {
    const runEnd = Math.min(block, bytes.length);
    const end = Math.min(block + HOLE_BLOCK_BYTES, bytes.length);
    const zero = block >= bytes.length || isAllZero(bytes.subarray(block, end));
    if (!zero && runStart < 0) runStart = block;
    if (zero && runStart >= 0) {
      target.write(offsetBytes + runStart, bytes.subarray(runStart, runEnd));
      written += runEnd - runStart;
      runStart = -1;
    }
  }
  return written;
}

/** A copy source over a raw file descriptor. */
export function fdSource(fd: number, sizeBytes: number): CopySource {
  return { sizeBytes, readInto: (offset, target) => readFully(fd, target, target.length, offset) };
}

/** A copy target over a raw file descriptor. */
export function fdTarget(fd: number, holesAreZero: boolean): CopyTarget {
  return { holesAreZero, write: (offset, data) => writeFully(fd, data, data.length, offset) };
}

/** A copy source over an open device. */
export function deviceSource(device: Device): CopySource {
  return { sizeBytes: device.sizeBytes, readInto: (o, t) => device.readInto(o, t) };
}
