/**
 * `sectorlog compact <logdir> (--keep DURATION | --before TIME)`: fold history older than a cut
 * into the compacted level; every point in time after the cut stays restorable.
 */
import { Command } from "commander";
import { COMPACT_STEPS, type CompactResult, type CompactStep } from "../lib/compact.ts";
import { compactLogdir } from "../lib/compact.ts";
import { UsageError } from "../lib/errors.ts";
import { formatTimeUtc, nowUs, parseDuration, parseTime } from "../lib/time.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import type { StoreCompactResult } from "../lib/store/store_compact.ts";
import { formatBytes, formatTimeBoth, printJson, progressBar, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";

/** Environment variable of the crash-test hook: a step name or its 1-based number. */
export const COMPACT_CRASH_ENV = "SECTORLOG_COMPACT_CRASH_AFTER";

interface CompactFlags extends S3Flags {
  keep?: string;
  grace?: string;
  before?: string;
  maxBytes?: string;
  keepMarks?: boolean;
  dryRun?: boolean;
  json?: boolean;
  verbose?: boolean;
}

/** Builds the `compact` command. */
export function compactCommand(): Command {
  const command = new Command("compact")
    .description(
      "fold history before a cut into one compacted level (keeps every point in time after it)",
    )
    .argument(
      "<logdir>",
      "log directory (works while watch or receive appends to it), or s3://bucket/prefix",
    )
    .option(
      "--keep <duration>",
      "keep the last DURATION restorable (90s, 15m, 36h, 7d; 0 = latest)",
    )
    .option("--before <time>", "fold everything at or before TIME (ISO 8601, -7d, @<unix-seconds>)")
    .option("--max-bytes <size>", "if still larger than SIZE (10G, 500MiB), move the cut forward")
    .option("--keep-marks", "keep marks restorable: cut just before the earliest one it would lose")
    .option("--dry-run", "show what would be folded and reclaimed; change nothing")
    .option(
      "--grace <duration>",
      "s3:// only: delete folded objects this long after they were retired, so running restores finish (default 1h)",
    )
    .option("--json", "print a JSON summary on stdout")
    .option("--verbose", "print a summary on stderr (quiet on success otherwise)")
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog compact /var/lib/sectorlog/vm1 --keep 7d            # nightly from cron\n" +
        "  sectorlog compact /var/lib/sectorlog/vm1 --keep 0 --dry-run --verbose\n" +
        "  sectorlog compact /srv/store/host1 --keep 30d --max-bytes 200G --keep-marks --json\n" +
        "  sectorlog compact s3://backups/vm1 --keep 7d --s3-endpoint http://127.0.0.1:8080\n",
    )
    .action(async (logdir: string, flags: CompactFlags) => {
      const presentUs = nowUs();
      const cutUs = cutOption(flags, presentUs);
      const maxBytes = flags.maxBytes === undefined ? undefined : parseSize(flags.maxBytes);
      if (isS3Url(logdir)) return await compactStoreCommand(logdir, cutUs, presentUs, flags);
      if (flags.grace !== undefined) {
        throw new UsageError("Cannot use --grace with a local logdir: it is for s3:// logdirs", {
          hint: "a local compaction removes folded files at once",
        });
      }
      const crashAfter = crashStep();
      const progress = progressBar("compact", flags.json !== true);
      let result: CompactResult;
      try {
        result = await compactLogdir(logdir, {
          cutUs,
          maxBytes,
          keepMarks: flags.keepMarks,
          dryRun: flags.dryRun,
          nowUs: presentUs,
          onProgress: (done, total) => progress.update(done, total),
          onStep: (step) => {
            if (step === crashAfter) Deno.kill(Deno.pid, "SIGKILL");
          },
        });
      } finally {
        progress.stop();
      }
      for (const warning of result.warnings) say(`sectorlog compact: warning: ${warning}`);
      if (flags.json === true) printJson({ command: "compact", ...result });
      else if (flags.verbose === true || flags.dryRun === true) describe(result);
    });
  return withS3Options(command);
}

/** `compact s3://bucket/prefix`: the fold runs on a temporary copy of what it needs. */
async function compactStoreCommand(
  url: string,
  cutUs: number,
  presentUs: number,
  flags: CompactFlags,
): Promise<void> {
  if (flags.maxBytes !== undefined) {
    throw new UsageError("Cannot use --max-bytes with an s3:// logdir", {
      hint: "give the cut with --keep or --before",
    });
  }
  const graceMs = flags.grace === undefined ? undefined : parseDuration(flags.grace) / 1000;
  const source = await openStoreLogdir(url, flags, "<logdir>");
  const { compactStore } = await import("../lib/store/store_compact.ts");
  const progress = progressBar("compact", flags.json !== true);
  let result: StoreCompactResult;
  try {
    result = await compactStore(source, {
      cutUs,
      keepMarks: flags.keepMarks,
      dryRun: flags.dryRun,
      nowUs: presentUs,
      graceMs,
      onProgress: (done, total) => progress.update(done, total),
      onRetry: ({ what, error, delayMs }) =>
        say(`sectorlog compact: ${error.message}; retrying ${what} in ${delayMs / 1000}s`),
    });
  } finally {
    progress.stop();
    source.store.close();
  }
  for (const warning of result.warnings) say(`sectorlog compact: warning: ${warning}`);
  if (flags.json === true) printJson({ command: "compact", ...result });
  else if (flags.verbose === true || flags.dryRun === true) {
    describe(result);
    const store = result.store;
    say(
      `store: ${store.objectsDownloaded} objects fetched (${
        formatBytes(store.bytesDownloaded)
      }), ${store.objectsUploaded} uploaded (${
        formatBytes(store.bytesUploaded)
      }), ${store.objectsRetired} retired; ${store.sweep.objectsDeleted} deleted after ${
        store.graceMs / 1000
      }s grace, ${store.sweep.orphansDeleted} orphans deleted, ${store.sweep.recordsWaiting} retire records still waiting`,
    );
  }
}

