/**
 * The restorable window of a logdir and how a TIME (an instant, `seq:<n>` or `mark:<name>`)
 * becomes the seq of the last entry a restore applies. One header-only pass, bounded memory.
 *
 * @module
 */
import { type IntegrityError, UsageError } from "./errors.ts";
import { readLogEntries, readManifest, scanHeaders } from "./format/logdir.ts";
import type { CompactedMark, Manifest } from "./format/manifest.ts";
import { realStorage } from "./storage/real_storage.ts";
import type { Storage } from "./storage/storage.ts";
import { formatTimeLocal, formatTimeUtc, nowUs, type TimeSpec } from "./time.ts";

/** Most marks a timeline lists (older ones are still resolvable by name during a scan). */
export const TIMELINE_MARKS_MAX = 10_000;

/** A named point in time. */
export interface MarkInfo {
  name: string;
  seq: number;
  timeUs: number;
  /** False for marks before the horizon (compacted away or before the base). */
  restorable: boolean;
}

/** The window of times a logdir can restore to, and what it holds. */
export interface Timeline {
  manifest: Manifest;
  /** Earliest restorable time. */
  earliestUs: number;
  /** Time of the last entry (or the horizon when the log is empty). */
  latestUs: number;
  /** First seq a restore applies on top of the base and levels. */
  applyFromSeq: number;
  /** Seq of the state at the horizon: restores never stop before it. */
  floorSeq: number;
  /** Seq of the last entry (applyFromSeq - 1 when empty). */
  lastSeq: number;
  entries: number;
  flushes: number;
  marks: MarkInfo[];
}

/** Where a restore stops. */
export interface RestorePoint {
  timeline: Timeline;
  /** Apply entries with seq in [applyFromSeq, targetSeq]. */
  targetSeq: number;
  /** The time the restored image represents. */
  targetUs: number;
  /** Time of the last entry applied (the horizon when none). */
  lastEntryUs: number;
  /** With `stopAtCorruption`: the corruption that ended the log early. */
  stoppedAtCorruption?: { message: string; path?: string; offsetBytes?: number };
}

/** Options of {@linkcode resolveRestorePoint}. */
export interface ResolveOptions {
  /** Round down to the last flush at or before the point (a filesystem-consistent state). */
  toFlush?: boolean;
  /** The present, for refusing times in the future (default: the wall clock). */
  nowUs?: number;
  /** Treat the first corrupt entry as the end of the log instead of failing. */
  stopAtCorruption?: boolean;
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
}

/** The first seq a restore applies after the base and levels. */
export function applyFromSeq(manifest: Manifest): number {
  const level = manifest.levels.at(-1);
  return Math.max(manifest.base.replayFromSeq, level === undefined ? 1 : level.cutSeq + 1);
}

interface ScanTarget {
  instantUs?: number;
  seq?: number;
  markName?: string;
}

interface ScanState {
  floorSeq: number;
  lastSeq: number;
  lastUs: number | undefined;
  entries: number;
  flushes: number;
  marks: MarkInfo[];
  atOrBefore: { seq: number; timeUs: number } | undefined;
  flushAtOrBefore: { seq: number; timeUs: number } | undefined;
  markHit: { seq: number; timeUs: number } | undefined;
}

/**
 * One pass over every header (and mark name) of the log: the window, counts, marks, and where a
 * restore to `target` stops.
 */
