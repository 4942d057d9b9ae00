/**
 * `sectorlog restore <logdir> <output> [--at TIME] [--to-flush]`: the image as of a time; with
 * `--in-place <device>`, the watched device itself put back to that time through the journal.
 */
import { Command } from "commander";
import { realpathSync } from "node:fs";
import { EXIT_INTEGRITY, UsageError } from "../lib/errors.ts";
import { restoreAt, type RestoreOptions, type RestoreResult } from "../lib/restore.ts";
import { restoreInPlace } from "../lib/restore_in_place.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import { restoreFromStore, type StoreRestoreResult } from "../lib/store/store_restore.ts";
import { parseTime, type TimeSpec } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, printJson, progressBar, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";

interface RestoreFlags extends S3Flags {
  at?: string;
  toFlush?: boolean;
  force?: boolean;
  stopAtCorruption?: boolean;
  json?: boolean;
  inPlace?: string;
  verify?: boolean;
}

/** Builds the `restore` command. */
export function restoreCommand(): Command {
  return withS3Options(new Command("restore"))
    .description("write the device image as it was at a time to a file or block device")
    .argument("<logdir>", "log directory to restore from, or s3://bucket/prefix")
    .argument(
      "[output]",
      "new file, existing file or block device (existing ones need --force); omit with --in-place",
    )
    .option("--at <time>", "ISO 8601, now, -15m, @<unix-seconds>, seq:<n> or mark:<name>", "now")
    .option("--to-flush", "round down to the last flush at or before TIME (filesystem-consistent)")
    .option("--force", "overwrite an existing file or block device")
    .option(
      "--stop-at-corruption",
      "restore the state just before the first corrupt entry instead of failing (exit 3 still)",
    )
    .option(
      "--in-place <device>",
      "put the watched device itself back to TIME (watch stopped): only differing blocks are written, journaled, then a mark restored-to:<time>",
    )
    .option(
      "--verify",
      "with --in-place: compare the whole device with the state at TIME afterwards",
    )
    .option("--json", "print a JSON summary on stdout")
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog restore /var/lib/sectorlog/vm1 /tmp/vm1.img --at '2026-11-24 02:13' --to-flush\n" +
        "  sectorlog restore /var/lib/sectorlog/vm1 /dev/loop4 --at mark:before-upgrade --force\n" +
        "  sectorlog restore /var/lib/sectorlog/vm1 --at mark:before-upgrade --in-place /dev/loop3\n" +
        "  sectorlog restore s3://backups/vm1 /tmp/vm1.img --at -2h --s3-endpoint http://127.0.0.1:8080\n",
    )
    .action(async (logdir: string, output: string | undefined, flags: RestoreFlags) => {
      const at = flags.at === undefined || flags.at === "now" ? undefined : parseTime(flags.at);
      if (flags.inPlace !== undefined) return await restoreInPlaceAction(logdir, output, at, flags);
      if (output === undefined) {
        throw new UsageError("Cannot restore: give an output file or block device", {
          hint: "or --in-place <device> to put the watched device itself back",
        });
      }
      const progress = progressBar("restore", flags.json !== true);
      const options = {
        at,
        toFlush: flags.toFlush,
        force: flags.force,
        stopAtCorruption: flags.stopAtCorruption,
        onProgress: (done: number, total: number) => progress.update(done, total),
      };
      let result: RestoreResult & Partial<StoreRestoreResult>;
      try {
        result = isS3Url(logdir)
          ? await restoreFromS3(logdir, output, flags, options)
          : await restoreAt(logdir, output, options);
      } finally {
        progress.stop();
      }
      if (result.stoppedAtCorruption !== undefined) {
        // The image is usable but older than asked for: say so loudly and exit 3.
        Deno.exitCode = EXIT_INTEGRITY;
        say(`sectorlog: warning: ${result.stoppedAtCorruption.message}`);
        say(
          `sectorlog: warning: restored only up to seq ${result.targetSeq} (${
            formatTimeBoth(result.targetUs)
          }), the last entry before the corruption`,
        );
      }
      if (flags.json === true) {
        printJson({ command: "restore", ...result });
        return;
      }
      say(
        `restored ${output} (${formatBytes(result.deviceBytes)}) as of ${
          formatTimeBoth(result.targetUs)
        }: ${result.entriesApplied} entries applied up to seq ${result.targetSeq} in ${result.durationMs} ms`,
      );
      if (result.bytesDownloaded !== undefined) {
        say(
          `downloaded ${result.objectsDownloaded} objects (${
            formatBytes(result.bytesDownloaded)
          }): ${result.segmentsFetched} of ${result.segmentsListed} segments`,
        );
      }
    });
}

/**
 * A restore from an `s3://` logdir: only the levels and segments the point needs are fetched
 * (parallel ranged GETs), and the base object is streamed straight into the output (see
 * lib/store/store_restore.ts).
 */
async function restoreFromS3(
  url: string,
  output: string,
  flags: RestoreFlags,
  options: RestoreOptions,
): ReturnType<typeof restoreFromStore> {
  const source = await openStoreLogdir(url, flags, "<logdir>");
  try {
    return await restoreFromStore(source, output, options);
  } finally {
    source.store.close();
  }
}

/** `restore --in-place <device>`: the output argument, when given, must name the same device. */
async function restoreInPlaceAction(
  logdir: string,
  output: string | undefined,
  at: TimeSpec | undefined,
  flags: RestoreFlags,
): Promise<void> {
  const device = flags.inPlace!;
  if (isS3Url(logdir)) {
    throw new UsageError(
      `Cannot restore ${logdir} --in-place: the journal must be a local logdir`,
      {
        hint: `restore to a file first: sectorlog restore ${logdir} <output> --at TIME`,
      },
    );
  }
  if (output !== undefined && !samePath(output, device)) {
    throw new UsageError(
      `Cannot restore to ${output} and --in-place ${device} at once: give the device once`,
      { hint: `sectorlog restore ${logdir} --at TIME --in-place ${device}` },
    );
  }
  if (flags.stopAtCorruption === true) {
    throw new UsageError("Cannot use --stop-at-corruption with --in-place", {
      hint: "restore to a file with --stop-at-corruption first and look at it",
    });
  }
  const progress = progressBar("restore in place", flags.json !== true);
  let result;
  try {
    result = await restoreInPlace(logdir, device, {
      at,
      toFlush: flags.toFlush,
      verify: flags.verify,
      onProgress: (done, total) => progress.update(done, total),
    });
  } finally {
    progress.stop();
  }
  const undo = `sectorlog restore ${logdir} --at seq:${result.beforeSeq} --in-place ${device}`;
  if (flags.json === true) {
    printJson({ command: "restore", inPlace: true, ...result, undo });
    return;
  }
  say(
    `restored ${device} in place to ${
      formatTimeBoth(result.targetUs)
    } (seq ${result.targetSeq}): wrote ${result.rangesWritten} ranges (${
      formatBytes(result.bytesWritten)
    }) of the ${result.candidateRanges} ranges (${
      formatBytes(result.candidateBytes)
    }) written since, journaled; mark ${result.mark.name} at seq ${result.mark.seq}${
      result.verifiedBytes === undefined ? "" : "; whole device verified"
    }`,
  );
  say(`undo with: ${undo}`);
}

function samePath(a: string, b: string): boolean {
  try {
    return realpathSync(a) === realpathSync(b);
  } catch {
    return a === b;
  }
}
