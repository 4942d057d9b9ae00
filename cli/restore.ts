/** `sectorlog restore <logdir> <output> [--at TIME] [--to-flush]`: the image as of a time. */
import { Command } from "commander";
import { EXIT_INTEGRITY } from "../lib/errors.ts";
import { restoreAt } from "../lib/restore.ts";
import { parseTime } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, printJson, progressBar, say } from "./_output.ts";

interface RestoreFlags {
  at?: string;
  toFlush?: boolean;
  force?: boolean;
  stopAtCorruption?: boolean;
  json?: boolean;
}

/** Builds the `restore` command. */
export function restoreCommand(): Command {
  return new Command("restore")
    .description("write the device image as it was at a time to a file or block device")
    .argument("<logdir>", "log directory to restore from")
    .argument("<output>", "new file, existing file or block device (existing ones need --force)")
    .option("--at <time>", "ISO 8601, now, -15m, @<unix-seconds>, seq:<n> or mark:<name>", "now")
    .option("--to-flush", "round down to the last flush at or before TIME (filesystem-consistent)")
    .option("--force", "overwrite an existing file or block device")
    .option(
      "--stop-at-corruption",
      "restore the state just before the first corrupt entry instead of failing (exit 3 still)",
    )
    .option("--json", "print a JSON summary on stdout")
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog restore /var/lib/sectorlog/vm1 /tmp/vm1.img --at '2026-11-24 02:13' --to-flush\n" +
        "  sectorlog restore /var/lib/sectorlog/vm1 /dev/loop4 --at mark:before-upgrade --force\n",
    )
    .action(async (logdir: string, output: string, flags: RestoreFlags) => {
      const at = flags.at === undefined || flags.at === "now" ? undefined : parseTime(flags.at);
      const progress = progressBar("restore", flags.json !== true);
      let result;
      try {
        result = await restoreAt(logdir, output, {
          at,
          toFlush: flags.toFlush,
          force: flags.force,
          stopAtCorruption: flags.stopAtCorruption,
          onProgress: (done, total) => progress.update(done, total),
        });
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
    });
}
