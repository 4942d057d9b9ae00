/**
 * The manifest: a JSON file that names everything a logdir holds. It is replaced atomically
 * (write temp, fsync, rename, fsync dir), so a reader sees the old or the new one, never a mix.
 *
 * @module
 */
import { IntegrityError, UsageError } from "../errors.ts";

/** The manifest format version this code writes and reads. */
export const MANIFEST_FORMAT_VERSION = 1;
/** The `format` field of every manifest. */
export const MANIFEST_FORMAT = "sectorlog-logdir";
/** A manifest larger than this is refused as corrupt. */
export const MANIFEST_BYTES_MAX = 64 * 1024 * 1024;

/** The base snapshot: a sparse raw image of the device. */
export interface BaseInfo {
  /** File name within the logdir. */
  file: string;
  /** Wall-clock time the copy began. */
  startedUs: number;
  /** Wall-clock time the copy ended: the earliest time a restore can reach. */
  endedUs: number;
  /** The first seq to replay on top of the base (the log began before the copy). */
  replayFromSeq: number;
  /** CRC32C of the whole image, holes read as zeroes, as 8 hex digits. */
  crc32c: string;
  /** Bytes that hold data (the rest are holes). */
  dataBytes: number;
}

/** A sealed segment: complete, fsynced, never written again. */
export interface SegmentInfo {
  file: string;
  firstSeq: number;
  lastSeq: number;
  firstUs: number;
  lastUs: number;
  sizeBytes: number;
  entries: number;
}

/** A compacted level: the latest data per extent as of its cut (written by `compact`). */
export interface LevelInfo {
  file: string;
  cutUs: number;
  /** Every entry with seq ≤ cutSeq is folded into this level. */
  cutSeq: number;
  sizeBytes: number;
  entries: number;
}

/** A mark whose time is before the horizon: listed, no longer restorable. */
export interface CompactedMark {
  name: string;
  seq: number;
  timeUs: number;
}

/** The whole manifest. */
export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  formatVersion: number;
  /** Identity of this logdir, made with its first snapshot. */
  logdirId: string;
  hostId: string;
  createdUs: number;
  deviceBytes: number;
  sectorBytes: number;
  base: BaseInfo;
  /** The earliest restorable time. */
  horizonUs: number;
  levels: LevelInfo[];
  segments: SegmentInfo[];
  compactedMarks: CompactedMark[];
}

/** Serializes a manifest (stable key order, trailing newline). */
export function encodeManifest(manifest: Manifest): string {
  return JSON.stringify(manifest, null, 2) + "\n";
}

/** Parses and validates a manifest; `path` is named in errors. */
export function decodeManifest(text: string, path: string): Manifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new IntegrityError(`Cannot parse manifest ${path}: ${(error as Error).message}`, {
      path,
      cause: error,
    });
  }
  const manifest = value as Manifest;
  const problem = manifestProblem(manifest);
  if (problem !== undefined) {
    throw new IntegrityError(`Invalid manifest ${path}: ${problem}`, { path });
  }
  if (manifest.formatVersion !== MANIFEST_FORMAT_VERSION) {
    throw new UsageError(
      `Cannot read ${path}: manifest format version ${manifest.formatVersion} is not supported ` +
        `(this sectorlog reads version ${MANIFEST_FORMAT_VERSION})`,
    );
  }
  return manifest;
}

function isUint(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

function manifestProblem(m: Manifest): string | undefined {
  if (typeof m !== "object" || m === null) return "not an object";
  if (m.format !== MANIFEST_FORMAT) return `format is not "${MANIFEST_FORMAT}"`;
  if (!isUint(m.formatVersion)) return "formatVersion missing";
  if (typeof m.logdirId !== "string" || typeof m.hostId !== "string") return "identity missing";
  if (!isUint(m.deviceBytes) || !isUint(m.sectorBytes) || m.sectorBytes === 0) {
    return "device geometry missing";
  }
  if (typeof m.base !== "object" || m.base === null) return "base missing";
  if (!isUint(m.base.replayFromSeq) || m.base.replayFromSeq < 1) return "base.replayFromSeq bad";
  if (!Number.isSafeInteger(m.base.endedUs) || !Number.isSafeInteger(m.horizonUs)) {
    return "times missing";
  }
  if (!Array.isArray(m.levels) || !Array.isArray(m.segments)) return "lists missing";
  if (!Array.isArray(m.compactedMarks)) return "compactedMarks missing";
  let nextSeq: number | undefined;
  for (const segment of m.segments) {
    if (
      !isUint(segment.firstSeq) || !isUint(segment.lastSeq) || segment.lastSeq < segment.firstSeq
    ) {
      return `segment ${segment.file} has a bad seq range`;
    }
    if (nextSeq !== undefined && segment.firstSeq !== nextSeq) {
      return `segment ${segment.file} starts at seq ${segment.firstSeq}, expected ${nextSeq}`;
    }
    nextSeq = segment.lastSeq + 1;
  }
  return undefined;
}

/** The seq the next entry after the sealed segments will carry. */
export function nextSeqAfterSealed(manifest: Manifest): number {
  const last = manifest.segments.at(-1);
  if (last !== undefined) return last.lastSeq + 1;
  const level = manifest.levels.at(-1);
  return Math.max(manifest.base.replayFromSeq, level === undefined ? 1 : level.cutSeq + 1);
}
