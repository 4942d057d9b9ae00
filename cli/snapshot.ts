/** `sectorlog snapshot <device> <logdir>`: the base copy taken before any write is logged. */
import { Command } from "commander";
import { takeSnapshot } from "../lib/snapshot.ts";
import { formatBytes, formatTimeBoth, printJson, progressBar, say } from "./_output.ts";

interface SnapshotFlags {
  force?: boolean;
  refresh?: boolean;
  hostId?: string;
  json?: boolean;
}

/** Builds the `snapshot` command. */
export function snapshotCommand(): Command {
  return new Command("snapshot")
    .description("copy a device into a new logdir as its base snapshot (holes stay holes)")
    .argument("<device>", "block device or image file to copy")
    .argument("<logdir>", "log directory to create (or to re-base with --force)")
    .option("--refresh", "take a new base of a logdir that has one, also while watch runs")
    .option("--force", "replace an existing base (same as --refresh)")
    .option("--host-id <id>", "host id recorded in a new logdir (default: hostname)")
    .option("--json", "print a JSON summary on stdout")
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog snapshot /dev/loop3 /var/lib/sectorlog/vm1\n" +
        "  sectorlog snapshot --refresh /dev/loop3 /var/lib/sectorlog/vm1   # online, while watch runs\n",
    )
    .action(async (device: string, logdir: string, flags: SnapshotFlags) => {
      const progress = progressBar("snapshot", flags.json !== true);
      let result;
      try {
        result = await takeSnapshot(device, logdir, {
          force: flags.force,
          refresh: flags.refresh,
          hostId: flags.hostId,
          onProgress: (done, total) => progress.update(done, total),
        });
      } finally {
        progress.stop();
      }
      if (flags.json === true) {
        printJson({ command: "snapshot", ...result });
        return;
      }
      say(
        `snapshot of ${device} (${formatBytes(result.deviceBytes)}, ${
          formatBytes(result.dataBytes)
        } of data) in ${logdir}: restorable from ${
          formatTimeBoth(result.endedUs)
        }, crc32c ${result.crc32c}`,
      );
    });
}
