/** `sectorlog diff <logdir> --from TIME [--to TIME] [--json]`: byte ranges changed in a window. */
import { Command } from "commander";
import { diffLogdir } from "../lib/diff.ts";
import { formatTimeUtc, parseTime } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, print, printJson, say } from "./_output.ts";

interface DiffFlags {
  from: string;
  to: string;
  json?: boolean;
}

/** Builds the `diff` command. */
export function diffCommand(): Command {
  return new Command("diff")
    .description(
      "list the byte ranges of the device that were written between two times (from the log; no data compared)",
    )
    .argument("<logdir>", "log directory")
    .requiredOption(
      "--from <time>",
      "the earlier point: ISO 8601, -15m, @<unix-seconds>, seq:<n> or mark:<name>",
    )
    .option("--to <time>", "the later point (default: the latest state)", "now")
    .option("--json", "print a JSON summary with every range on stdout")
    .addHelpText(
      "after",
      "\nA range counts as changed when a write, write-zeroes or trim after --from and at or\n" +
        "before --to covered it, even if it wrote the bytes it already held.\n" +
        "\nExamples:\n  sectorlog diff /var/lib/sectorlog/vm1 --from '2026-11-24 02:00' --to '2026-11-24 02:30'\n" +
        "  sectorlog diff /var/lib/sectorlog/vm1 --from mark:before-upgrade --json\n",
    )
    .action(async (logdir: string, flags: DiffFlags) => {
      const from = parseTime(flags.from);
      const to = flags.to === "now" ? undefined : parseTime(flags.to);
      const diff = await diffLogdir(logdir, { from, to });
      if (flags.json === true) {
        printJson({
          command: "diff",
          ...diff,
          from: { ...diff.from, time: formatTimeUtc(diff.from.targetUs) },
          to: { ...diff.to, time: formatTimeUtc(diff.to.targetUs) },
          rangeCount: diff.ranges.length,
          ranges: diff.ranges.map((range) => ({
            ...range,
            lastChange: formatTimeUtc(range.lastChangeUs),
          })),
        });
        return;
      }
      say(
        `diff of ${logdir} from ${
          formatTimeBoth(diff.from.targetUs)
        } (seq ${diff.from.targetSeq}) to ${
          formatTimeBoth(diff.to.targetUs)
        } (seq ${diff.to.targetSeq}): ${diff.writes} writes, ${diff.zeroes} zeroes, ${diff.trims} trims changed ${diff.ranges.length} ranges, ${
          formatBytes(diff.changedBytes)
        } (${diff.changedBytes} bytes)`,
      );
      if (diff.ranges.length === 0) return;
      print("offset_bytes length_bytes last_change");
      for (const range of diff.ranges) {
        print(`${range.offsetBytes} ${range.lengthBytes} ${formatTimeUtc(range.lastChangeUs)}`);
      }
    });
}
