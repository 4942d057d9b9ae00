/** `sectorlog verify <logdir>`: checksums, sequence, torn tails. Exit 3 on a problem. */
import { Command } from "commander";
import { EXIT_INTEGRITY } from "../lib/errors.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { formatBytes, printJson, progressBar, say } from "./_output.ts";

/** Builds the `verify` command. */
export function verifyCommand(): Command {
  return new Command("verify")
    .description("check the base snapshot, every entry's checksums, seq continuity and time order")
    .argument("<logdir>", "log directory")
    .option("--json", "print a JSON summary on stdout")
    .addHelpText("after", "\nExample:\n  sectorlog verify /var/lib/sectorlog/vm1 || alert-admin\n")
    .action(async (logdir: string, flags: { json?: boolean }) => {
      const progress = progressBar("verify", flags.json !== true);
      let result;
      try {
        result = await verifyLogdir(logdir, { onProgress: (d, t) => progress.update(d, t) });
      } finally {
        progress.stop();
      }
      if (!result.ok) Deno.exitCode = EXIT_INTEGRITY;
      if (flags.json === true) {
        printJson({ command: "verify", logdir, ...result });
        return;
      }
      for (const problem of result.problems) {
        say(`sectorlog: ${problem.message}`);
      }
      if (result.tornTail !== undefined) {
        const t = result.tornTail;
        say(
          `note: ${t.path} ends in a torn tail of ${t.bytes} bytes at offset ${t.offsetBytes} (${t.problem}); the next writer truncates it`,
        );
      }
      const summary =
        `${result.entries} entries (seq ${result.firstSeq}..${result.lastSeq}) in ${result.segments} segments, ${result.levels} levels, ${
          formatBytes(result.bytesChecked)
        } checked`;
      say(
        result.ok ? `ok: ${summary}` : `FAILED: ${result.problems.length} problem(s); ${summary}`,
      );
    });
}
