/**
 * diff: which byte ranges of the device changed between two points in time, from the log alone.
 * A range counts as changed when an entry after the first point and at or before the second
 * wrote, zeroed or trimmed it, even if it wrote the bytes the range already held: diff reads
 * entry headers, never data, so it costs one header scan whatever the device size. Ranges are
 * merged into extents (adjacent ones joined), each with the time of its latest change.
 *
 * @module
 */
import { UsageError } from "./errors.ts";
import { ExtentMap } from "./extent_map.ts";
import { ENTRY_HEADER_BYTES } from "./format/entry.ts";
import { readLogEntries } from "./format/logdir.ts";
import { resolveRestorePoint, type RestorePoint } from "./timeline.ts";
import { formatTimeUtc, type TimeSpec } from "./time.ts";

/** Options of {@linkcode diffLogdir}. */
export interface DiffOptions {
  /** The earlier point: the state just after the last entry at or before it. */
  from: TimeSpec;
  /** The later point (default: the latest state). */
  to?: TimeSpec;
  /** The present, for refusing future times (default: the wall clock). */
  nowUs?: number;
}

/** One changed extent of the device. */
export interface ChangedRange {
  offsetBytes: number;
  lengthBytes: number;
  /** Time of the latest entry in the window that changed part of this range. */
  lastChangeUs: number;
}

/** One end of a diff. */
export interface DiffPoint {
  /** The time the state represents. */
  targetUs: number;
  /** Seq of the last entry of that state. */
  targetSeq: number;
}

/** What {@linkcode diffLogdir} found. */
export interface DiffResult {
  logdir: string;
  deviceBytes: number;
  from: DiffPoint;
  to: DiffPoint;
  /** Entries in the window (from.targetSeq, to.targetSeq], of every kind. */
  entries: number;
  /** Write, zero and trim entries in the window. */
  writes: number;
  zeroes: number;
  trims: number;
  /** Bytes those entries covered, overlaps counted each time. */
  writtenBytes: number;
  /** Changed extents in offset order, merged. */
  ranges: ChangedRange[];
  /** Bytes the changed extents cover (each byte once). */
  changedBytes: number;
}

/**
 * The ranges that entries after `options.from` and at or before `options.to` changed. Times
 * outside the restorable window are refused with a {@linkcode UsageError} naming the window, and
 * so is a `from` after `to`.
 *
 * @example
 * ```ts ignore
 * import { diffLogdir } from "./diff.ts";
 * import { parseTime } from "./time.ts";
 * const diff = await diffLogdir("/var/lib/sectorlog/vm1", {
 *   from: parseTime("2026-11-24 02:00"),
 *   to: parseTime("2026-11-24 02:30"),
 * });
 * console.log(`${diff.ranges.length} ranges, ${diff.changedBytes} bytes changed`);
 * ```
 */
export async function diffLogdir(logdir: string, options: DiffOptions): Promise<DiffResult> {
  const from = await resolveEnd(logdir, options.from, "--from", options.nowUs);
  const to = await resolveEnd(logdir, options.to, "--to", options.nowUs);
  const instantsReversed = options.from.kind === "instant" && options.to?.kind === "instant" &&
    options.from.timeUs > options.to.timeUs;
  if (from.targetSeq > to.targetSeq || instantsReversed) {
    throw new UsageError(
      `Cannot diff from ${formatTimeUtc(from.targetUs)} to ${
        formatTimeUtc(to.targetUs)
      }: --from is after --to`,
      { hint: "swap the two times" },
    );
  }
  const manifest = to.timeline.manifest;
  const map = new ExtentMap(manifest.deviceBytes);
  const result: DiffResult = {
    logdir,
    deviceBytes: manifest.deviceBytes,
    from: { targetUs: from.targetUs, targetSeq: from.targetSeq },
    to: { targetUs: to.targetUs, targetSeq: to.targetSeq },
    entries: 0,
    writes: 0,
    zeroes: 0,
    trims: 0,
    writtenBytes: 0,
    ranges: [],
    changedBytes: 0,
  };
  if (to.targetSeq > from.targetSeq) {
    const entries = readLogEntries(logdir, manifest, {
      fromSeq: from.targetSeq + 1,
      headersOnly: true,
    });
    for await (const { header, fileOffsetBytes } of entries) {
      if (header.seq > to.targetSeq) break;
      result.entries++;
      if (header.kind === "write") result.writes++;
      else if (header.kind === "zero") result.zeroes++;
      else if (header.kind === "trim") result.trims++;
      else continue;
      result.writtenBytes += header.lengthBytes;
      map.set({
        offsetBytes: header.offsetBytes,
        lengthBytes: header.lengthBytes,
        kind: header.kind === "write" ? "data" : "zero",
        timeUs: header.timeUs,
        sourceIndex: 0,
        entryOffsetBytes: fileOffsetBytes,
        sourceOffsetBytes: header.kind === "write" ? fileOffsetBytes + ENTRY_HEADER_BYTES : 0,
      });
    }
  }
  for (const extent of map.extents()) {
    const last = result.ranges.at(-1);
    result.changedBytes += extent.lengthBytes;
    if (last !== undefined && last.offsetBytes + last.lengthBytes === extent.offsetBytes) {
      last.lengthBytes += extent.lengthBytes;
      last.lastChangeUs = Math.max(last.lastChangeUs, extent.timeUs);
    } else {
      result.ranges.push({
        offsetBytes: extent.offsetBytes,
        lengthBytes: extent.lengthBytes,
        lastChangeUs: extent.timeUs,
      });
    }
  }
  return result;
}

/** Resolves one end of the diff; errors name the option instead of a restore. */
async function resolveEnd(
  logdir: string,
  spec: TimeSpec | undefined,
  option: string,
  nowUs: number | undefined,
): Promise<RestorePoint> {
  try {
    return await resolveRestorePoint(logdir, spec, { nowUs });
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    throw new UsageError(error.message.replace(/^Cannot restore to /, `Cannot diff ${option} `), {
      hint: error.hint,
      cause: error,
    });
  }
}