async function scan(
  logdir: string,
  manifest: Manifest,
  target: ScanTarget,
  onCorruption?: (error: IntegrityError) => void,
  storage?: Storage,
): Promise<ScanState> {
  const fromSeq = applyFromSeq(manifest);
  const horizonUs = manifest.horizonUs;
  const state: ScanState = {
    floorSeq: fromSeq - 1,
    lastSeq: fromSeq - 1,
    lastUs: undefined,
    entries: 0,
    flushes: 0,
    marks: [],
    atOrBefore: undefined,
    flushAtOrBefore: undefined,
    markHit: undefined,
  };
  const decoder = new TextDecoder();
  let lastFlush: { seq: number; timeUs: number } | undefined;
  let flushBeforeMark: { seq: number; timeUs: number } | undefined;
  await scanHeaders(logdir, manifest, (header, entry) => {
    state.entries++;
    state.lastSeq = header.seq;
    state.lastUs = header.timeUs;
    if (header.timeUs <= horizonUs) state.floorSeq = header.seq;
    const point = { seq: header.seq, timeUs: header.timeUs };
    if (header.kind === "flush") {
      state.flushes++;
      lastFlush = point;
    }
    if (header.kind === "mark") {
      const name = decoder.decode(entry.payload);
      if (state.marks.length < TIMELINE_MARKS_MAX) {
        state.marks.push({ name, seq: header.seq, timeUs: header.timeUs, restorable: false });
      }
      // The latest mark of a name is the one `mark:<name>` means.
      if (target.markName === name) {
        state.markHit = point;
        flushBeforeMark = lastFlush;
      }
    }
    const inTarget = target.instantUs !== undefined
      ? header.timeUs <= target.instantUs
      : target.seq !== undefined
      ? header.seq <= target.seq
      : target.markName === undefined;
    if (inTarget) {
      state.atOrBefore = point;
      if (header.kind === "flush") state.flushAtOrBefore = point;
    }
  }, { fromSeq, onCorruption, storage });
  if (target.markName !== undefined) {
    state.atOrBefore = state.markHit;
    state.flushAtOrBefore = flushBeforeMark;
  }
  for (const mark of state.marks) mark.restorable = mark.seq >= state.floorSeq;
  state.marks.unshift(...manifest.compactedMarks.map(compactedToInfo));
  return state;
}

/** Reads the manifest and scans every header once to describe the logdir's timeline. */
export async function readTimeline(
  logdir: string,
  storage: Storage = realStorage,
): Promise<Timeline> {
  const manifest = await readManifest(logdir, storage);
  return toTimeline(manifest, await scan(logdir, manifest, {}, undefined, storage));
}

function compactedToInfo(mark: CompactedMark): MarkInfo {
  return { ...mark, restorable: false };
}

function toTimeline(manifest: Manifest, state: ScanState): Timeline {
  return {
    manifest,
    earliestUs: manifest.horizonUs,
    latestUs: Math.max(state.lastUs ?? manifest.horizonUs, manifest.horizonUs),
    applyFromSeq: applyFromSeq(manifest),
    floorSeq: state.floorSeq,
    lastSeq: state.lastSeq,
    entries: state.entries,
    flushes: state.flushes,
    marks: state.marks,
  };
}

/** Describes the window for error messages, in UTC and local time. */
export function describeWindow(timeline: Timeline): string {
  return `restorable window is ${formatTimeUtc(timeline.earliestUs)} to ${
    formatTimeUtc(timeline.latestUs)
  } (local ${formatTimeLocal(timeline.earliestUs)} to ${formatTimeLocal(timeline.latestUs)})`;
}

/**
 * Turns a TIME into the seq where a restore stops, refusing times outside the window with a
 * {@linkcode UsageError} that prints the window.
 */
export async function resolveRestorePoint(
  logdir: string,
  spec: TimeSpec | undefined,
  options: ResolveOptions = {},
): Promise<RestorePoint> {
  const manifest = await readManifest(logdir, options.storage);
  const target: ScanTarget = spec === undefined
    ? {}
    : spec.kind === "instant"
    ? { instantUs: spec.timeUs }
    : spec.kind === "seq"
    ? { seq: spec.seq }
    : { markName: spec.name };
  let stoppedAtCorruption: RestorePoint["stoppedAtCorruption"];
  const onCorruption = options.stopAtCorruption === true
    ? (error: IntegrityError) => {
      stoppedAtCorruption = {
        message: error.message,
        path: error.path,
        offsetBytes: error.offsetBytes,
      };
    }
    : undefined;
  const state = await scan(logdir, manifest, target, onCorruption, options.storage);
  if (spec?.kind === "mark") {
    const hit = state.markHit;
    if (hit === undefined) {
      throw new UsageError(`Cannot restore to mark:${spec.name}: no mark of that name`, {
        hint: markHint(toTimeline(manifest, state)),
      });
    }
    if (hit.seq < state.floorSeq) {
      throw new UsageError(
        `Cannot restore to mark:${spec.name}: it was set at ${
          formatTimeUtc(hit.timeUs)
        }, before the earliest restorable time ${formatTimeUtc(manifest.horizonUs)}`,
        { hint: describeWindow(toTimeline(manifest, state)) },
      );
    }
  }
  const timeline = toTimeline(manifest, state);
  checkInWindow(spec, timeline, options.nowUs ?? nowUs());
  let point = state.atOrBefore;
  if (options.toFlush === true) {
    point = state.flushAtOrBefore;
    if (point === undefined || point.seq < timeline.floorSeq) {
      throw new UsageError(
        `Cannot restore to ${
          describeSpec(spec)
        } with --to-flush: no flush between the horizon and that point`,
        { hint: describeWindow(timeline) },
      );
    }
  }
  const targetSeq = Math.max(point?.seq ?? timeline.floorSeq, timeline.floorSeq);
  const lastEntryUs = point !== undefined && point.seq >= timeline.floorSeq
    ? point.timeUs
    : manifest.horizonUs;
  const targetUs = spec?.kind === "instant" && options.toFlush !== true
    ? spec.timeUs
    : Math.max(lastEntryUs, manifest.horizonUs);
  return { timeline, targetSeq, targetUs, lastEntryUs, stoppedAtCorruption };
}

