/** `sectorlog log <logdir>`: the restorable window, marks, flushes and entries. */
import { Command } from "commander";
import { UsageError } from "../lib/errors.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import { withLocalCopy } from "../lib/store/store_copy.ts";
import { listEntries, readTimeline } from "../lib/timeline.ts";
import { formatTimeUtc, parseTime } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, print, printJson } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";

interface LogFlags extends S3Flags {
  from?: string;
  to?: string;
  summary?: boolean;
  json?: boolean;
}

/** Builds the `log` command. */
export function logCommand(): Command {
  return withS3Options(new Command("log"))
    .description("show the restorable window, marks, flushes and entries of a logdir")
    .argument("<logdir>", "log directory, or s3://bucket/prefix")
    .option("--from <time>", "list entries at or after this time")
    .option("--to <time>", "list entries at or before this time")
    .option("--summary", "print the window and marks only, no entries")
    .option("--json", "print JSON on stdout")
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog log /var/lib/sectorlog/vm1 --summary\n" +
        "  sectorlog log /var/lib/sectorlog/vm1 --from -1h --json\n",
    )
    .action(async (logdir: string, flags: LogFlags) => {
      const fromUs = instantOption(flags.from, "--from");
      const toUs = instantOption(flags.to, "--to");
      if (!isS3Url(logdir)) return await showLog(logdir, logdir, { ...flags, fromUs, toUs });
      const source = await openStoreLogdir(logdir, flags, "<logdir>");
      try {
        await withLocalCopy(
          source,
          { kind: "all" },
          (copy) => showLog(copy.logdir, logdir, { ...flags, fromUs, toUs }),
        );
      } finally {
        source.store.close();
      }
    });
}

/** Prints the log of the logdir at `path`, calling it `logdir` (an s3:// logdir is a copy). */
async function showLog(
  path: string,
  logdir: string,
  flags: LogFlags & { fromUs?: number; toUs?: number },
): Promise<void> {
  const { fromUs, toUs } = flags;
  const timeline = await readTimeline(path);
  const m = timeline.manifest;
  const window = {
    earliestUs: timeline.earliestUs,
    latestUs: timeline.latestUs,
    earliest: formatTimeUtc(timeline.earliestUs),
    latest: formatTimeUtc(timeline.latestUs),
  };
  const entries = flags.summary === true ? [] : listEntries(path, m, { fromUs, toUs });
  if (flags.json === true) {
    const listed = [];
    for await (const entry of entries) {
      listed.push({ ...entry, time: formatTimeUtc(entry.timeUs) });
    }
    printJson({
      logdir,
      logdirId: m.logdirId,
      hostId: m.hostId,
      deviceBytes: m.deviceBytes,
      window,
      firstSeq: timeline.applyFromSeq,
      lastSeq: timeline.lastSeq,
      entryCount: timeline.entries,
      flushCount: timeline.flushes,
      segments: m.segments.length,
      levels: m.levels.length,
      marks: timeline.marks.map((mark) => ({ ...mark, time: formatTimeUtc(mark.timeUs) })),
      entries: flags.summary === true ? undefined : listed,
    });
    return;
  }
  print(`logdir   ${logdir} (host ${m.hostId}, device ${formatBytes(m.deviceBytes)})`);
  print(`earliest ${formatTimeBoth(timeline.earliestUs)}`);
  print(`latest   ${formatTimeBoth(timeline.latestUs)}`);
  print(
    `entries  ${timeline.entries} (seq ${timeline.applyFromSeq}..${timeline.lastSeq}), ${timeline.flushes} flushes, ${m.segments.length} sealed segments, ${m.levels.length} levels`,
  );
  print(timeline.marks.length === 0 ? "marks    none" : `marks    ${timeline.marks.length}`);
  for (const mark of timeline.marks) {
    const note = mark.restorable ? "" : "  (no longer restorable)";
    print(`  seq ${mark.seq}  ${formatTimeUtc(mark.timeUs)}  ${mark.name}${note}`);
  }
  if (flags.summary === true) return;
  print("SEQ\tTIME (UTC)\tKIND\tOFFSET\tLENGTH\tNAME");
  for await (const e of entries) {
    print(
      `${e.seq}\t${formatTimeUtc(e.timeUs)}\t${e.kind}\t${e.offsetBytes}\t${e.lengthBytes}\t${
        e.name ?? ""
      }`,
    );
  }
}

function instantOption(text: string | undefined, option: string): number | undefined {
  if (text === undefined) return undefined;
  const spec = parseTime(text);
  if (spec.kind !== "instant") {
    throw new UsageError(
      `Invalid ${option} ${JSON.stringify(text)}: give a time, not ${spec.kind}:`,
    );
  }
  return spec.timeUs;
}
