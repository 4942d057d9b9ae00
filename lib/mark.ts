/**
 * Marks: named points in time. Appended directly when no writer holds the logdir, or through
 * the control socket of the `watch` that does.
 *
 * @module
 */
import { encodeMarkName } from "./disk.ts";
import { BusyError } from "./errors.ts";
import { LogdirWriter } from "./format/logdir_writer.ts";
import { requestMark } from "./control.ts";

/** Where a mark landed. */
export interface MarkResult {
  name: string;
  seq: number;
  timeUs: number;
  /** "logdir" when appended directly, "watch" when through the running writer. */
  via: "logdir" | "watch";
}

/**
 * Appends mark `name` to `logdir` and makes it durable.
 *
 * @example
 * ```ts
 * import { addMark } from "./mark.ts";
 * await addMark("/var/lib/sectorlog/vm1", "before-upgrade");
 * ```
 */
export async function addMark(logdir: string, name: string): Promise<MarkResult> {
  const payload = encodeMarkName(name);
  let writer: LogdirWriter;
  try {
    writer = await LogdirWriter.open(logdir, { purpose: "mark" });
  } catch (error) {
    if (!(error instanceof BusyError)) throw error;
    const viaWatch = await requestMark(logdir, name);
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