function cutOption(flags: CompactFlags, presentUs: number): number {
  if ((flags.keep === undefined) === (flags.before === undefined)) {
    throw new UsageError("Cannot compact: give exactly one of --keep DURATION or --before TIME", {
      hint: "e.g. --keep 7d keeps every point in time of the last 7 days",
    });
  }
  if (flags.keep !== undefined) return presentUs - parseDuration(flags.keep);
  const spec = parseTime(flags.before!, { nowUs: presentUs });
  if (spec.kind !== "instant") {
    throw new UsageError(
      `Invalid --before ${JSON.stringify(flags.before)}: give a time, not ${spec.kind}:`,
    );
  }
  return spec.timeUs;
}

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1024,
  kib: 1024,
  kb: 1000,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  mb: 1000 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  gb: 1000 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  tb: 1000 ** 4,
};

/** Parses a SIZE: bytes, or a number with K/M/G/T (binary, also KiB…) or KB/MB/GB/TB (decimal). */
export function parseSize(text: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$/.exec(text.trim());
  const unit = match === null ? undefined : SIZE_UNITS[match[2].toLowerCase()];
  const bytes = match === null || unit === undefined ? NaN : Math.floor(Number(match[1]) * unit);
  if (!Number.isSafeInteger(bytes)) {
    throw new UsageError(
      `Invalid --max-bytes ${JSON.stringify(text)}: expected a size such as 500MiB, 10G or 2TB`,
    );
  }
  return bytes;
}

/** The step named by the crash-test hook's environment variable, if set. */
function crashStep(): CompactStep | undefined {
  const value = Deno.env.get(COMPACT_CRASH_ENV);
  if (value === undefined || value === "") return undefined;
  const byNumber = /^\d+$/.test(value) ? COMPACT_STEPS[Number(value) - 1] : undefined;
  const step = byNumber ?? COMPACT_STEPS.find((name) => name === value);
  if (step === undefined) {
    throw new UsageError(
      `Invalid ${COMPACT_CRASH_ENV} ${
        JSON.stringify(value)
      }: expected 1 to ${COMPACT_STEPS.length} or one of ${COMPACT_STEPS.join(", ")}`,
    );
  }
  return step;
}

function describe(result: CompactResult): void {
  const prefix = result.dryRun ? "dry run: would " : "";
  if (!result.changed) {
    say(
      `${prefix}${result.dryRun ? "do" : "did"} nothing: nothing to fold before ${
        formatTimeUtc(result.cutUs)
      }; horizon stays at ${formatTimeBoth(result.horizonUs)}`,
    );
  } else {
    say(
      `${prefix}${
        result.dryRun ? "fold" : "folded"
      } ${result.foldedEntries} entries up to seq ${result.cutSeq} into a level of ${result.levelEntries} entries (${
        formatBytes(result.levelBytes)
      }); ${result.entriesBefore} → ${result.entriesAfter} entries, ${
        formatBytes(result.bytesBefore)
      } → ${formatBytes(result.bytesAfter)} (${formatBytes(result.reclaimedBytes)} reclaimed)`,
    );
    say(
      `restorable from ${formatTimeBoth(result.horizonUs)} (was ${
        formatTimeUtc(result.previousHorizonUs)
      })`,
    );
  }
  if (result.sealNote !== undefined) say(`note: ${result.sealNote}`);
  for (const mark of result.compactedMarks) {
    say(
      `mark ${JSON.stringify(mark.name)} (${formatTimeUtc(mark.timeUs)}) is no longer restorable`,
    );
  }
  const keep = result.keepMarks;
  if (keep !== undefined) {
    say(
      `--keep-marks kept ${keep.marks.join(", ")} restorable: cut at ${
        formatTimeUtc(result.cutUs)
      } instead of ${formatTimeUtc(keep.cutWithoutUs)}` +
        (keep.costBytes === undefined ? "" : `, keeping ${formatBytes(keep.costBytes)} more`),
    );
  }
  if (result.removedLeftovers.length > 0) {
    say(`removed ${result.removedLeftovers.length} files left by an interrupted compaction`);
  }
}
