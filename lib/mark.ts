/**
 * Marks: named points in time. Appended directly when no writer holds the logdir, or through
 * the control socket of the `watch` that does.
 *
 * @module
 */
import { encodeMarkName } from "./disk.ts";
import { BusyError } from "./errors.ts";
import { LogdirWriter, type LogdirWriterOptions } from "./format/logdir_writer.ts";
import { requestMark } from "./control.ts";
import type { Storage } from "./storage/storage.ts";

/** Options of {@linkcode addMark}. */
export interface MarkOptions {
  /** Where the logdir lives (default: the local filesystem). */
  storage?: Storage;
  /** Wall clock in µs (tests inject one). */
  clock?: () => number;
  /** Called after the mark is appended (see {@linkcode LogdirWriterOptions.onAppend}). */
  onAppend?: LogdirWriterOptions["onAppend"];
  /**
   * How to reach the writer that holds the logdir (a running `watch`); undefined when none
   * listens. Default: its control socket.
   */
  requestMark?: typeof requestMark;
}

/** Where a mark landed. */
export interface MarkResult {
  name: string;
  seq: number;
  timeUs: number;
  /** "logdir" when appended directly, "watch" when through the running writer. */
  via: "logdir" | "watch";
}

/**
 * Appends mark `name` to `logdir` and makes it durable. Opened offline, the writer recovers the
 * logdir like any other and leaves the replay a stopped `watch` still owes to it.
 *
 * @example
 * ```ts
 * import { addMark } from "./mark.ts";
 * await addMark("/var/lib/sectorlog/vm1", "before-upgrade");
 * ```
 */
export async function addMark(
  logdir: string,
  name: string,
  options: MarkOptions = {},
): Promise<MarkResult> {
  const payload = encodeMarkName(name);
  let writer: LogdirWriter;
  try {
    writer = await LogdirWriter.open(logdir, {
      purpose: "mark",
      storage: options.storage,
      clock: options.clock,
      onAppend: options.onAppend,
    });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    const viaWatch = await (options.requestMark ?? requestMark)(logdir, name);
    if (viaWatch === undefined) throw error;
    return { ...viaWatch, via: "watch" };
  }
  try {
    await writer.ready();
    const header = writer.appendSync("mark", 0, 0, payload);
    await writer.sync();
    return { name, seq: header.seq, timeUs: header.timeUs, via: "logdir" };
  } finally {
    await writer.close();
  }
}