function checkInWindow(spec: TimeSpec | undefined, timeline: Timeline, presentUs: number): void {
  if (spec === undefined) return;
  const window = describeWindow(timeline);
  if (spec.kind === "instant") {
    if (spec.timeUs < timeline.earliestUs) {
      throw new UsageError(
        `Cannot restore to ${formatTimeUtc(spec.timeUs)}: earliest restorable time is ${
          formatTimeUtc(timeline.earliestUs)
        }`,
        { hint: window },
      );
    }
    if (spec.timeUs > Math.max(presentUs, timeline.latestUs)) {
      throw new UsageError(
        `Cannot restore to ${formatTimeUtc(spec.timeUs)}: it is in the future`,
        { hint: window },
      );
    }
  } else if (spec.kind === "seq") {
    if (spec.seq < timeline.floorSeq || spec.seq > timeline.lastSeq) {
      throw new UsageError(
        `Cannot restore to seq:${spec.seq}: restorable seqs are ${timeline.floorSeq} to ${timeline.lastSeq}`,
        { hint: window },
      );
    }
  }
}

function describeSpec(spec: TimeSpec | undefined): string {
  if (spec === undefined) return "the latest state";
  if (spec.kind === "instant") return formatTimeUtc(spec.timeUs);
  if (spec.kind === "seq") return `seq:${spec.seq}`;
  return `mark:${spec.name}`;
}

function markHint(timeline: Timeline): string {
  const names = timeline.marks.filter((m) => m.restorable).map((m) => m.name);
  return names.length === 0
    ? "the logdir has no restorable marks"
    : `restorable marks: ${names.slice(-20).join(", ")}`;
}

/** One entry as `sectorlog log` lists it. */
export interface EntrySummary {
  seq: number;
  timeUs: number;
  kind: string;
  offsetBytes: number;
  lengthBytes: number;
  /** The mark's name, for marks. */
  name?: string;
}

/** Options of {@linkcode listEntries}. */
export interface ListEntriesOptions {
  /** Only entries at or after this time. */
  fromUs?: number;
  /** Only entries at or before this time. */
  toUs?: number;
}

/** Yields the logdir's entries (headers, and mark names) within a time range, in log order. */
export async function* listEntries(
  logdir: string,
  manifest: Manifest,
  options: ListEntriesOptions = {},
): AsyncGenerator<EntrySummary> {
  const decoder = new TextDecoder();
  const entries = readLogEntries(logdir, manifest, { fromSeq: 1, headersOnly: true });
  for await (const { header, payload } of entries) {
    if (options.fromUs !== undefined && header.timeUs < options.fromUs) continue;
    if (options.toUs !== undefined && header.timeUs > options.toUs) break;
    const summary: EntrySummary = {
      seq: header.seq,
      timeUs: header.timeUs,
      kind: header.kind,
      offsetBytes: header.offsetBytes,
      lengthBytes: header.lengthBytes,
    };
    if (header.kind === "mark") summary.name = decoder.decode(payload);
    yield summary;
  }
}
